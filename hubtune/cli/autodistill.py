"""`hubtune autodistill`: search a student architecture by distillation (accuracy vs measured latency)."""
from __future__ import annotations

# CLI option -> autodistill() argument (every one may also be set in --config FILE.yaml; the command line wins)
OPTIONS = ("teacher", "space", "dataset", "trials", "sampler", "storage", "study_name", "out", "resume", "overwrite",
           "seed", "max_samples", "eval_samples", "input_size", "data_dir", "trials_dir", "startup_trials",
           "population_size", "max_proposals", "flash_steps", "flash_lr", "layer_loss", "epochs", "batch_size", "lr",
           "optimizer", "temperature", "alpha_hard", "alpha_soft", "precision", "device", "latency_batch_size",
           "latency_threads", "latency_dtype", "latency_min_run_time", "latency_process", "latency_clock")


def _cmd(args) -> int:
    from ..search.api import _load_config, autodistill

    cfg = _load_config(args.config)
    for key in OPTIONS:
        v = getattr(args, key, None)
        if v is not None and v is not False:
            cfg[key] = v
    if args.objective:
        cfg["objectives"] = args.objective
    if args.constraint:
        cfg["constraints"] = args.constraint
    if args.no_channels_last:
        cfg["latency_channels_last"] = False
    cfg["verbose"] = not args.quiet
    if not cfg.get("out"):
        from ..errors import InputError

        raise InputError("--out DIR is required (or 'out:' in --config): the study, trials and front go there")
    res = autodistill(config=cfg)
    if not args.quiet:
        print(f"{res['evaluated']} students trained ({res['stopped']}); Pareto front ({', '.join(res['objectives'])}):")
        for r in res["front"]:
            vals = "  ".join(f"{k}={v:.4g}" for k, v in r["values"].items())
            print(f"  trial {r['number']:>3}  {vals}  {r['params']}  {r.get('loadable') or ''}")
        print(f"wrote {res['out']}/trials.csv, trials.json, pareto.json, pareto.png, front/")
    return 0


def add_parser(sub, lazy: bool = False) -> None:
    import argparse

    p = sub.add_parser(
        "autodistill", help="search a student architecture by distillation: Pareto front of accuracy and latency",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Each trial builds a student from the search space, trains it by flash distillation (stage by "
                    "stage, intermediate layers through learned feature matchers) then regular distillation (CE + "
                    "T^2 KL), evaluates its accuracy and measures its latency; an Optuna sampler proposes the next. "
                    "The study lives in a storage file (default OUT/study.db): --resume continues a killed search. "
                    "Outputs: OUT/trials.csv, trials.json, pareto.json, pareto.png, front/trial_N (timm folders, "
                    "loadable as local-dir:). Every option can be set in --config FILE.yaml (keys with '_').")
    p.add_argument("--teacher", help="the teacher: a spec or a tuned folder (e.g. local-dir:runs/teacher)")
    p.add_argument("--space", help="search space file (YAML or JSON: arch, params, fixed, layers)")
    p.add_argument("--dataset", help="registered dataset name or imagefolder:PATH")
    p.add_argument("--trials", type=int, help="students to train (distinct proposals; default 12)")
    p.add_argument("--sampler", choices=("tpe", "nsga2", "gp", "random", "grid"), help="default tpe")
    p.add_argument("--objective", action="append", metavar="METRIC:max|min",
                   help="repeatable (default accuracy:max and latency_ms:min); metrics: accuracy, eval_loss, "
                        "latency_ms, throughput_ips, params, flops")
    p.add_argument("--constraint", action="append", metavar="METRIC<=V",
                   help="repeatable, e.g. params<=5M, latency_ms<=2, accuracy>=0.8 (suffixes k, M, G)")
    p.add_argument("--storage", help="the study's storage: an SQLite file or an Optuna URL (default OUT/study.db)")
    p.add_argument("--study-name")
    p.add_argument("--out", help="output folder")
    p.add_argument("--config", help="YAML file of settings (the command line overrides it)")
    p.add_argument("--resume", action="store_true", default=None, help="continue the search in OUT")
    p.add_argument("--overwrite", action="store_true", default=None, help="start the search in OUT again")
    p.add_argument("--seed", type=int, help="seeds the sampler, the students and the data order (default 0)")
    p.add_argument("--max-samples", type=int, help="stratified subsample of the training set")
    p.add_argument("--eval-samples", type=int, help="stratified subsample of the evaluation set")
    p.add_argument("--input-size", type=int, help="image side the students see (default the teacher's)")
    p.add_argument("--data-dir")
    p.add_argument("--trials-dir", help="where trained trials are kept (default OUT/trials); share it between "
                                        "searches with the same teacher, data and training settings")
    p.add_argument("--startup-trials", type=int, help="tpe/gp: random proposals first (default trials//3, 3..10)")
    p.add_argument("--population-size", type=int, help="nsga2: population (default trials//3, 4..50)")
    p.add_argument("--max-proposals", type=int, help="stop after this many proposals (default max(10*trials, 100))")
    p.add_argument("--flash-steps", type=int, help="optimiser steps per flash-distillation stage (0: none; default 20)")
    p.add_argument("--flash-lr", type=float)
    p.add_argument("--layer-loss", choices=("mse", "kl"))
    p.add_argument("--epochs", type=int, help="epochs of regular distillation per trial (default 2)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--optimizer", choices=("sgd", "adamw"))
    p.add_argument("--temperature", type=float)
    p.add_argument("--alpha-hard", type=float)
    p.add_argument("--alpha-soft", type=float)
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"))
    p.add_argument("--device")
    p.add_argument("--latency-batch-size", type=int, help="batch of the throughput measurement (default 32)")
    p.add_argument("--latency-threads", type=int, help="threads pinned while timing (default 1)")
    p.add_argument("--latency-dtype", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--latency-min-run-time", type=float, help="seconds of timing per measurement (default 0.5)")
    p.add_argument("--latency-process", choices=("same", "fresh"), help="time in this process or a fresh one")
    p.add_argument("--latency-clock", choices=("wall", "cpu"),
                   help="wall: elapsed time (default); cpu: the timing thread's CPU time (threads 1), steadier on a "
                        "machine shared with other jobs")
    p.add_argument("--no-channels-last", action="store_true", help="time in the contiguous layout")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd)
