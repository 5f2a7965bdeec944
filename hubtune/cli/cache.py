"""`hubtune cache ls|clear`: the feature cache."""
from __future__ import annotations



def _cmd_cache(args) -> int:
    from ..features import FeatureCache

    cache = FeatureCache(args.cache_dir)
    if args.cache_command == "ls":
        entries = cache.ls()
        for e in entries:
            print(f"{e['bytes'] / 1e6:9.1f} MB  {'complete' if e['complete'] else 'partial '}  {e['model']}  "
                  f"{e['path']}")
        print(f"{len(entries)} entries in {cache.root}")
    else:
        print(f"removed {cache.clear()} entries from {cache.root}")
    return 0


def add_parser(sub, lazy: bool = False) -> None:
    ca = sub.add_parser("cache", help="manage the feature cache")
    ca.add_argument("cache_command", choices=("ls", "clear"))
    ca.add_argument("--cache-dir")
    ca.set_defaults(func=_cmd_cache)
