"""A spec's data config: the ``?key=value`` suffix, YAML mapping entries, precedence over config.json /
pretrained_cfg / timm's defaults, provenance, ``hubtune hub info``, cache separation, and what the model sees
when ranking and tuning. Tiny random-init models only; nothing is downloaded."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

timm = pytest.importorskip("timm")
from safetensors.torch import save_file  # noqa: E402

from hubtune.cli import main  # noqa: E402
from hubtune.data import ArrayDataset  # noqa: E402
from hubtune.errors import InputError, SpecError  # noqa: E402
from hubtune.features import ExtractOptions, FeatureCache, extract  # noqa: E402
from hubtune.hub import (  # noqa: E402
    ModelSpec,
    candidate_info,
    data_config_warning,
    identify_candidate,
    load_candidate,
    read_hub_file,
    split_specs,
)
from hubtune.hub.spec import CROP_MODES, DATA_KEYS, INTERPOLATIONS  # noqa: E402

DEFAULT = "timm default for test_resnet"


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HUBTUNE_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A bare test_resnet weights file (5 classes): no data config of its own."""
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=5)
    path = tmp_path_factory.mktemp("w") / "w.safetensors"
    save_file(model.state_dict(), str(path))
    return path


@pytest.fixture
def images():
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(24, 40, 40, 3), dtype=np.uint8)
    return ArrayDataset("rand24", imgs, np.arange(24) % 3)


def opts(tmp_path, **kw):
    base = dict(batch_size=8, chunk_size=12, precision="fp32", compile=False, progress=False, num_workers=0,
                cache_dir=str(tmp_path / "features"))
    return ExtractOptions(**{**base, **kw})


# ------------------------------------------------------------------ grammar

@pytest.mark.parametrize(
    "text, kind, name, arch, revision, overrides, canonical",
    [
        ("resnet18?input_size=64", "timm", "resnet18", None, None, {"input_size": (3, 64, 64)},
         "resnet18?input_size=64"),
        ("file:w.safetensors::resnet18?input_size=64&mean=0.5,0.5,0.5&std=0.5,0.5,0.5&interpolation=bilinear"
         "&crop_pct=1.0&crop_mode=center", "file", "w.safetensors", "resnet18", None,
         {"input_size": (3, 64, 64), "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bilinear",
          "crop_pct": 1.0, "crop_mode": "center"},
         "file:w.safetensors::resnet18?input_size=64&mean=0.5,0.5,0.5&std=0.5,0.5,0.5&interpolation=bilinear"
         "&crop_pct=1.0&crop_mode=center"),
        # canonical order, N for a square size, 1 mean value repeated, spaces and ints normalised
        ("file:w.pt::resnet18?crop_mode=squash&mean=0.5&input_size=3,64,64&crop_pct=1", "file", "w.pt", "resnet18",
         None, {"input_size": (3, 64, 64), "mean": (0.5,) * 3, "crop_pct": 1.0, "crop_mode": "squash"},
         "file:w.pt::resnet18?input_size=64&mean=0.5,0.5,0.5&crop_pct=1.0&crop_mode=squash"),
        ("hf-hub:acme/tiny@v1.0?input_size=3,32,48", "hf-hub", "acme/tiny", None, "v1.0",
         {"input_size": (3, 32, 48)}, "hf-hub:acme/tiny@v1.0?input_size=3,32,48"),
        ("timm:resnet18.a1_in1k?std=0.25", "timm", "resnet18.a1_in1k", None, None, {"std": (0.25,) * 3},
         "resnet18.a1_in1k?std=0.25,0.25,0.25"),
        ("pkg:efficientnet_lite0?interpolation=bilinear", "pkg", "efficientnet_lite0", None, None,
         {"interpolation": "bilinear"}, "pkg:efficientnet_lite0?interpolation=bilinear"),
        # a bare '?' sets nothing
        ("resnet18?", "timm", "resnet18", None, None, {}, "resnet18"),
        # paths may hold '?': a file: suffix follows ::ARCH, a local-dir: one follows the last '?'
        ("file:odd?dir/w.pt::resnet18", "file", "odd?dir/w.pt", "resnet18", None, {}, "file:odd?dir/w.pt::resnet18"),
        ("file:C::odd?x/w.pth::resnet18?crop_pct=0.9", "file", "C::odd?x/w.pth", "resnet18", None,
         {"crop_pct": 0.9}, "file:C::odd?x/w.pth::resnet18?crop_pct=0.9"),
        ("local-dir:/m/odd?dir?", "local-dir", "/m/odd?dir", None, None, {}, "local-dir:/m/odd?dir?"),
        ("local-dir:/m/odd?dir?input_size=32", "local-dir", "/m/odd?dir", None, None, {"input_size": (3, 32, 32)},
         "local-dir:/m/odd?dir?input_size=32"),
        ("local-dir:C:\\models\\m?crop_mode=border", "local-dir", "C:\\models\\m", None, None,
         {"crop_mode": "border"}, "local-dir:C:\\models\\m?crop_mode=border"),
    ],
)
def test_suffix_parses_and_round_trips(text, kind, name, arch, revision, overrides, canonical):
    spec = ModelSpec.parse(text)
    assert (spec.kind, spec.name, spec.arch, spec.revision) == (kind, name, arch, revision)
    assert spec.overrides == overrides
    assert str(spec) == canonical
    assert ModelSpec.parse(str(spec)) == spec
    assert spec.without_data_config() == ModelSpec(kind, name, arch, revision)


@pytest.mark.parametrize(
    "text, needles",
    [
        ("resnet18?foo=1", ["'foo'", "input_size, mean, std, interpolation, crop_pct, crop_mode"]),
        ("resnet18?input_size=abc", ["input_size='abc'", "3,H,W"]),
        ("resnet18?input_size=64.5", ["input_size='64.5'", "whole number"]),
        ("resnet18?input_size=1,64,64", ["input_size='1,64,64'", "RGB"]),
        ("resnet18?input_size=64,64", ["input_size='64,64'", "3,H,W"]),
        ("resnet18?input_size=0", ["input_size='0'", "1..4096"]),
        ("resnet18?input_size=99999", ["input_size='99999'", "1..4096"]),
        ("resnet18?mean=0.5,0.5", ["mean='0.5,0.5'", "3 finite numbers"]),
        ("resnet18?mean=nan,0,0", ["mean='nan,0,0'", "finite"]),
        ("resnet18?mean=0.5,,0.5", ["mean='0.5,,0.5'", "empty item"]),
        ("resnet18?std=0.5,0,0.5", ["std='0.5,0,0.5'", "> 0"]),
        ("resnet18?interpolation=cubic", ["interpolation='cubic'", "bilinear, bicubic"]),
        ("resnet18?interpolation=random", ["interpolation='random'"]),
        ("resnet18?crop_pct=1.5", ["crop_pct='1.5'", "(0, 1]"]),
        ("resnet18?crop_pct=0", ["crop_pct='0'", "(0, 1]"]),
        ("resnet18?crop_mode=middle", ["crop_mode='middle'", "center, squash, border"]),
        ("resnet18?input_size", ["'input_size' is not key=value"]),
        ("resnet18?input_size=64&input_size=32", ["sets input_size twice"]),
        ("resnet18?input_size=64&", ["empty item"]),
        ("resnet18?input_size=64?crop_pct=1", ["input_size='64?crop_pct=1'"]),
        ("file:w.pt?input_size=64::resnet18", ["goes after ::ARCH"]),
        ("local-dir:\\\\?\\C:\\m", ["ends with a bare '?'"]),
    ],
)
def test_bad_suffix_raises_spec_error_naming_key_value_and_allowed(text, needles):
    with pytest.raises(SpecError) as e:
        ModelSpec.parse(text)
    assert isinstance(e.value, InputError) and isinstance(e.value, ValueError)
    assert repr(text) in str(e.value)  # the spec is named
    for needle in needles:
        assert needle in str(e.value)


def test_with_data_config_from_python_values():
    spec = ModelSpec.parse("file:w.pt::resnet18").with_data_config(input_size=[3, 64, 64], mean=0.5, std=[0.2] * 3,
                                                                   crop_pct=1)
    assert str(spec) == "file:w.pt::resnet18?input_size=64&mean=0.5,0.5,0.5&std=0.2,0.2,0.2&crop_pct=1.0"
    with pytest.raises(SpecError, match="given twice"):
        ModelSpec.parse("resnet18?input_size=64").with_data_config(input_size=32)
    for bad in ({"input_size": True}, {"mean": ["a", 1, 2]}, {"crop_pct": [1.0]}, {"interpolation": 3},
                {"nope": 1}):
        with pytest.raises(SpecError, match=next(iter(bad))):
            ModelSpec.parse("resnet18").with_data_config(bad)


def test_split_specs_keeps_list_values_with_their_spec():
    text = ("file:w.pt::resnet18?mean=0.5,0.5,0.5&input_size=3,64,64,resnet50, pkg:efficientnet_lite0?std=1,2,3"
            "&crop_pct=1,,resnet18?crop_pct=0.9,resnet34")
    assert split_specs(text) == ["file:w.pt::resnet18?mean=0.5,0.5,0.5&input_size=3,64,64", "resnet50",
                                 "pkg:efficientnet_lite0?std=1,2,3&crop_pct=1", "resnet18?crop_pct=0.9", "resnet34"]
    assert split_specs("resnet18,resnet34") == ["resnet18", "resnet34"]


_floats = st.floats(min_value=-4, max_value=4, allow_nan=False, allow_infinity=False)
_overrides = st.fixed_dictionaries({}, optional={
    "input_size": st.one_of(st.integers(1, 4096), st.tuples(st.just(3), st.integers(1, 4096), st.integers(1, 4096))),
    "mean": st.one_of(_floats, st.lists(_floats, min_size=3, max_size=3)),
    "std": st.one_of(st.floats(1e-6, 10), st.lists(st.floats(1e-6, 10), min_size=3, max_size=3)),
    "interpolation": st.sampled_from(INTERPOLATIONS),
    "crop_pct": st.floats(1e-3, 1.0),
    "crop_mode": st.sampled_from(CROP_MODES),
})
_bases = st.sampled_from(["resnet18", "resnet50.a1_in1k", "hf-hub:acme/tiny", "hf-hub:acme/tiny@main",
                          "local-dir:/m/a b", "local-dir:/m/odd?dir?", "file:C::x/w.pt::resnet18",
                          "file:a?b/w.safetensors::vit_small_patch16_224", "pkg:efficientnet_lite1"])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(_bases, _overrides), min_size=1, max_size=4))
def test_format_then_parse_round_trips(entries):
    specs = [ModelSpec.parse(base).with_data_config(ov) for base, ov in entries]
    texts = [str(s) for s in specs]
    for spec, text in zip(specs, texts):
        again = ModelSpec.parse(text)
        assert again == spec and str(again) == text
        assert set(again.overrides) <= set(DATA_KEYS)
    assert split_specs(",".join(texts)) == texts  # a --models list splits back into the same specs


# ------------------------------------------------------------------ precedence and provenance

def test_file_spec_override_wins_over_timm_default(weights):
    plain = load_candidate(f"file:{weights}::test_resnet")
    assert plain.data_config["input_size"] == (3, 160, 160)  # timm's default for test_resnet
    assert set(plain.data_config_source.values()) == {DEFAULT}
    spec = f"file:{weights}::test_resnet?input_size=64&mean=0.5&std=0.25&interpolation=bicubic&crop_pct=1.0"
    cand = load_candidate(spec)
    assert cand.data_config == {"input_size": (3, 64, 64), "interpolation": "bicubic", "mean": (0.5,) * 3,
                                "std": (0.25,) * 3, "crop_pct": 1.0, "crop_mode": "center"}
    assert cand.data_config_source == {"input_size": "override", "interpolation": "override", "mean": "override",
                                       "std": "override", "crop_pct": "override", "crop_mode": DEFAULT}
    assert cand.identity != plain.identity  # another candidate: another cache identity
    ref = identify_candidate(spec)  # without loading: the same config, provenance and identity
    assert (ref.data_config, ref.data_config_source, ref.identity) == (cand.data_config, cand.data_config_source,
                                                                      cand.identity)
    info = candidate_info(spec)
    assert info["data_config"] == cand.data_config and info["data_config_source"] == cand.data_config_source
    assert info["input_size"] == (3, 64, 64)


def test_local_dir_override_wins_over_config_json(tiny_dir, tmp_path):
    base = load_candidate(f"local-dir:{tiny_dir}")
    assert base.data_config["input_size"] == (3, 32, 32)
    assert set(base.data_config_source.values()) == {"config.json"}  # saved by hubtune: every key is there
    cand = load_candidate(f"local-dir:{tiny_dir}?input_size=48&crop_mode=squash")
    assert cand.data_config["input_size"] == (3, 48, 48) and cand.data_config["crop_mode"] == "squash"
    assert cand.data_config["crop_pct"] == base.data_config["crop_pct"] == 1.0
    assert cand.data_config_source["input_size"] == "override" and cand.data_config_source["crop_pct"] == "config.json"

    # a config.json whose pretrained_cfg sets some keys: timm fills the rest from its generic defaults
    import shutil

    part = tmp_path / "part"
    shutil.copytree(tiny_dir, part)
    cfg = json.loads((part / "config.json").read_text())
    cfg["pretrained_cfg"] = {"input_size": [3, 40, 40], "mean": [0.1, 0.2, 0.3]}
    (part / "config.json").write_text(json.dumps(cfg))
    info = candidate_info(f"local-dir:{part}?std=0.5")
    assert info["data_config"]["input_size"] == (3, 40, 40) and info["data_config"]["mean"] == (0.1, 0.2, 0.3)
    assert info["data_config_source"] == {"input_size": "config.json", "mean": "config.json", "std": "override",
                                          "interpolation": "timm default", "crop_pct": "timm default",
                                          "crop_mode": "timm default"}
    assert load_candidate(f"local-dir:{part}?std=0.5").data_config_source == info["data_config_source"]


def test_timm_and_package_provenance_without_downloading(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    info = candidate_info("test_resnet.r160_in1k?crop_pct=1.0")
    assert info["data_config"]["crop_pct"] == 1.0 and info["data_config"]["input_size"] == (3, 160, 160)
    assert info["data_config_source"]["crop_pct"] == "override"
    assert info["data_config_source"]["input_size"] == "pretrained_cfg"
    info = candidate_info("pkg:efficientnet_lite0?input_size=64")
    assert info["data_config"]["input_size"] == (3, 64, 64) and info["input_size"] == (3, 64, 64)
    assert info["data_config_source"]["input_size"] == "override"
    assert {v for k, v in info["data_config_source"].items() if k != "input_size"} == {"package"}
    # random init: the registry's pretrained_cfg, then the override
    cand = load_candidate("test_resnet?input_size=48", pretrained=False)
    assert cand.data_config["input_size"] == (3, 48, 48)
    assert cand.data_config_source["mean"] == "pretrained_cfg"


def test_transformers_provenance():
    from hubtune.hub._transformers import data_config_from_processor, data_config_origin

    pp = {"size": {"shortest_edge": 256}, "crop_size": {"height": 224, "width": 224}, "do_center_crop": True,
          "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 2}
    origin = data_config_origin(pp, {})
    assert set(origin) == set(data_config_from_processor(pp, {}))
    assert origin == {"input_size": "preprocessor_config.json", "interpolation": "preprocessor_config.json",
                      "mean": "preprocessor_config.json", "std": "preprocessor_config.json",
                      "crop_pct": "preprocessor_config.json", "crop_mode": "transformers default"}
    origin = data_config_origin(None, {"image_size": 384})
    assert origin["input_size"] == "config.json" and origin["mean"] == "transformers default"
    assert data_config_origin({"size": 224}, {})["mean"] == "transformers default"


def test_warning_only_for_a_file_spec_entirely_on_timm_defaults(weights):
    spec = f"file:{weights}::test_resnet"
    note = data_config_warning(spec, load_candidate(spec).data_config_source)
    assert note.startswith(f"{spec}: no data config in the checkpoint; using timm's default for test_resnet; "
                           "set it with ?input_size=")
    assert "\n" not in note
    assert data_config_warning(spec + "?crop_pct=1.0", {"crop_pct": "override"}) is None
    assert data_config_warning("resnet18", {"input_size": "pretrained_cfg"}) is None


# ------------------------------------------------------------------ hub files

def test_yaml_mapping_entries_and_txt_suffix(tmp_path, weights):
    import shutil

    shutil.copy(weights, tmp_path / "w.safetensors")
    (tmp_path / "hub.yaml").write_text(
        "models:\n"
        "  - file:w.safetensors::test_resnet\n"
        "  - {spec: 'file:w.safetensors::test_resnet', input_size: 64, mean: [0.5, 0.5, 0.5], std: 0.5}\n"
        "  - spec: file:w.safetensors::test_resnet?crop_pct=1.0\n"
        "    input_size: [3, 32, 48]\n"
        "    interpolation: bilinear\n"
        "    crop_mode: squash\n"
        "  - {spec: 'file:w.safetensors::test_resnet?mean=0.5&input_size=64&std=0.5,0.5,0.5'}\n"  # a duplicate
    )
    w = tmp_path / "w.safetensors"
    assert read_hub_file(tmp_path / "hub.yaml") == [
        f"file:{w}::test_resnet",
        f"file:{w}::test_resnet?input_size=64&mean=0.5,0.5,0.5&std=0.5,0.5,0.5",
        f"file:{w}::test_resnet?input_size=3,32,48&interpolation=bilinear&crop_pct=1.0&crop_mode=squash",
    ]
    (tmp_path / "hub.txt").write_text(
        "# two data configs of one file\n"
        "file:w.safetensors::test_resnet?input_size=64   # small\n"
        "file:w.safetensors::test_resnet?crop_pct=1.0&crop_mode=border\n")
    assert read_hub_file(tmp_path / "hub.txt") == [f"file:{w}::test_resnet?input_size=64",
                                                   f"file:{w}::test_resnet?crop_pct=1.0&crop_mode=border"]


@pytest.mark.parametrize(
    "entry, needles",
    [
        ("{spec: 'resnet18', input_size: 64, colour: red}", ["entry 1", "'colour'", "input_size, mean"]),
        ("{input_size: 64}", ["entry 1", "needs a 'spec'"]),
        ("{spec: 'resnet18?input_size=32', input_size: 64}", ["given twice"]),
        ("{spec: 'resnet18', crop_pct: 2}", ["entry 1", "resnet18", "crop_pct=2", "(0, 1]"]),
        ("{spec: 'resnet18', mean: [0.5, 0.5]}", ["mean=[0.5, 0.5]", "3 finite numbers"]),
        ("'resnet18?input_sise=64'", ["'input_sise'"]),
    ],
)
def test_bad_yaml_entries_name_the_problem(tmp_path, entry, needles):
    (tmp_path / "hub.yaml").write_text(f"- {entry}\n")
    with pytest.raises(SpecError) as e:
        read_hub_file(tmp_path / "hub.yaml")
    assert str(tmp_path / "hub.yaml") in str(e.value)
    for needle in needles:
        assert needle in str(e.value)


# ------------------------------------------------------------------ hubtune hub info

def test_hub_info_shows_data_config_and_sources(weights, capsys):
    spec = f"file:{weights}::test_resnet"
    assert main(["hub", "info", spec]) == 0
    out, err = capsys.readouterr()
    info = json.loads(out)
    assert info["data_config"]["input_size"] == [3, 160, 160]
    assert set(info["data_config_source"].values()) == {DEFAULT}
    assert err.count("\n") == 1 and "hubtune: warning:" in err
    assert "no data config in the checkpoint; using timm's default for test_resnet" in err

    assert main(["hub", "info", spec + "?input_size=64&mean=0.5&std=0.5"]) == 0
    out, err = capsys.readouterr()
    info = json.loads(out)
    assert info["spec"] == spec + "?input_size=64&mean=0.5,0.5,0.5&std=0.5,0.5,0.5"
    assert info["data_config"]["input_size"] == [3, 64, 64] and info["input_size"] == [3, 64, 64]
    assert info["data_config_source"]["input_size"] == "override"
    assert info["data_config_source"]["crop_pct"] == DEFAULT
    assert err == ""


@pytest.mark.parametrize("suffix, needle", [("?colour=red", "unknown data config key 'colour'"),
                                            ("?crop_pct=2", "crop_pct='2' is invalid")])
def test_hub_info_bad_suffix_exits_2_with_the_message(weights, capsys, suffix, needle):
    assert main(["hub", "info", f"file:{weights}::test_resnet{suffix}"]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("hubtune hub: error: bad spec") and needle in err
    assert "Traceback" not in err and out == ""


# ------------------------------------------------------------------ extraction: cache keys and what the model sees

def _first_conv_inputs(monkeypatch):
    """Wraps load_candidate so the input shape of each loaded model's first convolution is recorded."""
    import hubtune.hub.candidate as C

    seen: dict[str, set] = {}
    real = C.load_candidate

    def recording(*a, **k):
        c = real(*a, **k)
        conv = next(m for m in c.module.modules() if isinstance(m, torch.nn.Conv2d))
        conv.register_forward_pre_hook(lambda mod, args, s=c.spec: seen.setdefault(s, set()).add(
            tuple(args[0].shape[1:])))
        return c

    monkeypatch.setattr(C, "load_candidate", recording)
    return seen


def test_two_overrides_of_one_file_are_two_cache_entries_and_two_inputs(tmp_path, weights, images, monkeypatch):
    base = f"file:{weights}::test_resnet"
    specs = [base + "?input_size=64&crop_pct=1.0", base + "?input_size=3,48,32&crop_pct=1.0", base]
    seen = _first_conv_inputs(monkeypatch)
    feats = {s: [] for s in specs}
    stats = extract(specs, images, opts(tmp_path), lambda s, f, l, y: feats[s].append(f))
    assert seen == {specs[0]: {(3, 64, 64)}, specs[1]: {(3, 48, 32)}, specs[2]: {(3, 160, 160)}}
    got = {s: np.concatenate(v) for s, v in feats.items()}
    assert all(g.shape == (24, 96) for g in got.values())
    assert not np.allclose(got[specs[0]], got[specs[1]]) and not np.allclose(got[specs[0]], got[specs[2]])
    assert not any(st.cache_hit for st in stats.values())
    entries = FeatureCache(tmp_path / "features").ls()
    assert len(entries) == 3 and {e["status"] for e in entries} == {"complete"}

    # again: every candidate from its own entry, no model loaded, the same features
    seen.clear()
    again = {s: [] for s in specs}
    stats = extract(specs, images, opts(tmp_path), lambda s, f, l, y: again[s].append(f))
    assert all(st.cache_hit for st in stats.values()) and seen == {}
    for s in specs:
        np.testing.assert_array_equal(np.concatenate(again[s]), got[s])
    assert len(FeatureCache(tmp_path / "features").ls()) == 3


def test_the_override_reaches_a_ranking(tmp_path, weights, images):
    from hubtune.ranking import rank

    base = f"file:{weights}::test_resnet"
    r = rank([base + "?input_size=32&crop_pct=1.0", base + "?input_size=64&crop_pct=1.0"], images,
             options=opts(tmp_path))
    scores = {c.spec.rpartition("?")[2]: c.scores["logme"] for c in r.candidates}
    assert set(scores) == {"input_size=32&crop_pct=1.0", "input_size=64&crop_pct=1.0"}
    assert scores["input_size=32&crop_pct=1.0"] != scores["input_size=64&crop_pct=1.0"]


# ------------------------------------------------------------------ tuning

def test_tune_builds_its_transforms_from_the_override(tmp_path, weights, monkeypatch):
    """hubtune.tune loads the model through the hub: its training and evaluation images have the override's
    size (the Engine is replaced by one that only looks at the datasets)."""
    import hubtune.tuning.api as api

    seen = {}

    class LookingEngine:
        def __init__(self, config):
            pass

        def fit(self, m, train_ds, eval_ds, mixer=None):
            seen.update(train=tuple(train_ds[0][0].shape), eval=tuple(eval_ds[0][0].shape),
                        data_config=dict(m.data_config))
            return {}

    monkeypatch.setattr(api, "Engine", LookingEngine)
    spec = f"file:{weights}::test_resnet?input_size=40&mean=0.5&std=0.5&crop_pct=1.0"
    api.tune("finetune", model=spec, dataset="digits", max_samples=60, epochs=1, batch_size=8)
    assert seen["train"] == seen["eval"] == (3, 40, 40)
    assert seen["data_config"]["input_size"] == (3, 40, 40) and seen["data_config"]["mean"] == (0.5,) * 3
    module, transform, name = api.model_and_transform(spec)
    assert name == str(ModelSpec.parse(spec)) and transform.data_config["input_size"] == (3, 40, 40)
    plain = api.model_and_transform(f"file:{weights}::test_resnet")[1]
    assert plain.data_config["input_size"] == (3, 160, 160)


def test_a_spec_without_suffix_keeps_its_identity(tiny_dir):
    """Specs without a suffix print as before, so their identities (and existing cache entries) are unchanged."""
    import hashlib

    cand = load_candidate(f"local-dir:{tiny_dir}")
    weights_hash = hashlib.sha256((tiny_dir / "model.safetensors").read_bytes()).hexdigest()
    expected = hashlib.sha256(f"hubtune-candidate-v1\nlocal-dir:{tiny_dir}\n{weights_hash}".encode()).hexdigest()
    assert cand.identity == expected
