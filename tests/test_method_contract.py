"""The declarative method contract (issue 9, "a new method really is one file"): a method written in one new file
runs through `hubtune tune`, `hubtune.tune()`, `make_transferable` and `create_method`, its settings are listed by
`hubtune tune --help` and validated; DANN + BSS is one option; the regularizers are modules; no import circle."""
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

import hubtune  # noqa: E402
from hubtune.cli import main  # noqa: E402
from hubtune.errors import ConfigError  # noqa: E402
from conftest import tiny_timm as tiny  # noqa: E402
from hubtune.tuning import METHODS, Method  # noqa: E402
from hubtune.tuning.losses import BatchSpectralShrinkage, SPRegularization, bss_penalty  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]

#: the whole of a new method: no other file is touched to add it
PLUGIN = '''
"""A label-smoothed fine-tune with a frozen-backbone option: one file, nothing else to edit."""
import torch.nn.functional as F

from hubtune.tuning import Method, Setting, new_head, penultimate_features, register_method


@register_method("{name}")
class SmoothTune(Method):
    """Fine-tune with label smoothing (a one-file method)."""

    settings = {{"smoothing": Setting(0.0, "label smoothing of the cross-entropy", float),
                "probe_only": Setting(False, "train the new head only", bool)}}
    regularizers = ("bss",)

    def __init__(self, model, num_classes, *, smoothing=0.0, probe_only=False, **regularizers):
        super().__init__()
        nh = new_head(model, num_classes, who="{name}")
        self.model, self.smoothing = nh.module, float(smoothing)
        if probe_only:
            for n, p in self.model.named_parameters():
                p.requires_grad_(n in nh.head_names)
        self.add_regularizers(self.model, nh.source_state, nh.head_names, **regularizers)

    def losses(self, batch):
        f = penultimate_features(self.model, batch["input"])
        ce = F.cross_entropy(self.model.get_classifier()(f).float(), batch["target"],
                             label_smoothing=self.smoothing)
        reg = self.regularize(f)
        return {{"total": ce + sum(reg.values()), "ce": ce.detach(), **{{k: v.detach() for k, v in reg.items()}}}}

    def predict(self, x):
        return self.model(x)

    def model_to_save(self):
        return self.model

    def hparams(self):
        return {{"smoothing": self.smoothing}}
'''




def read(out) -> dict:
    return json.loads((Path(out) / "report.json").read_text())


def test_a_method_in_one_new_file_in_the_methods_folder(tiny_dir, tmp_path):
    """In process: the file lands in a folder on ``hubtune.tuning.methods.__path__``; the registry finds it."""
    import hubtune.tuning.methods as pkg

    folder = tmp_path / "extra_methods"
    folder.mkdir()
    (folder / "smoothtune_inproc.py").write_text(PLUGIN.format(name="smoothtune-inproc"))
    assert "smoothtune-inproc" not in METHODS._entries
    pkg.__path__.append(str(folder))
    try:
        assert "smoothtune-inproc" in hubtune.list_methods()
        cls = METHODS.get("smoothtune-inproc")
        assert cls.__module__ == "hubtune.tuning.methods.smoothtune_inproc"
        # hubtune.tune(): built by the default from_settings, data config and name from the model
        rep = hubtune.tune("smoothtune-inproc", model=f"local-dir:{tiny_dir}", dataset="digits", max_samples=30,
                           epochs=1, batch_size=15, out=tmp_path / "run", smoothing=0.1, bss_eta=0.001)
        assert rep["method"] == "smoothtune-inproc" and rep["model"] == f"local-dir:{tiny_dir}"
        assert rep["method_hparams"] == {"smoothing": 0.1} and "train_bss" in rep["final"]
        assert hubtune.load_candidate(f"local-dir:{tmp_path / 'run'}").module.num_classes == 10
        # make_transferable and create_method: the same door
        m = hubtune.make_transferable(tiny(), "smoothtune-inproc", num_classes=3, seed=0, probe_only=True)
        x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
        terms = m.losses({"input": x, "target": y})
        terms["total"].backward()
        assert set(terms) == {"total", "ce"} and m.data_config["input_size"] == (3, 32, 32)
        assert sorted(n for n, p in m.model.named_parameters() if p.requires_grad) == ["fc.bias", "fc.weight"]
        m2 = hubtune.create_method("smoothtune-inproc", model=tiny(), num_classes=3, smoothing=0.2)
        assert m2.smoothing == 0.2
        # settings are validated: unknown name, wrong type
        with pytest.raises(ConfigError, match="has no argument 'smoothin'.*accepts: smoothing, probe_only, bss_eta"):
            hubtune.make_transferable(tiny(), "smoothtune-inproc", num_classes=3, smoothin=0.1)
        with pytest.raises(ConfigError, match="smoothing='lots' is invalid"):
            hubtune.create_method("smoothtune-inproc", model=tiny(), num_classes=3, smoothing="lots")
        # paired inputs are refused for a labelled method, teachers for a method without any
        with pytest.raises(ConfigError, match="does not adapt between domains"):
            hubtune.tune("smoothtune-inproc", model=f"local-dir:{tiny_dir}", dataset="digits",
                         target_dataset="digits", epochs=1)
        with pytest.raises(ConfigError, match="takes no teacher"):
            hubtune.tune("smoothtune-inproc", model=f"local-dir:{tiny_dir}", dataset="digits", teacher="x", epochs=1)
    finally:
        pkg.__path__.remove(str(folder))


def _cli(args, env_extra, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", **env_extra)
    return subprocess.run([sys.executable, "-m", "hubtune.cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=600)


def test_a_plugin_method_runs_through_the_cli(tiny_dir, tmp_path):
    """A subprocess: the file is a module on PYTHONPATH named by HUBTUNE_PLUGINS; --help lists its settings,
    --method-arg is validated against them, and `hubtune tune` trains with it."""
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "smoothtune_plugin.py").write_text(PLUGIN.format(name="smoothtune-plugin"))
    env = {"HUBTUNE_PLUGINS": "smoothtune_plugin",
           "PYTHONPATH": os.pathsep.join([str(plugins), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    r = _cli(["tune", "--help"], env, tmp_path)
    assert r.returncode == 0, r.stderr
    assert "smoothtune-plugin: Fine-tune with label smoothing" in r.stdout
    assert "smoothing=0.0: label smoothing of the cross-entropy" in r.stdout
    assert "bss_eta=0.0" in r.stdout and "dann (--target-dataset)" in r.stdout
    base = ["tune", "--method", "smoothtune-plugin", "--model", f"local-dir:{tiny_dir}", "--dataset", "digits",
            "--max-samples", "30", "--epochs", "1", "--batch-size", "15", "--quiet"]
    bad = _cli(base + ["--out", str(tmp_path / "bad"), "--method-arg", "smothing=0.1"], env, tmp_path)
    assert bad.returncode == 2 and "has no argument 'smothing'" in bad.stderr and "smoothing" in bad.stderr
    ok = _cli(base + ["--out", str(tmp_path / "ok"), "--method-arg", "smoothing=0.1"], env, tmp_path)
    assert ok.returncode == 0, ok.stderr
    rep = read(tmp_path / "ok")
    assert rep["method"] == "smoothtune-plugin" and rep["method_hparams"] == {"smoothing": 0.1}
    missing = _cli(["tune", "--help"], {"HUBTUNE_PLUGINS": "no_such_plugin_module"}, tmp_path)
    assert missing.returncode != 0 and "HUBTUNE_PLUGINS" in missing.stderr


def test_dann_with_bss_is_one_option(tiny_dir, tmp_path):
    m = hubtune.make_transferable(tiny(), "dann", num_classes=3, seed=0, hidden=8, bss_eta=0.5, bss_k=2)
    x_s, x_t, y = torch.randn(6, 3, 32, 32), torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2])
    m.eval()
    terms = m.losses({"input": x_s, "target": y, "target_input": x_t})
    assert set(terms) == {"total", "ce", "transfer", "domain_acc", "grl_coeff", "bss"}
    with torch.no_grad():
        f_s = m.features(x_s)
        f = m.features(torch.cat([x_s, x_t]))[:6]  # BSS is on the source rows of the joint forward
    assert float(terms["bss"]) == pytest.approx(0.5 * float(bss_penalty(f, 2)), rel=1e-4)
    assert float(terms["total"].detach()) == pytest.approx(float(terms["ce"] + terms["transfer"] + terms["bss"]),
                                                           rel=1e-5)
    assert f_s.shape == f.shape
    off = hubtune.make_transferable(tiny(), "dann", num_classes=3, seed=0, hidden=8)
    assert "bss" not in off.losses({"input": x_s, "target": y, "target_input": x_t})
    # through `hubtune tune`: --method-arg bss_eta on dann
    out = tmp_path / "dann-bss"
    rc = main(["tune", "--method", "dann", "--model", f"local-dir:{tiny_dir}", "--dataset", "digits",
               "--target-dataset", "digits", "--max-samples", "30", "--epochs", "1", "--batch-size", "15",
               "--out", str(out), "--quiet", "--method-arg", "bss_eta=0.001", "--method-arg", "hidden=8"])
    assert rc == 0
    rep = read(out)
    assert rep["method_hparams"]["bss_eta"] == 0.001 and "train_bss" in rep["final"]
    with pytest.raises(ConfigError, match="bss_eta=-1 is invalid"):
        hubtune.make_transferable(tiny(), "dann", num_classes=3, bss_eta=-1)


def test_regularizers_are_modules():
    torch.manual_seed(0)
    f = torch.randn(8, 5, dtype=torch.float64)
    s = torch.linalg.svdvals(f)
    assert float(BatchSpectralShrinkage(k=2)(f)) == pytest.approx(float(s[-2] ** 2 + s[-1] ** 2), rel=1e-6)
    src, tgt = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    sp = SPRegularization(src, tgt)
    with torch.no_grad():
        want = 0.5 * sum(float(((a - b) ** 2).sum()) for a, b in zip(tgt.parameters(), src.parameters()))
    assert float(sp().detach()) == pytest.approx(want, rel=1e-6)
    assert set(dict(sp.named_buffers())) == {"w0__weight", "w0__bias"} and not list(sp.parameters())
    sp().backward()
    assert tgt.weight.grad is not None


def test_every_registered_method_declares_what_it_takes():
    """The declaration is the one source: every setting is a keyword of the constructor with the same default,
    and every declared teacher is a constructor argument (this test is the only place a signature is read)."""
    for name in METHODS.names():
        cls = METHODS.get(name)
        assert cls.inputs in ("labeled", "paired") and cls.models in ("one", "many"), name
        params = inspect.signature(cls.__init__).parameters
        for t in cls.teachers:
            assert t in params, (name, t)
        for sname, setting in cls.settings.items():
            if sname in params and params[sname].default is not inspect.Parameter.empty:
                assert params[sname].default == setting.default, (name, sname)
            else:  # its own from_settings fills or consumes it (btuning's teacher_weights come from the ranking)
                assert cls.from_settings.__func__ is not Method.from_settings.__func__, (name, sname)
    assert METHODS.get("dann").inputs == "paired" and METHODS.get("btuning").models == "many"
    assert METHODS.get("kd").teachers == ("teacher",)


def test_no_import_circle_and_losses_split_by_family():
    tuning = ROOT / "hubtune" / "tuning"
    # engine imports the contract; the contract (and the timm-folder saving both use) never imports the engine
    assert "from .method import Method" in (tuning / "engine.py").read_text()
    for f in ("method.py", "_save.py"):
        assert "from .engine" not in (tuning / f).read_text() and "import engine" not in (tuning / f).read_text(), f
    r = subprocess.run([sys.executable, "-c", "import hubtune.tuning.losses.regularizers, hubtune.tuning._save"],
                       capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tuning / "losses").glob("*.py")) == [
        "__init__.py", "_checks.py", "adversarial.py", "distillation.py", "hints.py", "regularizers.py"]
    for old in ("kd.py", "finetune.py", "adaptation.py", "btuning.py", "zootuning.py", "hubpathway.py", "losses.py",
                "multi.py"):
        assert not (tuning / old).exists(), old
    # api.py: no method named, no signature read, no attribute probed (docstrings aside)
    import ast

    tree = ast.parse((tuning / "api.py").read_text())
    docs = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
    strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
               and id(n) not in docs}
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | \
        {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)} | \
        {a.name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
    assert not (set(METHODS.names()) - {"finetune"}) & strings  # finetune: the teacher fine-tune service
    assert not {"inspect", "signature", "cache_path", "multi_model", "from_ranking"} & names
    assert hubtune.create_method is hubtune.tuning.create_method
