"""Distillation from a teacher service against the plain ways, in one run. Writes bench/results/service.json.

    python bench/bench_service.py [--student mobilenetv3_small_100] [--teacher pkg:efficientnet_lite2]
                                  [--images 1024] [--epochs 2] [--size 64]

Student training throughput (images/s of the training loop, the engine's own figure) for four arms on the same
Fashion-MNIST images, student and teacher:

1. plain: fine-tune the student alone (no teacher), on both cores and on one (the served arm's student's share);
2. KD, teacher in process: the teacher's forward runs in the student's process, between the student's steps;
3. KD, served teacher: ``hubtune serve-teacher`` (Ray Serve, one replica) and ``--teacher serve:NAME``; the
   client keeps ``window`` requests in flight, so the teacher's inference overlaps the student's steps;
4. KD, cached teacher: the teacher's outputs computed beforehand (``hubtune cache-teacher``) and read back.

The comparison is about overlap, not extra hardware: on a CPU machine the student gets one core (torch threads
1) and the replica one core (``num_cpus=1`` and 1 thread), while the in-process arm has both cores (threads 2);
the plain and cached arms have both cores too. On a GPU the same script runs unchanged (student and replica
then share the device). Also reported: request latency percentiles and the time the student stalled waiting
for the teacher per epoch. EDL (PaddlePaddle) reported 82.8% of plain speed with remote teachers and 35.9%
with the teacher in process (ResNet50_vd student, ResNeXt101 teacher, ImageNet, GPUs).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from _seeds import machine  # noqa: E402

from hubtune._io import write_json  # noqa: E402


def arm(method: str, threads: int, out: Path, **kw) -> dict:
    """One ``hubtune.tune`` run with ``threads`` torch threads in this process; the engine's own training-loop
    throughput (images/s per epoch, evaluation excluded)."""
    import hubtune

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    rep = hubtune.tune(method, out=str(out), **kw)
    wall = time.perf_counter() - t0
    hist = rep["history"]
    return {"images_per_second": [h["train_images_per_second"] for h in hist],
            "steady_images_per_second": hist[-1]["train_images_per_second"], "wall_seconds": wall,
            "final_eval_acc": hist[-1].get("eval_acc"), "threads": threads}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--student", default="mobilenetv3_small_100", help="a timm architecture, randomly initialised")
    ap.add_argument("--teacher", default="pkg:efficientnet_lite2",
                    help="fine-tuned on the target first (1 epoch), then the teacher of every KD arm")
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=64, help="input size of student and teacher")
    ap.add_argument("--window", type=int, default=4)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "service.json"))
    args = ap.parse_args()
    import hubtune
    from hubtune.cli import main as cli
    from hubtune.hub import ModelSpec
    from hubtune.serving.deployment import serve_teacher

    cores = torch.get_num_threads()
    view = {"input_size": args.size, "crop_pct": 1.0}
    student = str(ModelSpec.parse(args.student).with_data_config(**view))
    work = Path(tempfile.mkdtemp(prefix="hubtune-bench-service-"))
    common = dict(model=student, dataset=args.dataset, epochs=args.epochs, batch_size=args.batch, seed=0,
                  augment=False, pretrained=False, lr=0.01)
    doc = {"machine": machine(), "settings": vars(args), "notes": __doc__, "arms": {}, "cores": cores}
    print(f"teacher: {args.teacher} fine-tuned on {args.dataset} for 1 epoch", flush=True)
    torch.set_num_threads(cores)
    hubtune.tune("finetune", model=str(ModelSpec.parse(args.teacher).with_data_config(**view)),
                 dataset=args.dataset, epochs=1, batch_size=args.batch, seed=0, augment=False, lr=0.01,
                 out=str(work / "teacher"))
    teacher = f"local-dir:{work / 'teacher'}"
    arms = doc["arms"]
    print("plain", flush=True)
    arms["plain"] = arm("finetune", cores, work / "plain", **common)
    print("plain, one thread (the core the served arm's student has)", flush=True)
    arms["plain_1_thread"] = arm("finetune", 1, work / "plain1", **common)
    print("kd, teacher in process", flush=True)
    arms["kd_in_process"] = arm("kd", cores, work / "inproc", teacher=teacher, **common)
    print("kd, teacher in process, one thread (as the served arm's student; its result should match)", flush=True)
    arms["kd_in_process_1_thread"] = arm("kd", 1, work / "inproc1", teacher=teacher, **common)
    print("kd, cached teacher", flush=True)
    t0 = time.perf_counter()
    assert cli(["cache-teacher", "--teacher", teacher, "--model", student, "--dataset", args.dataset,
                "--no-augment", "--cache-dir", str(work / "tcache")]) == 0
    cache_seconds = time.perf_counter() - t0
    arms["kd_cached"] = {**arm("kd", cores, work / "cached", teacher=teacher, cache_teacher=True,
                               cache_dir=str(work / "tcache"), **common), "cache_seconds": cache_seconds}
    print("kd, served teacher", flush=True)
    served = serve_teacher(teacher, name="bench-teacher", replicas=1, max_batch=args.batch,
                           num_cpus=1, env={"OMP_NUM_THREADS": "1"})
    try:
        from hubtune.tuning.methods import kd as kd_module

        seen = []
        real = kd_module.served_teacher
        kd_module.served_teacher = lambda spec, **kw: seen.append(real(spec, **kw)) or seen[-1]
        try:
            rec = arm("kd", 1, work / "served", teacher="serve:bench-teacher", serve_window=args.window, **common)
        finally:
            kd_module.served_teacher = real
        client = seen[-1].module.client
        st = client.stats
        lat = np.asarray(st["latencies"]) * 1e3
        rec.update({"latency_ms": {f"p{q}": float(np.percentile(lat, q)) for q in (50, 90, 99)} if lat.size else {},
                    "requests": st["requests"], "wait_seconds_per_epoch": st["wait_seconds"] / args.epochs,
                    "stall_seconds_per_epoch": st["stall_seconds"] / args.epochs,
                    "client": client.summary(), "replica": served.info})
        arms["kd_served"] = rec
    finally:
        served.stop()
    plain = arms["plain"]["steady_images_per_second"]
    doc["ratios_vs_plain"] = {k: v["steady_images_per_second"] / plain for k, v in arms.items() if k != "plain"}
    doc["served_vs_plain_1_thread"] = (arms["kd_served"]["steady_images_per_second"]
                                       / arms["plain_1_thread"]["steady_images_per_second"])
    doc["edl_reported"] = {"remote_teacher": 0.828, "in_process_teacher": 0.359}
    for k, v in doc["ratios_vs_plain"].items():
        print(f"{k:16s} {v:.1%} of plain ({arms[k]['steady_images_per_second']:.1f} img/s)", flush=True)
    write_json(Path(args.out), doc)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
