import numpy as np
import pytest
import torch


@pytest.fixture(params=["numpy", "numba"])
def backend(request):
    return request.param


def make_classification(n, d, classes, seed=0, gaps=False, dtype=np.float64):
    """Features with class signal in a few directions; ``gaps`` relabels classes to 0, 3, 6, ..."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    F = rng.standard_normal((n, d))
    F[:, : min(classes, d)] += 1.5 * np.eye(classes)[y][:, : min(classes, d)]
    if gaps:
        y = y * 3
    return F.astype(dtype), y


@pytest.fixture
def one_thread():
    """Tiny models train fastest on one thread; two threads on a busy 2-core box are ~100x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def separable(n=48, classes=3, size=16, seed=0):
    """Images whose class is the channel that is bright: trivially separable."""
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = 0.3 * torch.randn(n, 3, size, size, generator=g)
    x[torch.arange(n), y] += 1.5
    return TensorDataset(x, y)


def vectors(n=48, d=8, classes=3, seed=0):
    """Vectors whose class is the coordinate that is large: trivially separable."""
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = torch.randn(n, d, generator=g)
    x[torch.arange(n), y] += 3.0
    return TensorDataset(x, y)


def tiny_timm(num_classes=10, seed=0, size=32):
    """A seeded random-init timm ``test_resnet`` whose data config says ``size`` px and no crop."""
    import timm

    torch.manual_seed(seed)
    return timm.create_model("test_resnet", num_classes=num_classes,
                             pretrained_cfg_overlay={"input_size": (3, size, size), "crop_pct": 1.0})


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """:func:`tiny_timm` in timm's folder format (model.safetensors + config.json), for ``local-dir:`` specs."""
    from hubtune.tuning import save_timm_folder

    d = tmp_path_factory.mktemp("tiny-model")
    save_timm_folder(tiny_timm(), d)
    return d
