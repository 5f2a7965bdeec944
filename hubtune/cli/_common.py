"""What several subcommands share: the hub arguments."""
from __future__ import annotations

PACKAGED_HUB = ("pkg:efficientnet_lite0", "pkg:efficientnet_lite1", "pkg:efficientnet_lite2")


def hub_specs(args) -> list[str]:
    from ..hub import list_timm_models, read_hub_file, split_specs

    specs: list[str] = []
    for item in args.models or []:
        specs += split_specs(item)  # a comma inside ?mean=0.5,0.5,0.5 stays with its spec
    if args.hub == "timm":
        specs += list_timm_models(filter=args.filter or "*", tag=args.tag, max_params=args.max_params)
    elif args.hub:
        specs += read_hub_file(args.hub)
    return specs or list(PACKAGED_HUB)


def add_hub_args(p) -> None:
    p.add_argument("--models", action="append", help="comma-separated model specs (repeatable)")
    p.add_argument("--hub", help="a .txt/.yaml file of specs, or 'timm' to query timm's registry")
    p.add_argument("--filter", help="with --hub timm: name pattern, e.g. 'resnet*'")
    p.add_argument("--tag", help="with --hub timm: pretrained tag, e.g. in1k")
    p.add_argument("--max-params", help="with --hub timm: e.g. 30M")
