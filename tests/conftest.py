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
