"""Multi-model tuning against the baselines, with augmentation and 3 seeds, in one run: B-Tuning, Hub-Pathway
(k = 1 and 2) and Zoo-Tuning (full and lite) versus fine-tuning the top-1 model alone, an ensemble of the K and
plain KD from the best teacher, on the same data and budget; plus the efficiency of Hub-Pathway against the
ensemble and of Zoo-Tuning lite against one model, and routing / gate diagnostics with plots. Writes
bench/results/multi.json, bench/results/multi_hubpathway_routing.png and bench/results/multi_zootuning_gates.png.

    python bench/bench_multi.py [--train 1000 --val 300 --test 1000 --epochs 3 --size 96 --zoo-size 64
                                 --seeds 3 --lr 0.01 --lr-grid 0.01,0.03 --precision bf16]

**Data.** Fashion-MNIST (Debian's files, hubtune dataset ``fashion-mnist``). For seed ``s``: a stratified
subset of ``--train`` images of the train split to train on (``stratified_subsample(seed=s)``: the subset
changes with the seed, so the spread over seeds includes "which images you got"), and a disjoint stratified
held-out split of ``--val`` other train-split images, used only to pick learning rates (below); nobody trains
on it. The test set is one fixed stratified subset of ``--test`` images of the test split (seed 0) for every
seed and arm; it is never used for a choice. The source images of part B come from the rest of the train split,
disjoint from every seed's training and held-out images.

**Augmentation.** Every arm trains on ``hubtune.data.augment.AugmentedDataset(train, train_transform_for(
data_config, AugmentConfig()), seed=s)``: hubtune's default light recipe (timm's training transform: random
resized crop of 25-100 % of the area to the input size, horizontal flip 0.5, colour jitter 0.4; no mixup), a
new draw every epoch (the Engine calls ``set_epoch``), deterministic per (image, epoch, seed), so within a seed
all arms see exactly the same augmented images in the same order. Evaluation (held-out and test) uses the
evaluation transform (``hubtune.data.transform_for``), applied once. The part-B source models are pretrained
(the hub is built, not compared) on fixed evaluation-transform tensors, as before: the rotation task's labels
would not survive a horizontal flip.

**Budget, and why** (the issue asks for a budget where transfer matters and the arms are separable, the whole
benchmark in about 90 minutes on the 2-core machine; here both scripts together are aimed at <= 60 minutes on
a quiet machine): 1,000 training images (100 per class: the few-shot regime where pretrained features matter,
and where the multi-model methods claim their gains), 3 epochs, batch 32 (94 steps per epoch), SGD momentum 0.9,
cosine schedule, lr 0.01. Input size 96 px for part A (the lite models' own sizes are 224-260 px: 96 px is
~5x cheaper than 224 and still 3.4x the 28 px source resolution), 64 px for the resnet18 zoo of part B. bf16
autocast (``--precision bf16``; the CPU has avx512_bf16): measured 1.2x (EfficientNet-Lite, depthwise-heavy)
to 2.3x (Zoo-Tuning's K convolutions per layer) faster per training step than fp32 (one thread, arms
interleaved), which is what lets 3 seeds and the lr grids fit; the weights and the optimizer stay fp32
(autocast), and accuracy is measured in fp32. 1,000 test images (paired across arms: a difference of 1 point
is 10 images) and 300 held-out images (lr choice only). Measured (bench/results/multi.json): 50.9 minutes on
the 2-core VM (AMD EPYC, avx512_bf16) while other processes shared the cores (part A 32.4 min, of which seed 0
took 16 min at load average ~3.5 and seeds 1 and 2 8 min each at ~1.6; part B 18.4 min), after 14.5 minutes
of bench_tuning.py: 65 minutes for both, about 55 by the quieter seeds' pace.

**Learning rates.** Every arm trains with lr 0.01 (the previous benchmark's) except two, which get a grid of
``--lr-grid`` (0.01 and 0.03), the value picked per seed by accuracy on the held-out split (ties to the smaller
lr), and report the test accuracy of the model trained with the picked value:

* Zoo-Tuning (full and lite): its gates now start at exactly 1/K (the sources' average kernel), which makes a
  step on the source kernels move the aggregate ``1/K`` as far as a single model's step, against ``K/4`` with
  the old init (gates near 0.5): about K/2 (1.5 for K=3) times slower at the same lr (see
  ``hubtune/tuning/zootuning.py``). 0.03 = 3 x 0.01 covers that factor.
* fine-tune top-1, the reference of every target, with the same grid, so that the comparison stays fair.

The ensemble's members (all fine-tuned at 0.01) and the other methods (KD, B-Tuning, Hub-Pathway) get lr 0.01
only; their defaults are not tuned here.

A. **Heterogeneous hub**: the packaged ImageNet EfficientNet-Lite0/1/2 (``pkg:efficientnet_lite{0,1,2}``), every
   data config's input size set to ``--size`` (all three share the 127/128 normalisation, so one tensor per
   image serves every model). Per seed: ``hubtune.rank`` (LogME) on that seed's training images orders them;
   then fine-tune each (the ranking's top-1 with the lr grid is *fine-tune top-1*; the mean softmax of the K
   fine-tuned at 0.01 is the *ensemble*); KD (KL, T=4, alpha 0.5/0.5) from the fine-tuned top-1 (the arm's
   picked model: the best teacher by the ranking) into the smallest model (lite0, pretrained, new head);
   B-Tuning from the ranking's K pretrained models (LogME weights and scores of that seed's ranking) into the
   same smallest model; Hub-Pathway over the K with k=1 and with k=2 (default noisy gating, generator and loss
   weights).
B. **Same-architecture zoo**: ``--zoo-arch`` (timm resnet18, random init, identical start) pretrained here
   once, for ``--pretrain-epochs``, on three other sources: scikit-learn digits (10 classes), rotation
   prediction on Fashion-MNIST images disjoint from the target (4 classes, self-supervised) and Fashion-MNIST
   classes 0-4 on disjoint images (a related task with another label set). Per seed: ranked by LogME on the
   target; fine-tune each (top-1 with the lr grid, the ensemble of the K at 0.01), Zoo-Tuning and Zoo-Tuning
   lite (each with the lr grid; lite's test accuracy is that of the collapsed single resnet18, which computes
   what the lite model's eval predict computes). KD is not run on this hub: the teacher and the only student
   candidates share one architecture.

**Targets and verdicts.** ``vs_finetune_top1`` holds, per arm, the per-seed differences to fine-tune top-1,
their mean, their standard deviation and the reference's own; ``targets`` says for B-Tuning, Hub-Pathway (k=1,
k=2) and Zoo-Tuning (full, lite) whether each beats fine-tune top-1 by more than one standard deviation **of the
paired per-seed difference** (``target_met``; the criterion with the std of the fine-tune arm is given beside
it). Standard deviations are sample ones (ddof=1) over the 3 seeds.

**Diagnostics** (recorded for every run, plotted; the JSON says which methods lose). Hub-Pathway: the routing
over training, twice: (1) the Engine's per-epoch mean of the method's own ``route_frac_e`` loss terms (the
fraction of training samples routed to model e, noisy gates, as trained), and (2) the clean (eval) pathway
generator evaluated on a fixed batch (the seed's held-out images) before training and after every epoch (an
``on_epoch_start`` hook on the method instance plus one call after ``fit``; no randomness and no BN update, so
the training run is unchanged): the fraction of samples whose top-k holds each model and the mean softmax
probability per model. Zoo-Tuning: the gates of every aggregated convolution, evaluated the same way on 128
held-out images (a forward hook calling the layer's ``gates()`` on its input), averaged over the batch: per
layer and, for the plot, averaged over the layers; for lite also the EMA gates. Plots:
``multi_hubpathway_routing.png`` and ``multi_zootuning_gates.png``.

**Threads.** The script sets ``OMP_WAIT_POLICY=PASSIVE`` (unless the environment sets it) before torch loads:
on this shared 2-core VM, torch's OpenMP threads otherwise spin at every barrier while another process holds a
core, and a training step ran up to 10x slower (measured: lite0 at 96 px, 206 vs 19 ms per image with the
test suite running beside it); with passive waiting the threads sleep instead. Results do not depend on it
(the runs are deterministic); only the clocks do.

**Efficiency** (seed 0's trained models, ``--rounds`` interleaved rounds, medians, fp32 eager, eval, no grad,
batch 64 over the first ``--timing-images`` test tensors): inference samples/s of Hub-Pathway (k=1 and k=2) vs
the ensemble of the K fine-tuned models (target >= 2x, k=1) and of the collapsed Zoo-Tuning lite model vs one
fine-tuned zoo model (target within 10 %), plus full Zoo-Tuning with both exact implementations. Training
iterations/s on one fixed batch (``--timing-iters`` steps per arm per round, ``--train-rounds`` interleaved rounds,
in the training precision; the ensemble's rate is that of training its K members one after the other) and
parameter counts. The per-arm ``train_seconds`` are the Engine's clocks of the accuracy runs, one after another
(not interleaved). Numbers are recorded as measured, including where a method loses.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads libgomp: see "Threads" above

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _seeds import machine, mean_std, paired  # noqa: E402

from hubtune._io import write_json  # noqa: E402
from hubtune.data import create_dataset, stratified_subsample, transform_for  # noqa: E402
from hubtune.data.augment import AugmentConfig, AugmentedDataset, train_transform_for  # noqa: E402
from hubtune.features import ExtractOptions  # noqa: E402
from hubtune.hub import load_candidate  # noqa: E402
from hubtune.ranking import rank  # noqa: E402
from hubtune.tuning import (AdaptiveAggregationConv2d, BTuning, Engine, FineTune, HubPathway,  # noqa: E402
                            IndexedDataset, KnowledgeDistillation, TrainConfig, ZooTuning, save_timm_folder)
from hubtune.tuning import HubModel  # noqa: E402

HUB = ("pkg:efficientnet_lite0", "pkg:efficientnet_lite1", "pkg:efficientnet_lite2")
PLAIN = dict(l2sp_alpha=0.0, l2sp_beta=0.0, bss_eta=0.0)
RESULTS = Path(__file__).resolve().parent / "results"


# ------------------------------------------------------------------------------------------------ helpers
def to_tensors(ds, transform):
    x = torch.stack([transform(ds.image(i)) for i in range(len(ds))])
    return x, torch.as_tensor(np.asarray(ds.labels), dtype=torch.long)


@torch.no_grad()
def probs(predict, x, batch_size=128):
    return torch.cat([torch.softmax(predict(x[b:b + batch_size]).float(), 1) for b in range(0, len(x), batch_size)])


def acc(p, y):
    return float((p.argmax(1) == y).float().mean())


def nparams(*modules):
    seen, n = set(), 0
    for m in modules:
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                n += p.numel()
    return n


def splits(full_train, seeds, n_train, n_val):
    """Per seed: (training subset, held-out subset disjoint from it); and the union of their root indices."""
    out, used = {}, set()
    for s in seeds:
        tr = stratified_subsample(full_train, max_samples=n_train, seed=s)
        rest = np.setdiff1d(np.arange(len(full_train)), tr.indices)
        va_rel = stratified_subsample(full_train.subset(rest), max_samples=n_val, seed=s)
        va_idx = rest[va_rel.indices]
        assert not set(va_idx.tolist()) & set(tr.indices.tolist())
        out[s] = (tr, full_train.subset(va_idx))
        used |= set(tr.indices.tolist()) | set(va_idx.tolist())
    return out, np.array(sorted(used))


@torch.no_grad()
def throughput(predicts: dict, x, rounds: int, batch_size: int = 64) -> dict:
    """Median samples/s of each predict over all of ``x`` (fp32, eval), arms interleaved round by round."""
    times = {k: [] for k in predicts}
    for f in predicts.values():  # warm-up
        f(x[:batch_size])
    for _ in range(rounds):
        for k, f in predicts.items():
            t0 = time.perf_counter()
            for b in range(0, len(x), batch_size):
                f(x[b:b + batch_size])
            times[k].append(len(x) / (time.perf_counter() - t0))
    return {k: float(np.median(v)) for k, v in times.items()}


def set_impl(zoo, impl: str) -> None:
    for m in zoo.model.modules():
        if isinstance(m, AdaptiveAggregationConv2d):
            m.impl = impl


def train_rates(methods: dict, x, y, iters: int, rounds: int, lr: float, bf16: bool, setup=None) -> dict:
    """Median training iterations/s of each method on one fixed batch (forward, backward, SGD step; bf16
    autocast when the runs used it), arms interleaved round by round. The methods are trained further: call
    this after their evaluation."""
    opts = {k: torch.optim.SGD(m.param_groups(lr), lr=lr, momentum=0.9) for k, m in methods.items()}
    times = {k: [] for k in methods}

    def steps(k, n):
        m, opt = methods[k], opts[k]
        (setup or {}).get(k, lambda: None)()
        m.train()
        for _ in range(n):
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = m.losses({"input": x, "target": y})["total"]
            loss.float().backward()
            opt.step()

    for k in methods:  # warm-up
        steps(k, 1)
    for _ in range(rounds):
        for k in methods:
            t0 = time.perf_counter()
            steps(k, iters)
            times[k].append(iters / (time.perf_counter() - t0))
    for m in methods.values():
        m.eval()
    return {k: float(np.median(v)) for k, v in times.items()}


class EpochProbe:
    """Calls ``fn()`` before every epoch (an ``on_epoch_start`` hook set on the method *instance*) and once
    more after ``fit`` (:meth:`finish`): ``records[e]`` is the state after ``e`` epochs (0 = before training).
    ``fn`` must be free of randomness and side effects (eval mode, no grad), so the run is unchanged."""

    def __init__(self, method, fn):
        self.method, self.fn, self.records = method, fn, []
        orig = method.on_epoch_start

        def hook(epoch, total):
            self._record()
            return orig(epoch, total)

        method.on_epoch_start = hook

    def _record(self):
        was = self.method.training
        self.method.eval()
        with torch.no_grad():
            self.records.append(self.fn())
        self.method.train(was)

    def finish(self):
        self._record()
        del self.method.on_epoch_start  # back to the class's method
        return self.records


def hp_probe_fn(hp, x):
    def fn():
        g = hp.gate(x)
        return {"topk_fraction": g["mask"].float().mean(0).tolist(), "mean_prob": g["probs"].mean(0).tolist()}
    return fn


def zoo_probe_fn(zt, x):
    layers = [(n, m) for n, m in zt.model.named_modules() if isinstance(m, AdaptiveAggregationConv2d)]

    def fn():
        got = {}
        hooks = [m.register_forward_hook(
            lambda mod, inp, out, n=n: got.__setitem__(n, mod.gates(inp[0]).float().mean(0).tolist()))
            for n, m in layers]
        try:
            zt.predict(x)
        finally:
            for h in hooks:
                h.remove()
        per_layer = [got[n] for n, _ in layers]
        rec = {"mean_gates": np.mean(per_layer, axis=0).tolist(), "per_layer": per_layer}
        if zt.lite:
            ema = [m.ema_gates.float().tolist() for _, m in layers]
            rec["ema_mean_gates"] = np.mean(ema, axis=0).tolist()
            rec["ema_per_layer"] = ema
        return rec
    return fn


# ------------------------------------------------------------------------------------------------ plots
def plot_routing(A: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [a for a in ("hubpathway k=1", "hubpathway k=2") if a in A["diagnostics"]]
    if not arms:
        return
    fig, axes = plt.subplots(len(arms), 2, figsize=(11, 3.6 * len(arms)), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for r, arm in enumerate(arms):
        diag = A["diagnostics"][arm]
        for s, d in diag["per_seed"].items():
            names = d["models_in_routing_order"]
            short = [n.split(":")[-1].replace("efficientnet_", "") for n in names]
            tr = np.array(d["train_route_fraction_per_epoch"])  # (E, K)
            pr = np.array([x["topk_fraction"] for x in d["probe"]])  # (E+1, K)
            for e in range(tr.shape[1]):
                ls = ["-", "--", ":"][int(s) % 3]
                lab = f"{short[e]}" if s == "0" else None
                axes[r, 0].plot(np.arange(1, len(tr) + 1), tr[:, e], ls, color=colors[HUB_COLOR.get(names[e], e)],
                                marker="o", label=lab)
                axes[r, 1].plot(np.arange(len(pr)), pr[:, e], ls, color=colors[HUB_COLOR.get(names[e], e)],
                                marker="o", label=lab)
        axes[r, 0].set_title(f"{arm}: training routing (noisy gates, epoch mean)\nseeds 0/1/2 = solid/dashed/dotted")
        axes[r, 0].set_xlabel("epoch")
        axes[r, 0].set_ylabel("fraction of samples routed")
        axes[r, 1].set_title(f"{arm}: clean gates on held-out images\n(fraction with the model in its top-k)")
        axes[r, 1].set_xlabel("epochs trained")
        for ax in axes[r]:
            ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


HUB_COLOR = {s: i for i, s in enumerate(HUB)}


def plot_gates(B: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [a for a in ("zootuning", "zootuning lite") if a in B["diagnostics"]]
    if not arms:
        return
    fig, axes = plt.subplots(len(arms), 2, figsize=(12, 3.9 * len(arms)), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color_of: dict = {}

    def col(name):  # by source, not by rank (the order can differ per seed)
        return colors[color_of.setdefault(name, len(color_of)) % len(colors)]

    for r, arm in enumerate(arms):
        diag = B["diagnostics"][arm]
        lo, hi, K = 1.0, 0.0, 1
        for s, d in diag["per_seed"].items():
            names = d["models_in_gate_order"]
            ls = ["-", "--", ":"][int(s) % 3]
            g = np.array([x["mean_gates"] for x in d["probe"]])  # (E+1, K)
            K = g.shape[1]
            lo, hi = min(lo, g.min()), max(hi, g.max())
            for e in range(K):
                axes[r, 0].plot(np.arange(len(g)), g[:, e], ls, color=col(names[e]), marker="o", lw=1.6,
                                label=f"{names[e]} (picked lr)" if s == "0" else None)
            for lr, recs in d.get("probe_other_lrs", {}).items():
                o = np.array([x["mean_gates"] for x in recs])
                lo, hi = min(lo, o.min()), max(hi, o.max())
                for e in range(K):
                    axes[r, 0].plot(np.arange(len(o)), o[:, e], ls, color=col(names[e]), lw=0.9, alpha=0.35,
                                    label=f"{names[e]} (lr {lr}, not picked)" if s == "0" else None)
            if s == "0":
                last = np.array(d["probe"][-1]["per_layer"])  # (L, K)
                for e in range(K):
                    axes[r, 1].plot(np.arange(len(last)), last[:, e], "-", color=col(names[e]), marker=".",
                                    label=names[e])
                axes[r, 1].axhline(1.0 / K, color="gray", lw=0.8, ls=":")
        axes[r, 0].axhline(1.0 / K, color="gray", lw=0.8, ls=":")
        pad = 0.01
        axes[r, 0].set_ylim(min(lo, 1.0 / K - 0.02) - pad, max(hi, 1.0 / K + 0.02) + pad)
        axes[r, 0].set_title(f"{arm}: mean gate per source (over layers and 128 held-out images)\n"
                             f"picked lr per seed {diag['picked_lr_per_seed']}; seeds 0/1/2 solid/dashed/dotted",
                             fontsize=9)
        axes[r, 0].set_xlabel("epochs trained")
        axes[r, 0].set_ylabel("gate (1/K dotted)")
        axes[r, 1].set_title(f"{arm}, seed 0, picked lr, after training: mean gate per layer\n"
                             "(dotted: 1/K, the initial value)", fontsize=9)
        axes[r, 1].set_xlabel("aggregated convolution (forward order)")
        for ax in axes[r]:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ main
def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", type=int, default=1000)
    ap.add_argument("--val", type=int, default=300, help="held-out train-split images, for the lr choice only")
    ap.add_argument("--test", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--size", type=int, default=96, help="part A input size (px)")
    ap.add_argument("--zoo-size", type=int, default=64, help="part B input size (px)")
    ap.add_argument("--zoo-arch", default="resnet18")
    ap.add_argument("--source-images", type=int, default=2000, help="images per part B source task")
    ap.add_argument("--pretrain-epochs", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--lr-grid", default="0.01,0.03", help="lrs tried by fine-tune top-1 and Zoo-Tuning")
    ap.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved inference timing rounds")
    ap.add_argument("--train-rounds", type=int, default=3, help="interleaved training-rate rounds")
    ap.add_argument("--timing-iters", type=int, default=3, help="training steps per arm per timing round")
    ap.add_argument("--timing-images", type=int, default=256)
    ap.add_argument("--probe-images", type=int, default=128, help="held-out images for the Zoo-Tuning gate probe")
    ap.add_argument("--parts", default="AB")
    ap.add_argument("--out", default=str(RESULTS / "multi.json"))
    ap.add_argument("--plot-dir", default=None, help="where the PNGs go (default: beside --out)")
    ap.add_argument("--replot", default=None, metavar="JSON",
                    help="only redraw the PNGs from a multi.json written earlier (into --plot-dir or beside it)")
    args = ap.parse_args()
    if args.replot:
        old = json.loads(Path(args.replot).read_text())
        where = Path(args.plot_dir) if args.plot_dir else Path(args.replot).parent
        if "A_heterogeneous_hub" in old:
            plot_routing(old["A_heterogeneous_hub"], where / "multi_hubpathway_routing.png")
        if "B_same_architecture_zoo" in old:
            plot_gates(old["B_same_architecture_zoo"], where / "multi_zootuning_gates.png")
        return
    seeds = list(range(args.seeds))
    grid = sorted({float(v) for v in args.lr_grid.split(",")})
    plot_dir = Path(args.plot_dir) if args.plot_dir else Path(args.out).parent
    bf16 = args.precision == "bf16"
    t_start = time.perf_counter()
    report = {"machine": machine(), "settings": dict(vars(args), seed_list=seeds, lr_grid_values=grid),
              "load_average_at_start": os.getloadavg(), "partial": True, "log": []}

    def log(msg):
        report["log"].append(f"[{time.perf_counter() - t_start:7.1f}s] {msg}")
        print(report["log"][-1], flush=True)
        write_json(args.out, report)

    def tcfg(seed, lr=None, epochs=None):
        return TrainConfig(epochs=epochs or args.epochs, batch_size=args.batch_size, lr=lr or args.lr,
                           optimizer="sgd", momentum=0.9, scheduler="cosine", precision=args.precision,
                           device="cpu", seed=seed)

    report["settings"]["train_config"] = {k: getattr(tcfg(0), k) for k in (
        "epochs", "batch_size", "lr", "optimizer", "momentum", "scheduler", "precision", "weight_decay")}
    aug_cfg = AugmentConfig()
    report["settings"]["augment"] = json.loads(aug_cfg.key())
    full_train = create_dataset("fashion-mnist", split="train")
    data, used = splits(full_train, seeds, args.train, args.val)
    test_img = stratified_subsample(create_dataset("fashion-mnist", split="test"), max_samples=args.test, seed=0)
    n_classes = int(full_train.num_classes)
    cache = tempfile.mkdtemp(prefix="hubtune-bench-")
    opts = ExtractOptions(precision="fp32", cache_dir=cache, progress=False)

    def fit(method, train, cfg):
        rep = Engine(cfg).fit(method, train, None)
        method.eval()
        iters = cfg.epochs * -(-len(train) // cfg.batch_size)
        out = {"train_seconds": rep["seconds"], "train_iters_per_s": iters / rep["seconds"],
               "final_train_loss": rep["final"].get("train_total"), "lr": cfg.lr}
        return out, rep

    def evaluate(predict, xv, yv, xt, yt):
        pv, pt = probs(predict, xv), probs(predict, xt)
        return {"val_accuracy": acc(pv, yv), "test_accuracy": acc(pt, yt)}, pt

    def pick(runs: dict):
        """runs: lr -> result dict; the lr with the best held-out accuracy (ties: the smaller lr)."""
        best = max(sorted(runs), key=lambda lr: (runs[lr]["val_accuracy"], -lr))
        return best

    def summarise(part: dict, ref_arm: str, targets: list):
        arms = {}
        done = [str(s) for s in seeds if str(s) in part["per_seed"]]  # a partial report: the seeds run so far
        part["seeds_done"] = len(done)
        for arm in part["arm_order"]:
            vals = [part["per_seed"][s][arm] for s in done if arm in part["per_seed"][s]]
            if not vals or len(vals) != len(done):
                continue
            a = {"test_accuracy": mean_std([v["test_accuracy"] for v in vals])}
            if all("val_accuracy" in v for v in vals):
                a["val_accuracy"] = mean_std([v["val_accuracy"] for v in vals])
            for k in ("train_seconds",):
                if all(k in v for v in vals):
                    a[k] = mean_std([v[k] for v in vals])
            for k in ("params", "picked_lr", "model", "student", "teacher"):
                if k in vals[0]:
                    a[k] = [v.get(k) for v in vals] if len({json.dumps(v.get(k)) for v in vals}) > 1 else vals[0][k]
            arms[arm] = a
        part["arms"] = arms
        if ref_arm in arms:
            ref = arms[ref_arm]["test_accuracy"]["per_seed"]
            part["vs_finetune_top1"] = {arm: paired(a["test_accuracy"]["per_seed"], ref)
                                        for arm, a in arms.items() if arm != ref_arm}
            part["targets"] = {arm: {
                "criterion": "mean per-seed (paired) test-accuracy difference to fine-tune top-1 > its std over seeds",
                "target_met": part["vs_finetune_top1"][arm]["beats_by_more_than_one_std_of_difference"],
                "met_with_std_of_finetune_arm": part["vs_finetune_top1"][arm]["beats_by_more_than_one_std_of_reference"],
                "mean_difference": part["vs_finetune_top1"][arm]["mean_difference"],
                "std_of_difference": part["vs_finetune_top1"][arm]["std_of_difference"],
                "std_of_finetune_top1": part["vs_finetune_top1"][arm]["std_of_reference"]}
                for arm in targets if arm in part["vs_finetune_top1"]}
            for arm, diag in part.get("diagnostics", {}).items():
                if arm in part["vs_finetune_top1"]:
                    diag["method_loses_to_finetune_top1"] = part["vs_finetune_top1"][arm]["mean_difference"] <= 0
                    diag["method_meets_target"] = part["targets"].get(arm, {}).get("target_met")

    # ============================================================================ A. heterogeneous hub
    if "A" in args.parts:
        t_part = time.perf_counter()
        cands = []
        for spec in HUB:
            c = load_candidate(spec)
            c.data_config["input_size"] = (3, args.size, args.size)
            cands.append(c)
        norms = {(tuple(c.data_config["mean"]), tuple(c.data_config["std"])) for c in cands}
        assert len(norms) == 1, norms
        by_spec = {c.spec: c for c in cands}
        dc = dict(cands[0].data_config)
        eval_tf, train_tf = transform_for(dc), train_transform_for(dc, aug_cfg)
        x_te, y_te = to_tensors(test_img, eval_tf)
        A = {"data_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dc.items()},
             "rankings": {}, "per_seed": {}, "diagnostics": {},
             "arm_order": ["finetune top-1", "ensemble of K", "kd", "btuning", "hubpathway k=1", "hubpathway k=2"]
             + [f"finetune top-1 lr={lr:g}" for lr in grid]}
        report["A_heterogeneous_hub"] = A
        for seed in seeds:
            train_img, val_img = data[seed]
            x_va, y_va = to_tensors(val_img, eval_tf)
            train = AugmentedDataset(train_img, train_tf, seed=seed)
            rk = rank(cands, train_img, options=opts)
            order = [c.spec for c in rk.candidates]
            A["rankings"][str(seed)] = {c.spec: c.scores["logme"] for c in rk.candidates}
            log(f"A seed {seed} ranking: " + ", ".join(f"{c.spec} {c.scores['logme']:.4f}" for c in rk.candidates))
            S = A["per_seed"][str(seed)] = {}
            top1 = order[0]

            def finetune(spec, lr):
                torch.manual_seed(seed)
                ft = FineTune(copy.deepcopy(by_spec[spec].module), n_classes, **PLAIN)
                res, _ = fit(ft, train, tcfg(seed, lr))
                ev, pt = evaluate(ft.predict, x_va, y_va, x_te, y_te)
                res.update(ev, model=spec, params=nparams(ft.model))
                return ft, res, pt

            fts, P, base = {}, {}, {}
            for spec in order:
                fts[spec], base[spec], P[spec] = finetune(spec, args.lr)
                S[f"finetune {spec} lr={args.lr:g}"] = base[spec]
                log(f"A seed {seed} finetune {spec} lr {args.lr:g}: val {base[spec]['val_accuracy']:.4f} "
                    f"test {base[spec]['test_accuracy']:.4f} ({base[spec]['train_seconds']:.0f}s)")
            runs, models = {args.lr: base[top1]}, {args.lr: fts[top1]}
            for lr in grid:
                if lr not in runs:
                    models[lr], runs[lr], _ = finetune(top1, lr)
                    log(f"A seed {seed} finetune {top1} lr {lr:g}: val {runs[lr]['val_accuracy']:.4f} "
                        f"test {runs[lr]['test_accuracy']:.4f} ({runs[lr]['train_seconds']:.0f}s)")
            for lr in grid:
                S[f"finetune top-1 lr={lr:g}"] = runs[lr]
            best = pick(runs)
            S["finetune top-1"] = dict(runs[best], picked_lr=best, lr_grid_val_accuracy={
                f"{lr:g}": runs[lr]["val_accuracy"] for lr in sorted(runs)})
            teacher_ft = models[best]
            ens_pt = sum(P.values()) / len(P)
            ens_pv = sum(probs(fts[s].predict, x_va) for s in order) / len(order)
            S["ensemble of K"] = {"test_accuracy": acc(ens_pt, y_te), "val_accuracy": acc(ens_pv, y_va),
                                  "params": nparams(*(fts[s].model for s in order)),
                                  "train_seconds": sum(base[s]["train_seconds"] for s in order)}
            student = min(order, key=lambda s: by_spec[s].num_params)
            log(f"A seed {seed} fine-tune top-1 ({top1}) picked lr {best:g}: test "
                f"{S['finetune top-1']['test_accuracy']:.4f}; ensemble {S['ensemble of K']['test_accuracy']:.4f}; "
                f"student {student}")

            torch.manual_seed(seed)
            kd = KnowledgeDistillation(copy.deepcopy(by_spec[student].module), copy.deepcopy(teacher_ft.model).eval(),
                                       num_classes=n_classes, data_config=dc, teacher_data_config=dc)
            S["kd"], _ = fit(kd, IndexedDataset(train), tcfg(seed))
            ev, _ = evaluate(kd.predict, x_va, y_va, x_te, y_te)
            S["kd"].update(ev, teacher=f"{top1} fine-tuned (lr {best:g})", student=student, params=nparams(kd.student))
            log(f"A seed {seed} kd {top1} -> {student}: test {S['kd']['test_accuracy']:.4f}")
            del kd

            torch.manual_seed(seed)
            own = lambda s: HubModel(copy.deepcopy(by_spec[s].module), dc, s)  # noqa: E731
            bt = BTuning(own(student), [own(s) for s in order], n_classes,
                         teacher_weights=[rk.weights[s] for s in order],
                         logme_scores=[rk.candidates[i].scores["logme"] for i in range(len(order))],
                         student_weights=rk.weights[student])
            S["btuning"], _ = fit(bt, train, tcfg(seed))
            ev, _ = evaluate(bt.predict, x_va, y_va, x_te, y_te)
            S["btuning"].update(ev, student=student, pi=dict(zip(order, bt.ensemble.pi.tolist())),
                                params=nparams(bt.student))
            log(f"A seed {seed} btuning -> {student}: test {S['btuning']['test_accuracy']:.4f}, "
                f"pi {[round(v, 3) for v in bt.ensemble.pi.tolist()]}")
            del bt

            hps = {}
            for k in (1, 2):
                arm = f"hubpathway k={k}"
                torch.manual_seed(seed)
                hp = HubPathway([by_spec[s] for s in order], n_classes, k=k)
                probe = EpochProbe(hp, hp_probe_fn(hp, x_va))
                S[arm], rep = fit(hp, train, tcfg(seed))
                probe_recs = probe.finish()
                ev, _ = evaluate(hp.predict, x_va, y_va, x_te, y_te)
                routed = torch.zeros(len(order))
                with torch.no_grad():
                    for b in range(0, len(x_te), 128):
                        routed += (hp.gate(x_te[b:b + 128])["mask"]).float().sum(0)
                S[arm].update(ev, params=nparams(hp),
                              test_routing_fraction=dict(zip(order, (routed / len(x_te)).tolist())))
                train_frac = [[h.get(f"train_route_frac_{e}") for e in range(len(order))] for h in rep["history"]]
                A["diagnostics"].setdefault(arm, {"per_seed": {}})["per_seed"][str(seed)] = {
                    "models_in_routing_order": order,
                    "train_route_fraction_per_epoch": train_frac,
                    "train_loss_terms_per_epoch": [{k2: v for k2, v in h.items() if k2.startswith("train_")
                                                    and not k2.startswith("train_route")} for h in rep["history"]],
                    "probe": probe_recs,
                    "per_model_test_accuracy_of_own_head": {
                        s: acc(probs(lambda x, e=e: hp.model_logits(e, x), x_te), y_te) for e, s in enumerate(order)},
                }
                log(f"A seed {seed} {arm}: test {S[arm]['test_accuracy']:.4f}; train routing per epoch "
                    f"{[[round(v, 2) for v in r] for r in train_frac]}; test routing "
                    f"{ {s.split('_')[-1]: round(v, 2) for s, v in S[arm]['test_routing_fraction'].items()} }")
                hps[k] = hp

            if seed == seeds[0]:  # efficiency on seed 0's trained models, interleaved
                ens_models = [fts[s].model.eval() for s in order]
                xt = x_te[:args.timing_images]
                tp = throughput({"ensemble": lambda x: sum(torch.softmax(m(x), 1) for m in ens_models),
                                 "hubpathway_k1": hps[1].predict, "hubpathway_k2": hps[2].predict,
                                 "top1_alone": fts[top1].model}, xt, args.rounds)
                x_b = torch.stack([train[i][0] for i in range(args.batch_size)])
                y_b = torch.as_tensor([train[i][1] for i in range(args.batch_size)])
                tr = train_rates({"hubpathway_k1": hps[1], "hubpathway_k2": hps[2],
                                  **{f"finetune {s}": fts[s] for s in order}},
                                 x_b, y_b, args.timing_iters, args.train_rounds, args.lr, bf16)
                tr["ensemble (the K fine-tunes)"] = 1.0 / sum(1.0 / tr[f"finetune {s}"] for s in order)
                A["efficiency"] = {
                    "models": "seed 0's trained models", "images": len(xt), "rounds": args.rounds,
                    "inference_precision": "fp32 eager, eval, no grad, batch 64",
                    "inference_samples_per_s": tp,
                    "hubpathway_k1_over_ensemble_inference": tp["hubpathway_k1"] / tp["ensemble"],
                    "hubpathway_k2_over_ensemble_inference": tp["hubpathway_k2"] / tp["ensemble"],
                    "target_at_least": 2.0, "target_met": tp["hubpathway_k1"] / tp["ensemble"] >= 2.0,
                    "train_precision": args.precision, "train_rounds": args.train_rounds,
                    "train_iters_per_s": tr,
                    "hubpathway_k1_over_ensemble_training": tr["hubpathway_k1"] / tr["ensemble (the K fine-tunes)"],
                    "hubpathway_k2_over_ensemble_training": tr["hubpathway_k2"] / tr["ensemble (the K fine-tunes)"],
                    "params": {"hubpathway_k1": nparams(hps[1]), "hubpathway_k2": nparams(hps[2]),
                               "ensemble": nparams(*ens_models), "top1_alone": nparams(fts[top1].model)}}
                log(f"A efficiency: {json.dumps({k: v for k, v in A['efficiency'].items() if k != 'params'})}")
                del ens_models
            del hps, fts, models, teacher_ft
            summarise(A, "finetune top-1", ["btuning", "hubpathway k=1", "hubpathway k=2"])
            write_json(args.out, report)
        try:
            plot_routing(A, plot_dir / "multi_hubpathway_routing.png")
            A["plot"] = "multi_hubpathway_routing.png"
        except Exception as e:  # a plot must not lose the figures
            A["plot_error"] = f"{type(e).__name__}: {e}"
        A["part_seconds"] = time.perf_counter() - t_part
        log("A done: " + ", ".join(f"{a} {v['test_accuracy']['mean']:.4f}+-{v['test_accuracy']['std']:.4f}"
                                   for a, v in A["arms"].items()))

    # ============================================================================ B. same-architecture zoo
    if "B" in args.parts:
        import timm

        t_part = time.perf_counter()
        dc = {"input_size": (3, args.zoo_size, args.zoo_size), "mean": (0.485, 0.456, 0.406),
              "std": (0.229, 0.224, 0.225), "crop_pct": 1.0, "interpolation": "bilinear"}
        eval_tf, train_tf = transform_for(dc), train_transform_for(dc, aug_cfg)
        x_te, y_te = to_tensors(test_img, eval_tf)
        rng = np.random.default_rng(0)
        rest = np.setdiff1d(np.arange(len(full_train)), used)
        labels = np.asarray(full_train.labels)
        rot_idx = rng.choice(rest, args.source_images, replace=False)
        rest = np.setdiff1d(rest, rot_idx)
        sub_idx = rng.choice(rest[labels[rest] < 5], args.source_images, replace=False)
        xr, _ = to_tensors(full_train.subset(rot_idx), eval_tf)
        r = torch.as_tensor(rng.integers(0, 4, len(xr)))
        xr = torch.stack([torch.rot90(im, int(k), dims=(1, 2)) for im, k in zip(xr, r)])
        digits = create_dataset("digits", split="train")
        sources = {"digits": to_tensors(digits, eval_tf), "fmnist-rotation": (xr, r),
                   "fmnist-classes-0-4": to_tensors(full_train.subset(sub_idx), eval_tf)}
        folders, zoo = {}, {}
        root = Path(cache) / "zoo"
        pcfg = TrainConfig(epochs=args.pretrain_epochs, batch_size=args.batch_size, lr=0.05, optimizer="sgd",
                           momentum=0.9, scheduler="cosine", precision=args.precision, device="cpu", seed=0)
        B = {"data_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dc.items()},
             "sources": {}, "rankings": {}, "per_seed": {}, "diagnostics": {},
             "arm_order": ["finetune top-1", "ensemble of K", "zootuning", "zootuning lite"]
             + [f"finetune top-1 lr={lr:g}" for lr in grid] + [f"zootuning lr={lr:g}" for lr in grid]
             + [f"zootuning lite lr={lr:g}" for lr in grid]}
        report["B_same_architecture_zoo"] = B
        for name, (xs, ys) in sources.items():
            torch.manual_seed(0)  # identical start: the sources alone make the models differ
            net = timm.create_model(args.zoo_arch, pretrained=False, num_classes=int(ys.max()) + 1,
                                    pretrained_cfg_overlay=dc)
            ft = FineTune(net, int(ys.max()) + 1, **PLAIN)
            rep = Engine(pcfg).fit(ft, torch.utils.data.TensorDataset(xs, ys), None)
            save_timm_folder(ft.model, root / name)
            folders[name] = f"local-dir:{root / name}"
            B["sources"][name] = {"images": len(xs), "classes": int(ys.max()) + 1,
                                  "final_train_loss": rep["final"].get("train_total"), "seconds": rep["seconds"]}
            log(f"B pretrained {args.zoo_arch} on {name}: loss {rep['final'].get('train_total'):.3f} "
                f"({rep['seconds']:.0f}s)")
        names = {}
        for name, f in folders.items():
            c = load_candidate(f)
            names[c.spec] = name
            zoo[c.spec] = c
        for seed in seeds:
            train_img, val_img = data[seed]
            x_va, y_va = to_tensors(val_img, eval_tf)
            train = AugmentedDataset(train_img, train_tf, seed=seed)
            rk = rank(list(zoo.values()), train_img, options=opts)
            order = [c.spec for c in rk.candidates]
            B["rankings"][str(seed)] = {names[c.spec]: c.scores["logme"] for c in rk.candidates}
            log(f"B seed {seed} ranking: {B['rankings'][str(seed)]}")
            S = B["per_seed"][str(seed)] = {}
            top1 = order[0]
            x_probe = x_va[:args.probe_images]

            def finetune(spec, lr):
                torch.manual_seed(seed)
                ft = FineTune(copy.deepcopy(zoo[spec].module), n_classes, **PLAIN)
                res, _ = fit(ft, train, tcfg(seed, lr))
                ev, pt = evaluate(ft.predict, x_va, y_va, x_te, y_te)
                res.update(ev, model=names[spec], params=nparams(ft.model))
                return ft, res, pt

            fts, P, base = {}, {}, {}
            for spec in order:
                fts[spec], base[spec], P[spec] = finetune(spec, args.lr)
                S[f"finetune {names[spec]} lr={args.lr:g}"] = base[spec]
                log(f"B seed {seed} finetune {names[spec]} lr {args.lr:g}: val {base[spec]['val_accuracy']:.4f} "
                    f"test {base[spec]['test_accuracy']:.4f} ({base[spec]['train_seconds']:.0f}s)")
            runs = {args.lr: base[top1]}
            for lr in grid:
                if lr not in runs:
                    _, runs[lr], _ = finetune(top1, lr)
                    log(f"B seed {seed} finetune {names[top1]} lr {lr:g}: val {runs[lr]['val_accuracy']:.4f} "
                        f"test {runs[lr]['test_accuracy']:.4f}")
            for lr in grid:
                S[f"finetune top-1 lr={lr:g}"] = runs[lr]
            best = pick(runs)
            S["finetune top-1"] = dict(runs[best], picked_lr=best, lr_grid_val_accuracy={
                f"{lr:g}": runs[lr]["val_accuracy"] for lr in sorted(runs)})
            ens_pt = sum(P.values()) / len(P)
            ens_pv = sum(probs(fts[s].predict, x_va) for s in order) / len(order)
            S["ensemble of K"] = {"test_accuracy": acc(ens_pt, y_te), "val_accuracy": acc(ens_pv, y_va),
                                  "params": nparams(*(fts[s].model for s in order)),
                                  "train_seconds": sum(base[s]["train_seconds"] for s in order)}
            log(f"B seed {seed} fine-tune top-1 ({names[top1]}) picked lr {best:g}: test "
                f"{S['finetune top-1']['test_accuracy']:.4f}; ensemble {S['ensemble of K']['test_accuracy']:.4f}")

            kept = {}
            for lite in (False, True):
                arm = "zootuning lite" if lite else "zootuning"
                runs, methods, probes = {}, {}, {}
                for lr in grid:
                    torch.manual_seed(seed)
                    zt = ZooTuning([copy.deepcopy(zoo[s].module) for s in order], n_classes, lite=lite)
                    probe = EpochProbe(zt, zoo_probe_fn(zt, x_probe))
                    res, _ = fit(zt, train, tcfg(seed, lr))
                    probes[lr] = probe.finish()
                    if lite:
                        collapsed = zt.collapse().eval()
                        ev, _ = evaluate(collapsed, x_va, y_va, x_te, y_te)
                        ev_l, _ = evaluate(zt.predict, x_va, y_va, x_te, y_te)
                        res.update(ev, uncollapsed_test_accuracy=ev_l["test_accuracy"], params=nparams(collapsed),
                                   params_while_training=nparams(zt.model))
                        methods[lr] = (zt, collapsed)
                    else:
                        ev, _ = evaluate(zt.predict, x_va, y_va, x_te, y_te)
                        res.update(ev, params=nparams(zt.model))
                        methods[lr] = (zt, None)
                    runs[lr] = res
                    S[f"{arm} lr={lr:g}"] = res
                    log(f"B seed {seed} {arm} lr {lr:g}: val {res['val_accuracy']:.4f} test {res['test_accuracy']:.4f} "
                        f"({res['train_seconds']:.0f}s); mean gates "
                        f"{[round(v, 3) for v in probes[lr][-1]['mean_gates']]}")
                best_z = pick(runs)
                S[arm] = dict(runs[best_z], picked_lr=best_z, lr_grid_val_accuracy={
                    f"{lr:g}": runs[lr]["val_accuracy"] for lr in sorted(runs)})
                d = B["diagnostics"].setdefault(arm, {"per_seed": {}, "picked_lr_per_seed": []})
                d["picked_lr_per_seed"].append(best_z)
                d["per_seed"][str(seed)] = {
                    "models_in_gate_order": [names[s] for s in order], "picked_lr": best_z,
                    "probe": probes[best_z],
                    "probe_other_lrs": {f"{lr:g}": [{"mean_gates": r["mean_gates"],
                                                     **({"ema_mean_gates": r["ema_mean_gates"]}
                                                        if "ema_mean_gates" in r else {})} for r in probes[lr]]
                                        for lr in grid if lr != best_z}}
                kept[arm] = methods[best_z]

            if seed == seeds[0]:
                one = fts[top1].model.eval()
                aggregated, (lite_m, collapsed) = kept["zootuning"][0], kept["zootuning lite"]

                def full(impl):  # the per-sample aggregation, run by either exact implementation
                    def predict(x):
                        set_impl(aggregated, impl)
                        return aggregated.predict(x)
                    return predict

                xt = x_te[:args.timing_images]
                tp = throughput({"one_model": one, "zootuning_lite_collapsed": collapsed,
                                 "zootuning_full_impl_sum": full("sum"), "zootuning_full_impl_grouped": full("grouped")},
                                xt, args.rounds)
                set_impl(aggregated, "auto")
                x_b = torch.stack([train[i][0] for i in range(args.batch_size)])
                y_b = torch.as_tensor([train[i][1] for i in range(args.batch_size)])
                tr = train_rates({"zootuning (impl sum)": aggregated, "zootuning lite": lite_m, "one model": fts[top1]},
                                 x_b, y_b, args.timing_iters, args.train_rounds, args.lr, bf16,
                                 setup={"zootuning (impl sum)": lambda: set_impl(aggregated, "sum")})
                B["efficiency"] = {
                    "models": "seed 0's trained models (Zoo-Tuning at its picked lr)", "images": len(xt),
                    "rounds": args.rounds, "inference_precision": "fp32 eager, eval, no grad, batch 64",
                    "inference_samples_per_s": tp,
                    "lite_over_one_model_inference": tp["zootuning_lite_collapsed"] / tp["one_model"],
                    "target_within": 0.10,
                    "target_met": tp["zootuning_lite_collapsed"] / tp["one_model"] >= 0.90,
                    "train_precision": args.precision, "train_rounds": args.train_rounds, "train_iters_per_s": tr,
                    "params": {"one_model": nparams(one), "zootuning_lite_collapsed": nparams(collapsed),
                               "zootuning_full": nparams(aggregated.model), "zootuning_lite_training": nparams(lite_m.model)}}
                log(f"B efficiency: {json.dumps({k: v for k, v in B['efficiency'].items() if k != 'params'})}")
            del kept, fts
            summarise(B, "finetune top-1", ["zootuning", "zootuning lite"])
            write_json(args.out, report)
        try:
            plot_gates(B, plot_dir / "multi_zootuning_gates.png")
            B["plot"] = "multi_zootuning_gates.png"
        except Exception as e:
            B["plot_error"] = f"{type(e).__name__}: {e}"
        B["part_seconds"] = time.perf_counter() - t_part
        log("B done: " + ", ".join(f"{a} {v['test_accuracy']['mean']:.4f}+-{v['test_accuracy']['std']:.4f}"
                                   for a, v in B["arms"].items()))

    report["partial"] = False
    report["load_average_at_end"] = os.getloadavg()
    report["wall_seconds"] = time.perf_counter() - t_start
    write_json(args.out, report)
    brief = {k: report[k] for k in ("machine", "wall_seconds")}
    for part in ("A_heterogeneous_hub", "B_same_architecture_zoo"):
        if part in report:
            brief[part] = {k: report[part].get(k) for k in ("arms", "targets", "efficiency")}
    print(json.dumps(brief, indent=1, default=str)[:20000])


if __name__ == "__main__":
    main()
