"""`hubtune rank`: rank the models of a hub on a dataset."""
from __future__ import annotations

from pathlib import Path

from ..scoring import ESTIMATORS
from ._common import add_hub_args as _add_hub_args, hub_specs as _hub_specs

def _cmd_rank(args) -> int:
    from ..features import ExtractOptions
    from ..ranking import DEFAULT_METRICS, check_rank_args, rank

    # every count is checked before the hub is listed or any model loaded (0 never means "everything")
    check_rank_args(max_samples=args.max_samples, per_class=args.per_class, budget=args.budget, top_k=args.top_k,
                    verify=args.verify, verify_budget=args.verify_budget)
    options = ExtractOptions(batch_size=args.batch_size, chunk_size=args.chunk_size, device=args.device,
                             precision=args.precision, compile=False if args.no_compile else "auto",
                             cache_dir=args.cache_dir, use_cache=not args.no_cache,
                             progress=False if args.quiet else None, max_resident=args.max_resident,
                             num_workers="auto" if args.num_workers is None else args.num_workers)
    ray_options = None
    if args.backend == "ray":
        from ..ranking import RayOptions

        ray_options = RayOptions(address=args.ray_address, gpus_per_model=args.gpus_per_model,
                                 max_retries=args.max_retries, shard_rows=args.ray_shard_rows)
    specs = _hub_specs(args)
    if not args.quiet:
        print(f"Ranking {len(specs)} models on {args.dataset} with {', '.join(args.metric or DEFAULT_METRICS)}")
    ranking = rank(specs, args.dataset, metrics=args.metric or None, split=args.split,
                   data_dir=args.data_dir, download=args.download, max_samples=args.max_samples, per_class=args.per_class,
                   options=options, budget=args.budget, top_k=args.top_k, out=args.out,
                   trust_remote_code=args.trust_remote_code, backend=args.backend, ray_options=ray_options,
                   logme_mode="exact" if args.exact else "fast", verify=args.verify, verify_budget=args.verify_budget)
    print(ranking.table())
    if args.top_k:
        top = ranking.candidates[:args.top_k]
        print(f"top-{args.top_k}: {', '.join(c.spec_given or c.spec for c in top)}")
    if args.out:
        print(f"wrote {args.out}/ranking.json, ranking.csv" + (", ranking.png" if (Path(args.out) / "ranking.png").exists() else ""))
    return 0


def add_parser(sub, lazy: bool = False) -> None:
    names = ESTIMATORS.names()
    if lazy:  # the registry imports torch: only `hubtune rank --help` needs the list
        datasets = "the registered datasets (see hubtune rank --help)"
    else:
        from ..data import list_datasets

        datasets = ", ".join(list_datasets())

    rk = sub.add_parser(
        "rank", help="rank hub models on a dataset by transferability",
        description="Extract features of every candidate once (cached), score them, and rank. With no "
                    "arguments: digits and the packaged EfficientNet-Lite0/1/2 hub, offline. Datasets: "
                    f"{datasets}, imagefolder:PATH.")
    rk.add_argument("--dataset", default="digits")
    rk.add_argument("--split", default="train")
    rk.add_argument("--data-dir", help="where dataset files are looked for (default $HUBTUNE_DATA_DIR)")
    rk.add_argument("--download", action="store_true", help="download the dataset when missing (needs network)")
    _add_hub_args(rk)
    rk.add_argument("--metric", action="append", choices=names,
                    help="repeatable; the first orders the ranking (default: auto, then logme beside it)")
    rk.add_argument("--verify", type=int, metavar="K",
                    help="after scoring, fine-tune the top K briefly on a held-out split of the dataset by "
                         "successive halving, and put them first by held-out accuracy")
    rk.add_argument("--verify-budget", type=int, metavar="STEPS",
                    help="with --verify: total optimizer steps over all finalists and rungs (default: 2 epochs "
                         "of the training part per finalist)")
    rk.add_argument("--top-k", type=int)
    rk.add_argument("--max-samples", type=int, help="stratified subsample of this many images")
    rk.add_argument("--per-class", type=int, help="at most this many images per class")
    rk.add_argument("--budget", type=int, help="successive halving from this many images")
    rk.add_argument("--out", help="folder for ranking.json, ranking.csv, ranking.png, logme/ weights")
    rk.add_argument("--batch-size", type=int, default=64)
    rk.add_argument("--chunk-size", type=int, default=512,
                    help="rows decoded at once and written per cache file (an interrupted rank resumes after "
                         "the last whole chunk)")
    rk.add_argument("--device")
    rk.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto")
    rk.add_argument("--no-compile", action="store_true")
    rk.add_argument("--cache-dir")
    rk.add_argument("--no-cache", action="store_true")
    rk.add_argument("--quiet", action="store_true")
    rk.add_argument("--exact", action="store_true",
                    help="LogME in float64 throughout (equal to the reference to 1e-9); the default fast mode "
                         "(float32 Gram blocks) is within 1e-6 relative of it")
    rk.add_argument("--max-resident", type=int,
                    help="models loaded at once (default 1): peak memory is about the largest model plus one "
                         "chunk, whatever the hub's size")
    rk.add_argument("--num-workers", type=int,
                    help="DataLoader processes that decode images while the models run (default: 0 below 256 "
                         "images, else up to 4)")
    rk.add_argument("--backend", choices=("local", "ray"), default="local",
                    help="ray: one Ray task per candidate (pip install 'hubtune[ray]'); the result equals local")
    rk.add_argument("--ray-address",
                    help="with --backend ray: 'auto' or HOST:PORT of a running cluster (default: start a "
                         "private local instance on 127.0.0.1)")
    rk.add_argument("--gpus-per-model", type=float, default=0, help="with --backend ray: GPUs each task asks for")
    rk.add_argument("--ray-shard-rows", type=int,
                    help="with --backend ray: split each candidate's rows into tasks of this many rows")
    rk.add_argument("--max-retries", type=int, default=2,
                    help="with --backend ray: attempts after a task fails or its worker dies")
    rk.add_argument("--trust-remote-code", action="store_true",
                    help="let Hugging Face repos that ship their own model code run it (off by default)")
    rk.set_defaults(func=_cmd_rank)
