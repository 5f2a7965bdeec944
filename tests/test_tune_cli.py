"""`hubtune tune`, hubtune.tune() and hubtune.make_transferable(): tiny timm models saved as local folders,
the embedded digits dataset, CPU, offline."""
from __future__ import annotations

import json

import pytest
import torch

timm = pytest.importorskip("timm")

import hubtune  # noqa: E402
from hubtune.cli import build_parser, main  # noqa: E402
from hubtune.errors import ConfigError  # noqa: E402
from hubtune.hub import load_candidate  # noqa: E402
from hubtune.ranking import CandidateResult, Ranking  # noqa: E402
from conftest import tiny_timm as tiny  # noqa: E402
from hubtune.tuning import METHODS, Method, save_timm_folder  # noqa: E402
from hubtune.tuning.api import load_tune_config  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")




def read(out):
    return json.loads((out / "report.json").read_text())


def test_help_lists_registered_methods(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["tune", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for name in METHODS.names():
        assert name in text
    assert {"finetune", "dann", "cdan"} <= set(METHODS.names())


def test_cli_finetune_writes_a_loadable_model(tiny_dir, tmp_path, capsys):
    out = tmp_path / "ft"
    rc = main(["tune", "--method", "finetune", "--model", f"local-dir:{tiny_dir}", "--dataset", "digits",
               "--max-samples", "60", "--epochs", "1", "--batch-size", "20", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert (out / "model.safetensors").is_file() and (out / "report.json").is_file()
    rep = read(out)
    assert rep["method"] == "finetune" and rep["model"] == f"local-dir:{tiny_dir}" and rep["dataset"] == "digits"
    assert rep["config"]["epochs"] == 1 and rep["config"]["batch_size"] == 20
    cand = load_candidate(f"local-dir:{out}")
    assert cand.num_classes == 10 and tuple(cand.data_config["input_size"]) == (3, 32, 32)
    assert "tuned" in capsys.readouterr().out


def test_cli_ranking_top_k_and_yaml_config_with_overrides(tiny_dir, tmp_path):
    other = tmp_path / "other-model"
    save_timm_folder(tiny(seed=3), other)
    rdir = tmp_path / "rank"
    rdir.mkdir()
    ranking = Ranking(dataset="digits", metrics=["logme"], candidates=[
        CandidateResult(spec=f"local-dir:{tiny_dir}", scores={"logme": 1.0}, rank=1),
        CandidateResult(spec=f"local-dir:{other}", scores={"logme": 0.5}, rank=2)])
    (rdir / "ranking.json").write_text(json.dumps(ranking.to_dict()))
    out = tmp_path / "from-ranking"
    cfg = tmp_path / "tune.yaml"
    cfg.write_text(f"method: finetune\ndataset: digits\nmax_samples: 40\nepochs: 3\nbatch_size: 20\n"
                   f"lr: 0.05\noptimizer: adamw\nout: {out}\nmodel: local-dir:{other}\n"
                   "method_args:\n  l2sp_alpha: 0.0\n  bss_eta: 0.0\n")
    rc = main(["tune", "--config", str(cfg), "--ranking", str(rdir), "--top-k", "1", "--epochs", "1"])
    assert rc == 0
    rep = read(out)
    assert rep["model"] == f"local-dir:{tiny_dir}"                     # --ranking replaced the file's model
    assert rep["config"]["epochs"] == 1                                # the command line wins
    assert rep["config"]["lr"] == 0.05 and rep["config"]["optimizer"] == "adamw"   # from the file
    assert rep["config"]["batch_size"] == 20
    assert rep["method_hparams"]["l2sp_alpha"] == 0.0 and rep["method_hparams"]["bss_eta"] == 0.0
    assert len(rep["history"]) == 1
    # the CLI's --lr overrides the file's lr; --method-arg overrides method_args
    out2 = tmp_path / "override"
    rc = main(["tune", "--config", str(cfg), "--lr", "0.01", "--out", str(out2), "--method-arg", "bss_eta=0.5",
               "--max-samples", "30"])
    assert rc == 0
    rep2 = read(out2)
    assert rep2["config"]["lr"] == 0.01 and rep2["config"]["epochs"] == 3 and rep2["model"] == f"local-dir:{other}"
    assert rep2["method_hparams"]["bss_eta"] == 0.5 and rep2["method_hparams"]["l2sp_alpha"] == 0.0


def test_bad_method_exits_2_with_registered_names(tiny_dir, tmp_path, capsys):
    rc = main(["tune", "--method", "nope", "--model", f"local-dir:{tiny_dir}", "--dataset", "digits",
               "--out", str(tmp_path / "x")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "nope" in err
    for name in METHODS.names():
        assert name in err
    assert main(["tune", "--model", f"local-dir:{tiny_dir}", "--dataset", "digits", "--out", str(tmp_path)]) == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: finetune\nlearning_rate: 0.1\n")
    assert main(["tune", "--config", str(bad), "--out", str(tmp_path / "y")]) == 2
    assert "learning_rate" in capsys.readouterr().err


def test_load_tune_config_checks_keys(tmp_path):
    assert load_tune_config(None) == {}
    assert load_tune_config({"batch-size": 4}) == {"batch_size": 4}
    with pytest.raises(ConfigError, match="lrate"):
        load_tune_config({"lrate": 1})
    with pytest.raises(ConfigError, match="does not exist"):
        load_tune_config(tmp_path / "missing.yaml")


def test_python_api_dann_on_a_target_dataset(tiny_dir, tmp_path):
    """dann through hubtune.tune: source digits, target another domain (inverted digits in an image folder),
    unlabelled 80 % of the folder for training, its held-out 20 % (stratified) for evaluation."""
    import numpy as np
    from PIL import Image

    from hubtune.data import create_dataset

    digits = create_dataset("digits")
    folder = tmp_path / "inverted"
    for c in range(10):
        (folder / str(c)).mkdir(parents=True)
        for k, i in enumerate(np.flatnonzero(np.asarray(digits.labels) == c)[:5]):
            Image.fromarray(255 - np.asarray(digits.image(int(i)).convert("L"))).save(folder / str(c) / f"{k}.png")
    out = tmp_path / "dann"
    rep = hubtune.tune("dann", model=f"local-dir:{tiny_dir}", dataset="digits", target_dataset=f"imagefolder:{folder}",
                       max_samples=40, epochs=1, batch_size=20, out=out, hidden=16)
    assert rep["method"] == "dann" and rep["target_dataset"] == f"imagefolder:{folder}"
    assert {"train_ce", "train_transfer", "train_domain_acc", "eval_acc"} <= set(rep["final"])
    assert rep["method_hparams"]["grl_max_iters"] == 2            # the warm-up spans this run's 2 steps
    assert load_candidate(f"local-dir:{out}").num_classes == 10
    with pytest.raises(ConfigError, match="target_dataset"):
        hubtune.tune("cdan", model=f"local-dir:{tiny_dir}", dataset="digits", epochs=1, out=tmp_path / "z")


def _batch(n=6, size=32, classes=10):
    g = torch.Generator().manual_seed(0)
    return {"input": torch.randn(n, 3, size, size, generator=g), "target": torch.arange(n) % classes,
            "target_input": torch.randn(n - 1, 3, size, size, generator=g)}


@pytest.mark.parametrize("name, kwargs", [
    ("finetune", {"num_classes": 10}),
    ("dann", {"num_classes": 10, "hidden": 8}),
    ("cdan", {"num_classes": 10, "hidden": 8, "entropy_conditioning": True}),
    ("kd", {"num_classes": 10}),
])
def test_make_transferable_gives_losses_in_one_call(name, kwargs):
    if name not in METHODS:
        pytest.skip(f"method {name!r} is not registered")
    if name == "kd":
        kwargs = dict(kwargs, teacher=tiny(seed=5))
    m = hubtune.make_transferable(tiny(), name, **kwargs)
    assert isinstance(m, Method) and m.name == name
    opt = torch.optim.SGD([p for g in m.param_groups(0.01) for p in g["params"]], lr=0.01)
    batch = _batch()
    terms = m.losses(batch)
    assert "total" in terms and len(terms) >= 2 and torch.isfinite(terms["total"])
    opt.zero_grad()
    terms["total"].backward()
    opt.step()
    assert m.predict(batch["input"]).shape == (6, 10)
    assert hasattr(m.model_to_save(), "pretrained_cfg")


def test_cli_resume_continues_from_the_checkpoint(tiny_dir, tmp_path):
    out = tmp_path / "resume"
    base = ["tune", "--method", "finetune", "--model", f"local-dir:{tiny_dir}", "--dataset", "digits",
            "--max-samples", "30", "--batch-size", "15", "--out", str(out)]
    assert main(base + ["--epochs", "1"]) == 0
    assert main(base + ["--epochs", "2", "--resume"]) == 0
    rep = read(out)
    assert rep["resumed_from_epoch"] == 1 and [h["epoch"] for h in rep["history"]] == [1, 2]


def test_cli_cache_teacher_then_kd_reads_the_cache(tiny_dir, tmp_path, capsys, monkeypatch):
    import numpy as np

    from hubtune.tuning.methods import kd as kd_mod

    teacher = tmp_path / "teacher"
    save_timm_folder(tiny(seed=7), teacher)
    cache_dir = tmp_path / "tcache"
    rc = main(["cache-teacher", "--teacher", f"local-dir:{teacher}", "--dataset", "digits", "--max-samples", "40",
               "--cache-dir", str(cache_dir), "--batch-size", "16"])
    assert rc == 0, capsys.readouterr().err
    path = capsys.readouterr().out.strip().splitlines()[-1]
    arr = np.load(path)
    assert arr.shape == (1, 40, 10) and arr.dtype == np.float32  # (epochs, n, C)
    assert path.startswith(str(cache_dir)) and (cache_dir / (path.rsplit("/", 1)[1] + ".json")).is_file()

    forwards = []
    real_load = kd_mod.load_teacher

    def counting_load(model, role, pretrained):
        hm, cfg = real_load(model, role, pretrained)
        if role == "teacher":
            hm.module.register_forward_hook(lambda *a: forwards.append(1))
        return hm, cfg

    monkeypatch.setattr(kd_mod, "load_teacher", counting_load)
    out = tmp_path / "kd"
    rc = main(["tune", "--method", "kd", "--teacher", f"local-dir:{teacher}", "--model", f"local-dir:{tiny_dir}",
               "--dataset", "digits", "--max-samples", "40", "--epochs", "1", "--batch-size", "20",
               "--out", str(out), "--method-arg", "cache_teacher=true", "--method-arg", f"cache_dir={cache_dir}"])
    assert rc == 0, capsys.readouterr().err
    rep = read(out)
    assert rep["method"] == "kd" and rep["method_hparams"]["cache_path"] == path
    assert forwards == []                                      # every teacher output came from the cache


def test_bad_configuration_missing_teacher_and_mismatched_domains(tiny_dir, tmp_path, capsys):
    from PIL import Image

    with pytest.raises(ConfigError, match="needs a teacher"):
        hubtune.tune("kd", model=f"local-dir:{tiny_dir}", dataset="digits", epochs=1, out=tmp_path / "kd")
    assert main(["tune", "--method", "kd", "--model", f"local-dir:{tiny_dir}", "--dataset", "digits",
                 "--out", str(tmp_path / "kd2")]) == 2
    assert "--teacher" in capsys.readouterr().err
    folder = tmp_path / "two-classes"
    for label in ("a", "b"):
        (folder / label).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(folder / label / f"{i}.png")
    with pytest.raises(ConfigError, match="10 classes but target .* has 2"):
        hubtune.tune("dann", model=f"local-dir:{tiny_dir}", dataset="digits", target_dataset=f"imagefolder:{folder}",
                     eval_dataset=f"imagefolder:{folder}", max_samples=20, epochs=1, out=tmp_path / "da")
