"""Tuning at work: the teacher cache against a live teacher and plain training, and what pretraining and
distillation buy on a small budget, in one run. Writes bench/results/tuning.json.

    python bench/bench_tuning.py [--train 1000 --test 500 --epochs 5 --size 128 --rounds 7 --timing-images 512]

Data: Fashion-MNIST (Debian's files), a stratified subset of the train split for training and of the test
split for evaluation. Every image goes once through the teacher's evaluation transform
(``transform_for`` of pkg:efficientnet_lite0's data config, with ``input_size`` reduced to ``--size`` px so
that training fits a small CPU) into a tensor; every run below trains on those same tensors, in the same
seeded order, so all arms of every comparison see identical inputs.

1. Distillation epoch time. The same student (timm ``--student``, from scratch, identical initial weights)
   is trained for the same epochs on the same data three ways: plain cross-entropy (``FineTune`` with L2-SP
   and BSS off), KD with a live teacher, and KD with the teacher's outputs read from a cache written
   beforehand by ``cache_teacher_outputs`` (its time reported separately). Seconds per epoch come from the
   Engine's per-epoch clock (training only; evaluation is done outside ``fit``). Two measurements: the
   full-length runs of part 2b, one after another; and ``--rounds`` interleaved rounds of one-epoch fits
   (plain, live, cached, plain, ...) on the first ``--timing-images`` images, whose medians give the headline
   ratios cached/plain and live/plain (interleaving spreads load from other processes over all three arms;
   the load average at start and end is recorded). Target: cached within 1.2x of plain.
2. Accuracy for a fixed small budget (same epochs, lr, batch, schedule in each pair):
   fine-tuning pretrained pkg:efficientnet_lite0 against the same architecture from scratch; and KD from
   the fine-tuned lite0 (the teacher of part 1) into the student against the same student without KD (the
   plain run of part 1). Accuracies are recorded as measured, including where a method does not win.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from hubtune._io import write_json
from hubtune.data import create_dataset, stratified_subsample, transform_for
from hubtune.hub import load_candidate
from hubtune.tuning import Engine, FineTune, IndexedDataset, KnowledgeDistillation, TrainConfig
from hubtune.tuning import cache_teacher_outputs

TEACHER = "pkg:efficientnet_lite0"


def to_tensors(ds, transform):
    x = torch.stack([transform(ds.image(i)) for i in range(len(ds))])
    return x, torch.as_tensor(np.asarray(ds.labels), dtype=torch.long)


@torch.no_grad()
def accuracy(predict, x, y, batch_size=128):
    correct = 0
    for b in range(0, len(x), batch_size):
        correct += int((predict(x[b:b + batch_size]).argmax(1) == y[b:b + batch_size]).sum())
    return correct / len(x)


def fit(method, train, cfg):
    """Train with the Engine (no eval inside fit); returns (report, per-epoch training seconds)."""
    report = Engine(cfg).fit(method, train, None)
    cum = [r["seconds"] for r in report["history"]]
    per_epoch = [cum[0]] + [b - a for a, b in zip(cum, cum[1:])]
    method.eval()
    return report, per_epoch


def make_student(arch, seed):
    import timm

    torch.manual_seed(seed)
    return timm.create_model(arch, pretrained=False)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--train", type=int, default=1000)
    ap.add_argument("--test", type=int, default=500)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--size", type=int, default=128, help="input size in px for every arm (lite0's own is 224)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--student", default="mobilenetv3_small_050")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=7, help="interleaved one-epoch timing rounds")
    ap.add_argument("--timing-images", type=int, default=512)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "tuning.json"))
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()

    lines = []

    def log(msg):  # progress, also written to --out as a partial result until the full report replaces it
        lines.append(f"[{time.perf_counter() - t_start:7.1f}s] {msg}")
        print(lines[-1], flush=True)
        write_json(args.out, {"partial": True, "load_average_at_start": load_start, "log": lines})

    load_start = os.getloadavg()

    teacher_cand = load_candidate(TEACHER)
    native_size = list(teacher_cand.data_config["input_size"])
    dc = dict(teacher_cand.data_config, input_size=(3, args.size, args.size))
    transform = transform_for(dc)
    train_img = stratified_subsample(create_dataset("fashion-mnist", split="train"), max_samples=args.train,
                                     seed=args.seed)
    test_img = stratified_subsample(create_dataset("fashion-mnist", split="test"), max_samples=args.test,
                                    seed=args.seed)
    t0 = time.perf_counter()
    x_tr, y_tr = to_tensors(train_img, transform)
    x_te, y_te = to_tensors(test_img, transform)
    pre_seconds = time.perf_counter() - t0
    train = torch.utils.data.TensorDataset(x_tr, y_tr)
    n_classes = int(train_img.num_classes)
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, optimizer="sgd", momentum=0.9,
                      scheduler="cosine", precision="fp32", device="cpu", seed=args.seed)
    log(f"data: {len(x_tr)} train, {len(x_te)} test at {args.size}px ({pre_seconds:.1f}s to transform)")
    plain_ce = dict(l2sp_alpha=0.0, l2sp_beta=0.0, bss_eta=0.0)

    # ---- 2a. fine-tune pretrained lite0 vs lite0 from scratch
    torch.manual_seed(args.seed)
    ft_pre = FineTune(teacher_cand.module, n_classes, **plain_ce)
    rep_pre, ep_pre = fit(ft_pre, train, cfg)
    acc_pre = accuracy(ft_pre.predict, x_te, y_te)
    log(f"lite0 pretrained: acc {acc_pre:.4f}, {sum(ep_pre):.1f}s")
    teacher = copy.deepcopy(ft_pre.model).eval()
    del ft_pre

    # ---- 1. + 2b. the student three ways
    # warm-up: one short untimed fit so that allocator / kernel first-use costs hit no measured run
    warm = FineTune(make_student(args.student, args.seed), n_classes, **plain_ce)
    Engine(TrainConfig(epochs=1, batch_size=args.batch_size, lr=args.lr, precision="fp32", device="cpu",
                       seed=args.seed)).fit(warm, torch.utils.data.Subset(train, range(2 * args.batch_size)))
    del warm

    plain = FineTune(make_student(args.student, args.seed), n_classes, **plain_ce)
    rep_plain, ep_plain = fit(plain, train, cfg)
    acc_plain = accuracy(plain.predict, x_te, y_te)
    log(f"student plain CE: acc {acc_plain:.4f}, epochs {[round(s, 2) for s in ep_plain]}")

    live = KnowledgeDistillation(make_student(args.student, args.seed), teacher, num_classes=n_classes)
    rep_live, ep_live = fit(live, IndexedDataset(train), cfg)
    acc_live = accuracy(live.predict, x_te, y_te)
    log(f"student KD live teacher: acc {acc_live:.4f}, epochs {[round(s, 2) for s in ep_live]}")

    with tempfile.TemporaryDirectory() as cache_dir:
        cache_path = Path(cache_dir) / "teacher.npy"
        t0 = time.perf_counter()
        cache_teacher_outputs(teacher, IndexedDataset(train), cache_path, batch_size=64, device="cpu")
        cache_seconds = time.perf_counter() - t0
        log(f"teacher cache written in {cache_seconds:.1f}s")
        cached = KnowledgeDistillation(make_student(args.student, args.seed), teacher, num_classes=n_classes,
                                       cache_teacher=True, cache_path=cache_path)
        rep_cached, ep_cached = fit(cached, IndexedDataset(train), cfg)
    acc_cached = accuracy(cached.predict, x_te, y_te)
    log(f"student KD cached teacher: acc {acc_cached:.4f}, epochs {[round(s, 2) for s in ep_cached]}")
    acc_teacher = accuracy(teacher, x_te, y_te)

    # ---- 1b. interleaved timing rounds: one epoch each of plain / live / cached on the first --timing-images
    # images, fresh students, the three arms alternating so that load from other processes hits all alike
    sub = torch.utils.data.Subset(train, range(min(args.timing_images, len(train))))
    cfg1 = TrainConfig(epochs=1, batch_size=args.batch_size, lr=args.lr, optimizer="sgd", momentum=0.9,
                       scheduler="cosine", precision="fp32", device="cpu", seed=args.seed)
    rounds = {"plain_ce": [], "kd_live_teacher": [], "kd_cached_teacher": []}
    with tempfile.TemporaryDirectory() as cache_dir:
        sub_cache = Path(cache_dir) / "teacher.npy"
        t0 = time.perf_counter()
        cache_teacher_outputs(teacher, IndexedDataset(sub), sub_cache, batch_size=64, device="cpu")
        sub_cache_seconds = time.perf_counter() - t0
        for r in range(args.rounds):
            m = FineTune(make_student(args.student, args.seed), n_classes, **plain_ce)
            rounds["plain_ce"].append(fit(m, sub, cfg1)[1][0])
            m = KnowledgeDistillation(make_student(args.student, args.seed), teacher, num_classes=n_classes)
            rounds["kd_live_teacher"].append(fit(m, IndexedDataset(sub), cfg1)[1][0])
            m = KnowledgeDistillation(make_student(args.student, args.seed), teacher, num_classes=n_classes,
                                      cache_teacher=True, cache_path=sub_cache)
            rounds["kd_cached_teacher"].append(fit(m, IndexedDataset(sub), cfg1)[1][0])
            log(f"timing round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in rounds.items()))
    med = {k: float(np.median(v)) for k, v in rounds.items()}

    # ---- 2a (second arm). lite0 from scratch, same budget
    torch.manual_seed(args.seed)
    ft_scr = FineTune(load_candidate(TEACHER, pretrained=False).module, n_classes, **plain_ce)
    rep_scr, ep_scr = fit(ft_scr, train, cfg)
    acc_scr = accuracy(ft_scr.predict, x_te, y_te)
    log(f"lite0 scratch: acc {acc_scr:.4f}, {sum(ep_scr):.1f}s")

    def run(rep, per_epoch, acc):
        return {"seconds_per_epoch": sum(per_epoch) / len(per_epoch), "epoch_seconds": per_epoch,
                "seconds_total": rep["seconds"], "final_train_loss": rep["final"].get("train_total"),
                "test_accuracy": acc}

    spe = lambda ep: sum(ep) / len(ep)  # noqa: E731
    cached_ratio = spe(ep_cached) / spe(ep_plain)
    live_ratio = spe(ep_live) / spe(ep_plain)
    report = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch": torch.__version__, "threads": torch.get_num_threads()},
        "settings": {
            "dataset": "fashion-mnist (Debian files), stratified subsets, seed %d" % args.seed,
            "train_images": len(x_tr), "test_images": len(x_te), "num_classes": n_classes,
            "input_size_px": args.size, "native_input_size": native_size,
            "input_note": (f"every arm uses the same tensors: {TEACHER}'s evaluation transform with input_size "
                           f"reduced from {native_size[1]} to {args.size} px, applied once before training"),
            "pretransform_seconds": pre_seconds,
            "train_config": {"epochs": args.epochs, "batch_size": args.batch_size, "optimizer": "sgd",
                             "lr": args.lr, "momentum": 0.9, "scheduler": "cosine", "precision": "fp32",
                             "device": "cpu", "seed": args.seed},
            "teacher": f"{TEACHER} fine-tuned here (part 2a, pretrained arm)", "student": args.student,
            "student_init": "timm pretrained=False, identical weights in every student arm (seeded)",
            "kd": {"kind": "kl", "temperature": 4.0, "alpha_hard": 0.5, "alpha_soft": 0.5},
            "finetune_regularisers": "l2sp_alpha=0, l2sp_beta=0, bss_eta=0 (plain cross-entropy)",
        },
        "distillation_epoch_time_interleaved": {
            "images": len(sub), "rounds": args.rounds, "epoch_seconds": rounds,
            "median_epoch_seconds": med, "cache_write_seconds": sub_cache_seconds,
            "ratio_cached_over_plain": med["kd_cached_teacher"] / med["plain_ce"],
            "ratio_live_over_plain": med["kd_live_teacher"] / med["plain_ce"],
            "target_cached_over_plain_at_most": 1.2,
            "target_met": med["kd_cached_teacher"] / med["plain_ce"] <= 1.2,
        },
        "distillation_epoch_time": {
            "note": "the full-length runs of part 2b (all epochs, all training images), run one after another",
            "plain_ce": run(rep_plain, ep_plain, acc_plain),
            "kd_live_teacher": run(rep_live, ep_live, acc_live),
            "kd_cached_teacher": run(rep_cached, ep_cached, acc_cached),
            "cache_write_seconds": cache_seconds,
            "ratio_cached_over_plain": cached_ratio,
            "ratio_live_over_plain": live_ratio,
            "target_cached_over_plain_at_most": 1.2,
            "target_met": cached_ratio <= 1.2,
            "cached_vs_live_accuracy_diff": acc_cached - acc_live,
        },
        "accuracy": {
            "finetune_pretrained_vs_scratch": {
                "model": TEACHER,
                "pretrained": {"test_accuracy": acc_pre, "seconds": rep_pre["seconds"],
                               "final_train_loss": rep_pre["final"].get("train_total")},
                "scratch": {"test_accuracy": acc_scr, "seconds": rep_scr["seconds"],
                            "final_train_loss": rep_scr["final"].get("train_total")},
                "difference": acc_pre - acc_scr,
                "pretrained_wins": acc_pre > acc_scr,
            },
            "kd_vs_no_kd": {
                "teacher_test_accuracy": acc_teacher,
                "student": args.student,
                "no_kd": acc_plain, "kd_live": acc_live, "kd_cached": acc_cached,
                "difference_kd_live_minus_no_kd": acc_live - acc_plain,
                "kd_wins": acc_live > acc_plain,
            },
        },
        "load_average_at_start": load_start, "load_average_at_end": os.getloadavg(),
        "wall_seconds": time.perf_counter() - t_start,
    }
    write_json(args.out, report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
