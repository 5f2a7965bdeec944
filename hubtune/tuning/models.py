"""The hub models a method holds, in one place: loading them, their data config, their penultimate features,
their identity, a new head, feeding them a batch prepared for another model, taking them from a ranking.

Every method (one model or many) uses these, so each exists once:

* :func:`load_models` / :func:`load_model`: specs, Candidates, :class:`HubModel` s or timm modules ->
  :class:`HubModel` records (module, data config, name, identity); the one spec-or-module loader.
* a module given without a hub spec gets its data config from :func:`hubtune.hub.sources.data_config_of`, the
  one place it is resolved (as for hub candidates).
* :func:`penultimate_features`: the one penultimate-feature forward (``forward_features`` +
  ``forward_head(pre_logits=True)``, flattened), exactly as the ranking extracts features.
* :func:`module_identity`: the one module hash (a cache and checkpoint key for a module given without a spec).
* :func:`new_head`: a copy of a timm model with a new ``num_classes`` classifier and every other matching tensor
  transferred (:func:`transfer_weights`, :func:`head_names`).
* :class:`InputAdapter` maps a batch normalised for one data config to another: un-normalise with the source
  mean/std, resize (bilinear, antialiased) to the destination ``input_size`` if it differs, normalise with the
  destination mean/std. Identity (the same tensor) when the two configs agree. A design choice: every image is
  decoded and transformed once (by the first model's transform) and adapted on the fly, rather than decoded
  once per model. :func:`view_of` is the part of a data config it reads.
* :func:`ranking_top` reads a ``hubtune rank --out`` folder and returns its best ``k`` specs;
  :func:`check_ranking_dataset` compares the ranking's ``dataset_info`` with the dataset being tuned.
"""
from __future__ import annotations

import copy
import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import ConfigError

VIEW_KEYS = ("input_size", "mean", "std")  # what InputAdapter reads of a data config


@dataclass
class HubModel:
    module: torch.nn.Module
    data_config: dict
    name: str                      # the spec, or the module's class name
    identity: str | None = None    # the candidate identity hash (None for a bare module)
    num_params: int = 0
    extra: dict = field(default_factory=dict)


def has_data_config(module: torch.nn.Module) -> bool:
    """The module says how its inputs are prepared (a timm ``pretrained_cfg``); a bare module does not, and is
    then fed the batch as it comes."""
    return bool(getattr(module, "pretrained_cfg", None) or getattr(module, "default_cfg", None))


def penultimate_features(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Penultimate features ``(B, D)`` of a timm model: ``flatten(forward_head(forward_features(x),
    pre_logits=True))``, exactly as the ranking extracted them (``Candidate.forward``)."""
    f = module.forward_head(module.forward_features(x), pre_logits=True)
    return f.reshape(f.shape[0], -1)


def module_identity(module: torch.nn.Module) -> str:
    """sha256 of a module's class name and state dict (names, dtypes, shapes, bytes): a cache key. The one
    module hash of hubtune's tuning code (a hub spec's identity is the Candidate's)."""
    h = hashlib.sha256(f"hubtune-module-v1\n{type(module).__name__}\n".encode())
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def view_of(data_config: dict | None) -> dict | None:
    """The part of a data config that decides what a model is fed (``input_size``, ``mean``, ``std``), as
    plain lists of numbers; None for None."""
    if data_config is None:
        return None
    return {k: [float(v) for v in data_config[k]] for k in VIEW_KEYS if data_config.get(k) is not None}


def load_models(models, *, pretrained: bool = True, role: str = "models") -> list[HubModel]:
    """``models`` (a list of specs, Candidates or nn.Modules; one item is taken as a list of one) ->
    ``[HubModel]`` in the same order. Specs are loaded with :func:`hubtune.hub.load_candidate`."""
    if isinstance(models, (str, torch.nn.Module)) or hasattr(models, "identity"):
        models = [models]
    try:
        models = list(models)
    except TypeError:
        raise ConfigError(f"{role}={models!r} is invalid: give a list of hub specs or timm models") from None
    if not models:
        raise ConfigError(f"{role} is empty: give at least one hub spec or timm model")
    out = []
    for m in models:
        if isinstance(m, HubModel):
            out.append(m)
        elif isinstance(m, str):
            from ..hub import load_candidate

            c = load_candidate(m, pretrained=pretrained)
            out.append(HubModel(c.module, dict(c.data_config), c.spec, c.identity, c.num_params))
        elif hasattr(m, "module") and hasattr(m, "identity") and isinstance(m.module, torch.nn.Module):
            out.append(HubModel(m.module, dict(m.data_config), m.spec, m.identity, m.num_params))
        elif isinstance(m, torch.nn.Module):
            from ..hub.sources import data_config_of

            out.append(HubModel(m, data_config_of(m), type(m).__name__, None,
                                sum(p.numel() for p in m.parameters())))
        else:
            raise ConfigError(f"{role} item {m!r} is invalid: give a hub spec such as 'resnet18', a Candidate or "
                              "a timm model")
    return out


def load_model(model, *, pretrained: bool = True, role: str = "model") -> HubModel:
    """One spec, Candidate, :class:`HubModel` or nn.Module -> a :class:`HubModel` (see :func:`load_models`)."""
    if isinstance(model, (list, tuple)):
        raise ConfigError(f"{role}={model!r} is a list; give one hub spec or timm model")
    return load_models([model], pretrained=pretrained, role=role)[0]


class InputAdapter(torch.nn.Module):
    """Re-express a batch normalised for ``src`` (a timm data config) as ``dst`` expects it; see the module
    docstring. No parameters; buffers hold the four mean/std vectors."""

    def __init__(self, src: dict, dst: dict):
        super().__init__()
        ms, ss = tuple(src.get("mean", (0.0,) * 3)), tuple(src.get("std", (1.0,) * 3))
        md, sd = tuple(dst.get("mean", (0.0,) * 3)), tuple(dst.get("std", (1.0,) * 3))
        self.size = tuple(int(v) for v in dst["input_size"][-2:]) if dst.get("input_size") else None
        self.src_size = tuple(int(v) for v in src["input_size"][-2:]) if src.get("input_size") else None
        self.same_norm = ms == md and ss == sd
        self.identity = self.same_norm and (self.size is None or self.size == self.src_size)
        for name, v in (("mean_s", ms), ("std_s", ss), ("mean_d", md), ("std_d", sd)):
            self.register_buffer(name, torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.identity or x.ndim != 4:
            return x
        if not self.same_norm:
            x = x * self.std_s.to(x.dtype) + self.mean_s.to(x.dtype)
        if self.size is not None and tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False, antialias=True)
        if not self.same_norm:
            x = (x - self.mean_d.to(x.dtype)) / self.std_d.to(x.dtype)
        return x


def ranking_top(ranking, k: int, method: str, *, need_weights: bool = False):
    """``(Ranking, [spec] * k)``: the best ``k`` of ``ranking`` (a ``hubtune rank --out`` folder or a
    :class:`~hubtune.ranking.Ranking`). Errors name the folder and the cure when ``k`` exceeds the ranking,
    or, with ``need_weights``, when the ranking holds no LogME posterior weights."""
    from ..ranking import Ranking

    if not isinstance(ranking, Ranking):
        folder = Path(ranking)
        if not (folder / "ranking.json").is_file():
            raise ConfigError(f"ranking={str(folder)!r} is not a `hubtune rank --out` folder (no ranking.json); "
                              "run `hubtune rank --out DIR` first")
        ranking = Ranking.load(folder)
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ConfigError(f"{method}: top_k={k!r} is invalid; give a whole number >= 1")
    n = len(ranking.candidates)
    if k > n:
        raise ConfigError(f"{method}: top_k={k} but the ranking holds only {n} candidate(s) "
                          f"({', '.join(c.spec for c in ranking.candidates)}); lower --top-k or rank more models")
    specs = [c.spec for c in ranking.candidates[:k]]
    if need_weights:
        missing = [s for s in specs if s not in ranking.weights]
        if missing:
            raise ConfigError(f"{method}: the ranking has no LogME posterior weights for {', '.join(missing)}; "
                              "re-run `hubtune rank` with the logme metric (the default) and --out so that "
                              "logme/*.npz is written")
    return ranking, specs


# ---------------------------------------------------------------------------------------------- dataset check
def dataset_info_of(dataset) -> dict | None:
    """``{"spec", "fingerprint", "base_fingerprint", "num_classes"}`` of the dataset being tuned: an
    :class:`~hubtune.data.ImageDataset` (a stratified subsample's base is the dataset it was drawn from), a
    dict with (some of) those keys, or a fingerprint string. None for None."""
    if dataset is None:
        return None
    if isinstance(dataset, str):
        return {"spec": None, "fingerprint": dataset, "base_fingerprint": None, "num_classes": None}
    if isinstance(dataset, dict):
        return {k: dataset.get(k) for k in ("spec", "fingerprint", "base_fingerprint", "num_classes")}
    fp = getattr(dataset, "fingerprint", None)
    if fp is None:
        raise ConfigError(f"dataset={type(dataset).__name__} has no fingerprint: give the training set as an "
                          "ImageDataset (hubtune.create_dataset), its fingerprint string, or a dict "
                          "{'fingerprint', 'num_classes'}")
    root = getattr(dataset, "_root", None)  # a SubsetDataset (stratified subsample) points at its base
    base = root.fingerprint if root is not None and hasattr(root, "fingerprint") else fp
    return {"spec": getattr(dataset, "name", None), "fingerprint": fp, "base_fingerprint": base,
            "num_classes": getattr(dataset, "num_classes", None)}


def ranking_dataset_info(ranking) -> dict | None:
    """The ``dataset_info`` a ranking was made on (``ranking.json``'s top-level key), None for a ranking
    written before hubtune recorded it."""
    info = getattr(ranking, "dataset_info", None)
    if info is None and not hasattr(ranking, "candidates"):
        path = Path(ranking) / "ranking.json"
        if path.is_file():
            info = json.loads(path.read_text()).get("dataset_info")
    return info if isinstance(info, dict) else None


def _describe(info: dict) -> str:
    parts = [str(info.get("spec") or "an unnamed dataset")]
    if info.get("split"):
        parts[0] += f" (split {info['split']})"
    if info.get("num_classes") is not None:
        parts.append(f"{info['num_classes']} classes")
    fp = info.get("base_fingerprint") or info.get("fingerprint")
    if fp:
        parts.append(f"fingerprint {str(fp)[:12]}")
    return ", ".join(parts)


def check_ranking_dataset(ranking, dataset, method: str, *, allow_foreign: bool = False) -> None:
    """Refuse (:class:`~hubtune.errors.ConfigError`) a ranking made on another dataset than ``dataset`` (the
    training set: see :func:`dataset_info_of`): another number of classes, or another base dataset (the base
    fingerprints differ; without fingerprints, the specs). A subsample of the same dataset is the same
    dataset. A ranking without ``dataset_info`` (written by an older hubtune) or no ``dataset`` given: a
    warning, since nothing can be checked. ``allow_foreign``: warn instead of refusing."""
    info = ranking_dataset_info(ranking)
    where = str(ranking) if not hasattr(ranking, "candidates") else "the ranking"
    if info is None:
        warnings.warn(f"{method}: {where} does not record the dataset it was ranked on (made by an older hubtune); "
                      "its LogME weights are assumed to be for the dataset being tuned. Re-run `hubtune rank` "
                      "to have this checked")
        return
    mine = dataset_info_of(dataset)
    if mine is None:
        warnings.warn(f"{method}: the dataset being tuned was not given, so the ranking's dataset "
                      f"({_describe(info)}) is not checked; pass dataset=train_dataset")
        return
    why = None
    if info.get("num_classes") is not None and mine.get("num_classes") is not None \
            and int(info["num_classes"]) != int(mine["num_classes"]):
        why = "another number of classes"
    else:
        theirs = {info.get("base_fingerprint"), info.get("fingerprint")} - {None}
        ours = {mine.get("base_fingerprint"), mine.get("fingerprint")} - {None}
        if theirs and ours:
            if not theirs & ours:
                why = "another dataset (the fingerprints differ)"
        elif info.get("spec") and mine.get("spec") and str(mine["spec"]).split(":")[0].split("[")[0] != \
                str(info["spec"]).split(":")[0].split("[")[0]:
            why = "another dataset"
    if why is None:
        return
    msg = (f"{method}: {where} was ranked on {_describe(info)}, but the dataset being tuned is {_describe(mine)}: "
           f"{why}. Its LogME weights project onto another task's labels. Rank on this dataset "
           "(`hubtune rank --dataset ... --out DIR`), or, if you mean it, pass "
           "`--method-arg allow_foreign_ranking=true` (allow_foreign_ranking=True)")
    if allow_foreign:
        warnings.warn(msg)
        return
    raise ConfigError(msg)


# ---------------------------------------------------------------------------------------------- a new head
def head_names(model: torch.nn.Module) -> set[str]:
    """State-dict names of a timm model's classifier (the module ``get_classifier()`` returns)."""
    head = model.get_classifier()
    for prefix, mod in model.named_modules():
        if mod is head:
            return {f"{prefix}.{n}" if prefix else n for n in head.state_dict()}
    return set()


def transfer_weights(source_state: dict, target: torch.nn.Module, skip: set | frozenset = frozenset()) -> dict:
    """Copy every tensor of ``source_state`` into ``target`` whose name and shape match (names in ``skip``
    are left alone). Returns ``{"copied", "missing", "shape_mismatch", "unexpected", "skipped"}`` name lists."""
    report = {"copied": [], "missing": [], "shape_mismatch": [], "unexpected": [], "skipped": []}
    tsd = target.state_dict()
    new = {}
    for name, t in tsd.items():
        if name in skip:
            report["skipped"].append(name)
        elif name not in source_state:
            report["missing"].append(name)
        elif tuple(source_state[name].shape) != tuple(t.shape):
            report["shape_mismatch"].append(name)
        else:
            new[name] = source_state[name]
            report["copied"].append(name)
    report["unexpected"] = [n for n in source_state if n not in tsd]
    target.load_state_dict(new, strict=False)
    return report


def check_num_classes(num_classes, who: str) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"{who} num_classes={num_classes!r} is invalid: give a whole number >= 1")
    return num_classes


@dataclass
class NewHead:
    """What :func:`new_head` returns: the re-headed copy, the source's state dict (the L2-SP anchor), the new
    head's parameter names and the transfer report."""
    hub: HubModel
    source_state: dict
    head_names: set
    copy_report: dict

    @property
    def module(self) -> torch.nn.Module:
        return self.hub.module


def new_head(model, num_classes: int, *, pretrained: bool = True, who: str = "method") -> NewHead:
    """A copy of ``model`` (a spec, Candidate, HubModel or timm model; loaded by :func:`load_model`) with a new
    ``num_classes`` classifier (``reset_classifier``); every other tensor whose name and shape match is copied
    from the source (:func:`transfer_weights`). The source module is not changed."""
    hm = load_model(model, pretrained=pretrained)
    check_num_classes(num_classes, who)
    src = hm.module
    if not hasattr(src, "reset_classifier") or not hasattr(src, "get_classifier"):
        raise ConfigError(f"{who} needs a timm model (reset_classifier/get_classifier), got {type(src).__name__}")
    source_state = {k: v.detach().clone() for k, v in src.state_dict().items()}
    target = copy.deepcopy(src)
    target.reset_classifier(num_classes)
    heads = head_names(target)
    report = transfer_weights(source_state, target, skip=heads)
    return NewHead(HubModel(target, dict(hm.data_config), hm.name, hm.identity, hm.num_params), source_state,
                   heads, report)
