"""A loaded hub model ready for feature extraction: ``load_candidate(spec) -> Candidate``.

The data config a candidate is fed with is its source's (config.json, timm's pretrained_cfg, timm's default for
the architecture, the package's), with the spec's ``?key=value`` overrides on top (:func:`apply_overrides`);
``data_config_source`` says, key by key, where each value came from (``"override"`` for the spec's).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from .sources import SOURCES, count_params
from .spec import ModelSpec


@dataclass
class Candidate:
    spec: str
    module: torch.nn.Module  # eval mode
    data_config: dict  # input_size, mean, std, interpolation, crop_pct, crop_mode
    num_features: int  # penultimate width
    num_classes: int  # source head classes, 0 if no head
    identity: str  # sha256 of the canonical spec (with its data-config suffix) and the weights content: a cache key
    num_params: int
    data_config_source: dict = field(default_factory=dict)  # key -> "override", "config.json", "pretrained_cfg", ...

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One pass: ``forward_features``, ``forward_head(pre_logits=True)``, then the classifier.

        Returns (penultimate features ``(B, num_features)``, source logits ``(B, num_classes)`` or None).
        """
        m = self.module
        feats = m.forward_head(m.forward_features(x), pre_logits=True)
        feats = feats.reshape(feats.shape[0], -1)
        logits = m.get_classifier()(feats) if self.num_classes else None
        return feats, logits

    __call__ = forward


def identity_of(spec: ModelSpec, weights_hash: str) -> str:
    """sha256 of the canonical spec and the weights hash. The spec's data-config suffix is part of it, so two
    data configs of the same weights are two candidates (and two cache entries); a spec without a suffix keeps
    the identity it always had."""
    return hashlib.sha256(f"hubtune-candidate-v1\n{spec}\n{weights_hash}".encode()).hexdigest()


def apply_overrides(spec: ModelSpec, data_config: dict | None, source: dict | None) -> tuple[dict | None, dict | None]:
    """``(data_config, data_config_source)`` with the spec's overrides on top: each key the spec sets takes its
    value and the provenance ``"override"``; the others keep the source's value and provenance (``"KIND
    source"`` where the source reports none). ``(None, None)`` when nothing is known (no data config, no
    override); a partial config when only the overrides are known."""
    if data_config is None and not spec.data_config:
        return None, None
    dc = dict(data_config or {})
    src = {k: (source or {}).get(k) or f"{spec.kind} source" for k in dc}
    for key, value in spec.data_config:
        dc[key] = value
        src[key] = "override"
    return dc, src


def data_config_warning(spec: str | ModelSpec, data_config_source: dict | None) -> str | None:
    """One line for a ``file:`` candidate whose data config is entirely timm's default for its architecture
    (the checkpoint carries none and the spec sets none), else None."""
    spec = ModelSpec.parse(spec)
    if spec.kind != "file" or spec.data_config or not data_config_source:
        return None
    if not all(str(v).startswith("timm default") for v in data_config_source.values()):
        return None
    return (f"{spec}: no data config in the checkpoint; using timm's default for {spec.arch}; set it with "
            f"?input_size=...&mean=...&std=... after the spec (e.g. {spec}?input_size=64&mean=0.5&std=0.5)")


@dataclass
class CandidateRef:
    """A candidate not loaded yet: what the cache and the planner need (identity, data config, sizes), read
    without loading the weights where the source can (``identity`` is None where it cannot: random init,
    weights not local, transformers repos). ``load()`` builds the :class:`Candidate` when its turn comes."""

    spec: str
    identity: str | None
    data_config: dict | None
    num_params: int | None = None
    num_classes: int | None = None
    trust_remote_code: bool = False
    data_config_source: dict | None = None

    def load(self) -> Candidate:
        c = load_candidate(self.spec, trust_remote_code=self.trust_remote_code)
        if self.identity is not None and c.identity != self.identity:  # the file changed since it was hashed
            self.identity = c.identity
        return c


def identify_candidate(spec: str | ModelSpec, trust_remote_code: bool = False) -> CandidateRef:
    """A :class:`CandidateRef` for a spec: parses it and asks its source for the identity without loading.
    Raises what loading would raise for a bad spec or a damaged config (never downloads)."""
    spec = ModelSpec.parse(spec)
    source = SOURCES.get(spec.kind)
    ident = source.identify(spec) if hasattr(source, "identify") else None
    if ident is None:
        return CandidateRef(str(spec), None, None, trust_remote_code=trust_remote_code)
    dc, src = apply_overrides(spec, ident["data_config"], ident.get("data_config_source"))
    return CandidateRef(str(spec), identity_of(spec, ident["weights_hash"]), dc,
                        ident.get("num_params"), ident.get("num_classes"), trust_remote_code, src)


def load_candidate(spec: str | ModelSpec, pretrained: bool = True, trust_remote_code: bool = False) -> Candidate:
    """Load a model from any spec kind (see :mod:`hubtune.hub.spec`), safely and offline first.

    Raises ``SpecError`` for a malformed spec, ``ModelNotFoundError`` for an unknown architecture, repo or
    path, ``WeightsNotAvailableError`` when the weights are not local and cannot be fetched.
    ``trust_remote_code`` is passed to the source: only a transformers repo whose config names its own
    code (``auto_map``) runs it, and only when this is True; nothing else ever runs remote code.
    """
    spec = ModelSpec.parse(spec)
    loaded = SOURCES.get(spec.kind).load(spec, pretrained, trust_remote_code)
    module = loaded.module.eval()
    num_features = int(getattr(module, "head_hidden_size", None) or module.num_features)
    num_classes = int(getattr(module, "num_classes", 0) or 0)
    dc, src = apply_overrides(spec, loaded.data_config, getattr(loaded, "data_config_source", None))
    return Candidate(
        spec=str(spec),
        module=module,
        data_config=dc,
        num_features=num_features,
        num_classes=num_classes,
        identity=identity_of(spec, loaded.weights_hash),
        num_params=count_params(module),
        data_config_source=src,
    )


def candidate_info(spec: str | ModelSpec) -> dict:
    """What a spec is, without loading or downloading weights: ``spec``, ``kind``, ``architecture``,
    ``num_params`` (counted on the meta device), ``num_classes``, ``input_size``, ``pretrained_tag``,
    ``weights_location`` (a path, or where it would be looked for), ``cached`` (bool), ``data_config`` (what
    the model will be fed with, the spec's overrides included; None when unknown without downloading) and
    ``data_config_source`` (key -> where its value came from)."""
    spec = ModelSpec.parse(spec)
    info = SOURCES.get(spec.kind).info(spec)
    dc, src = apply_overrides(spec, info.get("data_config"), info.get("data_config_source"))
    info.update(data_config=dc, data_config_source=src)
    if dc and "input_size" in dc:
        info["input_size"] = tuple(dc["input_size"])
    return {"spec": str(spec), "kind": spec.kind, **info}
