"""SSLD on Fashion-MNIST: does distillation on teacher-selected unlabelled data beat KD on the labelled set, and
does the teacher's top-k selection beat a random pool of the same size? Writes bench/results/ssld.json.

Setting (issue 13): a labelled set of ``--labeled`` images (stratified, fixed across seeds), the rest of the
official training split as the unlabelled pool (subsampled to ``--pool`` images), the official test set for
dedup (all 10,000) and evaluation (``--eval`` of them); teacher ``pkg:efficientnet_lite0`` fine-tuned on the
labelled set; student a timm model built without pretrained weights. Arms, ``--seeds`` seeds each:

* ``ce``: the student trained with cross-entropy on the labelled set;
* ``kd``: kd on the labelled set (alpha_hard = alpha_soft = 0.5, the SSLD loss ``skl``, T = 1), as many optimizer
  steps as the SSLD distillation (equal compute), then no fine-tune;
* ``ssld_nofinetune`` / ``ssld``: the recipe's distilled model, and after its final fine-tune;
* ``random_pool`` (+ ``random_pool_nofinetune``): the same recipe with ``selection/selection.json`` replaced by
  a random draw of the same size from the deduplicated pool (a stage replaced by hand, then ``resume``);
* ablations (``--ablation-seeds`` seeds, distillation stage only): loss ``js`` and ``kl`` instead of ``skl``;
  ``teacher_bn=train`` against ``eval``, both with a live teacher (train-mode BN cannot be cached).

Every reduction from the issue's setting (image size, pool size, epochs, evaluation subset, seeds) is recorded in
the JSON under ``"reductions"``. Machine: run with one thread (``torch.set_num_threads(1)``).
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import hubtune  # noqa: E402
from hubtune._io import write_json  # noqa: E402
from hubtune.data import create_dataset  # noqa: E402
from hubtune.tuning.api import train_dataset  # noqa: E402


def ms(xs):
    xs = [x for x in xs if x is not None]
    return {"mean": float(np.mean(xs)) if xs else None, "std": float(np.std(xs, ddof=1)) if len(xs) > 1 else None,
            "n": len(xs), "values": xs}


def fresh_run(out: Path, reuse: Path | None = None) -> Path:
    """The empty run folder ``out`` (the benchmark's own: removed first), holding ``reuse``'s pool stages (scores,
    dedup, selection) when given, so that the recipe resumes after them."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for stg in ("scores", "dedup", "selection") if reuse is not None else ():
        shutil.copytree(reuse / stg, out / stg)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--labeled", type=int, default=1000)
    ap.add_argument("--pool", type=int, default=3000)
    ap.add_argument("--eval", type=int, default=2000)
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--teacher-epochs", type=int, default=6)
    ap.add_argument("--distill-epochs", type=int, default=6)
    ap.add_argument("--finetune-epochs", type=int, default=2)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--ablation-seeds", type=int, default=1)
    ap.add_argument("--student", default="mobilenetv3_small_050")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--ood", type=int, default=0,
                    help="add this many out-of-distribution images (scikit-learn digits, 28x28) to the pool")
    ap.add_argument("--work", default="/tmp/hubtune_bench_ssld")
    ap.add_argument("--out", default=str(ROOT / "bench/results/ssld.json"))
    ap.add_argument("--probe", action="store_true", help="only the dedup probe (needs WORK/teacher); --out its JSON")
    ap.add_argument("--probe-eval", type=int, default=2000)
    ap.add_argument("--probe-copies", type=int, default=300)
    a = ap.parse_args()
    if a.probe:
        return dedup_probe(a)
    torch.set_num_threads(1)
    t_all = time.perf_counter()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    sz = f"?input_size={a.size}&crop_pct=1.0"
    student = f"{a.student}{sz}"

    # ---- data: a fixed labelled split, the rest of the training split as the pool, the official test set
    labeled, _ = train_dataset("fashion-mnist", None, max_samples=a.labeled, seed=0)
    full_train = create_dataset("fashion-mnist", "train")
    rest = np.setdiff1d(np.arange(len(full_train)), labeled.indices)
    pool_rows = np.sort(np.random.default_rng(0).choice(rest, size=a.pool, replace=False))
    pool = full_train.subset(pool_rows)
    n_in = len(pool)
    if a.ood:  # the pool of the paper is partly off-task (ImageNet-22k): digits images stand in for that part
        from PIL import Image

        from hubtune.data import ArrayDataset

        dg = [create_dataset("digits", sp) for sp in ("train", "test")]
        dimg = [np.asarray(d.image(i).convert("L").resize((28, 28), Image.BILINEAR)) for d in dg
                for i in range(len(d))][:a.ood]
        fm = np.stack([np.asarray(pool.image(i)) for i in range(len(pool))])
        pool = ArrayDataset("fashion-mnist+digits", np.concatenate([fm, np.stack(dimg)]),
                            np.zeros(len(fm) + len(dimg), dtype=np.int64))
    test = create_dataset("fashion-mnist", "test")
    eval_ds = test.subset(np.sort(np.random.default_rng(1).choice(len(test), size=a.eval, replace=False)))
    common = dict(eval_dataset=eval_ds, batch_size=64, augment=False)

    # ---- the teacher: pkg:efficientnet_lite0 fine-tuned on the labelled set
    tdir = work / "teacher"
    t0 = time.perf_counter()
    if not (tdir / "report.json").is_file():
        hubtune.tune("finetune", model=f"pkg:efficientnet_lite0{sz}", dataset=labeled, epochs=a.teacher_epochs,
                     lr=1e-3, out=tdir, overwrite=True, seed=0, train={"optimizer": "adamw"}, **common)
    t_rep = json.loads((tdir / "report.json").read_text())
    teacher = f"local-dir:{tdir}"
    res = {"teacher": {"spec": f"pkg:efficientnet_lite0{sz}", "epochs": a.teacher_epochs, "optimizer": "adamw",
                       "lr": 1e-3,
                       "eval_acc": t_rep["final"]["eval_acc"], "train_seconds": t_rep.get("seconds")}}
    print("teacher", res["teacher"], flush=True)
    arms: dict[str, list] = {}
    times: dict[str, list] = {}
    extra: dict = {}

    def add(name, acc, secs):
        arms.setdefault(name, []).append(acc)
        times.setdefault(name, []).append(secs)
        print(f"{name}: {acc}  ({secs:.0f} s)", flush=True)

    def run_ssld(out, seed, **kw):
        args = dict(teacher=teacher, student=student, dataset=labeled, unlabeled=pool, out=out,
                    per_class=a.per_class, dedup_against="fashion-mnist", distill_epochs=a.distill_epochs,
                    finetune_epochs=a.finetune_epochs, lr=a.lr, seed=seed, student_pretrained=False,
                    cache_teacher=True, **common)
        args.update(kw)
        return hubtune.ssld(**args)

    for seed in range(a.seeds):
        # SSLD (top-k)
        t0 = time.perf_counter()
        # scores, dedup and selection do not depend on the seed: reused (and checked) from seed 0
        out = fresh_run(work / f"ssld-s{seed}", work / "ssld-s0" if seed > 0 else None)
        rep = run_ssld(out, seed, resume=True)
        secs = time.perf_counter() - t0
        add("ssld_nofinetune", rep["distill_eval_acc"], rep["stages"]["distill"]["seconds"])
        add("ssld", rep["final_eval_acc"], secs)
        n_train = rep["n_labeled"] + rep["n_selected"]
        if seed == 0:
            rows = [e["pool_index"] for e in json.loads((out / "selection/selection.json").read_text())["entries"]]
            extra["ood_in_pool"] = len(pool) - n_in
            extra["ood_fraction_selected_topk"] = float(np.mean(np.asarray(rows) >= n_in)) if rows else None
            extra["dedup"] = rep["dedup"]
            extra["selection_counts"] = rep["stages"]["selection"]["counts"]
            extra["n_selected"] = rep["n_selected"]
            extra["stage_seconds_seed0"] = {k: v["seconds"] for k, v in rep["stages"].items()}
        # random pool of the same size: selection.json replaced by hand, then resume (stages 1-2 are reused)
        t0 = time.perf_counter()
        rout = fresh_run(work / f"random-s{seed}", out)
        sel = json.loads((out / "selection" / "selection.json").read_text())
        keep = np.flatnonzero(np.load(out / "dedup" / "keep.npy"))
        probs = np.load(out / "scores" / "pool-logits.npy")[0]
        rnd = np.sort(np.random.default_rng(100 + seed).choice(keep, size=sel["n_selected"], replace=False))
        sel["entries"] = [{"pool_index": int(r), "label": int(np.argmax(probs[r])), "classes": [], "score": None}
                          for r in rnd]
        sel["note"] = "random draw of the same size from the deduplicated pool (bench_ssld.py)"
        write_json(rout / "selection" / "selection.json", sel)
        extra.setdefault("ood_fraction_selected_random", []).append(float(np.mean(rnd >= n_in)))
        rrep = run_ssld(rout, seed, resume=True)
        assert not rrep["stages"]["scores"]["ran"] and not rrep["stages"]["selection"]["ran"]
        add("random_pool_nofinetune", rrep["distill_eval_acc"], rrep["stages"]["distill"]["seconds"])
        add("random_pool", rrep["final_eval_acc"], time.perf_counter() - t0)
        # CE on the labelled set, and KD on it with the same number of optimizer steps as SSLD's distillation
        kd_epochs = max(1, round(a.distill_epochs * n_train / len(labeled)))
        t0 = time.perf_counter()
        r = hubtune.tune("finetune", model=student, dataset=labeled, epochs=kd_epochs, lr=a.lr,
                         out=work / f"ce-s{seed}", overwrite=True, seed=seed, pretrained=False, **common)
        add("ce", r["final"]["eval_acc"], time.perf_counter() - t0)
        t0 = time.perf_counter()
        kd_cache = work / "kd-teacher.npy"  # the teacher's outputs on the (un-augmented) labelled images, once
        if not kd_cache.is_file():
            from hubtune.data import transform_for
            from hubtune.tuning.models import load_model
            from hubtune.tuning.teachers import cache_teacher_outputs

            s_cfg = load_model(student, pretrained=False).data_config
            _, lab_view = train_dataset(labeled, transform_for(s_cfg), seed=0)
            cache_teacher_outputs(teacher, lab_view, kd_cache, input_config=s_cfg)
        r = hubtune.tune("kd", model=student, teacher=teacher, dataset=labeled, epochs=kd_epochs, lr=a.lr,
                         out=work / f"kd-s{seed}", overwrite=True, seed=seed, pretrained=False, kind="skl",
                         temperature=1.0, alpha_hard=0.5, alpha_soft=0.5, cache_teacher=True,
                         cache_path=str(kd_cache), **common)
        add("kd", r["final"]["eval_acc"], time.perf_counter() - t0)
        extra["kd_ce_epochs"] = kd_epochs
        partial(res, arms, times, extra, a, t_all)

    for seed in range(a.ablation_seeds):  # ablations reuse the top-k run's scores, dedup and selection
        base = work / f"ssld-s{seed}"
        for name, kw in (("loss_js", {"loss": "js"}), ("loss_kl", {"loss": "kl"}),
                         ("teacher_bn_train", {"teacher_bn": "train", "cache_teacher": False}),
                         ("teacher_bn_eval_live", {"cache_teacher": False})):
            t0 = time.perf_counter()
            out = fresh_run(work / f"{name}-s{seed}", base)
            rep = run_ssld(out, seed, resume=True, finetune_epochs=0, **kw)
            add(name + "_nofinetune", rep["distill_eval_acc"], time.perf_counter() - t0)
            partial(res, arms, times, extra, a, t_all)
    partial(res, arms, times, extra, a, t_all, final=True)


def dedup_probe(a):
    """How well near-duplicate detection in the teacher's embedding finds perturbed copies of test images: the
    centred cosine of each planted copy with its original's nearest test image, and of distinct training images."""
    import io

    from PIL import Image

    from hubtune.data import ArrayDataset, transform_for
    from hubtune.recipes.ssld import _cosine_nearest, _features
    from hubtune.tuning.teachers import load_teacher

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    hm, cfg = load_teacher(f"local-dir:{Path(a.work) / 'teacher'}")
    tf = transform_for(cfg)
    test, train = create_dataset("fashion-mnist", "test"), create_dataset("fashion-mnist", "train")
    rng = np.random.default_rng(2)
    ev_idx = np.sort(rng.choice(len(test), size=a.probe_eval, replace=False))
    ev = np.stack([np.asarray(test.image(int(i))) for i in ev_idx])
    planted = ev[:a.probe_copies].astype(np.int16)
    distinct = np.stack([np.asarray(train.image(int(i))) for i in rng.choice(len(train), a.probe_copies * 4,
                                                                              replace=False)])

    def jpeg(x, q):
        buf = io.BytesIO()
        Image.fromarray(x.astype(np.uint8)).save(buf, "JPEG", quality=q)
        return np.asarray(Image.open(buf)).astype(np.int16)

    def resize(x):
        im = Image.fromarray(x.astype(np.uint8))
        return np.asarray(im.resize((22, 22), Image.BILINEAR).resize((28, 28), Image.BILINEAR)).astype(np.int16)

    kinds = {"brightness+3": lambda x: x + 3, "contrast*1.02": lambda x: np.round(x * 1.02),
             "jpeg_q98": lambda x: jpeg(x, 98), "jpeg_q90": lambda x: jpeg(x, 90),
             "noise+-1": lambda x: x + rng.integers(-1, 2, x.shape), "noise+-3": lambda x: x + rng.integers(-3, 4, x.shape),
             "resize_22px": resize}
    zeros = lambda n: np.zeros(n, dtype=np.int64)  # noqa: E731
    ef = _features(hm.module, ArrayDataset("ev", ev, zeros(len(ev))), tf, 64, None)
    center = ef.astype(np.float64).mean(0)
    _, dcos = _cosine_nearest(_features(hm.module, ArrayDataset("d", distinct, zeros(len(distinct))), tf, 64, None),
                              ef, center)
    out = {"teacher": "the benchmark's teacher (EfficientNet-Lite0 fine-tuned, 32 px)", "eval_images": a.probe_eval,
           "copies_per_kind": a.probe_copies, "distinct_images": len(distinct),
           "distinct_max_cosine": {"max": float(dcos.max()), "q99": float(np.quantile(dcos, .99)),
                                   "median": float(np.median(dcos)),
                                   "removed_at_0.95": float(np.mean(dcos >= 0.95)),
                                   "removed_at_0.97": float(np.mean(dcos >= 0.97))},
           "copies": {}}
    for name, fn in kinds.items():
        cp = np.stack([np.clip(fn(x), 0, 255).astype(np.uint8) for x in planted])
        idx, cos = _cosine_nearest(_features(hm.module, ArrayDataset(name, cp, zeros(len(cp))), tf, 64, None), ef,
                                   center)
        out["copies"][name] = {"min": float(cos.min()), "median": float(np.median(cos)),
                               "nearest_is_original": float(np.mean(idx == np.arange(len(idx)))),
                               "found_at_0.95": float(np.mean(cos >= 0.95)), "found_at_0.97": float(np.mean(cos >= 0.97))}
        print(name, out["copies"][name], flush=True)
    out["seconds"] = time.perf_counter() - t0
    out["machine"] = "2-core AMD EPYC (Zen 5, avx512_bf16, no AMX), shared with other jobs; torch threads 1"
    write_json(Path(a.out), out)


def partial(res, arms, times, extra, a, t_all, final=False):
    summ = {k: ms(v) for k, v in arms.items()}
    out = dict(res)
    out.update({
        "benchmark": "bench_ssld.py",
        "complete": final,
        "machine": "2-core AMD EPYC (Zen 5, avx512_bf16, no AMX), shared with other jobs; torch threads 1",
        "python": platform.python_version(), "torch": torch.__version__,
        "setting": {"dataset": "fashion-mnist (Debian package)", "input_size": a.size, "labeled": a.labeled,
                    "pool": a.pool, "ood_in_pool": a.ood, "eval_images": a.eval, "dedup_against": "fashion-mnist test (10,000)",
                    "per_class": a.per_class, "student": a.student + " (pretrained=False)",
                    "teacher": "pkg:efficientnet_lite0 fine-tuned on the labelled set",
                    "distill_epochs": a.distill_epochs, "finetune_epochs": a.finetune_epochs, "lr": a.lr,
                    "finetune_lr": a.lr / 10, "batch_size": 64, "augment": False, "loss": "skl", "temperature": 1.0,
                    "teacher_bn": "eval", "multi_assign": "first", "seeds": a.seeds,
                    "ablation_seeds": a.ablation_seeds,
                    "labelled split": "fixed (stratified, seed 0) across seeds; the seed varies the student's init, "
                                      "data order and the random pool"},
        "reductions": [
            f"images {a.size}x{a.size} (Fashion-MNIST is 28x28; EfficientNet-Lite0 expects 224)",
            f"pool: {a.pool} images drawn from the 59,000 remaining training images, not all of them",
            f"evaluation on {a.eval} of the 10,000 test images (dedup against all 10,000)",
            f"teacher fine-tuned {a.teacher_epochs} epochs, distillation {a.distill_epochs} epochs, fine-tune "
            f"{a.finetune_epochs} epochs, no augmentation",
            f"{a.seeds} seeds for the target arms (ce, kd, ssld with/without fine-tune, random pool); "
            f"{a.ablation_seeds} seed(s) for the loss and teacher-BN ablations",
            "one teacher and one labelled split for all seeds",
        ],
        "arms": summ, "seconds_per_arm": {k: ms(v) for k, v in times.items()}, **extra,
        "seconds_total": time.perf_counter() - t_all,
    })
    if "ssld" in summ and "kd" in summ and summ["ssld"]["std"] is not None and summ["kd"]["std"] is not None:
        s, k, r = summ["ssld"], summ["kd"], summ.get("random_pool")
        out["targets"] = {
            "ssld_minus_kd": s["mean"] - k["mean"],
            "ssld_above_kd_by_more_than_one_std": bool(s["mean"] - k["mean"] > max(s["std"], k["std"])),
            "topk_minus_random_pool": (s["mean"] - r["mean"]) if r else None,
            "topk_above_random_pool": bool(r and s["mean"] > r["mean"]),
        }
    write_json(Path(a.out), out)


if __name__ == "__main__":
    main()
