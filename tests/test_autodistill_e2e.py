"""AutoDistillation end to end on digits through the CLI: 3 trials, the outputs, front members that load back as
``local-dir:`` and reproduce their recorded accuracy, refusal and resume of a finished search, and a search killed
inside a trial's training (the Engine's fault hook, a real SIGKILL) that resumes to the uninterrupted result."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

pytestmark = pytest.mark.usefixtures("one_thread")  # the 3-trial search takes ~3 s on an idle core

SPACE = "arch: test_efficientnet\nparams:\n  channel_multiplier: {choices: [0.5, 1.0, 1.5]}\n"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from hubtune.tuning import save_timm_folder

    d = tmp_path_factory.mktemp("autodistill")
    torch.manual_seed(0)
    t = timm.create_model("test_resnet", num_classes=10,
                          pretrained_cfg_overlay={"input_size": (3, 16, 16), "crop_pct": 1.0})
    save_timm_folder(t, d / "teacher")
    (d / "space.yaml").write_text(SPACE)
    return d


def args(d: Path, out: Path, *extra):
    return ["autodistill", "--teacher", f"local-dir:{d / 'teacher'}", "--space", str(d / "space.yaml"),
            "--dataset", "digits", "--trials", "3", "--sampler", "tpe", "--max-samples", "120", "--eval-samples",
            "60", "--flash-steps", "2", "--epochs", "1", "--batch-size", "30", "--latency-min-run-time", "0.05",
            "--out", str(out), "--quiet", *extra]


@pytest.fixture(scope="module")
def full(setup):
    from hubtune.cli import main

    out = setup / "full"
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # module-scoped, so made before the one_thread fixture: the killed run has 1 thread
    try:
        assert main(args(setup, out)) == 0
    finally:
        torch.set_num_threads(n)
    return out


def test_three_trial_search_writes_a_loadable_front(setup, full):
    from hubtune.hub import load_candidate
    from hubtune.search.api import load_search_data

    rows = list(csv.DictReader((full / "trials.csv").open()))
    trained = [r for r in rows if r["state"] == "COMPLETE" and not r["duplicate_of"]]
    assert len(trained) == 3 and len({r["param_channel_multiplier"] for r in trained}) == 3
    pareto = json.loads((full / "pareto.json").read_text())
    assert pareto["evaluated"] == 3 and pareto["front"] and (full / "pareto.png").stat().st_size > 1000
    dc = json.loads((setup / "teacher" / "config.json").read_text())["pretrained_cfg"]
    _, eval_set, _ = load_search_data("digits", dc, max_samples=120, eval_samples=60, seed=0)
    x, y = eval_set.tensors
    for r in pareto["front"]:
        c = load_candidate(r["loadable"])
        assert r["loadable"].startswith(f"local-dir:{full / 'front'}")
        with torch.no_grad():
            acc = (c.module.eval()(x).argmax(1) == y).double().mean().item()
        assert acc == pytest.approx(r["values"]["accuracy:max"], abs=1e-12)
        assert tuple(c.data_config["input_size"]) == (3, 16, 16)


def test_a_finished_search_is_refused_without_resume_and_answered_from_the_record_with_it(setup, full, capsys):
    from hubtune.cli import main

    before = json.loads((full / "trials.json").read_text())
    assert main(args(setup, full)) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(args(setup, full, "--resume")) == 0
    after = json.loads((full / "trials.json").read_text())
    assert after == before


@pytest.mark.slow
def test_search_killed_inside_training_resumes_to_the_uninterrupted_result(setup, full, tmp_path):
    """SIGKILL at the 3rd optimiser step of one Engine run: inside the first trial's regular distillation (its flash
    stages are done and are loaded back from their folders; the regular stage starts again). The resumed
    search trains the same students to the same accuracies and flash losses (latency is measured again only for
    the interrupted trial, so it is not compared)."""
    out = tmp_path / "killed"
    env = dict(os.environ, OMP_NUM_THREADS="1", HUBTUNE_TEST_KILL_AFTER_STEPS="3")
    cmd = [sys.executable, "-m", "hubtune.cli", *args(setup, out)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == -9, r.stderr[-2000:]
    assert not (out / "trials.json").exists()
    env.pop("HUBTUNE_TEST_KILL_AFTER_STEPS")
    r = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]

    def key(folder):
        t = json.loads((folder / "trials.json").read_text())["trials"]
        return [(x["number"], x["state"], x["params"], x["values"]["accuracy:max"],
                 [s.get("layer_loss") for s in x["metrics"].get("stages", [])]) for x in t]

    assert key(out) == key(full)
