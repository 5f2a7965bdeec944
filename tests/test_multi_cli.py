"""zootuning and hubpathway end to end: `hubtune rank --out` -> `hubtune tune --ranking DIR --top-k K`, the
`--models` list, make_transferable, and the errors for a hub that does not fit (tiny timm models, digits)."""
from __future__ import annotations

import json

import pytest
import torch

timm = pytest.importorskip("timm")

import hubtune  # noqa: E402
from hubtune.cli import main  # noqa: E402
from hubtune.errors import ConfigError  # noqa: E402
from hubtune.tuning import HubPathway, ZooTuning, save_timm_folder  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(arch="test_resnet", seed=0):
    torch.manual_seed(seed)
    return timm.create_model(arch, num_classes=5, pretrained_cfg_overlay={"input_size": (3, 16, 16),
                                                                        "crop_pct": 1.0})


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """Two test_resnet copies (different weights) and a test_efficientnet in local folders, ranked on digits."""
    root = tmp_path_factory.mktemp("hub")
    specs = {}
    for name, arch, seed in (("r1", "test_resnet", 1), ("r2", "test_resnet", 2), ("e1", "test_efficientnet", 3)):
        save_timm_folder(tiny(arch, seed), root / name)
        specs[name] = f"local-dir:{root / name}"
    rc = main(["rank", "--models", ",".join(specs.values()), "--dataset", "digits", "--max-samples", "60",
               "--out", str(root / "rank"), "--cache-dir", str(root / "cache"), "--quiet"])
    assert rc == 0
    return root, specs


def tune_cli(*args):
    return main(["tune", "--dataset", "digits", "--max-samples", "60", "--epochs", "1", "--batch-size", "20",
                 "--optimizer", "adamw", "--lr", "0.003", *args])


def test_cli_hubpathway_from_rank_output(hub, tmp_path, capsys):
    root, specs = hub
    out = tmp_path / "hp"
    rc = tune_cli("--method", "hubpathway", "--ranking", str(root / "rank"), "--top-k", "3", "--out", str(out),
                  "--method-arg", "k=1")
    assert rc == 0, capsys.readouterr().err
    rep = json.loads((out / "report.json").read_text())
    ranked = [c["spec"] for c in json.loads((root / "rank" / "ranking.json").read_text())["candidates"]]
    assert rep["method"] == "hubpathway" and rep["method_hparams"]["names"] == ranked
    assert "eval_acc" in rep["final"]
    m = HubPathway.load(out)
    x = torch.randn(4, 3, 16, 16)
    m.eval()
    assert m.predict(x).shape == (4, 10) and sum(m.last_routed) == 4  # k=1: one model per sample


def test_cli_zootuning_lite_from_models_list_writes_a_timm_folder(hub, tmp_path, capsys):
    _, specs = hub
    out = tmp_path / "zoo"
    rc = tune_cli("--method", "zootuning", "--models", f"{specs['r1']},{specs['r2']}", "--out", str(out),
                  "--method-arg", "lite=true")
    assert rc == 0, capsys.readouterr().err
    rep = json.loads((out / "report.json").read_text())
    assert rep["method"] == "zootuning" and rep["method_hparams"]["lite"] is True
    assert rep["model"] == f"{specs['r1']} + {specs['r2']}"
    cand = hubtune.load_candidate(f"local-dir:{out}")  # the collapsed model: one ordinary timm model
    assert type(cand.module).__name__ == "ResNet" and cand.num_classes == 10


def test_zootuning_from_a_ranking_of_mixed_architectures_is_refused(hub, tmp_path, capsys):
    root, _ = hub
    rc = tune_cli("--method", "zootuning", "--ranking", str(root / "rank"), "--top-k", "3", "--out",
                  str(tmp_path / "z"))
    err = capsys.readouterr().err
    assert rc == 2 and "hubpathway" in err  # names the cure
    assert not (tmp_path / "z" / "model.safetensors").exists()
    with pytest.raises(ConfigError, match="only 3 candidate"):
        hubtune.tune("hubpathway", ranking=root / "rank", top_k=5, dataset="digits", max_samples=30, epochs=1)
    with pytest.raises(ConfigError, match="takes no teacher"):
        hubtune.tune("hubpathway", ranking=root / "rank", top_k=2, teacher="x", dataset="digits", epochs=1)
    with pytest.raises(ConfigError, match="several models"):
        hubtune.tune("hubpathway", dataset="digits", max_samples=30, epochs=1)


def test_make_transferable_takes_a_list_of_models():
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0])
    for name, models in (("zootuning", [tiny(seed=1), tiny(seed=2)]),
                         ("hubpathway", [tiny(seed=1), tiny("test_efficientnet", 2)])):
        m = hubtune.make_transferable(models, name, num_classes=3)
        assert isinstance(m, (ZooTuning, HubPathway))
        terms = m.losses({"input": x, "target": y})
        terms["total"].backward()
        assert m.predict(x).shape == (4, 3)
