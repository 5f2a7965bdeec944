"""Precision against fp32: how bf16 moves transferability scores and rankings, and what it buys.
Writes bench/results/precision.json (and precision.png with matplotlib).

    OMP_NUM_THREADS=2 python bench/bench_precision.py [--samples 1000] [--datasets digits,fashion-mnist]

For each dataset (a stratified subsample with a fixed seed, put in an order whose every prefix is
stratified, so the first rows are a fair probe) and each model, the features and source logits of every
row are extracted under

* ``fp32`` and ``bf16`` (full autocast) with hubtune's extractor (``ExtractOptions(precision=...)``),
* ``bf16-trunk`` (bf16 up to the last stage, float32 from there: :func:`hubtune.features.precision.make_forward`),
  ``bf16-mid`` (float32 also for the stem and the stages of stride <= 8, bf16 only in between) and
  ``bf16-head`` (bf16-trunk's fallback: only pooling/pre-logits/classifier in float32), with a loop of
  the same shape (timm eval transform, channels-last, inference mode, same batches),

and scored with LogME and LEEP on every prefix in ``--prefixes`` and on all rows. Reported per model:
score differences against fp32 (absolute, relative), the relative error of the features, whether the
probe rule of :func:`~hubtune.features.precision.probe_error` (``PROBE_SAFETY`` x the largest |difference|
on the first ``--probe`` rows and on each half of them) brackets the difference on all rows, and whether
the single-probe rule (the whole probe only) would have; extraction speed; per dataset: the rankings
under each precision, the pairs a precision swaps, and the tie groups that the probe errors give.

Speed is also timed apart, interleaved (``--timing-rounds`` rounds of each precision in turn, the best
and the median round kept), because other jobs share the CPU and a single pass is noisy.

The packaged EfficientNet-Lite0/1/2 are the real candidates. ``--random-models`` (timm architectures with
random weights: ResNet, MobileNetV3, ViT) only show how each family's structure carries bf16 rounding:
random weights give features unlike trained ones (no large BatchNorm running means, residual branches
near zero at init), so their score gaps mean nothing and their rankings are not reported.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from hubtune._io import write_json
from hubtune.data import create_dataset, stratified_subsample, transform_for
from hubtune.features import ExtractOptions, extract
from hubtune.features.precision import (
    PROBE_SAFETY, bf16_supported, cpu_has_amx, make_forward, probe_diffs, score_chunk, tie_groups,
)
from hubtune.hub import load_candidate

DEFAULT_MODELS = "pkg:efficientnet_lite0,pkg:efficientnet_lite1,pkg:efficientnet_lite2"
RANDOM_MODELS = "resnet18,mobilenetv3_small_100,vit_tiny_patch16_224"
VARIANTS = ("fp32", "bf16", "bf16-trunk", "bf16-mid", "bf16-head")  # bf16-head: bf16-trunk with tail="head"
METRICS = ("logme", "leep")
T0 = time.perf_counter()


def log(msg):
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


def stratified_prefix_order(labels, seed=0):
    try:
        from hubtune.ranking import stratified_order

        return stratified_order(labels, seed)
    except ImportError:  # the ranking module is being rewritten; a round-robin over shuffled classes
        rng = np.random.default_rng(seed)
        per = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
        key = np.empty(len(labels))
        for idx in per:
            key[idx] = (np.arange(len(idx)) + 0.5) / len(idx)
        return np.argsort(key, kind="stable")


DEVICE = "cpu"


def variant_forward(cand, variant):
    if variant == "bf16-head":
        return make_forward(cand, "bf16-trunk", DEVICE, tail="head")
    return make_forward(cand, variant, DEVICE)


def own_loop(cand, ds, variant, batch_size, chunk=256):
    """The extractor's shape of work with make_forward: decode a chunk, batches, channels-last."""
    cand.module.eval().to(DEVICE).to(memory_format=torch.channels_last)
    fwd = variant_forward(cand, variant)
    transform = transform_for(cand.data_config)
    feats, logits, seconds = [], [], 0.0
    for start in range(0, len(ds), chunk):
        x = torch.stack([transform(ds.image(i)) for i in range(start, min(start + chunk, len(ds)))])
        t0 = time.perf_counter()
        with torch.inference_mode():
            for b in range(0, len(x), batch_size):
                f, lg = fwd(x[b:b + batch_size].to(DEVICE).contiguous(memory_format=torch.channels_last))
                feats.append(f.cpu().numpy())
                logits.append(lg.cpu().numpy())
        if DEVICE != "cpu":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - t0
    return np.concatenate(feats), np.concatenate(logits), seconds, {"tail": fwd.tail, "start": fwd.start}


def hub_extract(cand, ds, precision, batch_size):
    out = {"f": [], "l": []}

    def on_chunk(spec, f, lg, y):
        out["f"].append(f)
        out["l"].append(lg)

    opts = ExtractOptions(precision=precision, batch_size=batch_size, chunk_size=256, device=DEVICE, compile=False,
                          use_cache=False, progress=False)
    st = extract([cand], ds, opts, on_chunk)[cand.spec]
    return np.concatenate(out["f"]), np.concatenate(out["l"]), st.seconds


def time_variants(cand, images, batch_size, rounds):
    """images/s per variant, the variants interleaved within each round: best and median of the rounds."""
    cand.module.eval().to(DEVICE).to(memory_format=torch.channels_last)
    x = images.to(DEVICE).contiguous(memory_format=torch.channels_last)
    sync = torch.cuda.synchronize if DEVICE != "cpu" else (lambda: None)
    fwds = {v: variant_forward(cand, v) for v in VARIANTS}
    times = {v: [] for v in VARIANTS}
    with torch.inference_mode():
        for v, f in fwds.items():  # warm-up: oneDNN primitive creation, weight casts
            for b in range(0, len(x), batch_size):
                f(x[b:b + batch_size])
        for _ in range(rounds):
            for v, f in fwds.items():
                t0 = time.perf_counter()
                for b in range(0, len(x), batch_size):
                    f(x[b:b + batch_size])
                sync()
                times[v].append(time.perf_counter() - t0)
    return ({v: len(x) / min(t) for v, t in times.items()},
            {v: len(x) / float(np.median(t)) for v, t in times.items()})


def model_report(cand, ds, args, random_init):
    labels = np.asarray(ds.labels)
    n = len(ds)
    prefixes = sorted({p for p in args.prefixes if p < n} | {args.probe, n})
    out = {"spec": cand.spec, "random_init": random_init, "n": n, "variants": {}}
    feats = {}
    for v in VARIANTS:
        if v in ("fp32", "bf16"):
            F, L, sec = hub_extract(cand, ds, v, args.batch_size)
            tail, how = {}, "hubtune.features.extract"
        else:
            F, L, sec, tail = own_loop(cand, ds, v, args.batch_size)
            how = "make_forward loop"
        feats[v] = (F, L)
        scores = {str(p): score_chunk(METRICS, F[:p], L[:p], labels[:p]) for p in prefixes}
        out["variants"][v] = {"how": how, **tail, "seconds": sec, "images_per_second": n / sec,
                              "scores": scores}
        log(f"  {cand.spec} {v}: {n / sec:.1f} img/s, logme {scores[str(n)]['logme']:.5f} "
            f"leep {scores[str(n)]['leep']:.5f}")
    F32, L32 = feats["fp32"]
    ref = out["variants"]["fp32"]["scores"]
    for v in VARIANTS[1:]:
        F, L = feats[v]
        r = out["variants"][v]
        r["feature_rel_error"] = float(np.linalg.norm(F - F32) / np.linalg.norm(F32))
        r["feature_max_abs_error"] = float(np.abs(F - F32).max())
        r["logit_max_abs_error"] = float(np.abs(L - L32).max())
        r["diff"] = {p: {m: r["scores"][p][m] - ref[p][m] for m in METRICS} for p in ref}
        full = r["diff"][str(n)]
        r["full"] = {m: {"abs": abs(full[m]), "rel": abs(full[m]) / abs(ref[str(n)][m])} for m in METRICS}
        P = args.probe
        r["probe"] = probe_diffs(METRICS, (F[:P], L[:P]), (F32[:P], L32[:P]), labels[:P])  # signed, per part
    return out, feats


def dataset_report(name, specs, args, random_init):
    base = create_dataset(name)
    ds = stratified_subsample(base, max_samples=args.random_samples if random_init else args.samples, seed=0)
    ds = ds.subset(stratified_prefix_order(np.asarray(ds.labels), 0))
    log(f"{name}: {len(ds)} of {len(base)} images, {'random-init' if random_init else 'pretrained'} models")
    models, images = {}, {}
    for spec in specs:
        cand = load_candidate(spec, pretrained=not random_init)
        models[cand.spec], _ = model_report(cand, ds, args, random_init)
        key = json.dumps(cand.data_config, sort_keys=True, default=list)
        if key not in images:
            t = transform_for(cand.data_config)
            images[key] = torch.stack([t(ds.image(i)) for i in range(args.timing_images)])
        ips, med = time_variants(cand, images[key], args.batch_size, args.timing_rounds)
        models[cand.spec]["timing_images_per_second"] = {"best": ips, "median": med,
                                                         "load_average": list(os.getloadavg())}
        models[cand.spec]["speed_ratio_vs_fp32"] = {v: ips[v] / ips["fp32"] for v in VARIANTS}
        models[cand.spec]["speed_ratio_vs_fp32_median"] = {v: med[v] / med["fp32"] for v in VARIANTS}
        log(f"  {cand.spec} timing (best of {args.timing_rounds}): "
            + ", ".join(f"{v} {s:.1f}" for v, s in ips.items()))
        del cand
    return {"dataset": name, "n": len(ds), "models": models}


def analyze(report, safety=PROBE_SAFETY):
    """Everything derived from the raw figures (scores on every prefix, signed probe differences), so that
    ``--reanalyze`` recomputes it with the library's current rule without a forward pass: per variant the
    probe error and whether it brackets the full-data difference; per dataset the rankings, swapped pairs
    and tie groups; the summary rows; the bracketing rate of the rule for several safety factors."""
    report["probe_safety"] = safety
    for d in report["datasets"]:
        n = str(d["n"])
        for r in d["models"].values():
            for v in VARIANTS[1:]:
                x = r["variants"][v]
                full = x["diff"][n]
                x["full"] = {m: {"abs": abs(full[m]),
                                 "rel": abs(full[m]) / abs(r["variants"]["fp32"]["scores"][n][m])} for m in METRICS}
                x["probe_error"] = {}
                for m in METRICS:
                    parts = x["probe"][m]
                    diff, single = max(abs(v_) for v_ in parts.values()), abs(parts["all"])
                    x["probe_error"][m] = {
                        "diff": diff, "error": safety * diff, "brackets_full": safety * diff >= abs(full[m]),
                        "single_diff": single, "single_brackets_full": safety * single >= abs(full[m]),
                        "full_over_diff": abs(full[m]) / diff if diff else float("inf")}
        if d["models"] and not any(r["random_init"] for r in d["models"].values()) and len(d["models"]) > 1:
            d["rankings"] = {m: _ranking(d["models"], n, m) for m in METRICS}
    report["summary"] = summarize(report)
    cases = [(x, m, abs(x["diff"][str(d["n"])][m]), r["random_init"])
             for d in report["datasets"] for r in d["models"].values() for v, x in r["variants"].items()
             if v != "fp32" for m in METRICS]
    pre = [c for c in cases if not c[3]]

    def rate(sel, m, k, key):
        sel = [(x, f) for x, m_, f, _ in sel if m_ == m]
        return f"{sum(k * x['probe_error'][m][key] >= f for x, f in sel)}/{len(sel)}"

    report["probe_rule"] = {
        "rule": f"error = {safety} x max |score(policy) - score(fp32)| over the first {report['settings']['probe']} "
                "rows and each half of them (hubtune.features.precision.probe_error)",
        "brackets_full_difference": {m: {f"safety {k}": {"rule": rate(cases, m, k, "diff"),
                                                         "pretrained_only": rate(pre, m, k, "diff"),
                                                         "single_probe_difference": rate(cases, m, k, "single_diff")}
                                         for k in (1, 2, 3, 4)} for m in METRICS},
        "worst_full_over_diff": {m: max(x["probe_error"][m]["full_over_diff"] for x, m_, _, _ in cases if m_ == m)
                                 for m in METRICS},
    }
    return report


def _ranking(models, n, m):
    order = {v: sorted(models, key=lambda s: -models[s]["variants"][v]["scores"][n][m]) for v in VARIANTS}
    ref = {s: models[s]["variants"]["fp32"]["scores"][n][m] for s in models}
    gaps = sorted(abs(ref[a] - ref[b]) for i, a in enumerate(models) for b in list(models)[i + 1:])
    per = {"fp32_order": order["fp32"], "smallest_fp32_gap": gaps[0]}
    for v in VARIANTS[1:]:
        scores = {s: models[s]["variants"][v]["scores"][n][m] for s in models}
        errors = {s: models[s]["variants"][v]["probe_error"][m]["error"] for s in models}
        groups = tie_groups(scores, errors)
        # the pairs this precision orders the other way round from fp32: each must fall inside a tie group
        swapped = [(a, b) for i, a in enumerate(order[v]) for b in order[v][i + 1:]
                   if order["fp32"].index(a) > order["fp32"].index(b)]
        gid = {s: k for k, g in enumerate(groups) for s in g}
        per[v] = {"order": order[v], "same_as_fp32": order[v] == order["fp32"], "swapped_pairs": swapped,
                  "errors": errors, "tie_groups": groups,
                  "swaps_inside_tie_groups": all(gid[a] == gid[b] for a, b in swapped),
                  "max_abs_diff": max(abs(scores[s] - ref[s]) for s in models)}
    return per


def summarize(report):
    rows = []
    for d in report["datasets"]:
        for spec, r in d["models"].items():
            for v in VARIANTS[1:]:
                x = r["variants"][v]
                rows.append({"dataset": d["dataset"], "model": spec, "random_init": r["random_init"], "variant": v,
                             "logme_abs_diff": x["full"]["logme"]["abs"], "logme_rel_diff": x["full"]["logme"]["rel"],
                             "leep_abs_diff": x["full"]["leep"]["abs"],
                             "feature_rel_error": x["feature_rel_error"],
                             "probe_error_logme": x["probe_error"]["logme"]["error"],
                             "probe_brackets_logme": x["probe_error"]["logme"]["brackets_full"],
                             "probe_error_leep": x["probe_error"]["leep"]["error"],
                             "probe_brackets_leep": x["probe_error"]["leep"]["brackets_full"],
                             "speed_vs_fp32": r["speed_ratio_vs_fp32"][v]})
    return rows


def plot(report, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [r for r in report["summary"] if not r["random_init"]]
    def name(r):
        return f"{r['dataset']}\n{r['model'].split(':')[-1].replace('efficientnet_', '')}"

    labels = sorted({name(r) for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    w = 0.8 / (len(VARIANTS) - 1)
    for k, v in enumerate(VARIANTS[1:]):
        vals = {name(r): r for r in rows if r["variant"] == v}
        xs = np.arange(len(labels)) + (k - (len(VARIANTS) - 2) / 2) * w
        axes[0].bar(xs, [vals[lab]["logme_abs_diff"] for lab in labels], w, label=v)
        axes[1].bar(xs, [vals[lab]["speed_vs_fp32"] for lab in labels], w, label=v)
    axes[0].set_title("|LogME - LogME fp32| on all rows")
    axes[1].set_title("speed vs fp32 (best of rounds)")
    axes[1].axhline(1.0, color="k", lw=0.8)
    for ax in axes:
        ax.set_xticks(np.arange(len(labels)))
        ax.set_xticklabels(labels, fontsize=7)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return str(path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--random-samples", type=int, default=500)
    ap.add_argument("--datasets", default="digits,fashion-mnist")
    ap.add_argument("--models", default=DEFAULT_MODELS)
    ap.add_argument("--random-models", default=RANDOM_MODELS, help="'' to skip")
    ap.add_argument("--random-datasets", default="fashion-mnist")
    ap.add_argument("--probe", type=int, default=256)
    ap.add_argument("--prefixes", default="128,256,512")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--timing-images", type=int, default=64)
    ap.add_argument("--timing-rounds", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reanalyze", metavar="JSON", help="recompute the derived figures of a stored report "
                    "(the probe rule, tie groups, summary) with the current code, without a forward pass")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "precision.json"))
    args = ap.parse_args()
    global DEVICE
    DEVICE = args.device
    if args.reanalyze:
        with open(args.reanalyze) as f:
            report = json.load(f)
        for d in report["datasets"]:  # drop what analyze derives, so nothing stale survives
            d.pop("rankings", None)
            for r in d["models"].values():
                for x in r["variants"].values():
                    for k in ("full", "probe_error"):
                        x.pop(k, None)
                    for m, parts in x.get("probe", {}).items():  # the first format kept more than the diffs
                        if "diffs" in parts:
                            x["probe"][m] = parts["diffs"]
        analyze(report)
        report["reanalyzed"] = f"derived figures recomputed by: {' '.join(sys.argv)}"
        report["plot"] = plot(report, Path(args.out).with_suffix(".png"))
        write_json(args.out, report)
        print(json.dumps(report["probe_rule"], indent=1))
        return
    args.prefixes = [int(p) for p in args.prefixes.split(",") if p]
    flags = set()
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next(line for line in f if line.startswith("flags")).split())
    except (OSError, StopIteration):
        pass
    report = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "cpu_flags": sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}),
                    "amx": cpu_has_amx(), "bf16_supported": bf16_supported("cpu"),
                    "gpu": torch.cuda.is_available(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                    "load_average_at_start": list(os.getloadavg())},
        "settings": {k: v for k, v in vars(args).items()}, "probe_safety": PROBE_SAFETY,
        "command": " ".join(sys.argv), "datasets": [], "partial": True,
    }
    jobs = [(d, args.models.split(","), False) for d in args.datasets.split(",") if d]
    if args.random_models:
        jobs += [(d, args.random_models.split(","), True) for d in args.random_datasets.split(",") if d]
    for name, specs, random_init in jobs:
        report["datasets"].append(dataset_report(name, specs, args, random_init))
        write_json(args.out, analyze(report))
    report["partial"] = False
    report["seconds"] = time.perf_counter() - T0
    report["load_average_at_end"] = list(os.getloadavg())
    analyze(report)
    report["plot"] = plot(report, Path(args.out).with_suffix(".png"))
    write_json(args.out, report)
    log(f"wrote {args.out}")
    for r in report["summary"]:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
