"""Argument checks shared by ranking, tuning and the data layer (validated once, at the boundary)."""
from __future__ import annotations

import operator

from .errors import InputError


def check_count(name: str, value, *, flag: str | None = None, cure: str = "pass a positive integer",
                error: type[InputError] = InputError, optional: bool = True) -> int | None:
    """``value`` as an int >= 1, or None when it is None and ``optional``. A bool, a non-integer, 0 or a negative
    number raises ``error`` naming ``name`` (and the command-line ``flag``) and the ``cure``: 0 never means
    "all"."""
    if value is None and optional:
        return None
    where = f"{name}={value!r}" + (f" ({flag} {value})" if flag else "")
    try:
        if isinstance(value, bool):
            raise TypeError
        value = operator.index(value)
    except TypeError:
        raise error(f"{where} is not a whole number; {cure}") from None
    if value < 1:
        raise error(f"{where} must be a whole number >= 1 (at least 1; 0 does not mean 'all'); {cure}")
    return value


def split_options(text: str, where: str, error: type[InputError] = InputError) -> tuple[str, dict[str, str]]:
    """``"HEAD?K=V&K2=V2"`` -> ``("HEAD", {"K": "V", "K2": "V2"})``, keys and values stripped; an option without
    ``=`` raises ``error`` naming ``where`` (the spec as the user wrote it)."""
    head, _, query = text.partition("?")
    opts = {}
    for part in filter(None, query.split("&")):
        k, sep, v = part.partition("=")
        if not sep:
            raise error(f"{where}: option {part!r} must be NAME=VALUE")
        opts[k.strip()] = v.strip()
    return head, opts
