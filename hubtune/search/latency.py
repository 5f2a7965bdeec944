"""Latency of a model measured properly, and its deterministic cost proxies (parameters, FLOPs).

What is timed is the model alone: eval mode, ``torch.inference_mode``, a fixed input tensor made once (no data
loading, no transform, no host-device copy), the deployment layout (``channels_last`` memory format and
``dtype``), after ``warmup`` untimed calls, with the intra-op threads pinned (``threads``, default 1). The clock
is :class:`torch.utils.benchmark.Timer` (``blocked_autorange``: it picks a number of calls per measurement so
that the timer's overhead is negligible, and repeats measurements for at least ``min_run_time`` seconds); the
figures are the **median** over those measurements and the interquartile range as the spread. Batch-1 latency
(ms per call) and batch-N throughput (images/s) are measured and reported separately: they answer different
questions (an interactive request versus bulk scoring).

``fresh=True`` (:func:`measure_latency_fresh`) measures in a new Python process (``python -m
hubtune.search.latency``), so the allocator, caches and thread pools left by training do not colour the figure.

Parameters and FLOPs do not vary from run to run: FLOPs are counted by :class:`torch.utils.flop_counter.FlopCounterMode`
on one batch-1 forward (a multiply-add counts 2; convolutions and matrix products, which dominate, are counted;
element-wise operations are not).

Run as a program: ``python -m hubtune.search.latency local-dir:PATH --input-size 3 32 32 --threads 1`` prints
the JSON of :func:`measure_latency`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Sequence

import torch

from ..errors import ConfigError, HubtuneError

__all__ = ["measure_latency", "measure_latency_fresh", "count_params", "count_flops", "LatencyError"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class LatencyError(HubtuneError, RuntimeError):
    """The latency measurement process failed; the message carries its error output."""


def count_params(model: torch.nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def count_flops(model: torch.nn.Module, input_size: Sequence[int]) -> int:
    """FLOPs of one forward pass on one ``input_size`` image (``FlopCounterMode``; multiply-add = 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    was = model.training
    model.eval()
    try:
        x = torch.zeros(1, *input_size)
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(x)
        return int(counter.get_total_flops())
    finally:
        model.train(was)


def _check(input_size, batch_size, threads, dtype, warmup, min_run_time, clock="wall"):
    if clock not in CLOCKS:
        raise ConfigError(f"latency clock={clock!r}; choose wall (elapsed time) or cpu (the timing thread's CPU time)")
    if clock == "cpu" and threads != 1:
        raise ConfigError(f"latency clock='cpu' with threads={threads}: the CPU time of the timing thread is the "
                          "latency only when the model runs on that one thread; use threads=1 or clock='wall'")
    if (not isinstance(input_size, (list, tuple)) or len(input_size) != 3
            or not all(isinstance(s, int) and s > 0 for s in input_size)):
        raise ConfigError(f"latency input_size={input_size!r}; give (channels, height, width), e.g. (3, 224, 224)")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ConfigError(f"latency batch_size={batch_size!r}; give a whole number >= 1 (the throughput batch)")
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise ConfigError(f"latency threads={threads!r}; give a whole number >= 1")
    if dtype not in DTYPES:
        raise ConfigError(f"latency dtype={dtype!r}; choose one of {', '.join(DTYPES)}")
    if not isinstance(warmup, int) or warmup < 0:
        raise ConfigError(f"latency warmup={warmup!r}; give a whole number >= 0")
    if not isinstance(min_run_time, (int, float)) or not min_run_time > 0:
        raise ConfigError(f"latency min_run_time={min_run_time!r}; give seconds > 0")


CLOCKS = ("wall", "cpu")


@torch.inference_mode()
def _time(model, x, threads: int, warmup: int, min_run_time: float, clock: str = "wall") -> dict:
    import time
    import timeit

    from torch.utils import benchmark

    for _ in range(warmup):
        model(x)
    timer = benchmark.Timer(stmt="model(x)", globals={"model": model, "x": x}, num_threads=threads,
                            timer=time.thread_time if clock == "cpu" else timeit.default_timer)
    m = timer.blocked_autorange(min_run_time=min_run_time)
    return {"median_s": float(m.median), "iqr_s": float(m.iqr), "measurements": len(m.times),
            "calls_per_measurement": int(m.number_per_run)}


def measure_latency(model: torch.nn.Module, input_size: Sequence[int], *, batch_size: int = 32, threads: int = 1,
                    channels_last: bool = True, dtype: str = "float32", warmup: int = 10,
                    min_run_time: float = 0.5, clock: str = "wall") -> dict:
    """Batch-1 latency and batch-``batch_size`` throughput of ``model`` on CPU in this process (see the module
    docstring). Returns ``latency_ms`` (median), ``latency_iqr_ms``, ``throughput_ips`` (images/s from the
    median batch time), ``throughput_iqr_ms`` (spread of the batch time), ``params``, ``flops`` and the
    measurement settings. The model is measured on a copy of its layout (it is left as it was: mode, memory
    format and dtype are restored). ``clock``: ``"wall"`` (elapsed time, what a dedicated machine serves) or
    ``"cpu"`` (the CPU time of the timing thread, ``time.thread_time``; ``threads=1`` only): on a machine shared with
    other jobs the elapsed time includes the time the thread waited for a core, the CPU time does not."""
    input_size = tuple(int(s) for s in input_size) if isinstance(input_size, (list, tuple)) else input_size
    _check(input_size, batch_size, threads, dtype, warmup, min_run_time, clock)
    import copy

    params, flops = count_params(model), count_flops(model, input_size)
    net = copy.deepcopy(model).eval().to(DTYPES[dtype])
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net = net.to(memory_format=fmt)
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(1, *input_size, generator=g).to(DTYPES[dtype]).contiguous(memory_format=fmt)
    xb = torch.randn(batch_size, *input_size, generator=g).to(DTYPES[dtype]).contiguous(memory_format=fmt)
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        one = _time(net, x1, threads, warmup, min_run_time, clock)
        many = _time(net, xb, threads, max(1, warmup // 4), min_run_time, clock)
    finally:
        torch.set_num_threads(prev)
    return {"latency_ms": one["median_s"] * 1e3, "latency_iqr_ms": one["iqr_s"] * 1e3,
            "throughput_ips": batch_size / many["median_s"], "throughput_iqr_ms": many["iqr_s"] * 1e3,
            "params": params, "flops": flops,
            "latency_setup": {"input_size": list(input_size), "batch_size": batch_size, "threads": threads,
                              "channels_last": bool(channels_last), "dtype": dtype, "warmup": warmup,
                              "min_run_time": float(min_run_time), "measurements_b1": one["measurements"],
                              "measurements_bN": many["measurements"], "fresh_process": False, "clock": clock,
                              "timer": "torch.utils.benchmark.Timer.blocked_autorange"}}


def measure_latency_fresh(spec: str, input_size: Sequence[int], *, batch_size: int = 32, threads: int = 1,
                          channels_last: bool = True, dtype: str = "float32", warmup: int = 10,
                          min_run_time: float = 0.5, clock: str = "wall", timeout: float = 600.0) -> dict:
    """:func:`measure_latency` of the model ``spec`` (e.g. ``local-dir:PATH``, a saved student) in a new
    Python process, started with ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` set to ``threads``."""
    input_size = tuple(int(s) for s in input_size)
    _check(input_size, batch_size, threads, dtype, warmup, min_run_time, clock)
    cmd = [sys.executable, "-m", "hubtune.search.latency", str(spec), "--input-size", *map(str, input_size),
           "--batch-size", str(batch_size), "--threads", str(threads), "--dtype", dtype, "--warmup", str(warmup),
           "--min-run-time", str(min_run_time), "--clock", clock] + ([] if channels_last else ["--no-channels-last"])
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise LatencyError(f"measuring the latency of {spec} took more than {timeout:.0f} s; lower min_run_time "
                           "or measure in this process (latency_process='same')") from None
    if proc.returncode != 0:
        raise LatencyError(f"measuring the latency of {spec} in a fresh process failed (exit {proc.returncode}): "
                           f"{proc.stderr.strip()[-800:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["latency_setup"]["fresh_process"] = True
    return out


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m hubtune.search.latency",
                                description="Latency (batch 1) and throughput (batch N) of one model, as JSON.")
    p.add_argument("spec")
    p.add_argument("--input-size", type=int, nargs=3, required=True)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--min-run-time", type=float, default=0.5)
    p.add_argument("--no-channels-last", action="store_true")
    p.add_argument("--clock", default="wall", choices=CLOCKS)
    a = p.parse_args(argv)
    from ..hub import load_candidate

    model = load_candidate(a.spec, pretrained=True).module
    res = measure_latency(model, tuple(a.input_size), batch_size=a.batch_size, threads=a.threads,
                          channels_last=not a.no_channels_last, dtype=a.dtype, warmup=a.warmup,
                          min_run_time=a.min_run_time, clock=a.clock)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
