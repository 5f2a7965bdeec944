"""`hubtune hub list|info`: the candidates of a hub."""
from __future__ import annotations

import sys

from ..errors import HubtuneError
from ._common import add_hub_args as _add_hub_args, hub_specs as _hub_specs


def _cmd_hub(args) -> int:
    import json

    from ..hub import candidate_info, data_config_warning

    if args.hub_command == "info":
        info = candidate_info(args.spec)
        print(json.dumps(info, indent=2, default=str))
        note = data_config_warning(info["spec"], info.get("data_config_source"))
        if note:
            print(f"hubtune: warning: {note}", file=sys.stderr)
        return 0
    for spec in _hub_specs(args):
        try:
            info = candidate_info(spec)
            print(f"{spec:45s} {(info.get('num_params') or 0) / 1e6:7.1f}M  {str(info.get('input_size')):16s} "
                  f"{'cached' if info.get('cached') else 'not cached'}")
        except HubtuneError as e:
            print(f"{spec:45s} unavailable: {e}")
    return 0


def add_parser(sub, lazy: bool = False) -> None:
    hb = sub.add_parser("hub", help="list hub candidates or inspect one")
    hsub = hb.add_subparsers(dest="hub_command", required=True)
    hl = hsub.add_parser("list", help="list candidates (default: the packaged hub)")
    _add_hub_args(hl)
    hi = hsub.add_parser("info", help="metadata of one spec: sizes, where the weights are, the data config and "
                                      "where each of its values comes from (a spec may end in ?input_size=N&...)")
    hi.add_argument("spec")
    hb.set_defaults(func=_cmd_hub)
