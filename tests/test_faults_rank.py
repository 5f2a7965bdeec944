"""Fault injection for ranking, the feature cache, the hub and the datasets (issue 15).

Damaged, missing and foreign cache files; kill -9 of `hubtune rank` at several points; unwritable and full
output locations; bad files of every input kind rank reads (weights, config.json, images, links). Every
case checks the result against an uninterrupted / fresh run or a hand-checked expectation."""
from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from hubtune.cli import main
from hubtune.data import create_dataset, stratified_subsample
from hubtune.errors import InputError, ModelNotFoundError, OutputError, WeightsNotAvailableError
from hubtune.features import CacheDamageWarning, ExtractOptions, FeatureCache
from hubtune.ranking import Ranking, rank

REPO = Path(__file__).resolve().parents[1]
PCFG = {"input_size": [3, 32, 32], "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bilinear",
        "crop_pct": 1.0, "crop_mode": "center"}


def save_local(folder: Path, seed: int = 0, num_classes: int = 5, side: int = 32, mutate=None, config=None) -> str:
    """A random-init timm ``test_resnet`` saved in timm's format (config.json + model.safetensors)."""
    torch.manual_seed(seed)
    m = timm.create_model("test_resnet", pretrained=False, num_classes=num_classes)
    if mutate is not None:
        mutate(m)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(folder / "model.safetensors"))
    cfg = config if config is not None else {
        "architecture": "test_resnet", "num_classes": num_classes, "pretrained_cfg": dict(PCFG, input_size=[3, side, side])}
    (folder / "config.json").write_text(json.dumps(cfg))
    return f"local-dir:{folder}"


@pytest.fixture(scope="module")
def digits60():
    return stratified_subsample(create_dataset("digits"), max_samples=60, seed=0)


@pytest.fixture(scope="module")
def hub2(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    return [save_local(root / "a", seed=0), save_local(root / "b", seed=1)]


def opts(cache, **kw):
    kw.setdefault("chunk_size", 20)
    return ExtractOptions(batch_size=10, precision="fp32", progress=False, cache_dir=None if cache is None else str(cache),
                          use_cache=cache is not None, compile=False, **kw)


def scores(r: Ranking) -> dict:
    return {c.spec: c.scores["logme"] for c in r.candidates}


@pytest.fixture(scope="module")
def fresh(hub2, digits60):
    """The reference: an uncached run with the same chunking."""
    return scores(rank(hub2, digits60, options=opts(None)))


def entry_dirs(cache: Path) -> list[Path]:
    return sorted(p for p in (cache / "features").iterdir() if p.is_dir())


def entry_of(cache: Path, spec: str) -> Path:
    for d in entry_dirs(cache):
        if json.loads((d / "key.json").read_text())["spec"] == spec:
            return d
    raise AssertionError(spec)


# ------------------------------------------------------------------------------------------ damaged cache
def _delete(d):
    (d / "chunk-000000020.npz").unlink()


def _truncate(d):
    p = d / "chunk-000000020.npz"
    p.write_bytes(p.read_bytes()[:200])


def _flip(d):
    p = d / "chunk-000000020.npz"
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0xFF
    p.write_bytes(bytes(b))


def _relabel(d):
    """A chunk that checksums (the index is rewritten to match) but holds other labels: written by no one."""
    import hashlib
    import io

    p = d / "chunk-000000020.npz"
    with np.load(p) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["labels"] = (arrays["labels"] + 1) % 10
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    p.write_bytes(buf.getvalue())
    idx = json.loads((d / "index.json").read_text())
    for r in idx["chunks"]:
        if r["start"] == 20:
            r.update(bytes=len(buf.getvalue()), sha256=hashlib.sha256(buf.getvalue()).hexdigest())
    (d / "index.json").write_text(json.dumps(idx))


def _index_garbage(d):
    (d / "index.json").write_text("{not json")


def _index_list(d):
    (d / "index.json").write_text("[1, 2, 3]")


def _index_missing(d):
    (d / "index.json").unlink()


def _key_garbage(d):
    (d / "key.json").write_bytes(b"\x00\xff garbage")


def _index_lies_about_rows(d):
    idx = json.loads((d / "index.json").read_text())
    idx["chunks"][1]["rows"] = 25  # promises more rows than the chunk holds
    idx["chunks"] = idx["chunks"][:2]
    (d / "index.json").write_text(json.dumps(idx))


DAMAGE = {  # how, what the warning says, rows still trusted (then recomputed from there)
    "missing chunk": (_delete, "chunk-000000020.npz is missing", 20),
    "truncated chunk": (_truncate, "truncated", 20),
    "corrupt chunk": (_flip, "checksum", 20),
    "foreign chunk": (_relabel, "labels", 20),
    "index not json": (_index_garbage, "index.json is not readable JSON", 0),
    "index not an object": (_index_list, "not a hubtune-feature-cache-v2 index", 0),
    "index missing": (_index_missing, "index.json is missing", 0),
    "key damaged": (_key_garbage, "key.json is not readable JSON", 0),
    "index lies": (_index_lies_about_rows, "holds 20 rows, the index promised 25", 20),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_entry_is_reported_and_recomputed_never_trusted(tmp_path, hub2, digits60, fresh, damage, capsys):
    how, needle, trusted = DAMAGE[damage]
    cache = tmp_path / "cache"
    first = rank(hub2, digits60, options=opts(cache))
    assert scores(first) == pytest.approx(fresh, rel=1e-6)
    victim = entry_of(cache, first.candidates[0].spec)
    how(victim)
    # `cache ls` names the damage (checksums only with --verify) instead of crashing
    assert main(["cache", "ls", "--cache-dir", str(cache), "--verify"]) == 0
    out = capsys.readouterr().out
    if damage != "foreign chunk":  # its labels are only wrong against the dataset, which ls does not know
        assert "damaged" in out and str(victim) in out and "1 damaged" in out, out
    with pytest.warns(CacheDamageWarning) as rec:
        again = rank(hub2, digits60, options=opts(cache))
    msgs = [str(w.message) for w in rec if issubclass(w.category, CacheDamageWarning)]
    assert len(msgs) == 1 and str(victim) in msgs[0] and needle in msgs[0], msgs
    hurt = next(c for c in again.candidates if c.spec == first.candidates[0].spec)
    other = next(c for c in again.candidates if c.spec != hurt.spec)
    # not a silent hit: only the trusted rows came from the cache, the rest was recomputed; full n
    assert (hurt.cache_hit, hurt.cached, hurt.computed, hurt.n) == (False, trusted, 60 - trusted, 60)
    assert (other.cache_hit, other.cached, other.computed) == (True, 60, 0)
    assert scores(again) == pytest.approx(fresh, rel=1e-6)
    # the entry is whole again: a third run is a clean, verified hit
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheDamageWarning)
        third = rank(hub2, digits60, options=opts(cache))
    assert all(c.cache_hit for c in third.candidates) and scores(third) == pytest.approx(fresh, rel=1e-6)
    assert [e["status"] for e in FeatureCache(cache).ls(verify=True)] == ["complete", "complete"]


def test_missing_chunk_in_the_issue_cli(tmp_path, hub2, capsys):
    """The case from the issue, through the CLI: delete one chunk of a complete entry and rank again."""
    cache, out1, out2 = tmp_path / "cache", tmp_path / "o1", tmp_path / "o2"
    args = ["rank", "--models", ",".join(hub2), "--max-samples", "60", "--chunk-size", "20", "--precision", "fp32",
            "--no-compile", "--quiet", "--cache-dir", str(cache)]
    assert main(args + ["--out", str(out1)]) == 0
    d = entry_dirs(cache)[0]
    (d / "chunk-000000040.npz").unlink()
    with pytest.warns(CacheDamageWarning, match="chunk-000000040.npz is missing"):
        assert main(args + ["--out", str(out2)]) == 0
    a, b = (json.loads((o / "ranking.json").read_text()) for o in (out1, out2))
    spec = json.loads((d / "key.json").read_text())["spec"]
    hurt = next(c for c in b["candidates"] if c["spec"] == spec)
    assert not hurt["cache_hit"] and hurt["n"] == 60 and hurt["cached"] == 40 and hurt["computed"] == 20
    assert [c["spec"] for c in a["candidates"]] == [c["spec"] for c in b["candidates"]]
    for x, y in zip(a["candidates"], b["candidates"]):
        assert y["scores"]["logme"] == pytest.approx(x["scores"]["logme"], rel=1e-6)
    assert "40/60" in capsys.readouterr().out  # the table says how much came from the cache


def test_resumed_rank_reports_both_throughputs(tmp_path, hub2, digits60):
    cache = tmp_path / "cache"
    rank(hub2[:1], digits60, options=opts(cache))
    (entry_dirs(cache)[0] / "chunk-000000040.npz").unlink()
    with pytest.warns(CacheDamageWarning):
        r = rank(hub2[:1], digits60, options=opts(cache), out=tmp_path / "out")
    c = r.candidates[0]
    assert (c.cached, c.computed) == (40, 20)
    assert c.images_per_second == pytest.approx(20 / c.seconds)           # the recomputed part
    assert c.overall_images_per_second == pytest.approx(60 / (c.seconds + c.cache_seconds))  # all rows
    assert c.cache_seconds > 0
    saved = json.loads((tmp_path / "out" / "ranking.json").read_text())["candidates"][0]
    assert saved["images_per_second"] == pytest.approx(c.images_per_second)
    assert saved["overall_images_per_second"] == pytest.approx(c.overall_images_per_second)
    assert "all img/s" in r.table()


def test_cache_clear_deletes_only_what_hubtune_wrote(tmp_path, hub2, digits60, capsys):
    cache = tmp_path / "cache"
    rank(hub2, digits60, options=opts(cache))
    feats = cache / "features"
    (feats / "my_notes.txt").write_text("keep me")
    (feats / "photos").mkdir()
    (feats / "photos" / "cat.png").write_bytes(b"png")
    fake = feats / ("0" * 32)  # named like an entry, but its key.json does not name it
    fake.mkdir()
    (fake / "key.json").write_text('{"spec": "mine"}')
    d = entry_dirs(cache)[1]
    (d / "README.user").write_text("mine too")
    (feats / "link").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "precious").write_text("x")
    assert main(["cache", "ls", "--cache-dir", str(cache)]) == 0
    ls = capsys.readouterr().out
    assert "2 entries" in ls and "not written by hubtune" in ls
    assert main(["cache", "clear", "--cache-dir", str(cache)]) == 0
    out = capsys.readouterr().out
    assert "removed 2 entries" in out and "skipped 5 items not written by hubtune" in out
    assert (feats / "my_notes.txt").read_text() == "keep me" and (feats / "photos" / "cat.png").exists()
    assert (fake / "key.json").exists() and (d / "README.user").exists()
    assert sorted(p.name for p in d.iterdir()) == ["README.user"]  # hubtune's files in it are gone
    assert (tmp_path / "elsewhere" / "precious").exists()
    assert not list(feats.glob("*/chunk-*.npz"))


def test_cache_clear_of_only_hubtune_entries_removes_the_folder(tmp_path, hub2, digits60, capsys):
    cache = tmp_path / "cache"
    rank(hub2[:1], digits60, options=opts(cache))
    assert main(["cache", "clear", "--cache-dir", str(cache)]) == 0
    assert "removed 1 entries" in capsys.readouterr().out
    assert not (cache / "features").exists() and cache.exists()


# ------------------------------------------------------------------------------------- arguments first
@pytest.fixture
def no_model_loads(monkeypatch):
    import hubtune.hub

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(hubtune.hub, "load_candidate", boom)


@pytest.mark.parametrize("flag", ["--max-samples", "--per-class", "--budget", "--top-k"])
@pytest.mark.parametrize("value", ["0", "-1"])
def test_rank_cli_refuses_zero_and_negative_counts_before_work(flag, value, tmp_path, capsys, no_model_loads):
    rc = main(["rank", "--models", "pkg:efficientnet_lite0", flag, value, "--cache-dir", str(tmp_path / "c"),
               "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and flag in err and value in err, err
    assert not (tmp_path / "c").exists() and not (tmp_path / "o").exists()


@pytest.mark.parametrize("arg", ["max_samples", "per_class", "budget", "top_k"])
def test_rank_api_refuses_zero_before_work(arg, no_model_loads):
    with pytest.raises(InputError, match=arg):
        rank(["pkg:efficientnet_lite0"], "digits", **{arg: 0})
    with pytest.raises(InputError, match=arg):
        rank(["pkg:efficientnet_lite0"], "digits", **{arg: True})


def test_stratified_subsample_refuses_zero(digits60):
    for kw in ({"max_samples": 0}, {"per_class": 0}, {"max_samples": -3}):
        with pytest.raises(InputError, match="at least 1"):
            stratified_subsample(digits60, **kw)


def test_unwritable_out_fails_before_extraction(tmp_path, hub2, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    cache = tmp_path / "cache"
    rc = main(["rank", "--models", hub2[0], "--max-samples", "20", "--cache-dir", str(cache),
               "--out", str(blocker / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "could not write" in err and str(blocker / "out") in err and "--out" in err
    assert not (cache / "features").exists() or not any((cache / "features").iterdir())  # nothing extracted
    rc = main(["rank", "--models", hub2[0], "--max-samples", "20", "--cache-dir", str(blocker / "cache")])
    err = capsys.readouterr().err
    assert rc == 2 and "could not write" in err and "--cache-dir" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permission bits")
def test_read_only_out_folder_fails_before_extraction(tmp_path, hub2, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        rc = main(["rank", "--models", hub2[0], "--max-samples", "20", "--cache-dir", str(tmp_path / "c"),
                   "--out", str(ro)])
    finally:
        ro.chmod(0o755)
    assert rc == 2 and "permission denied" in capsys.readouterr().err
    assert not (tmp_path / "c" / "features").exists() or not any((tmp_path / "c" / "features").iterdir())


def test_full_disk_while_writing_the_cache_is_a_typed_error_and_leaves_no_temporaries(tmp_path, hub2, digits60):
    """RLIMIT_FSIZE (ulimit -f) makes every write past 4 KB fail with EFBIG, as a full disk would."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    cache = tmp_path / "cache"
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        with pytest.raises(OutputError, match="ulimit -f"):
            rank(hub2[:1], digits60, options=opts(cache))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert not [p for p in cache.rglob("*") if p.name.endswith(".tmp")]
    # what was left is consistent: a rerun (with room) trusts nothing it cannot verify
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheDamageWarning)
        r = rank(hub2[:1], digits60, options=opts(cache))
    assert r.candidates[0].n == 60


# ------------------------------------------------------------------------------ one bad model, not the hub
def _nan_weights(m):
    with torch.no_grad():
        next(p for n, p in m.named_parameters() if "conv" in n).fill_(float("nan"))


def _inf_head(m):
    with torch.no_grad():
        m.get_classifier().weight.fill_(float("inf"))


def test_bad_candidates_are_skipped_and_the_rest_ranked(tmp_path, digits60):
    root = tmp_path / "hub"
    good = save_local(root / "good", seed=3)
    bad = {}
    bad["empty safetensors"] = save_local(root / "empty")
    (root / "empty" / "model.safetensors").write_bytes(b"")
    bad["truncated safetensors"] = save_local(root / "trunc")
    p = root / "trunc" / "model.safetensors"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    bad["config a list"] = save_local(root / "cfglist", config=[1, 2])
    bad["config not json"] = save_local(root / "cfgjunk")
    (root / "cfgjunk" / "config.json").write_text("{oops")
    for name, cfg in {
        "negative num_classes": {"architecture": "test_resnet", "num_classes": -3, "pretrained_cfg": PCFG},
        "huge num_classes": {"architecture": "test_resnet", "num_classes": 10**12, "pretrained_cfg": PCFG},
        "input_size 2 ints": {"architecture": "test_resnet", "num_classes": 5, "pretrained_cfg": dict(PCFG, input_size=[32, 32])},
        "input_size negative": {"architecture": "test_resnet", "num_classes": 5, "pretrained_cfg": dict(PCFG, input_size=[3, -1, 32])},
        "input_size absurd": {"architecture": "test_resnet", "num_classes": 5, "pretrained_cfg": dict(PCFG, input_size=[3, 10**6, 10**6])},
        "std zero": {"architecture": "test_resnet", "num_classes": 5, "pretrained_cfg": dict(PCFG, std=[0, 1, 1])},
        "pretrained_cfg a string": {"architecture": "test_resnet", "num_classes": 5, "pretrained_cfg": "x"},
        "model_args absurd": {"architecture": "test_resnet", "num_classes": 5, "pretrained_cfg": PCFG,
                              "model_args": {"stem_width": 10**6}},
        "model_args unknown": {"architecture": "test_resnet", "num_classes": 5, "pretrained_cfg": PCFG,
                               "model_args": {"no_such_arg": 1}},
    }.items():
        bad[name] = save_local(root / name.replace(" ", "_"), config=cfg)
    bad["NaN weights"] = save_local(root / "nan", mutate=_nan_weights)
    bad["Inf logits"] = save_local(root / "inf", mutate=_inf_head)
    needles = {"empty safetensors": "empty", "truncated safetensors": "truncated", "config a list": "not an object",
               "config not json": "JSON", "negative num_classes": "num_classes=-3",
               "huge num_classes": "num_classes=1000000000000", "input_size 2 ints": "input_size",
               "input_size negative": "input_size", "input_size absurd": "input_size", "std zero": "std",
               "pretrained_cfg a string": "pretrained_cfg", "model_args absurd": "parameters",
               "model_args unknown": "no_such_arg", "NaN weights": "NaN or Inf", "Inf logits": "NaN or Inf"}
    specs = [bad[k] for k in bad] + [good]
    with pytest.warns(UserWarning, match="skipping"):
        r = rank(specs, digits60, metrics=("logme", "leep"), options=opts(tmp_path / "cache"), out=tmp_path / "out")
    assert [c.spec for c in r.candidates] == [good]
    assert set(r.skipped) == set(bad.values())
    for name, spec in bad.items():
        why = r.skipped[spec]
        assert spec.partition(":")[2] in why and needles[name] in why, (name, why)
    saved = json.loads((tmp_path / "out" / "ranking.json").read_text())
    assert set(saved["skipped"]) == set(bad.values()) and len(saved["candidates"]) == 1
    # non-finite outputs were never cached
    assert len(FeatureCache(tmp_path / "cache").ls()) == 1


def test_all_candidates_bad_is_one_typed_error(tmp_path, digits60):
    spec = save_local(tmp_path / "nan", mutate=_nan_weights)
    with pytest.warns(UserWarning), pytest.raises(InputError, match="no candidate could be ranked.*NaN"):
        rank([spec], digits60, options=opts(None))


# ------------------------------------------------------------------------------------- hub typed errors
def test_hub_info_unknown_tag_names_it_and_lists_the_known_tags(capsys):
    from hubtune.hub import candidate_info

    with pytest.raises(ModelNotFoundError, match="nonexistent_tag") as e:
        candidate_info("resnet18.nonexistent_tag")
    assert "resnet18.a1_in1k" in str(e.value)
    assert main(["hub", "info", "resnet18.nonexistent_tag"]) == 2
    assert "choose one of" in capsys.readouterr().err


@pytest.fixture
def online_empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))


def _transport_error():
    """The connection error of the HTTP client huggingface_hub uses (httpx2 or httpx)."""
    for name in ("httpx2", "httpx"):
        try:
            mod = __import__(name)
        except ImportError:
            continue
        return mod.ConnectError("[Errno -3] Temporary failure in name resolution")
    return TimeoutError("timed out")


def _raiser(exc):
    def fake(*a, **k):
        raise exc
    return fake


def test_unreachable_network_is_not_reported_as_missing_files(online_empty_cache, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    from hubtune.hub import candidate_info, load_candidate

    for exc in (LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub and we "
                                        "cannot find the requested files in the local cache."),
                _transport_error(), ConnectionError("down")):
        monkeypatch.setattr(huggingface_hub, "hf_hub_download", _raiser(exc))
        for call in (lambda: load_candidate("hf-hub:acme/tiny"), lambda: candidate_info("hf-hub:acme/tiny")):
            with pytest.raises(WeightsNotAvailableError) as e:
                call()
            msg = str(e.value)
            assert "could not reach" in msg and "network" in msg and "HF_HUB_OFFLINE" in msg
            assert "has none of" not in msg


def test_file_absent_from_a_reachable_repo_is_reported_as_absent(online_empty_cache, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import RemoteEntryNotFoundError

    from hubtune.hub import load_candidate

    class Resp:
        status_code, headers, request, url = 404, {}, None, "https://huggingface.co"

        def json(self):
            return {}

        text = ""

    try:
        exc = RemoteEntryNotFoundError("404 Entry not found", response=Resp())
    except Exception:
        pytest.skip("this huggingface_hub builds its HTTP errors differently")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _raiser(exc))
    with pytest.raises(WeightsNotAvailableError, match="has none of") as e:
        load_candidate("hf-hub:acme/tiny")
    assert "could not reach" not in str(e.value)


# ------------------------------------------------------------------------------------- rankings travel
def test_ranking_stores_resolved_specs_and_works_from_another_directory(tmp_path, digits60, monkeypatch):
    work = tmp_path / "work"
    save_local(work / "models" / "m", seed=2)
    monkeypatch.chdir(work)
    r = rank(["local-dir:models/m", "local-dir:./models/../models/m"], digits60, options=opts(None),
             out="out")
    assert len(r.candidates) == 1  # the same folder named twice is ranked once
    c = r.candidates[0]
    assert c.spec == f"local-dir:{work / 'models' / 'm'}" and c.spec_given == "local-dir:models/m"
    saved = json.loads((work / "out" / "ranking.json").read_text())["candidates"][0]
    assert saved["spec"] == c.spec and saved["spec_given"] == "local-dir:models/m"
    monkeypatch.chdir(tmp_path)
    back = Ranking.load(work / "out")
    assert back.top(1) == [c.spec]
    from hubtune.hub import load_candidate

    assert load_candidate(back.top(1)[0]).num_classes == 5  # loads from elsewhere
    assert set(back.weights) == {c.spec}


def test_ranking_records_its_dataset(tmp_path, hub2):
    r = rank(hub2[:1], "digits", max_samples=40, options=opts(None), out=tmp_path / "out")
    full = create_dataset("digits")
    sub = stratified_subsample(full, max_samples=40, seed=0)
    want = {"spec": "digits", "split": "train", "fingerprint": sub.fingerprint, "base_fingerprint": full.fingerprint,
            "num_classes": 10, "max_samples": 40, "per_class": None}
    assert r.dataset_info == want
    saved = json.loads((tmp_path / "out" / "ranking.json").read_text())
    assert saved["dataset_info"] == want and saved["dataset"] == r.dataset
    assert Ranking.load(tmp_path / "out").dataset_info == want
    del saved["dataset_info"]
    (tmp_path / "out" / "ranking.json").write_text(json.dumps(saved))
    assert Ranking.load(tmp_path / "out").dataset_info is None  # older rankings


def test_damaged_ranking_json_is_a_typed_error(tmp_path):
    (tmp_path / "ranking.json").write_text("{")
    with pytest.raises(InputError, match="ranking.json"):
        Ranking.load(tmp_path)


# ------------------------------------------------------------------------------------------ image folders
def _png(path: Path, value: int, size=8):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size), value, np.uint8), "L").save(path)


def test_links_out_of_a_class_folder_are_not_followed(tmp_path):
    root = tmp_path / "imgs"
    _png(root / "cat" / "c1.png", 10)
    _png(root / "dog" / "d1.png", 200)
    _png(root / "dog" / "d2.png", 210)
    _png(tmp_path / "outside" / "o.png", 99)
    (root / "cat" / "up").symlink_to(root, target_is_directory=True)  # .. : would pull the dogs in as cats
    (root / "cat" / "dogs").symlink_to(root / "dog", target_is_directory=True)
    (root / "cat" / "d1.png").symlink_to(root / "dog" / "d1.png")
    (root / "cat" / "far").symlink_to(tmp_path / "outside", target_is_directory=True)
    (root / "cat" / "self").symlink_to(root / "cat", target_is_directory=True)  # a loop inside: followed once
    (root / "dog" / "inner").mkdir()
    (root / "dog" / "inner" / "again.png").symlink_to(root / "dog" / "d2.png")  # inside its class: kept
    with pytest.warns(UserWarning, match="4 link") as rec:
        ds = create_dataset(f"imagefolder:{root}")
    msg = str(rec[0].message)
    for name in ("cat/up", "cat/dogs", "cat/d1.png", "cat/far"):
        assert name in msg
    assert ds.files == ["cat/c1.png", "dog/d1.png", "dog/d2.png", "dog/inner/again.png"]
    assert list(ds.labels) == [0, 1, 1, 1]


@pytest.mark.parametrize("limit", [40, 20])  # 64 pixels: over the limit (PIL warns) / over twice it (PIL raises)
def test_image_too_large_to_decode_safely_is_a_typed_error(tmp_path, monkeypatch, limit):
    root = tmp_path / "imgs"
    _png(root / "a" / "big.png", 1)
    _png(root / "b" / "ok.png", 2)
    ds = create_dataset(f"imagefolder:{root}")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    with pytest.raises(InputError, match="too large to decode safely") as e:
        ds.image(0)
    assert "big.png" in str(e.value) and "MAX_IMAGE_PIXELS" in str(e.value)


# ------------------------------------------------------------------------------------------- kill -9
KILLER = r"""
import os, signal, sys
import hubtune.features.cache as C
point, k = sys.argv[1], int(sys.argv[2])
n = [0]
orig_write, orig_text = C.CacheEntry.write_chunk, C.atomic_write_text

def write_chunk(self, *a, **kw):
    if point == "mid-chunk":  # the chunk file renamed into place, its index record not yet written
        def text(path, s):
            if str(path).endswith("index.json") and n[0] == k:
                os.kill(os.getpid(), signal.SIGKILL)
            return orig_text(path, s)
        C.atomic_write_text = text
    orig_write(self, *a, **kw)
    n[0] += 1
    if point == "after-chunk" and n[0] == k:
        os.kill(os.getpid(), signal.SIGKILL)

C.CacheEntry.write_chunk = write_chunk
from hubtune.cli import main
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("point,k", [("after-chunk", 1),     # after the first chunk of the first model
                                     ("after-chunk", 3),     # between the models (3 chunks each, own groups)
                                     ("mid-chunk", 4)])      # inside the second model's second chunk write
def test_kill_9_mid_rank_then_rerun_gives_the_uninterrupted_ranking(tmp_path, point, k):
    root = tmp_path / "hub"
    specs = [save_local(root / "a", seed=0, side=32), save_local(root / "b", seed=1, side=24)]  # two transforms
    args = ["rank", "--models", ",".join(specs), "--max-samples", "60", "--chunk-size", "20", "--precision",
            "fp32", "--no-compile", "--quiet", "--metric", "logme", "--metric", "leep"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    ref = tmp_path / "ref"
    assert main(args + ["--cache-dir", str(tmp_path / "refcache"), "--out", str(ref)]) == 0
    cache, out = tmp_path / "cache", tmp_path / "out"
    run = [sys.executable, "-c", KILLER, point, str(k)] + args + ["--cache-dir", str(cache), "--out", str(out)]
    p = subprocess.run(run, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert not (out / "ranking.json").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheDamageWarning)  # a kill leaves nothing damaged, only unfinished
        assert main(args + ["--cache-dir", str(cache), "--out", str(out)]) == 0
    a, b = (json.loads((o / "ranking.json").read_text()) for o in (ref, out))
    assert [(c["spec"], c["scores"]) for c in a["candidates"]] == [(c["spec"], c["scores"]) for c in b["candidates"]]
    done = sum(c["cached"] for c in b["candidates"])
    assert 0 < done < 120 and sum(c["computed"] for c in b["candidates"]) == 120 - done
    assert not [p for p in cache.rglob("*") if p.name.endswith(".tmp")]
