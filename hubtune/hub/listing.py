"""Listing timm's pretrained models and reading hub files (lists of specs)."""
from __future__ import annotations

import fnmatch
import functools
import re
from dataclasses import replace
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

    ``.txt``: one spec per line; ``#`` starts a comment; a data config is set with the spec's ``?key=value``
    suffix. ``.yaml`` / ``.yml``: a list, or a mapping with a ``models:`` list, whose entries are spec strings
    or mappings ``{spec: SPEC, input_size: 64, mean: [0.5, 0.5, 0.5], ...}`` (the data-config keys of
    :mod:`hubtune.hub.spec`; a key both in the mapping and in the spec's suffix is an error). Relative paths in
    ``local-dir:`` and ``file:`` specs are taken relative to the hub file's folder. Two entries that name the
    same model with different data configs are two candidates.
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
        if not isinstance(doc, list) or not all(isinstance(e, (str, dict)) for e in doc):
            raise SpecError(f"hub file {path} must hold a list of spec strings or {{spec: ..., input_size: ...}} "
                            "mappings (or models: [...])")
        entries = [e.strip() if isinstance(e, str) else e for e in doc if not isinstance(e, str) or e.strip()]
    else:
        raise InputError(f"hub file {path}: unsupported type {suffix!r}; use .txt, .yaml or .yml")
    out: list[str] = []
    for i, entry in enumerate(entries):
        try:
            spec = _entry_spec(entry)
        except SpecError as e:
            where = f"entry {i + 1}" if isinstance(entry, dict) else ""
            raise SpecError(f"hub file {path}: {where + ': ' if where else ''}{e}") from None
        if spec.kind in ("local-dir", "file") and not Path(spec.name).expanduser().is_absolute():
            spec = replace(spec, name=str(path.parent / spec.name))
        if str(spec) not in out:
            out.append(str(spec))
    return out


def _entry_spec(entry: "str | dict") -> ModelSpec:
    """A hub-file entry: a spec string, or a mapping with ``spec`` and data-config keys."""
    if isinstance(entry, str):
        return ModelSpec.parse(entry)
    from .spec import DATA_KEYS

    spec = entry.get("spec")
    if not isinstance(spec, str) or not spec.strip():
        raise SpecError(f"the mapping {entry!r} needs a 'spec' string, e.g. {{spec: 'file:w.pt::resnet18', "
                        "input_size: 64}")
    unknown = [k for k in entry if k != "spec" and k not in DATA_KEYS]
    if unknown:
        raise SpecError(f"the mapping for {spec!r} has unknown key {', '.join(repr(k) for k in unknown)}; the keys "
                        f"are spec and the data-config keys {', '.join(DATA_KEYS)}")
    return ModelSpec.parse(spec).with_data_config({k: v for k, v in entry.items() if k != "spec"})
