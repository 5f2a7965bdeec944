"""Every notebook in notebooks/ runs top to bottom (offline, on the embedded default), and what it writes and
prints is checked against what the notebook claims, with independent computations where they are cheap."""
import json
import re
from pathlib import Path

import numpy as np
import pytest

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def _run(path: Path, tmp_path: Path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("HUBTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    work = tmp_path / "work"
    work.mkdir()
    nb = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(work)}}).execute()
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                     if o.get("output_type") == "stream")
    return work, text


def _check_ranking(folder: Path, n_candidates: int) -> dict:
    """The ranking folder is complete and consistent: ranks follow the first metric's scores, the CSV agrees
    with the JSON, and each candidate's saved LogME posterior has one row per class and the candidate's feature
    width."""
    data = json.loads((folder / "ranking.json").read_text())
    cands = data["candidates"]
    assert len(cands) == n_candidates and "logme" in data["metrics"]
    scores = [c["scores"][data["metrics"][0]] for c in cands]
    assert all(np.isfinite(scores))
    assert [c["rank"] for c in cands] == sorted([c["rank"] for c in cands])
    assert scores == sorted(scores, reverse=True)
    csv_rows = (folder / "ranking.csv").read_text().strip().splitlines()[1:]
    assert [r.split(",")[1] for r in csv_rows] == [c["spec"] for c in cands]
    for c in cands:
        with np.load(folder / c["logme_weights"]) as z:
            assert z["weights"].shape == (10, c["feature_dim"])
            assert np.isfinite(z["weights"]).all()
    return data


def test_rank_notebook(tmp_path, monkeypatch):
    work, text = _run(Path(__file__).parent.parent / "notebooks" / "rank.ipynb", tmp_path, monkeypatch)
    data = _check_ranking(work / "ranking-out", 2)
    for c in data["candidates"]:
        assert set(c["scores"]) == {"logme", "leep"}
        # LEEP is the log of an average probability: strictly negative, above log(1/num_classes) - slack
        assert np.log(1e-3) < c["scores"]["leep"] < 0
    noise = float(re.search(r"noise features LogME: (\S+)", text).group(1))
    # Gaussian noise carries no label information: it must score below both pretrained models
    assert noise < min(c["scores"]["logme"] for c in data["candidates"])


def test_tune_notebook(tmp_path, monkeypatch):
    work, text = _run(Path(__file__).parent.parent / "notebooks" / "tune.ipynb", tmp_path, monkeypatch)
    ranking = _check_ranking(work / "rank-out", 2)
    report = json.loads((work / "tune-out" / "report.json").read_text())
    assert report["model"] == ranking["candidates"][0]["spec"]
    assert report["method"] == "finetune" and len(report["history"]) == 1
    assert (work / "tune-out" / "model.safetensors").stat().st_size > 1_000_000  # a whole EfficientNet-Lite
    assert "transfer" in text  # the DANN cell printed its loss terms


def test_btuning_notebook(tmp_path, monkeypatch):
    work, text = _run(Path(__file__).parent.parent / "notebooks" / "btuning.ipynb", tmp_path, monkeypatch)
    _check_ranking(work / "rank-out", 3)
    results = json.loads(text[text.index("{\n"):text.index("}", text.index("{\n")) + 1])
    assert results["btuning"] > 0.5  # 10 classes, chance 0.1
    report = json.loads((work / "btuning-out" / "report.json").read_text())
    assert report["method"] == "btuning" and len(report["history"]) == 3


def test_every_notebook_is_checked():
    assert {p.name for p in NOTEBOOKS} == {"rank.ipynb", "tune.ipynb", "btuning.ipynb"}
