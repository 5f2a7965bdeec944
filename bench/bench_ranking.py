"""Ranking at work: extraction throughput, the cache, and successive halving, each against the plain way
in one run. Writes bench/results/ranking.json.

    python bench/bench_ranking.py [--samples 512] [--models pkg:efficientnet_lite0,...]

1. Throughput: hubtune's extractor (inference mode, channels-last, bf16 autocast where supported, one
   decode shared by candidates with the same transform) against a plain fp32 eager timm loop (decode and
   transform per model, ``torch.no_grad``), on the same models and images; plus the agreement of their
   LogME scores and of the rankings they induce.
2. Cache: a second ``rank`` of the same hub and data against the first.
3. Successive halving (``budget``) against the full ranking: forward passes saved and how often it
   picks the same top-1, over three seeds and two starting budgets.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from hubtune.data import create_dataset, stratified_subsample, transform_for
from hubtune.features import ExtractOptions, extract
from hubtune.hub import load_candidate
from hubtune.ranking import rank
from hubtune._io import write_json
from hubtune.scoring import logme

DEFAULT_MODELS = "pkg:efficientnet_lite0,pkg:efficientnet_lite1,pkg:efficientnet_lite2"


def plain_loop(cand, ds, batch_size):
    transform = transform_for(cand.data_config)
    cand.module.float().eval()
    feats = []
    start = time.perf_counter()
    with torch.no_grad():
        for b in range(0, len(ds), batch_size):
            x = torch.stack([transform(ds.image(i)) for i in range(b, min(b + batch_size, len(ds)))])
            f, _ = cand.forward(x)
            feats.append(f.numpy())
    return np.concatenate(feats), time.perf_counter() - start


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--models", default=DEFAULT_MODELS)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "ranking.json"))
    args = ap.parse_args()
    specs = args.models.split(",")
    ds = stratified_subsample(create_dataset("digits"), max_samples=args.samples, seed=0)
    cands = [load_candidate(s) for s in specs]

    plain = {}
    for c in cands:
        f, sec = plain_loop(c, ds, args.batch_size)
        plain[c.spec] = {"seconds": sec, "logme": logme(f, ds.labels).score}
    feats = {c.spec: [] for c in cands}
    start = time.perf_counter()
    stats = extract(cands, ds, ExtractOptions(batch_size=args.batch_size, use_cache=False, progress=False),
                    lambda s, f, l, y: feats[s].append(f))
    hub_total = time.perf_counter() - start
    hub = {s: {"seconds": stats[s].seconds, "logme": logme(np.concatenate(v), ds.labels).score}
           for s, v in feats.items()}
    plain_total = sum(v["seconds"] for v in plain.values())
    order = lambda d: sorted(d, key=lambda s: -d[s]["logme"])  # noqa: E731
    throughput = {
        "images": len(ds), "models": specs,
        "plain_fp32_eager": {"total_seconds": plain_total, "images_per_second": len(ds) * len(cands) / plain_total,
                             "per_model": plain},
        "hubtune": {"total_seconds_with_decode": hub_total,
                    "images_per_second": len(ds) * len(cands) / hub_total, "per_model": hub,
                    "bf16": stats[specs[0]].extra.get("bf16")},
        "speedup": plain_total / hub_total,
        "logme_max_abs_diff": max(abs(plain[s]["logme"] - hub[s]["logme"]) for s in specs),
        "ranking_plain": order(plain), "ranking_hubtune": order(hub),
        "ranking_unchanged": order(plain) == order(hub),
        "target_speedup": 3.0,
    }

    with tempfile.TemporaryDirectory() as cache_dir:
        opts = ExtractOptions(batch_size=args.batch_size, cache_dir=cache_dir, progress=False)
        t0 = time.perf_counter()
        first = rank(specs, ds, options=opts)
        t1 = time.perf_counter()
        second = rank(specs, ds, options=opts)
        t2 = time.perf_counter()
        cache = {"first_seconds": t1 - t0, "second_seconds": t2 - t1, "ratio": (t2 - t1) / (t1 - t0),
                 "same_ranking": first.top(len(specs)) == second.top(len(specs)), "target_ratio_below": 0.10}
    with tempfile.TemporaryDirectory() as cache_dir:
        opts = ExtractOptions(batch_size=args.batch_size, cache_dir=cache_dir, progress=False)
        full = rank(specs, ds, options=opts)
    trials = []
    for seed in (0, 1, 2):
        for budget in (32, 64):
            with tempfile.TemporaryDirectory() as cache_dir:
                opts = ExtractOptions(batch_size=args.batch_size, cache_dir=cache_dir, progress=False)
                r = rank(specs, ds, options=opts, budget=budget, top_k=1, seed=seed)
            b = r.budget
            trials.append({"seed": seed, "budget": budget, "top1": r.top(1)[0], "agrees": r.top(1) == full.top(1),
                           "forward_passes": b["forward_passes"],
                           "compute_saved": 1 - b["forward_passes"] / b["forward_passes_full_ranking"]})
    halving_report = {"top1_full": full.top(1)[0], "trials": trials,
                      "top1_agreement_rate": float(np.mean([t["agrees"] for t in trials])),
                      "mean_compute_saved": float(np.mean([t["compute_saved"] for t in trials]))}

    report = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "torch": torch.__version__, "threads": torch.get_num_threads()},
              "throughput": throughput, "cache": cache, "successive_halving": halving_report}
    write_json(args.out, report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
