"""Ranking a real hub on one machine: bounded residency, decode shared through a bounded store and run in
DataLoader workers, cache hits without constructing a model, memoised weights hashes, lazy fingerprints."""
import gc
import json
import os
import weakref

import numpy as np
import pytest
import torch

from hubtune.data import ArrayDataset, PythonDataset, create_dataset, stratified_subsample
from hubtune.errors import InputError
from hubtune.features import ExtractOptions, extract
from hubtune.hub import identify_candidate, load_candidate
from hubtune.ranking import rank

from conftest import tiny_timm


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HUBTUNE_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """Four tiny random-init models in timm's folder format, three sharing one transform."""
    from hubtune.tuning import save_timm_folder

    root = tmp_path_factory.mktemp("hub")
    specs = []
    for i, size in enumerate((32, 32, 32, 40)):
        d = root / f"m{i}"
        save_timm_folder(tiny_timm(num_classes=5, seed=i, size=size), d)
        specs.append(f"local-dir:{d}")
    return specs


class Counted(ArrayDataset):
    """Counts the images decoded in this process."""

    decoded = 0

    def _load(self, i):
        type(self).decoded += 1
        return super()._load(i)


@pytest.fixture
def digits():
    ds = stratified_subsample(create_dataset("digits"), max_samples=90, seed=0)
    images = np.stack([np.asarray(ds.image(i)) for i in range(len(ds))])
    Counted.decoded = 0
    return Counted("digits90", images, ds.labels, classes=ds.classes)


def opts(tmp_path, **kw):
    base = dict(batch_size=16, chunk_size=40, precision="fp32", compile=False, progress=False, num_workers=0,
                cache_dir=str(tmp_path / "features"))
    return ExtractOptions(**{**base, **kw})


class Residency:
    """Wraps load_candidate to count the models alive at once (by weak references to their modules)."""

    def __init__(self, monkeypatch):
        import hubtune.hub.candidate as C

        self.alive, self.peak, self.loads = 0, 0, 0
        real = C.load_candidate

        def counting(*a, **k):
            gc.collect()  # what the extractor freed is gone before we count
            c = real(*a, **k)
            self.loads += 1
            self.alive += 1
            self.peak = max(self.peak, self.alive)
            weakref.finalize(c.module, self._gone)
            return c

        monkeypatch.setattr(C, "load_candidate", counting)

    def _gone(self):
        self.alive -= 1


@pytest.mark.parametrize("resident", [1, 2])
def test_at_most_max_resident_models_are_alive(tmp_path, hub, digits, monkeypatch, resident):
    seen = Residency(monkeypatch)
    stats = extract(hub, digits, opts(tmp_path, max_resident=resident, use_cache=False))
    assert seen.loads == len(hub) and seen.peak == resident
    assert all(st.loaded and st.computed == len(digits) for st in stats.values())


def test_bounded_residency_gives_the_same_features(tmp_path, hub, digits):
    got = {}
    for resident in (1, 4):
        feats = {s: [] for s in hub}
        extract(hub, digits, opts(tmp_path, max_resident=resident, use_cache=False),
                lambda s, f, l, y: feats[s].append(f))
        got[resident] = {s: np.concatenate(v) for s, v in feats.items()}
    for s in hub:
        np.testing.assert_array_equal(got[1][s], got[4][s])


@pytest.mark.parametrize("memory_mb,disk_mb,decodes", [(64, 0, 1), (0, 64, 1), (0, 0, 3)])
def test_a_transform_group_decodes_each_image_once(tmp_path, hub, digits, memory_mb, disk_mb, decodes):
    """Three candidates share a transform, one at a time: the decoded chunks are kept for the next ones in
    memory or on disk; when neither may hold them they are decoded again. Same features every way."""
    feats = {s: [] for s in hub[:3]}
    extract(hub[:3], digits, opts(tmp_path, use_cache=False, decoded_memory_mb=memory_mb, decoded_disk_mb=disk_mb),
            lambda s, f, l, y: feats[s].append(f))
    assert Counted.decoded == decodes * len(digits)
    Counted.decoded = 0
    ref = {s: [] for s in hub[:3]}
    extract(hub[:3], digits, opts(tmp_path, use_cache=False, max_resident=3), lambda s, f, l, y: ref[s].append(f))
    assert Counted.decoded == len(digits)
    for s in feats:
        np.testing.assert_array_equal(np.concatenate(feats[s]), np.concatenate(ref[s]))


def test_decode_workers_give_the_same_features(tmp_path, hub, digits):
    out = {}
    for workers in (0, 2):
        feats = []
        extract(hub[:1], digits, opts(tmp_path, use_cache=False, num_workers=workers),
                lambda s, f, l, y: feats.append(f))
        out[workers] = np.concatenate(feats)
    np.testing.assert_array_equal(out[0], out[2])
    assert Counted.decoded == len(digits)  # the second pass decoded in the workers, not here


class Broken(ArrayDataset):
    def _load(self, i):
        if i == 7:
            raise OSError("truncated file")
        return super()._load(i)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_decode_error_in_a_worker_is_a_typed_error_naming_the_image(tmp_path, hub, digits, workers):
    images = np.stack([np.asarray(digits.image(i)) for i in range(len(digits))])
    bad = Broken("broken", images, digits.labels)
    with pytest.raises(InputError, match=r"broken\[7\] could not be decoded \(OSError: truncated file\)") as e:
        extract(hub[:1], bad, opts(tmp_path, use_cache=False, num_workers=workers))
    assert "Traceback" not in str(e.value)


def test_second_rank_answers_from_the_cache_without_loading_a_model(tmp_path, hub, digits, monkeypatch):
    import hubtune.hub._weights as W

    W._HASHES.clear()  # hashed by earlier tests into another cache's memo
    first = rank(hub, digits, metrics=["logme", "leep"], options=opts(tmp_path))
    assert all(c.loaded and not c.cache_hit for c in first.candidates)
    import hubtune.hub.candidate as C

    def refuse(*a, **k):
        raise AssertionError("a model was constructed")

    monkeypatch.setattr(C, "load_candidate", refuse)
    monkeypatch.setattr("hubtune.hub.sources._from_config", refuse)

    W._HASHES.clear()  # as in a new process: the weights hashes come from the memo file
    monkeypatch.setattr(W, "open", lambda *a, **k: (_ for _ in ()).throw(AssertionError("hashed again")),
                        raising=False)
    second = rank(hub, digits, metrics=["logme", "leep"], options=opts(tmp_path))
    assert all(c.cache_hit and not c.loaded and c.computed == 0 for c in second.candidates)
    assert [c.spec for c in second.candidates] == [c.spec for c in first.candidates]
    for a, b in zip(first.candidates, second.candidates):
        assert a.scores == b.scores and a.num_params == b.num_params > 0
        assert (a.feature_dim, a.num_source_classes) == (b.feature_dim, b.num_source_classes) == (a.feature_dim, 5)


def test_identity_without_loading_equals_the_loaded_identity(hub):
    for spec in hub + ["pkg:efficientnet_lite0"]:
        ref, c = identify_candidate(spec), load_candidate(spec)
        assert (ref.identity, ref.data_config, ref.num_params, ref.num_classes) == \
               (c.identity, c.data_config, c.num_params, c.num_classes)


def test_weights_hash_is_memoised_by_path_size_and_mtime(tmp_path):
    import hubtune.hub._weights as W

    f = tmp_path / "w.bin"
    f.write_bytes(b"a" * 1000)
    st = os.stat(f)
    first = W.file_sha256(f)
    assert (W.memo_path()).is_file()
    # same size and mtime, other bytes: the memo (in memory, then on disk) still answers
    f.write_bytes(b"b" * 1000)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert W.file_sha256(f) == first
    W._HASHES.clear()
    assert W.file_sha256(f) == first
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # a new mtime: hashed again
    import hashlib

    assert W.file_sha256(f) == hashlib.sha256(b"b" * 1000).hexdigest() != first


class Targets(torch.utils.data.Dataset):
    """A torchvision-like dataset with ``targets``; counts its reads."""

    def __init__(self, n=10):
        self.n, self.reads = n, 0
        self.targets = [i % 3 for i in range(n)]

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.reads += 1
        return torch.full((3, 4, 4), i / 20), i % 3


def test_python_dataset_with_targets_decodes_lazily():
    src = Targets()
    ds = PythonDataset(src)
    assert src.reads == 1 and ds.labels.tolist() == src.targets  # one read: the first item, checked
    fp = ds.fingerprint
    assert src.reads == 11  # the fingerprint decoded every image, once, when asked for
    assert ds.fingerprint == fp and src.reads == 11
    assert PythonDataset(Targets()).fingerprint == fp


def test_python_dataset_key_fingerprints_without_decoding():
    src = Targets()
    a = PythonDataset(src, key="targets-v1")
    assert a.fingerprint and src.reads == 1
    assert PythonDataset(Targets(), key="targets-v1").fingerprint == a.fingerprint
    assert PythonDataset(Targets(), key="targets-v2").fingerprint != a.fingerprint
    assert PythonDataset(Targets(), key="targets-v1").fingerprint != PythonDataset(Targets()).fingerprint
    with pytest.raises(InputError, match="key=''"):
        PythonDataset(src, key="")
    bad = Targets()
    bad.targets[0] = 2
    with pytest.raises(InputError, match="targets"):
        PythonDataset(bad)


def test_options_are_checked():
    for kw, what in ((dict(max_resident=0), "max_resident=0"), (dict(num_workers=-1), "num_workers=-1"),
                     (dict(decoded_memory_mb=-5), "decoded_memory_mb=-5")):
        with pytest.raises(InputError, match=what):
            ExtractOptions(**kw)


# -- the Ray backend: a real local Ray (the session fixture ``ray_local``, loopback only) -------------------------
@pytest.fixture
def ray_local(ray_local):
    """The session's Ray, able to unpickle this module's dataset class (the workers cannot import tests/)."""
    import sys

    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    return ray_local


def ray_opts(tmp_path, **kw):
    # the workers' own cache root (the weights-hash memo) stays in this test's folder
    return {"runtime_env": {"env_vars": {"HUBTUNE_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}}, **kw}


def assert_same_ranking(a, b, rel=1e-9):
    assert [c.spec for c in a.candidates] == [c.spec for c in b.candidates]
    for x, y in zip(a.candidates, b.candidates):
        for m in a.metrics:
            assert y.scores[m] == pytest.approx(x.scores[m], rel=rel, abs=0)
        assert (x.feature_dim, x.num_source_classes, x.n, x.num_params) == \
               (y.feature_dim, y.num_source_classes, y.n, y.num_params)
    for spec, w in a.weights.items():
        np.testing.assert_allclose(b.weights[spec]["weights"], w["weights"], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("shard_rows", [None, 40])
def test_ray_ranking_equals_the_local_ranking(ray_local, tmp_path, hub, digits, one_thread, shard_rows):
    """Every task computes from scratch (a cache of its own): one task per candidate gives the same chunks in
    the same order (LogME to 1e-9); shards of 40 rows merge on the driver in shard order."""
    # fast LogME shards round their float32 blocks apart (1e-6); exact LogME merges to 1e-9
    mode = "fast" if shard_rows is None else "exact"
    local = rank(hub, digits, metrics=["logme", "leep"], options=opts(tmp_path / "a"), logme_mode=mode)
    remote = rank(hub, digits, metrics=["logme", "leep"], options=opts(tmp_path / "b"), backend="ray", logme_mode=mode,
                  ray_options=ray_opts(tmp_path, shard_rows=shard_rows), out=tmp_path / "out")
    assert all(c.loaded and c.computed == len(digits) for c in remote.candidates)
    assert_same_ranking(local, remote)
    for f in ("ranking.json", "ranking.csv", "ranking.png"):
        assert (tmp_path / "out" / f).is_file()
    again = rank(hub, digits, metrics=["logme", "leep"], options=opts(tmp_path / "b"), backend="ray", logme_mode=mode,
                 ray_options=ray_opts(tmp_path, shard_rows=shard_rows))
    assert all(c.cache_hit and not c.loaded for c in again.candidates)  # the tasks answered from the cache
    assert_same_ranking(remote, again, rel=0)
    ray_local.assert_loopback()  # the workers started for these tasks listen on loopback only too


def test_ray_task_killed_on_its_first_attempt_is_retried(ray_local, tmp_path, hub, digits, one_thread):
    local = rank(hub[:2], digits, options=opts(tmp_path / "a"))
    kills = tmp_path / "kills"
    kills.mkdir()
    env = ray_opts(tmp_path)
    env["runtime_env"]["env_vars"]["HUBTUNE_TEST_RAY_KILL_ONCE"] = str(kills)
    remote = rank(hub[:2], digits, options=opts(tmp_path / "b"), backend="ray", ray_options=env)
    assert len(list(kills.iterdir())) == 2  # each task died once
    assert_same_ranking(local, remote)
    with pytest.raises(InputError, match="max_retries=-1"):
        rank(hub[:2], digits, options=opts(tmp_path / "b"), backend="ray", ray_options={"max_retries": -1})
    with pytest.raises(InputError, match="unknown keys"):
        rank(hub[:2], digits, options=opts(tmp_path / "b"), backend="ray", ray_options={"shards": 2})
    with pytest.raises(InputError, match="backend='spark'"):
        rank(hub[:2], digits, backend="spark")


def test_the_numba_logme_kernel_leaves_torch_threads_alone(one_thread):
    """numba's OpenMP layer shares torch's OpenMP runtime: a parallel kernel used to reset it to all cores, so
    the candidates ranked after the first LogME ran with another thread count (and other float rounding)."""
    pytest.importorskip("numba")
    from hubtune.scoring import create_estimator

    rng = np.random.default_rng(0)
    acc = create_estimator("logme", backend="numba")
    acc.update(rng.random((90, 16)), np.arange(90) % 3)
    acc.result()
    assert torch.get_num_threads() == 1


def test_tie_band_is_the_measured_precision_error(tmp_path, hub, digits, one_thread):
    """Under bf16 every candidate's error is PROBE_SAFETY (4) x the largest LogME difference bf16 vs fp32 on a stratified
    probe and its halves, recomputed here with a plain loop; ties are the chained overlapping intervals."""
    from hubtune.data import transform_for
    from hubtune.features.precision import PROBE_SAFETY
    from hubtune.ranking import PROBE_ROWS, stratified_order
    from hubtune.scoring import logme

    r = rank(hub, digits, metrics=["logme"], options=opts(tmp_path, precision="bf16"), out=tmp_path / "out")
    assert r.precision == "bf16"
    idx = stratified_order(digits.labels, 0)[:PROBE_ROWS]
    y = digits.labels[idx]
    for c in r.candidates:
        cand = load_candidate(c.spec)
        x = torch.stack([transform_for(cand.data_config)(digits.image(int(i))) for i in idx])
        with torch.inference_mode():
            f32 = cand.forward(x)[0].numpy()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                f16 = cand.forward(x)[0].float().numpy()
        h = len(y) // 2
        diffs = [logme(f16[s], y[s]).score - logme(f32[s], y[s]).score for s in (slice(None), slice(0, h), slice(h, None))]
        # (batches of 16 there, one batch here: float rounding differs a little)
        assert c.precision_error["logme"] == pytest.approx(PROBE_SAFETY * max(map(abs, diffs)), rel=1e-3)
    s = sorted(r.candidates, key=lambda c: c.rank)
    for a, b in zip(s, s[1:]):  # neighbours share a tie label exactly when their intervals touch
        touch = a.scores["logme"] - b.scores["logme"] <= a.precision_error["logme"] + b.precision_error["logme"]
        assert (a.tie != "" and a.tie == b.tie) == touch
    saved = json.loads((tmp_path / "out" / "ranking.json").read_text())
    assert saved["precision"] == "bf16" and all("precision_error" in c and "tie" in c for c in saved["candidates"])
    exact = rank(hub, digits, metrics=["logme"], options=opts(tmp_path, precision="fp32"))
    assert exact.precision == "fp32" and all(c.precision_error == {"logme": 0.0} and c.tie == "" for c in exact.candidates)
    assert "tie" not in exact.table().splitlines()[0]
