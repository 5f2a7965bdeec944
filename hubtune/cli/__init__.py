"""The ``hubtune`` command: one module per subcommand, each with ``add_parser(sub, lazy)``.

Subcommands and their choices are read from the registries, so nothing is listed by hand twice.
"""
from __future__ import annotations

import argparse
import sys
import warnings

from .. import __version__
from ..errors import HubtuneError
from . import autodistill, cache, cache_teacher, hub, rank, score, serve_teacher, ssld, tune

#: the subcommands, in the order ``--help`` lists them
SUBCOMMANDS = (score, rank, hub, tune, cache_teacher, serve_teacher, cache, ssld, autodistill)


def build_parser(argv=None) -> argparse.ArgumentParser:
    """The parser. With ``argv`` given and neither ``tune`` nor ``--help`` in it, the method registry (which
    imports torch) is not loaded, so ``hubtune score`` starts fast."""
    parser = argparse.ArgumentParser(prog="hubtune", description="Rank the models of a hub by how well they "
                                                                 "transfer to your data, then tune with the best.")
    parser.add_argument("--version", action="version", version=f"hubtune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    lazy = argv is not None and not any(a in ("tune", "-h", "--help") for a in argv)
    for module in SUBCOMMANDS:
        module.add_parser(sub, lazy=lazy)
    return parser


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings from the command are messages for the user (a skipped model, a damaged cache entry): print the
    message alone, not the source line that raised it."""
    return f"hubtune: warning: {message}\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    warnings.formatwarning = _format_warning
    args = build_parser(argv).parse_args(argv)
    try:
        return args.func(args)
    except HubtuneError as e:
        print(f"hubtune {args.command}: error: {e}", file=sys.stderr)
        return 2


__all__ = ["main", "build_parser"]
