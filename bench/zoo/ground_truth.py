"""Measured fine-tune ground truth of every zoo candidate on one target, with one fixed protocol.

    .venv/bin/python bench/zoo/ground_truth.py --target fashion   # -> bench/zoo/ground_truth_fashion.json
    .venv/bin/python bench/zoo/ground_truth.py --target digits    # -> bench/zoo/ground_truth_digits.json

Resumable: the JSON is rewritten atomically after every run and a rerun skips the runs it holds. Runs go
seed-major (every candidate at seed 0, then at seed 1), so a partial file already covers the whole zoo.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_zoo import ZOO  # noqa: E402
from common import BUILD, HERE, TARGETS, THREADS, Cached, accuracy, target_splits, write_json_atomic  # noqa: E402

PROTOCOL = {"method": "finetune (all layers, new head; hubtune.tuning.FineTune defaults)", "optimizer": "sgd",
            "momentum": 0.9, "weight_decay": 0.0, "batch_size": 32, "epochs": 4, "scheduler": "cosine",
            "warmup_epochs": 0, "lrs": [0.01, 0.05], "seeds": [0, 1], "augment": "none (evaluation transform)",
            "precision": "fp32", "evaluation": "top-1 accuracy on the test subset after the last epoch",
            "threads": THREADS}


def run_one(spec: str, train, test, lr: float, seed: int, cache: dict) -> dict:
    from hubtune.data import transform_for
    from hubtune.tuning import Engine, FineTune, TrainConfig
    from hubtune.tuning.method import seed_everything

    t0 = time.perf_counter()
    seed_everything(seed)  # as hubtune.tune does: the new head is drawn from the seed
    method = FineTune(spec, num_classes=int(train.num_classes))
    key = json.dumps(method.data_config, sort_keys=True, default=str)
    if key not in cache:  # the evaluation transform, applied once per data config
        tf = transform_for(method.data_config)
        cache[key] = (Cached(train, tf), Cached(test, tf))
    tr, te = cache[key]
    cfg = TrainConfig(epochs=PROTOCOL["epochs"], batch_size=PROTOCOL["batch_size"], optimizer=PROTOCOL["optimizer"],
                      lr=lr, momentum=PROTOCOL["momentum"], weight_decay=PROTOCOL["weight_decay"],
                      scheduler=PROTOCOL["scheduler"], seed=seed, device="cpu", precision=PROTOCOL["precision"])
    t1 = time.perf_counter()
    report = Engine(cfg).fit(method, tr)  # no eval_dataset: evaluated once, below, after the last epoch
    t2 = time.perf_counter()
    acc = accuracy(method, te)
    t3 = time.perf_counter()
    steps = PROTOCOL["epochs"] * -(-len(tr) // PROTOCOL["batch_size"])
    return {"lr": lr, "seed": seed, "acc": acc, "train_seconds": round(t2 - t1, 2), "eval_seconds": round(t3 - t2, 2),
            "setup_seconds": round(t1 - t0, 2), "seconds": round(t3 - t0, 2), "steps": steps,
            "final_train_loss": report["final"].get("train_total")}


def summarize(runs: list, names: list) -> tuple[dict, dict]:
    cands, gaps, variances = {}, [], []
    for name in names:
        mine = [r for r in runs if r["candidate"] == name]
        by_lr = {lr: [r for r in mine if r["lr"] == lr] for lr in PROTOCOL["lrs"]}
        mean = {lr: float(np.mean([r["acc"] for r in rs])) for lr, rs in by_lr.items() if rs}
        if not mean:
            continue
        best = max(mean, key=mean.get)
        accs = {r["seed"]: r["acc"] for r in by_lr[best]}
        cands[name] = {"truth": mean[best], "best_lr": best, "mean_acc_by_lr": {str(k): v for k, v in mean.items()},
                       "acc_by_seed_at_best_lr": {str(k): v for k, v in accs.items()},
                       "runs_done": len(mine),  # one fine-tune at the best lr (load + train + eval): mean, min
                       "finetune_seconds": float(np.mean([r["seconds"] for r in by_lr[best]])),
                       "finetune_seconds_min": min(r["seconds"] for r in by_lr[best])}
        if len(accs) == 2:
            a, b = accs.values()
            gaps.append(abs(a - b))
            variances.append(np.var([a, b], ddof=1))
    noise = {"candidates_with_two_seeds": len(gaps),
             "mean_abs_seed_gap_at_best_lr": float(np.mean(gaps)) if gaps else None,
             "max_abs_seed_gap_at_best_lr": float(np.max(gaps)) if gaps else None,
             "pooled_std_at_best_lr": float(np.sqrt(np.mean(variances))) if variances else None}
    pairs = {}
    for r in runs:
        pairs.setdefault((r["candidate"], r["lr"]), []).append(r["acc"])
    all_gaps = [abs(v[0] - v[1]) for v in pairs.values() if len(v) == 2]
    noise["mean_abs_seed_gap_all_lrs"] = float(np.mean(all_gaps)) if all_gaps else None
    noise["pooled_std_all_lrs"] = (float(np.sqrt(np.mean([np.var(v, ddof=1) for v in pairs.values() if len(v) == 2])))
                                   if all_gaps else None)
    return cands, noise


def wait_built(name: str, poll: float = 10.0) -> None:
    while name not in (json.loads((HERE / "zoo.json").read_text()) if (HERE / "zoo.json").exists() else {}):
        time.sleep(poll)


def rank_check(train, target: str, spec: str) -> dict:
    """hubtune.rank(dataset=..., max_samples=N, seed=S) must rank exactly the rows trained on here."""
    import hubtune
    from hubtune.features.extractor import ExtractOptions

    t = TARGETS[target]
    r = hubtune.rank([spec], t["dataset"], max_samples=t["train_max_samples"], seed=t["train_seed"],
                     options=ExtractOptions(cache_dir=str(BUILD / "cache")))
    got = r.dataset_info["fingerprint"]
    return {"call": f"hubtune.rank(models, {t['dataset']!r}, max_samples={t['train_max_samples']}, "
                    f"seed={t['train_seed']})", "ranking_fingerprint": got, "train_fingerprint": train.fingerprint,
            "same_rows": got == train.fingerprint}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", choices=sorted(TARGETS), required=True)
    ap.add_argument("--epochs", type=int, default=PROTOCOL["epochs"],
                    help=f"another protocol length (default {PROTOCOL['epochs']}, the reference); writes "
                         "ground_truth_TARGET_eN.json")
    args = ap.parse_args()
    suffix = "" if args.epochs == PROTOCOL["epochs"] else f"_e{args.epochs}"
    PROTOCOL["epochs"] = args.epochs
    torch.set_num_threads(THREADS)
    names = list(ZOO)  # in build order; a candidate still being built by build_zoo.py is waited for
    out = HERE / f"ground_truth_{args.target}{suffix}.json"
    train, test = target_splits(args.target)
    doc = json.loads(out.read_text()) if out.exists() else {}
    if doc and doc.get("protocol") != PROTOCOL:
        sys.exit(f"{out} was made with another protocol; move it away to start again")
    runs = doc.get("runs", [])
    t = TARGETS[args.target]
    doc = {"target": {**t, "name": args.target, "train_split": "train", "test_split": "test",
                      "n_train": len(train), "n_test": len(test), "num_classes": int(train.num_classes),
                      "train_fingerprint": train.fingerprint, "test_fingerprint": test.fingerprint,
                      "rebuild": "hubtune.data.stratified_subsample(hubtune.create_dataset(dataset, split), "
                                 "max_samples=..., seed=...) for each split whose max_samples is set; "
                                 "otherwise the whole split"},
           "protocol": PROTOCOL, "rank_check": doc.get("rank_check"), "runs": runs,
           "wall_seconds": doc.get("wall_seconds", 0.0)}
    if doc["rank_check"] is None:
        doc["rank_check"] = rank_check(train, args.target, f"local-dir:{BUILD / names[0]}")
        print("rank check:", doc["rank_check"], flush=True)
    done = {(r["candidate"], r["lr"], r["seed"]) for r in runs}
    cache = {}
    for seed in PROTOCOL["seeds"]:
        for name in names:
            for lr in PROTOCOL["lrs"]:
                if (name, lr, seed) in done:
                    continue
                wait_built(name)
                t0 = time.perf_counter()
                rec = {"candidate": name, **run_one(f"local-dir:{BUILD / name}", train, test, lr, seed, cache)}
                runs.append(rec)
                doc["wall_seconds"] = round(doc["wall_seconds"] + time.perf_counter() - t0, 1)
                doc["candidates"], doc["noise"] = summarize(runs, names)
                write_json_atomic(out, doc)
                print(f"{args.target} {name:26s} lr={lr:<5} seed={seed} acc={rec['acc']:.4f} "
                      f"{rec['seconds']:.1f}s", flush=True)
    doc["candidates"], doc["noise"] = summarize(runs, names)
    write_json_atomic(out, doc)
    for name, c in sorted(doc["candidates"].items(), key=lambda kv: -kv[1]["truth"]):
        print(f"{name:26s} truth={c['truth']:.4f} lr={c['best_lr']} finetune={c['finetune_seconds']:.1f}s")
    print("noise:", doc["noise"])


if __name__ == "__main__":
    main()
