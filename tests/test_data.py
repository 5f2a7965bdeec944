"""hubtune.data: every dataset kind, fingerprints, stratified subsampling, the model transform, errors."""
import gzip
import pickle
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from hubtune.data import (
    DATASETS, ImageDataset, create_dataset, list_datasets, read_idx, register_dataset, stratified_subsample,
    transform_for,
)
from hubtune.data import sources
from hubtune.data.dataset import ArrayDataset
from hubtune.errors import DatasetNotFoundError, EmptyInputError, InputError

TIMM_CONFIG = {"input_size": (3, 224, 224), "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
               "interpolation": "bicubic", "crop_pct": 0.875, "crop_mode": "center"}


@pytest.fixture(autouse=True)
def isolated_data_dir(tmp_path, monkeypatch):
    """No test reads the user's default data folder."""
    monkeypatch.setenv("HUBTUNE_DATA_DIR", str(tmp_path / "default-data-dir"))


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img)


# -- digits ---------------------------------------------------------------------------------------------------
def test_digits_split_is_stratified_80_20_and_covers_everything():
    from sklearn.datasets import load_digits

    d = load_digits()
    train, test = create_dataset("digits"), create_dataset("digits", split="test")
    assert (train.name, test.name) == ("digits:train", "digits:test")
    assert len(train) + len(test) == 1797 and (len(train), len(test)) == (1438, 359)
    counts = np.bincount(d.target, minlength=10)
    assert np.array_equal(np.bincount(test.labels, minlength=10), np.round(0.2 * counts).astype(int))
    assert train.num_classes == test.num_classes == 10 and train.classes == [str(i) for i in range(10)]
    assert train.labels.dtype == np.int64
    # the two splits hold exactly the scikit-learn images, scaled 0..16 -> 0..255, with their labels
    expected = np.rint(d.images * 255 / 16).astype(np.uint8).reshape(1797, 64)
    got = np.concatenate([train.images, test.images]).reshape(1797, 64)
    rows = lambda a, y: sorted(map(bytes, np.column_stack([a, y]).astype(np.uint8)))  # noqa: E731
    assert rows(got, np.concatenate([train.labels, test.labels])) == rows(expected, d.target)
    img = train.image(0)
    assert img.mode == "L" and img.size == (8, 8)
    assert set(np.unique(pixels(img))) <= {round(v * 255 / 16) for v in range(17)}
    assert (train.images.min(), train.images.max()) == (0, 255)
    image, label = train[0]
    assert pixels(image).tobytes() == pixels(img).tobytes() and label == train.labels[0]


def test_digits_fingerprint_is_stable_and_tells_splits_apart():
    a, b, t = create_dataset("digits"), create_dataset("digits"), create_dataset("digits", split="test")
    assert a.fingerprint == b.fingerprint and len(a.fingerprint) == 64
    int(a.fingerprint, 16)
    assert a.fingerprint != t.fingerprint


# -- fashion-mnist --------------------------------------------------------------------------------------------
def write_idx(path, arr: np.ndarray, gz: bool):
    codes = {np.dtype("u1"): 0x08, np.dtype(">i4"): 0x0C}
    arr = arr.astype(arr.dtype.newbyteorder(">") if arr.dtype.itemsize > 1 else arr.dtype)
    head = bytes([0, 0, codes[arr.dtype], arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    data = head + arr.tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


@pytest.fixture
def no_debian_fashion(monkeypatch, tmp_path):
    monkeypatch.setattr(sources, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "no-debian")


@pytest.mark.parametrize("gz", [False, True])
def test_fashion_mnist_reads_tiny_idx_files(tmp_path, gz, no_debian_fashion):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 4, 3), dtype=np.uint8)
    labels = np.array([3, 0, 9, 3, 1], dtype=np.uint8)
    sfx = ".gz" if gz else ""
    write_idx(tmp_path / f"t10k-images-idx3-ubyte{sfx}", images, gz)
    write_idx(tmp_path / f"t10k-labels-idx1-ubyte{sfx}", labels, gz)
    ds = create_dataset("fashion-mnist", split="test", data_dir=tmp_path)
    assert ds.name == "fashion-mnist:test" and len(ds) == 5 and ds.num_classes == 10
    assert ds.classes[9] == "Ankle boot"
    assert np.array_equal(ds.labels, [3, 0, 9, 3, 1])
    img = ds.image(2)
    assert img.mode == "L" and img.size == (3, 4)  # PIL size is (W, H)
    assert np.array_equal(pixels(img), images[2])
    assert create_dataset("fashion-mnist", split="test", data_dir=tmp_path).fingerprint == ds.fingerprint
    # no train files there and no Debian fallback: a typed error naming the places and the cures
    with pytest.raises(DatasetNotFoundError) as e:
        create_dataset("fashion-mnist", split="train", data_dir=tmp_path)
    msg = str(e.value)
    assert str(tmp_path) in msg and "apt-get install dataset-fashion-mnist" in msg and "download=True" in msg
    assert "--data-dir" in msg


def test_fashion_mnist_in_torchvision_layout(tmp_path, no_debian_fashion):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    write_idx(raw / "train-images-idx3-ubyte", np.full((2, 2, 2), 7, np.uint8), False)
    write_idx(raw / "train-labels-idx1-ubyte", np.array([1, 2], np.uint8), False)
    ds = create_dataset("fashion-mnist", data_dir=tmp_path)
    assert np.array_equal(ds.labels, [1, 2]) and pixels(ds.image(1)).tolist() == [[7, 7], [7, 7]]


def test_read_idx_big_endian_and_corrupt_files(tmp_path):
    arr = np.array([[1, -2, 70000], [0, 5, -1]], dtype=np.int32)
    write_idx(tmp_path / "a.idx", arr.astype(">i4"), False)
    got = read_idx(tmp_path / "a.idx")
    assert got.tolist() == arr.tolist() and got.shape == (2, 3)
    (tmp_path / "bad.idx").write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(InputError, match="not an IDX file"):
        read_idx(tmp_path / "bad.idx")
    full = (tmp_path / "a.idx").read_bytes()
    (tmp_path / "short.idx").write_bytes(full[:-3])
    with pytest.raises(InputError, match="truncated"):
        read_idx(tmp_path / "short.idx")


@pytest.mark.skipif(not (sources.DEBIAN_FASHION_MNIST_DIR / "train-labels-idx1-ubyte.gz").is_file(),
                    reason="Debian's Fashion-MNIST files are absent: apt-get install dataset-fashion-mnist")
def test_fashion_mnist_from_debian_package(tmp_path):
    train = create_dataset("fashion-mnist", data_dir=tmp_path)  # empty data_dir: falls back to Debian's
    test = create_dataset("fashion-mnist", split="test")
    assert (len(train), len(test)) == (60000, 10000)
    assert np.array_equal(np.bincount(train.labels), [6000] * 10)
    assert np.array_equal(np.bincount(test.labels), [1000] * 10)
    assert train.labels[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]  # the published first labels
    img = train.image(0)
    assert img.mode == "L" and img.size == (28, 28) and pixels(img).max() > 0
    assert train.fingerprint != test.fingerprint


# -- cifar ----------------------------------------------------------------------------------------------------
def write_pickle(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def fake_cifar10(root, per_batch=2):
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(1)
    batches = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [(i + j) % 10 for j in range(per_batch)]
        write_pickle(base / name, {b"batch_label": name.encode(), b"data": data, b"labels": labels})
        batches[name] = (data, labels)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    write_pickle(base / "batches.meta", {b"label_names": names, b"num_vis": 3072})
    return batches


def test_cifar10_reads_torchvision_python_format(tmp_path):
    batches = fake_cifar10(tmp_path)
    train = create_dataset("cifar10", data_dir=tmp_path)
    test = create_dataset("cifar10", split="test", data_dir=tmp_path)
    assert (len(train), len(test)) == (10, 2) and train.classes[1] == "automobile" and train.num_classes == 10
    assert train.labels.tolist() == sum((batches[f"data_batch_{k}"][1] for k in range(1, 6)), [])
    data = batches["data_batch_3"][0]
    img = train.image(4)  # two rows per batch: batch 3 starts at row 4
    assert img.mode == "RGB" and img.size == (32, 32)
    for x, y in [(0, 0), (31, 0), (4, 17), (31, 31)]:
        assert img.getpixel((x, y)) == tuple(int(data[0, c * 1024 + y * 32 + x]) for c in range(3))
    assert create_dataset("cifar10", data_dir=tmp_path).fingerprint == train.fingerprint != test.fingerprint


def test_cifar100_fine_labels(tmp_path):
    base = tmp_path / "cifar-100-python"
    base.mkdir()
    data = np.arange(3 * 3072, dtype=np.int64).reshape(3, 3072).astype(np.uint8)
    write_pickle(base / "train", {b"data": data, b"fine_labels": [99, 0, 42], b"coarse_labels": [1, 2, 3]})
    write_pickle(base / "test", {b"data": data[:1], b"fine_labels": [5], b"coarse_labels": [0]})
    write_pickle(base / "meta", {b"fine_label_names": [f"c{i}".encode() for i in range(100)]})
    ds = create_dataset("cifar100", data_dir=tmp_path)
    assert ds.labels.tolist() == [99, 0, 42] and ds.num_classes == 100 and ds.classes[42] == "c42"
    assert ds.image(1).getpixel((1, 0)) == (int(data[1, 1]), int(data[1, 1025]), int(data[1, 2049]))
    assert len(create_dataset("cifar100", split="test", data_dir=tmp_path)) == 1


def test_cifar_missing_files_and_unsafe_pickles(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="download=True") as e:
        create_dataset("cifar10", data_dir=tmp_path)
    assert "cifar-10-batches-py" in str(e.value) and "data_batch_1" in str(e.value)
    fake_cifar10(tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    write_pickle(tmp_path / "cifar-10-batches-py" / "test_batch", {b"data": Evil(), b"labels": []})
    with pytest.raises(InputError, match="refusing to load builtins.print"):
        create_dataset("cifar10", split="test", data_dir=tmp_path)


# -- image folders --------------------------------------------------------------------------------------------
def make_folder(root):
    colors = {"cat/a.png": (255, 0, 0), "cat/b.PNG": (0, 255, 0), "dog/x/deep.png": (0, 0, 255),
              "dog/c.jpg": None, "bird/z.png": (10, 20, 30)}
    for rel, color in colors.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith(".jpg"):
            Image.fromarray(np.full((5, 6), 77, np.uint8), "L").save(p, quality=100)
        else:
            Image.new("RGBA" if rel == "bird/z.png" else "RGB", (3, 2), color).save(p)
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / ".ipynb_checkpoints").mkdir()
    Image.new("RGB", (3, 2)).save(root / ".ipynb_checkpoints" / "hidden.png")
    (root / "emptyclass").mkdir()


def test_imagefolder_classes_files_and_pixels(tmp_path):
    make_folder(tmp_path / "f")
    ds = create_dataset(f"imagefolder:{tmp_path / 'f'}")
    assert ds.classes == ["bird", "cat", "dog", "emptyclass"] and ds.num_classes == 4
    assert ds.files == ["bird/z.png", "cat/a.png", "cat/b.PNG", "dog/c.jpg", "dog/x/deep.png"]
    assert ds.labels.tolist() == [0, 1, 1, 2, 2]
    assert ds.image(0).mode == "RGB" and ds.image(0).getpixel((2, 1)) == (10, 20, 30)  # RGBA -> RGB
    assert ds.image(1).getpixel((0, 0)) == (255, 0, 0) and ds.image(4).getpixel((1, 1)) == (0, 0, 255)
    gray = ds.image(3)
    assert gray.mode == "L" and gray.size == (6, 5) and abs(int(pixels(gray).mean()) - 77) <= 1
    # decoded on demand: a rewritten file is read as it is now
    Image.new("RGB", (3, 2), (1, 2, 3)).save(tmp_path / "f" / "cat" / "a.png")
    assert ds.image(1).getpixel((0, 0)) == (1, 2, 3)


def test_imagefolder_fingerprint(tmp_path):
    make_folder(tmp_path / "f")
    a = create_dataset(f"imagefolder:{tmp_path / 'f'}")
    assert create_dataset(tmp_path / "f").fingerprint == a.fingerprint  # a Path works too, same content
    shutil.copytree(tmp_path / "f", tmp_path / "g")  # copy2 keeps sizes and mtimes: same content, same hash
    assert create_dataset(f"imagefolder:{tmp_path / 'g'}").fingerprint == a.fingerprint
    Image.new("RGB", (4, 4), (9, 9, 9)).save(tmp_path / "g" / "cat" / "new.png")
    assert create_dataset(f"imagefolder:{tmp_path / 'g'}").fingerprint != a.fingerprint
    p = tmp_path / "f" / "cat" / "b.PNG"
    Image.new("RGB", (30, 20), (0, 255, 0)).save(p)  # rewritten with other content
    assert create_dataset(f"imagefolder:{tmp_path / 'f'}").fingerprint != a.fingerprint


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        create_dataset(f"imagefolder:{tmp_path / 'nowhere'}")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    (tmp_path / "empty" / "cls" / "readme.txt").write_text("x")
    with pytest.raises(EmptyInputError, match="no images"):
        create_dataset(f"imagefolder:{tmp_path / 'empty'}")
    with pytest.raises(InputError, match="needs a path"):
        create_dataset("imagefolder:")
    (tmp_path / "bad" / "cls").mkdir(parents=True)
    (tmp_path / "bad" / "cls" / "broken.png").write_bytes(b"not a png")
    ds = create_dataset(f"imagefolder:{tmp_path / 'bad'}")
    with pytest.raises(InputError, match="broken.png is not a readable image"):
        ds.image(0)


# -- python datasets ------------------------------------------------------------------------------------------
class TensorDataset(torch.utils.data.Dataset):
    """CHW float tensors in [0, 1], like torchvision with ToTensor; counts the reads."""

    classes = ["zero", "one", "two"]

    def __init__(self, n=6, bump=0):
        self.n, self.bump, self.reads = n, bump, 0

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.reads += 1
        x = torch.zeros(3, 4, 5)
        x[0], x[1], x[2] = i / 10, 0.5, 1.0
        if self.bump and i == self.n - 1:
            x[2, 0, 0] = 0.0
        return x, torch.tensor(i % 3)


def test_torch_dataset_of_tensors():
    src = TensorDataset()
    ds = create_dataset(src)
    assert isinstance(ds, ImageDataset) and len(ds) == 6 and ds.classes == ["zero", "one", "two"]
    assert ds.labels.tolist() == [0, 1, 2, 0, 1, 2] and ds.num_classes == 3
    assert src.reads == 6
    img = ds.image(4)
    assert img.mode == "RGB" and img.size == (5, 4) and img.getpixel((0, 0)) == (102, 128, 255)
    fp = ds.fingerprint
    assert src.reads == 7  # the fingerprint was computed while reading the labels, not again
    assert create_dataset(TensorDataset()).fingerprint == fp
    assert create_dataset(TensorDataset(bump=1)).fingerprint != fp  # one pixel differs
    assert create_dataset(TensorDataset(n=5)).fingerprint != fp


def test_sequence_of_arrays_and_pil_images():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[..., 1] = 200
    chw = np.ones((3, 2, 2), np.float32) * 0.2
    items = [(gray, 1), (rgb, np.int64(0)), (Image.new("P", (2, 2)), 1), (chw, 2), (gray[..., None], 0)]
    ds = create_dataset(items)
    assert ds.labels.tolist() == [1, 0, 1, 2, 0] and ds.classes is None and ds.num_classes == 3
    assert ds.image(0).mode == "L" and np.array_equal(pixels(ds.image(0)), gray)
    assert ds.image(1).getpixel((1, 1)) == (0, 200, 0)
    assert ds.image(2).mode == "RGB"
    assert ds.image(3).getpixel((0, 0)) == (51, 51, 51)
    assert np.array_equal(pixels(ds.image(4)), gray)


def test_python_dataset_errors():
    with pytest.raises(InputError, match="Normalize"):
        create_dataset([(torch.full((3, 2, 2), -0.5), 0)])
    with pytest.raises(InputError, match=r"\(image, label\) pairs"):
        create_dataset([np.zeros((2, 2), np.uint8)])
    with pytest.raises(InputError, match="labels must be integer"):
        create_dataset([(np.zeros((2, 2), np.uint8), 1.5)])
    with pytest.raises(InputError, match="negative"):
        create_dataset([(np.zeros((2, 2), np.uint8), -1)])
    with pytest.raises(EmptyInputError):
        create_dataset([])
    with pytest.raises(InputError, match="shape"):
        create_dataset([(np.zeros((2, 2, 2, 2), np.uint8), 0)])
    with pytest.raises(InputError, match="cannot make a dataset of a int"):
        create_dataset(42)


# -- subsets and stratified subsampling -----------------------------------------------------------------------
def counted(counts) -> ArrayDataset:
    labels = np.repeat(np.arange(len(counts)), counts)
    rng = np.random.default_rng(3)
    labels = labels[rng.permutation(labels.size)]
    images = (np.arange(labels.size) % 256).astype(np.uint8)[:, None, None] * np.ones((1, 2, 2), np.uint8)
    return ArrayDataset("toy:train", images, labels)


def test_subset_images_labels_and_fingerprints():
    ds = counted([10, 10, 10])
    s = ds.subset([5, 2, 29])
    assert len(s) == 3 and s.labels.tolist() == ds.labels[[5, 2, 29]].tolist() and s.num_classes == 3
    assert pixels(s.image(2))[0, 0] == 29
    assert s.fingerprint != ds.fingerprint
    assert ds.subset([5, 2, 29]).fingerprint == s.fingerprint
    assert ds.subset([2, 5, 29]).fingerprint != s.fingerprint  # order is content
    nested = s.subset([2, 0])
    assert pixels(nested.image(0))[0, 0] == 29 and pixels(nested.image(1))[0, 0] == 5
    assert nested.fingerprint not in (s.fingerprint, ds.subset([29, 5]).fingerprint)
    with pytest.raises(InputError, match="out of range"):
        ds.subset([0, 30])
    with pytest.raises(IndexError):
        s.image(3)


def test_array_fingerprint_covers_pixels_labels_and_source():
    images, labels = np.zeros((4, 2, 2), np.uint8), np.array([0, 1, 0, 1])
    fp = ArrayDataset("toy:train", images, labels).fingerprint
    assert ArrayDataset("toy:train", images.copy(), labels.copy()).fingerprint == fp
    assert ArrayDataset("toy:train", images, [1, 1, 0, 1]).fingerprint != fp
    other = images.copy()
    other[3, 1, 1] = 1
    assert ArrayDataset("toy:train", other, labels).fingerprint != fp
    assert ArrayDataset("toy:test", images, labels).fingerprint != fp
    assert images.flags.writeable and labels.flags.writeable  # the caller's arrays are left alone


@pytest.mark.parametrize("counts,max_samples,per_class,expected", [
    ([500, 300, 200], 100, None, [50, 30, 20]),
    ([500, 300, 200], 7, None, [4, 2, 1]),            # 3.5, 2.1, 1.4: largest remainder
    ([500, 300, 200], None, 250, [250, 250, 200]),
    ([500, 300, 200], 100, 250, [36, 36, 28]),        # caps first, then proportions of 250:250:200
    ([990, 5, 5], 10, None, [8, 1, 1]),               # every class keeps one
    ([40, 0, 20], 30, None, [20, 0, 10]),             # an empty class stays empty
])
def test_stratified_subsample_counts(counts, max_samples, per_class, expected):
    ds = counted(counts)
    s = stratified_subsample(ds, max_samples=max_samples, per_class=per_class, seed=0)
    assert np.bincount(s.labels, minlength=len(counts)).tolist() == expected
    assert np.array_equal(s.labels, ds.labels[s._root_idx])
    assert np.all(np.diff(s.indices) > 0)  # original order, no repeats
    assert s.num_classes == ds.num_classes


def test_stratified_subsample_is_deterministic():
    ds = counted([500, 300, 200])
    a = stratified_subsample(ds, max_samples=100, seed=0)
    assert np.array_equal(a.indices, stratified_subsample(ds, max_samples=100, seed=0).indices)
    assert a.fingerprint == stratified_subsample(ds, max_samples=100, seed=0).fingerprint
    b = stratified_subsample(ds, max_samples=100, seed=1)
    assert not np.array_equal(a.indices, b.indices) and a.fingerprint != b.fingerprint
    assert stratified_subsample(ds) is ds and stratified_subsample(ds, max_samples=5000) is ds
    for bad in ({"max_samples": 0}, {"per_class": -1}, {"max_samples": 2.5}):
        with pytest.raises(InputError, match=next(iter(bad))):
            stratified_subsample(ds, **bad)


# -- the model transform --------------------------------------------------------------------------------------
def test_transform_for_gray_8x8():
    t = transform_for(TIMM_CONFIG)
    x = t(Image.fromarray(np.full((8, 8), 128, np.uint8), "L"))
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    mean, std = torch.tensor(TIMM_CONFIG["mean"]), torch.tensor(TIMM_CONFIG["std"])
    expected = (128 / 255 - mean) / std
    assert torch.allclose(x.mean(dim=(1, 2)), expected, atol=1e-3)
    assert float((x - expected[:, None, None]).abs().max()) < 1 / 255 / 0.224 + 1e-4
    # a varied digit: the three channels carry the same (replicated gray) values before normalising
    digit = create_dataset("digits").image(3)
    y = t(digit) * std[:, None, None] + mean[:, None, None]
    assert torch.allclose(y[0], y[1], atol=1e-5) and torch.allclose(y[1], y[2], atol=1e-5)
    assert float(y.max() - y.min()) > 0.5
    assert pickle.loads(pickle.dumps(t))(digit).shape == (3, 224, 224)  # DataLoader workers can use it


def test_transform_for_bad_config():
    with pytest.raises(InputError, match="input_size"):
        transform_for({"mean": (0.5,)})


# -- registry and errors --------------------------------------------------------------------------------------
def test_registry_lists_and_unknown_names():
    assert {"digits", "fashion-mnist", "cifar10", "cifar100", "imagefolder"} <= set(list_datasets())
    with pytest.raises(InputError) as e:
        create_dataset("cifar11")
    assert isinstance(e.value, ValueError)
    assert "'cifar11'" in str(e.value) and "digits" in str(e.value) and "imagefolder:PATH" in str(e.value)
    with pytest.raises(InputError, match="unknown split 'val'.*train, test"):
        create_dataset("digits", split="val")
    with pytest.raises(InputError, match="split="):
        create_dataset("digits:test")


def test_register_dataset_reaches_create_dataset():
    @register_dataset("toy-test-only")
    def toy(arg, split, data_dir, download):
        return ArrayDataset(f"toy:{split}:{arg}", np.zeros((2, 1, 1), np.uint8), [0, 1])

    try:
        assert "toy-test-only" in list_datasets()
        assert create_dataset("toy-test-only:x", split="test").name == "toy:test:x"
        with pytest.raises(ValueError, match="registered twice"):
            register_dataset("toy-test-only")(toy)
    finally:
        DATASETS._entries.pop("toy-test-only")
    ds = create_dataset("digits")
    assert create_dataset(ds) is ds
