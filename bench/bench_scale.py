"""Ranking hubs of 5, 20 and 60 models: peak memory stays flat, a second run answers from the cache.

Each hub is a set of random-init timm models of several families saved as ``local-dir:`` folders (timm's
format, small input size so the run is short). Every ``hubtune rank`` runs in a fresh process, whose peak RSS
(``ru_maxrss``) and wall time are measured; the second run of each hub reads the same cache and must load no
model (``loaded`` is false for every candidate in its ranking.json). Writes bench/results/scale.json.

    python bench/bench_scale.py [--sizes 5 20 60] [--samples 300] [--px 64]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ARCHS = ["resnet18", "mobilenetv3_small_100", "efficientnet_b0", "resnet34", "regnetx_002", "mobilenetv2_100",
         "densenet121", "resnet50"]


def make_hub(root: Path, count: int, px: int) -> list[str]:
    import timm
    import torch

    from hubtune.tuning import save_timm_folder

    specs = []
    for i in range(count):
        d = root / f"m{i:03d}"
        if not (d / "config.json").is_file():
            torch.manual_seed(i)
            arch = ARCHS[i % len(ARCHS)]
            m = timm.create_model(arch, num_classes=10,
                                  pretrained_cfg_overlay={"input_size": (3, px, px), "crop_pct": 1.0})
            save_timm_folder(m, d)
        specs.append(f"local-dir:{d}")
    return specs


def run_rank(specs: list[str], out: Path, cache: Path, samples: int, extra: tuple = ()) -> dict:
    """``hubtune rank`` in a fresh process; its own peak RSS comes back through a tiny wrapper."""
    hub_file = out.with_suffix(".txt")
    hub_file.write_text("\n".join(specs) + "\n")
    code = ("import resource, sys\nfrom hubtune.cli import main\n"
            "rc = main(sys.argv[1:])\n"
            "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
            "sys.exit(rc)\n")
    cmd = [sys.executable, "-c", code, "rank", "--hub", str(hub_file), "--max-samples", str(samples),
           "--cache-dir", str(cache), "--out", str(out), "--quiet", *extra]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"rank failed ({p.returncode}):\n{p.stderr[-3000:]}")
    rss = [int(line.split()[1]) for line in p.stderr.splitlines() if line.startswith("MAXRSS_KB")][0]
    ranking = json.loads((out / "ranking.json").read_text())
    cands = ranking["candidates"]
    return {"scores": {c["spec"]: c["scores"] for c in cands}, "wall_s": round(wall, 2), "peak_rss_mb": round(rss / 1024, 1), "ranked": len(cands),
            "skipped": len(ranking["skipped"]), "models_loaded": sum(bool(c.get("loaded")) for c in cands),
            "cache_hits": sum(bool(c["cache_hit"]) for c in cands),
            "largest_model_params": max(c["num_params"] for c in cands)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[5, 20, 60])
    ap.add_argument("--samples", type=int, default=300)
    ap.add_argument("--px", type=int, default=64)
    ap.add_argument("--ray", type=int, default=0,
                    help="also rank the first N models with --backend ray (a local 2-CPU instance) against a "
                         "local run, both from a cold cache: equality and overhead")
    ap.add_argument("--work", help="folder for the hubs and caches (default: a temporary one, removed)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "scale.json"))
    args = ap.parse_args(argv)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="hubtune-scale-"))
    try:
        models = make_hub(work / "models", max(args.sizes), args.px)
        rows = []
        for size in args.sizes:
            specs = models[:size]
            cache = work / f"cache-{size}"
            shutil.rmtree(cache, ignore_errors=True)
            first = run_rank(specs, work / f"rank-{size}-a", cache, args.samples)
            second = run_rank(specs, work / f"rank-{size}-b", cache, args.samples)
            row = {"models": size, "first": first, "second": second,
                   "second_over_first_time": round(second["wall_s"] / first["wall_s"], 4)}
            rows.append(row)
            print(json.dumps(row), flush=True)
        ray = None
        if args.ray:
            specs = models[:args.ray]
            local = run_rank(specs, work / "ray-local", work / "cache-ray-local", args.samples)
            remote = run_rank(specs, work / "ray-ray", work / "cache-ray-ray", args.samples, ("--backend", "ray"))
            diff = max(abs(remote["scores"][s]["logme"] - v["logme"]) / abs(v["logme"])
                       for s, v in local["scores"].items())
            ray = {"models": len(specs), "local_wall_s": local["wall_s"], "ray_wall_s": remote["wall_s"],
                   "ray_over_local": round(remote["wall_s"] / local["wall_s"], 3),
                   "max_rel_logme_difference": diff,
                   "note": "each a fresh process with a cold cache; the Ray run includes starting a local "
                           "instance (2 CPUs, one task per candidate, 1 CPU each)"}
            print(json.dumps(ray), flush=True)
        for r in rows:
            for run in ("first", "second"):
                r[run].pop("scores", None)
        rss = [r["first"]["peak_rss_mb"] for r in rows]
        result = {
            "what": "peak RSS and wall time of `hubtune rank` (fresh process each) on hubs of random-init timm "
                    f"models ({', '.join(ARCHS)}, cycled) at {args.px}px on {args.samples} digits images; the "
                    "second run of each hub reads the first run's cache",
            "machine": {"cpu": _cpu(), "cores": os.cpu_count(), "python": platform.python_version()},
            "defaults": {"max_resident": 1},
            "runs": rows,
            "ray": ray,
            "peak_rss_growth_first_to_last": round(rss[-1] / rss[0], 3),
            "targets": {"memory_flat_in_hub_size": rss[-1] <= 1.25 * rss[0],
                        "second_run_at_most_5pct": all(r["second_over_first_time"] <= 0.05 for r in rows),
                        "second_run_loads_no_model": all(r["second"]["models_loaded"] == 0 for r in rows)},
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result["targets"]))
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def _cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
