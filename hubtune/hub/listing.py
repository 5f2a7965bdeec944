"""Listing timm's pretrained models and reading hub files (lists of specs)."""
from __future__ import annotations

import fnmatch
import functools
import re
from pathlib import Path

from ..errors import InputError, SpecError
from .spec import ModelSpec

_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9}


def parse_count(value: int | float | str | None) -> int | None:
    """``30_000_000``, ``'30M'``, ``'1.5B'``, ``'500k'`` -> an int (None stays None)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise InputError(f"bad parameter count {value!r}; give a number such as 30000000 or '30M'")
    if isinstance(value, (int, float)):
        if value < 0:
            raise InputError(f"bad parameter count {value!r}: it must not be negative")
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGbB]?)\s*", str(value))
    if not m:
        raise InputError(f"bad parameter count {value!r}; give a number with an optional k, M or B suffix, e.g. '30M'")
    return int(round(float(m.group(1)) * _UNITS[m.group(2).lower()]))


@functools.lru_cache(maxsize=None)
def _param_count(name: str) -> int:
    """Parameters of a timm model (with its tag's head), counted on the meta device."""
    from .sources import build, count_params

    return count_params(build(name, name, device="meta"))


def list_timm_models(filter: str = "*", tag: str | None = None, max_params: int | str | None = None) -> list[str]:
    """timm's pretrained models (``name.tag``) matching ``filter`` (fnmatch on the full name).

    ``tag``: a pattern with wildcards is fnmatched against the tag; a plain string must occur in it
    (``tag='in1k'`` keeps ``a1_in1k`` and ``in1k``). ``max_params`` (int or ``'30M'``) keeps models with at
    most that many parameters, counted on the meta device (no weights are downloaded).
    """
    import timm

    limit = parse_count(max_params)
    names = timm.list_models(filter or "*", pretrained=True)
    if tag is not None:
        wild = any(c in tag for c in "*?[")
        names = [n for n in names
                 if (fnmatch.fnmatch(n.partition(".")[2], tag) if wild else tag in n.partition(".")[2])]
    if limit is not None:
        names = [n for n in names if _param_count(n) <= limit]
    return names


def read_hub_file(path: str | Path) -> list[str]:
    """Specs from a hub file, canonicalised, duplicates dropped, order kept.

    ``.txt``: one spec per line; ``#`` starts a comment. ``.yaml`` / ``.yml``: a list of specs, or a mapping
    with a ``models:`` list. Relative paths in ``local-dir:`` and ``file:`` specs are taken relative to the
    hub file's folder.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"hub file {path} does not exist; give a .txt (one spec per line) or .yaml file")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        entries = [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()]
        entries = [e for e in entries if e]
    elif suffix in (".yaml", ".yml"):
        import yaml

        try:
            doc = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise SpecError(f"hub file {path} is not valid YAML: {e}") from None
        if isinstance(doc, dict):
            if "models" not in doc:
                raise SpecError(f"hub file {path} is a mapping without a 'models' key; write models: [spec, ...]")
            doc = doc["models"]
        if doc is None:
            doc = []
        if not isinstance(doc, list) or not all(isinstance(e, str) for e in doc):
            raise SpecError(f"hub file {path} must hold a list of spec strings (or models: [...])")
        entries = [e.strip() for e in doc if e.strip()]
    else:
        raise InputError(f"hub file {path}: unsupported type {suffix!r}; use .txt, .yaml or .yml")
    out: list[str] = []
    for entry in entries:
        try:
            spec = ModelSpec.parse(entry)
        except SpecError as e:
            raise SpecError(f"hub file {path}: {e}") from None
        if spec.kind in ("local-dir", "file") and not Path(spec.name).expanduser().is_absolute():
            spec = ModelSpec(spec.kind, str(path.parent / spec.name), spec.arch, spec.revision)
        if str(spec) not in out:
            out.append(str(spec))
    return out
