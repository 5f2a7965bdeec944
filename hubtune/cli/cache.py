"""`hubtune cache ls|clear`: the feature cache."""
from __future__ import annotations


def _show(paths: list[str], k: int = 5) -> str:
    return ", ".join(paths[:k]) + (f", ... ({len(paths) - k} more)" if len(paths) > k else "")


def _cmd_cache(args) -> int:
    from ..features import FeatureCache

    cache = FeatureCache(args.cache_dir)
    if args.cache_command == "ls":
        entries = cache.ls(verify=args.verify)
        for e in entries:
            status = e["status"] if e["status"] != "partial" else f"partial {e['rows']}/{e['total_rows']}"
            line = f"{e['bytes'] / 1e6:9.1f} MB  {status:9s}  {e['model']}  {e['path']}"
            if e["problem"]:
                line += f"  ({e['problem']}; it will be recomputed)"
            print(line)
        damaged = sum(e["status"] == "damaged" for e in entries)
        print(f"{len(entries)} entries in {cache.root}" + (f", {damaged} damaged" if damaged else ""))
        foreign = cache.foreign()
        if foreign:
            print(f"{len(foreign)} items under {cache.folder} were not written by hubtune: {_show(foreign)}")
    else:
        removed, skipped = cache.clear()
        print(f"removed {removed} entries from {cache.root}")
        if skipped:
            print(f"skipped {len(skipped)} items not written by hubtune: {_show(skipped)}")
    return 0


def add_parser(sub, lazy: bool = False) -> None:
    ca = sub.add_parser("cache", help="manage the feature cache",
                        description="ls: list entries (complete, partial or damaged); clear: delete the entries "
                                    "hubtune wrote, leaving (and listing) anything else under CACHE_DIR/features")
    ca.add_argument("cache_command", choices=("ls", "clear"))
    ca.add_argument("--cache-dir")
    ca.add_argument("--verify", action="store_true", help="with ls: also checksum every chunk (reads the cache)")
    ca.set_defaults(func=_cmd_cache)
