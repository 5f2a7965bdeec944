"""Faults around `hubtune score` and the file helpers: atomic writes that fail (disk full via RLIMIT_FSIZE,
an exception mid-write), output modes under the umask, read-only or impossible output locations, damaged
feature files of every kind, contradicting flags, and the bounded-memory streaming path."""
import errno
import json
import os
import stat
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest

import _brute
from conftest import make_classification
from hubtune._io import (
    atomic_path, atomic_savez, atomic_torch_save, atomic_write_text, check_writable, load_array, open_array,
    save_state_dict,
)
from hubtune.cli import main
from hubtune.errors import FeatureFileError, OutputError

REPO = Path(__file__).resolve().parents[1]


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def _run_py(code: str, cwd: Path, fsize: int | None = None) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter, optionally under RLIMIT_FSIZE (Python ignores SIGXFSZ, so an
    oversize write fails with EFBIG instead of killing the process)."""

    def limit():
        if fsize is not None:
            import resource

            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'tests'}", OMP_NUM_THREADS="1",
               PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env, preexec_fn=limit,
                          capture_output=True, text=True, timeout=120)


# --------------------------------------------------------------------------------------- atomic writes
@pytest.mark.slow  # a fresh interpreter importing torch: several seconds on the shared 2-core box
def test_disk_full_leaves_no_temporary_file_and_raises_output_error_naming_the_file(tmp_path):
    """Every writer, under a 64 KiB file-size limit, writing ~800 KB: OutputError naming the final file,
    the old content intact, no temporary file left. (torch and safetensors report the failed write as
    RuntimeError / SafetensorError: the old code let those through and the message named no file.)"""
    code = """
    import json, numpy as np, torch
    from hubtune._io import (atomic_savez, atomic_torch_save, atomic_write_bytes, atomic_write_text,
                             save_state_dict, write_json)
    from hubtune.errors import OutputError
    big = np.zeros(100_000)
    writers = {
        "bytes.bin": lambda p: atomic_write_bytes(p, big.tobytes()),
        "text.txt": lambda p: atomic_write_text(p, "x" * 800_000),
        "json.json": lambda p: write_json(p, {"a": big}),
        "arrays.npz": lambda p: atomic_savez(p, a=big),
        "model.pt": lambda p: atomic_torch_save({"w": torch.zeros(100_000)}, p),
        "model.safetensors": lambda p: save_state_dict(torch.nn.Linear(300, 300), p),
    }
    out = {}
    for name, write in writers.items():
        open(name, "w").write("old")
        try:
            write(name)
            out[name] = "no error"
        except OutputError as e:
            out[name] = "OutputError: " + str(e)
        except BaseException as e:
            out[name] = type(e).__name__ + ": " + str(e)
    print(json.dumps(out))
    """
    proc = _run_py(code, tmp_path, fsize=64 << 10)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, msg in results.items():
        assert msg.startswith("OutputError: "), (name, msg)
        assert name in msg and "ulimit -f" in msg, msg
        assert (tmp_path / name).read_text() == "old", name
    assert _leftovers(tmp_path) == []


def test_exception_mid_write_removes_the_temporary_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    for exc in (RuntimeError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(exc)):
            with atomic_path(target) as tmp:
                tmp.write_bytes(b"half written")
                raise exc
        assert target.read_bytes() == b"old" and _leftovers(tmp_path) == []


def test_oserror_mid_write_is_an_output_error_but_one_about_another_file_is_not(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(OutputError, match=r"out\.bin: the disk is full"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"x")
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp))
    # an input that is missing is the input's problem, not a failed write of out.bin
    with pytest.raises(FileNotFoundError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(Path(tmp_path / "missing-input").read_bytes())
    assert not target.exists() and _leftovers(tmp_path) == []


@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_final_files_follow_the_umask_read_at_write_time(tmp_path, mask, mode):
    """The umask is read when the file is written, not once at import (the old code cached it)."""
    torch = pytest.importorskip("torch")
    old = os.umask(mask)
    try:
        paths = [atomic_write_text(tmp_path / "a.txt", "x"), atomic_savez(tmp_path / "a.npz", a=np.ones(2)),
                 atomic_torch_save({"a": torch.ones(2)}, tmp_path / "a.pt"),
                 save_state_dict(torch.nn.Linear(2, 2), tmp_path / "a.safetensors")]
    finally:
        os.umask(old)
    for p in paths:
        assert stat.S_IMODE(p.stat().st_mode) == mode, (p, oct(p.stat().st_mode))


def test_check_writable_refuses_impossible_locations_before_work(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="a-file"):
        check_writable(blocker / "out")                     # parent is a regular file (root ignores chmod)
    with pytest.raises(OutputError, match="hubtune-nowhere"):
        check_writable("/proc/hubtune-nowhere")              # /proc takes no new folders, even for root
    with pytest.raises(OutputError, match="MB free"):
        check_writable(tmp_path, need_bytes=1 << 62)
    assert check_writable(tmp_path / "new" / "deep") == tmp_path / "new" / "deep"
    assert _leftovers(tmp_path / "new" / "deep") == []


def test_check_writable_sees_the_file_size_limit(tmp_path):
    proc = _run_py("""
    from hubtune._io import check_writable
    from hubtune.errors import OutputError
    check_writable(".", file_bytes=1000)  # under the limit: fine
    try:
        check_writable(".", file_bytes=10_000_000)
    except OutputError as e:
        print("OutputError:", e)
    """, tmp_path, fsize=1 << 20)
    assert proc.returncode == 0, proc.stderr
    assert "OutputError:" in proc.stdout and "ulimit -f" in proc.stdout


def test_score_json_into_an_impossible_folder_fails_before_scoring(tmp_path, capsys):
    (tmp_path / "a-file").write_text("x")
    F, y = make_classification(50, 4, 2)
    np.save(tmp_path / "f.npy", F)
    np.save(tmp_path / "y.npy", y)
    assert main(["score", str(tmp_path / "f.npy"), str(tmp_path / "y.npy"), "--json",
                 str(tmp_path / "a-file" / "out.json")]) == 2
    captured = capsys.readouterr()
    assert "a-file" in captured.err and "logme" not in captured.out  # no table: refused before the work


@pytest.mark.slow  # a fresh interpreter
def test_score_json_on_a_full_disk_exits_2_and_leaves_nothing(tmp_path):
    F, y = make_classification(300, 40, 3)
    np.save(tmp_path / "f.npy", F)
    np.save(tmp_path / "y.npy", y)
    proc = _run_py("""
    import sys
    from hubtune.cli import main
    sys.exit(main(["score", "f.npy", "y.npy", "--metric", "logme", "--backend", "numpy", "--json", "o.json"]))
    """, tmp_path, fsize=512)  # the JSON (per-class α, β, evidence, ...) is larger than 512 bytes
    assert proc.returncode == 2, proc.stderr
    assert "o.json" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o.json").exists() and _leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------- bad feature files
def _bad_files(folder: Path) -> dict:
    torch = pytest.importorskip("torch")
    good = np.arange(60, dtype=np.float32).reshape(20, 3)
    np.save(folder / "good.npy", good)
    raw = (folder / "good.npy").read_bytes()
    np.savez(folder / "good.npz", features=good, labels=np.arange(20) % 2)
    torch.save({"features": torch.from_numpy(good)}, folder / "good.pt")
    files = {
        "truncated.npy": raw[: len(raw) - 40],
        "header-only.npy": raw[:40],
        "not-numpy.npy": b"this is not a numpy file at all",
        "truncated.npz": (folder / "good.npz").read_bytes()[:300],
        "truncated.pt": (folder / "good.pt").read_bytes()[:200],
        "empty.npy": b"", "empty.npz": b"", "empty.pt": b"",
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    np.save(folder / "pickle.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    np.savez(folder / "pickle.npz", features=np.array([{"a": 1}], dtype=object))
    damaged = bytearray((folder / "good.npz").read_bytes())
    damaged[200] ^= 0xFF  # inside the stored 'features' data: only the CRC can tell
    (folder / "crc.npz").write_bytes(bytes(damaged))
    import pickle

    (folder / "code.pt").write_bytes(pickle.dumps(Path("x")))  # not tensors: refused by weights_only
    torch.save([1, 2, 3], folder / "list.pt")
    (folder / "folder.npy").mkdir()
    names = sorted(files) + ["pickle.npy", "pickle.npz", "crc.npz", "code.pt", "list.pt", "folder.npy"]
    return {n: folder / n for n in names}


def test_every_kind_of_bad_feature_file_is_a_typed_error_naming_the_file(tmp_path):
    for name, path in _bad_files(tmp_path).items():
        with pytest.raises(FeatureFileError) as info:
            load_array(path)
        msg = str(info.value)
        assert name in msg, msg
        assert any(w in msg for w in ("save", "pass")), msg  # says what to do


def test_cli_exits_2_on_every_bad_feature_file_without_a_traceback(tmp_path, capsys):
    np.save(tmp_path / "y.npy", np.arange(20) % 2)
    for name, path in _bad_files(tmp_path).items():
        assert main(["score", str(path), str(tmp_path / "y.npy")]) == 2, name
        err = capsys.readouterr().err
        assert err.startswith("hubtune score: error:") and name in err, err
        if name == "crc.npz":
            continue  # its 'labels' member is intact: only 'features' is damaged
        # and as labels
        assert main(["score", str(tmp_path / "good.npy"), str(path), "--metric", "logme"]) == 2, name
        assert name in capsys.readouterr().err


@pytest.mark.slow  # a fresh interpreter
def test_bad_files_through_the_console_script_print_no_traceback(tmp_path):
    (tmp_path / "t.npz").write_bytes(b"PK\x03\x04 truncated")
    proc = subprocess.run([sys.executable, "-m", "hubtune.cli", "score", str(tmp_path / "t.npz")],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2 and "t.npz" in proc.stderr and "Traceback" not in proc.stderr


def test_good_files_of_every_kind_still_load(tmp_path):
    torch = pytest.importorskip("torch")
    a = np.random.default_rng(0).standard_normal((301, 5)).astype(np.float32)
    np.save(tmp_path / "c.npy", a)
    np.save(tmp_path / "f.npy", np.asfortranarray(a))
    np.savez(tmp_path / "s.npz", features=a)
    np.savez_compressed(tmp_path / "z.npz", features=a)
    torch.save(torch.from_numpy(a), tmp_path / "t.pt")
    torch.save({"features": torch.from_numpy(a).to(torch.bfloat16)}, tmp_path / "b.pt")
    for name in ("c.npy", "f.npy", "s.npz", "z.npz", "t.pt"):
        src = open_array(tmp_path / name)
        assert src.shape == a.shape
        np.testing.assert_array_equal(np.concatenate([b for _, b in src.blocks(17)]), a)
        np.testing.assert_array_equal(src.read(), a)
    np.testing.assert_array_equal(load_array(tmp_path / "b.pt"),
                                  torch.from_numpy(a).to(torch.bfloat16).float().numpy())
    # stored members and .npy are memory-mapped, compressed members streamed: none is read whole
    assert type(open_array(tmp_path / "c.npy")).__name__ == "_Mapped"
    assert type(open_array(tmp_path / "s.npz")).__name__ == "_Mapped"
    assert type(open_array(tmp_path / "z.npz")).__name__ == "_Stream"


# ----------------------------------------------------------------------------------- contradicting flags
def _regression_files(folder: Path, fractional=True):
    rng = np.random.default_rng(3)
    F = rng.standard_normal((150, 6))
    t = F[:, 0] - 0.5 * F[:, 1] + 0.2 * rng.standard_normal(150)
    np.save(folder / "f.npy", F)
    np.save(folder / "t.npy", t if fractional else t.round())
    return F, t if fractional else t.round()


def test_regression_and_multilabel_together_are_refused(tmp_path, capsys):
    _regression_files(tmp_path)
    assert main(["score", str(tmp_path / "f.npy"), str(tmp_path / "t.npy"), "--regression",
                 "--multilabel"]) == 2
    err = capsys.readouterr().err
    assert "--regression" in err and "--multilabel" in err and "contradict" in err


def test_regression_with_default_metrics_scores_logme_and_says_what_was_left_out(tmp_path, capsys):
    F, t = _regression_files(tmp_path, fractional=False)  # integral floats: only the flag makes them continuous
    out = tmp_path / "r.json"
    assert main(["score", str(tmp_path / "f.npy"), str(tmp_path / "t.npy"), "--regression", "--json",
                 str(out)]) == 0
    printed = capsys.readouterr().out
    assert "hscore-shrunk left out" in printed and "regression" in printed
    doc = json.loads(out.read_text())
    assert doc["metrics"] == ["logme"] and doc["task"] == "regression"
    ref = _brute.logme(F, t, "regression")["score"]
    assert doc["rows"][0]["scores"]["logme"] == pytest.approx(ref, rel=1e-9)


def test_continuous_labels_without_a_flag_are_scored_as_regression(tmp_path, capsys):
    F, t = _regression_files(tmp_path, fractional=True)
    out = tmp_path / "r.json"
    assert main(["score", str(tmp_path / "f.npy"), str(tmp_path / "t.npy"), "--json", str(out)]) == 0
    assert "hscore-shrunk left out" in capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert doc["rows"][0]["scores"]["logme"] == pytest.approx(_brute.logme(F, t, "regression")["score"], rel=1e-9)


@pytest.mark.parametrize("metric", ["hscore", "leep", "nce"])
def test_an_explicit_metric_that_cannot_score_the_task_is_an_error_naming_it(tmp_path, capsys, metric):
    _regression_files(tmp_path)
    assert main(["score", str(tmp_path / "f.npy"), str(tmp_path / "t.npy"), "--regression", "--metric",
                 "logme", "--metric", metric]) == 2
    err = capsys.readouterr().err
    assert metric in err and "logme" in err  # names the offender and what can


# ------------------------------------------------------------------------------------ bounded streaming
class _Recorder:
    def __init__(self, monkeypatch):
        from hubtune.scoring import ESTIMATORS

        self.sizes = {}
        for name in ESTIMATORS.names():
            cls = ESTIMATORS.get(name)
            if "update" not in vars(cls):
                continue  # inherits a patched one (hscore-shrunk)
            original = cls.update

            def update(est, x, labels, _original=original):
                self.sizes.setdefault(est.name, []).append(len(x))
                return _original(est, x, labels)

            monkeypatch.setattr(cls, "update", update)


@pytest.mark.parametrize("fmt", ["npy", "npz", "npz-compressed", "pt"])
def test_cli_feeds_every_estimator_bounded_blocks_and_matches_one_shot_float64(tmp_path, monkeypatch, fmt):
    """The old CLI read the file whole and called update once with all n rows (widened to float64 at once)."""
    torch = pytest.importorskip("torch")
    import hubtune.cli.score as score_cli

    monkeypatch.setattr(score_cli, "gram_block_rows", lambda width: 64)
    rng = np.random.default_rng(7)
    n, z = 1000, 12
    logits = (rng.standard_normal((n, z)) * 2).astype(np.float32)
    y = rng.integers(0, 4, n) * 2  # gaps: classes 0, 2, 4, 6
    logits[np.arange(n), y] += 2.0
    path = tmp_path / f"x.{fmt.split('-')[0]}"
    if fmt == "npy":
        np.save(path, logits)
        np.save(tmp_path / "y.npy", y)
        argv = [str(path), str(tmp_path / "y.npy")]
    elif fmt == "npz":
        np.savez(path, features=logits, labels=y)
        argv = [str(path)]
    elif fmt == "npz-compressed":
        np.savez_compressed(path, features=logits, labels=y)
        argv = [str(path)]
    else:
        torch.save({"features": torch.from_numpy(logits), "labels": torch.from_numpy(y)}, path)
        argv = [str(path)]
    rec = _Recorder(monkeypatch)
    out = tmp_path / "r.json"
    metrics = ["logme", "leep", "nce", "hscore", "hscore-shrunk"]
    assert main(["score", *argv, "--softmax", "--backend", "numpy", "--json", str(out)]
                + [a for m in metrics for a in ("--metric", m)]) == 0
    for m in metrics:
        assert max(rec.sizes[m]) <= 64 and sum(rec.sizes[m]) == n, (m, rec.sizes[m][:5])
    scores = json.loads(out.read_text())["rows"][0]["scores"]
    F = logits.astype(np.float64)
    P = np.exp(F - F.max(1, keepdims=True))
    P /= P.sum(1, keepdims=True)
    assert scores["logme"] == pytest.approx(_brute.logme(F, y)["score"], rel=1e-9)
    assert scores["leep"] == pytest.approx(_brute.leep(P, y), rel=1e-9)
    assert scores["nce"] == pytest.approx(_brute.nce(F.argmax(1), y), rel=1e-12)
    assert scores["hscore"] == pytest.approx(_brute.hscore(F, y), rel=1e-7)
    assert scores["hscore-shrunk"] == pytest.approx(_brute.hscore_shrunk(F, y)[0], rel=1e-7)


def test_default_block_size_scales_with_the_width():
    """32 MiB of float64 per block whatever the width: the old LEEP second pass used 65536 rows, i.e.
    the whole input (and twice it in float64) for any file under 65536 rows."""
    from hubtune.scoring import LEEP
    from hubtune.scoring.gram import BLOCK_ELEMENTS, block_rows

    for width in (10, 1000, 21843):
        assert block_rows(width) * width <= max(BLOCK_ELEMENTS, 64 * width)
    p = np.full((10, 1000), 1e-3)
    est = LEEP().update(p, np.arange(10) % 2)
    assert est._block() * 1000 <= BLOCK_ELEMENTS


def test_streamed_crc_check_catches_damage_a_memory_map_would_miss(tmp_path):
    a = np.arange(4000, dtype=np.float64).reshape(1000, 4)
    np.savez(tmp_path / "a.npz", features=a)
    with zipfile.ZipFile(tmp_path / "a.npz") as zf:
        assert zf.getinfo("features.npy").compress_type == zipfile.ZIP_STORED
    raw = bytearray((tmp_path / "a.npz").read_bytes())
    raw[20_000] ^= 0x01  # one bit in the data, far from any header
    (tmp_path / "a.npz").write_bytes(bytes(raw))
    src = open_array(tmp_path / "a.npz")  # the header is fine
    with pytest.raises(FeatureFileError, match="CRC"):
        for _ in src.blocks(100):
            pass
