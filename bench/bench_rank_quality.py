"""Rank quality against measured fine-tune accuracy, on the zoos of bench/zoo. Writes
bench/results/rank_quality.json.

    python bench/bench_rank_quality.py [--targets fashion,digits] [--verify 4:0,6:0] [--no-verify]

For each target (its ground truth made by bench/zoo/ground_truth.py, the zoo by bench/zoo/build_zoo.py):

1. Every registered estimator scores every candidate on exactly the training rows the ground truth was
   fine-tuned on (features extracted once through hubtune's cache; each estimator's scoring time measured
   apart). Estimators scored across candidates (ETran, NCTI) are given their combination.
2. Quality per estimator, raw and tie-aware (:func:`hubtune.rank_quality.ranking_quality`; the tier width is
   the ground truth's measured seed-to-seed noise: the mean |acc(seed 0) - acc(seed 1)| at the best lr).
3. ``auto``: every subset of 1-3 feature estimators, aggregated by mean normalised rank
   (:func:`hubtune.scoring.aggregate_ranks`), is scored on each target; the leave-one-zoo-out figure of a
   selection rule is the quality, on the other target, of the subset it picks on one. The shipped
   ``auto`` (:data:`hubtune.scoring.auto.COMPONENTS`) is then run through ``hubtune.rank`` itself.
4. The plain way, timed in this run: fine-tuning every candidate once with the ground truth's protocol (its
   best lr, seed 0), which is what ranking is meant to spare (the ground truth itself ran 2 lrs x 2 seeds).
5. ``--verify K:B``: ``hubtune.rank(metrics=["auto"], verify=K, verify_budget=B)`` end to end; quality of the
   final order and its cost (extraction, scoring and verification seconds; and optimizer steps) against 4.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "bench" / "zoo"))
from _seeds import machine  # noqa: E402
from common import target_splits  # noqa: E402

from hubtune._io import write_json  # noqa: E402
from hubtune.features import ExtractOptions, extract  # noqa: E402
from hubtune.rank_quality import ranking_quality  # noqa: E402
from hubtune.ranking import rank  # noqa: E402
from hubtune.scoring import ESTIMATORS, aggregate_ranks, create_estimator, list_estimators  # noqa: E402
from hubtune.scoring.auto import COMPONENTS  # noqa: E402
from hubtune.scoring.leep import softmax  # noqa: E402


def load_target(target: str):
    gt = json.loads((ROOT / "bench" / "zoo" / f"ground_truth_{target}.json").read_text())
    zoo = json.loads((ROOT / "bench" / "zoo" / "zoo.json").read_text())
    names = [n for n in zoo if n in gt["candidates"]]
    specs = {n: zoo[n]["spec"].replace("local-dir:", f"local-dir:{ROOT}/", 1) if zoo[n]["spec"].startswith(
        "local-dir:bench") else zoo[n]["spec"] for n in names}
    truth = {n: gt["candidates"][n]["truth"] for n in names}
    noise = gt["noise"]["mean_abs_seed_gap_at_best_lr"]
    full_seconds = sum(gt["candidates"][n]["finetune_seconds"] for n in names)
    return gt, specs, truth, noise, full_seconds


def features(specs: dict, train, cache_dir: str):
    """{name: (features, logits, labels)} over the target's training rows, and the extraction seconds."""
    parts = {n: [] for n in specs}
    by_spec = {s: n for n, s in specs.items()}
    t0 = time.perf_counter()
    extract(list(specs.values()), train, ExtractOptions(precision="fp32", cache_dir=cache_dir, progress=False),
            lambda s, f, l, y: parts[by_spec[s]].append((f, l, y)), on_error="raise")
    secs = time.perf_counter() - t0
    out = {}
    for n, p in parts.items():
        f, l, y = (np.concatenate([x[i] for x in p]) if p[0][i] is not None else None for i in range(3))
        out[n] = (f, l, y)
    return out, secs


def score_all(feats: dict) -> tuple[dict, dict, dict]:
    """({metric: {name: ranking score}}, {metric: {name: per-model score}}, {metric: seconds for the hub})."""
    ranked, per_model, seconds = {}, {}, {}
    for m in list_estimators():
        if m == "auto":
            continue
        cls = ESTIMATORS.get(m)
        results, t0 = {}, time.perf_counter()
        try:
            for n, (f, l, y) in feats.items():
                x = f if cls.input_kind == "features" else (softmax(l) if cls.input_kind == "probs" else l)
                if x is None:
                    raise ValueError("no source head")
                results[n] = create_estimator(m).update(x, y).result()
        except Exception as e:  # an estimator that cannot score this zoo is reported, not fatal
            print(f"  {m}: not scored ({type(e).__name__}: {e})", flush=True)
            continue
        combine = getattr(cls, "combine", None)
        ranked[m] = combine(results) if callable(combine) else {n: float(r.score) for n, r in results.items()}
        seconds[m] = time.perf_counter() - t0
        per_model[m] = {n: float(r.score) for n, r in results.items()}
        print(f"  {m:15s} {seconds[m]:7.2f} s", flush=True)
    return ranked, per_model, seconds


def subsets(per_model_by_target: dict, truths: dict, noises: dict, max_size: int = 3) -> dict:
    """Tie-aware quality of the mean-normalised-rank aggregation of every subset of feature estimators."""
    feats = [m for m in next(iter(per_model_by_target.values()))
             if ESTIMATORS.get(m).input_kind == "features" and all(m in pm for pm in per_model_by_target.values())]
    out = {}
    for size in range(1, max_size + 1):
        for combo in itertools.combinations(feats, size):
            row = {}
            for t, pm in per_model_by_target.items():
                agg = aggregate_ranks({n: {m: pm[m][n] for m in combo} for n in truths[t]})
                row[t] = ranking_quality(agg, truths[t], noises[t])
            out["+".join(combo)] = row
    return out


#: the rule auto's components are chosen by, fixed before looking: no tie-aware top-1 regret above this (points)
#: on any zoo, then the best mean tie-aware weighted tau, the fewest estimators within PARSIMONY of it
MAX_REGRET, PARSIMONY = 0.5, 0.01


def choose(table: dict, targets: list) -> str:
    """The subset the rule picks on ``targets`` (see MAX_REGRET)."""
    def mean_tau(c):
        return float(np.mean([table[c][t]["tie_aware"]["weighted_tau"] for t in targets]))

    ok = [c for c in table if max(table[c][t]["tie_aware"]["top1_regret"] for t in targets) <= MAX_REGRET] or list(table)
    best = max(mean_tau(c) for c in ok)
    return min((c for c in ok if mean_tau(c) >= best - PARSIMONY), key=lambda c: (c.count("+"), -mean_tau(c)))


def lozo(table: dict, targets: list) -> dict:
    """Leave one zoo out: the subset the rule picks on each target alone, measured on every target."""
    return {on: {"chosen": (c := choose(table, [on])), "on": {t: table[c][t] for t in targets}} for on in targets}


def plain_way(target: str, specs: dict, train, rec: dict) -> float:
    """Fine-tune every candidate once (the ground truth's protocol, its best lr, seed 0), timed here."""
    from ground_truth import PROTOCOL, run_one

    _, test = target_splits(target)
    gt = json.loads((ROOT / "bench" / "zoo" / f"ground_truth_{target}.json").read_text())
    cache, per, t0 = {}, {}, time.perf_counter()
    for n, spec in specs.items():
        lr = gt["candidates"][n]["best_lr"]
        run = run_one(spec, train, test, lr, 0, cache)
        per[n] = {"seconds": run["seconds"], "acc": run["acc"],
                  "ground_truth_seed0_acc": gt["candidates"][n]["acc_by_seed_at_best_lr"].get("0")}
    total = time.perf_counter() - t0
    rec["plain_way"] = {"what": "one fine-tune per candidate, protocol of the ground truth at its best lr, seed 0",
                        "seconds": total, "per_candidate": per}
    print(f"  plain way: fine-tuning all {len(specs)} once took {total:.0f} s", flush=True)
    return total


def brief(q: dict) -> str:
    a, r = q["tie_aware"], q["raw"]
    return (f"wτ {a['weighted_tau']:+.3f} (raw {r['weighted_tau']:+.3f})  τ {a['kendall_tau']:+.3f}  "
            f"ρ {a['spearman']:+.3f}  regret {a['top1_regret']:.2f} (raw {r['top1_regret']:.2f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", default="fashion,digits")
    ap.add_argument("--verify", default="4:0,6:0",
                    help="K:BUDGET pairs for rank(verify=K, verify_budget=BUDGET); BUDGET 0 = the default")
    ap.add_argument("--no-verify", action="store_true")
    ap.add_argument("--no-full", action="store_true",
                    help="do not time the plain way (use the ground truth's recorded seconds instead)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "rank_quality.json"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    targets = args.targets.split(",")
    cache = tempfile.mkdtemp(prefix="hubtune-rq-")
    doc = {"machine": machine(), "targets": {}, "notes": __doc__}
    per_model, truths, noises, loaded = {}, {}, {}, {}
    for t in targets:
        gt, specs, truth, noise, full = load_target(t)
        train, _ = target_splits(t)
        print(f"{t}: {len(specs)} candidates, {len(train)} training images, noise {noise:.4f}", flush=True)
        feats, ext = features(specs, train, cache)
        print(f"  extraction {ext:.1f} s", flush=True)
        ranked, pm, secs = score_all(feats)
        quality = {m: {**ranking_quality(ranked[m], truth, noise), "seconds": secs[m]} for m in ranked}
        for m, q in sorted(quality.items(), key=lambda kv: -kv[1]["tie_aware"]["weighted_tau"]):
            print(f"  {m:15s} {brief(q)}", flush=True)
        doc["targets"][t] = {"n_candidates": len(specs), "n_train": len(train), "noise": noise,
                             "truth": truth, "full_finetune_seconds": full, "extraction_seconds": ext,
                             "estimators": quality, "scores": ranked, "per_model_scores": pm,
                             "protocol": gt["protocol"], "protocol_steps_per_candidate": gt["runs"][0]["steps"]}
        per_model[t], truths[t], noises[t], loaded[t] = pm, truth, noise, (specs, train)
    if len(targets) > 1:
        table = subsets(per_model, truths, noises)
        doc["subsets"] = table
        doc["leave_one_zoo_out"] = lozo(table, targets)
        doc["auto_rule"] = {"max_regret_points": MAX_REGRET, "parsimony": PARSIMONY,
                            "chosen_on_all": choose(table, targets), "shipped": "+".join(COMPONENTS)}
        mean_best = sorted(table, key=lambda c: -np.mean([table[c][t]["tie_aware"]["weighted_tau"] for t in targets]))
        doc["subsets_best_mean"] = [{"components": c, **{t: brief(table[c][t]) for t in targets}}
                                    for c in mean_best[:10]]
        for pick_on, v in doc["leave_one_zoo_out"].items():
            print(f"picked on {pick_on}: {v['chosen']}: " + "; ".join(f"{t}: {brief(q)}" for t, q in v["on"].items()))
    for t in targets:
        specs, train = loaded[t]
        name_of = {s: n for n, s in specs.items()}
        full = doc["targets"][t]["full_finetune_seconds"]
        if not args.no_full:
            full = plain_way(t, specs, train, doc["targets"][t])
            one = {n: v["acc"] for n, v in doc["targets"][t]["plain_way"]["per_candidate"].items()}
            doc["targets"][t]["plain_way"]["as_a_ranker"] = ranking_quality(one, truths[t], noises[t])
        t0 = time.perf_counter()
        r = rank(list(specs.values()), train, metrics=["auto"],
                 options=ExtractOptions(precision="fp32", cache_dir=cache, progress=False))
        auto = {name_of[c.spec]: c.scores["auto"] for c in r.candidates}
        q = ranking_quality(auto, truths[t], noises[t])
        doc["targets"][t]["auto"] = {"components": list(COMPONENTS), "seconds_cached_features": time.perf_counter() - t0,
                                     "seconds_with_extraction": time.perf_counter() - t0 +
                                     doc["targets"][t]["extraction_seconds"], **q, "scores": auto}
        print(f"{t} auto {COMPONENTS}: {brief(q)}", flush=True)
        if args.no_verify:
            continue
        doc["targets"][t]["verify"] = []
        for pair in args.verify.split(","):
            k, budget = (int(x) for x in pair.split(":"))
            t0 = time.perf_counter()
            r = rank(list(specs.values()), train, metrics=["auto"], verify=k, verify_budget=budget or None,
                     options=ExtractOptions(precision="fp32", cache_dir=cache, progress=False))
            secs = time.perf_counter() - t0 + doc["targets"][t]["extraction_seconds"]
            n = len(r.candidates)
            order = {name_of[c.spec]: float(n - i) for i, c in enumerate(r.candidates)}  # the final order
            q = ranking_quality(order, truths[t], noises[t])
            steps_all = doc["targets"][t]["protocol_steps_per_candidate"] * len(specs)
            rec = {"k": k, "budget_steps": r.verification["total_steps"], "seconds": secs,
                   "cost_vs_full_finetune": secs / full, "steps_vs_full_finetune": r.verification["total_steps"]
                   / steps_all, "verification": r.verification, **q,
                   "order": [name_of[c.spec] for c in r.candidates]}
            doc["targets"][t]["verify"].append(rec)
            print(f"{t} verify K={k} steps={rec['budget_steps']}: {brief(q)}  cost {secs:.0f} s = "
                  f"{rec['cost_vs_full_finetune']:.1%} of fine-tuning all ({rec['steps_vs_full_finetune']:.1%} "
                  "of the steps)", flush=True)
    write_json(Path(args.out), doc)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
