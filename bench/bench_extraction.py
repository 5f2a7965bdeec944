"""Extraction near the limit: for each model, in one run, a plain fp32 eager timm loop, hubtune's
end-to-end extraction (decode included) and the forward-only limit of the same model on this CPU.
Writes bench/results/extraction.json.

    python bench/bench_extraction.py                       # full run (the lead's quiet-machine run)
    python bench/bench_extraction.py --quick               # smoke run: tiny sizes, one compile config
    python bench/bench_extraction.py --models pkg:efficientnet_lite0 --no-compile --out /tmp/x.json

Per model (``timm:resnet50`` with random weights, ``pkg:efficientnet_lite0`` with its packaged weights):

1. plain: what a user writes first. In-memory PIL images transformed one by one with timm's eval
   transform (``timm.data.create_transform(**data_config)``), stacked by 32, ``model(x)`` in fp32 eager under
   ``torch.no_grad``. Decode included.
2. limit: forward passes only (hubtune's ``Candidate.forward``: features and source logits) over a
   synthetic batch already in memory. A staged search, each stage keeping the best of the one before:
   precision (fp32, bf16 autocast, bf16 weights, fp32 with oneDNN bf16 math) x channels-last at batch 32;
   batch size; threads; then ``torch.compile`` (inductor modes, with and without inductor ``freezing``, each
   in a fresh process with a fresh inductor cache so its cold compile time is measured, then its warm,
   cached recompile); then OpenMP / oneDNN environment variables (fresh processes). Every configuration's
   img/s is reported, with the best.
3. hubtune: ``hubtune.features.extract`` on digits resized by the model's transform (decode, transform,
   forward, float32 features and logits out), with the current ``ExtractOptions`` defaults and with the
   settings the search found (eager, and compiled when compiling won: cold, compile included, then warm).

Ratios: e2e/limit (target >= 0.85), e2e/plain (target >= 5 for the ResNet-50-class model), limit/plain;
compile break-even (rows from which compiling repays its cold compile time). The limit is also expressed as
achieved TFLOP/s (FLOPs per image from ``torch.utils.flop_counter.FlopCounterMode`` on one image) against
the chip's bf16 matrix peak (cores x clock x bf16 FLOP/cycle/core from the microarchitecture, the per-cycle
rate and the clock checked by a small assembly probe when gcc is present) and against a measured bf16
matmul. Timings are medians over timed repetitions after warm-up; the best repetition is kept alongside.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

DEFAULT_MODELS = "timm:resnet50,pkg:efficientnet_lite0"
PRECISIONS = ("fp32", "bf16-autocast", "bf16-weights", "fp32-onednn-bf16")
ENV_VARIANTS = {  # name -> (environment, precision override or None)
    "omp_proc_bind_close": ({"OMP_PROC_BIND": "close", "OMP_PLACES": "cores"}, None),
    "omp_wait_active": ({"OMP_WAIT_POLICY": "ACTIVE"}, None),
    "omp_wait_passive": ({"OMP_WAIT_POLICY": "PASSIVE"}, None),
    "onednn_fpmath_bf16_on_fp32": ({"ONEDNN_DEFAULT_FPMATH_MODE": "BF16"}, "fp32"),
}
RESULT_TAG = "BENCH_RESULT "


# ----------------------------------------------------------------------------------------------- machine

def cpu_info() -> dict:
    info = {"model_name": platform.processor() or platform.machine(), "vendor": None, "family": None,
            "model": None, "nominal_mhz": None, "max_mhz": None, "hypervisor": None}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        kv = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        kv = {k.strip(): v.strip() for k, v in kv.items()}
        info["model_name"] = kv.get("Model name", info["model_name"])
        info["vendor"] = kv.get("Vendor ID")
        info["family"] = int(kv["CPU family"]) if kv.get("CPU family", "").isdigit() else None
        info["model"] = int(kv["Model"]) if kv.get("Model", "").isdigit() else None
        info["max_mhz"] = float(kv["CPU max MHz"]) if kv.get("CPU max MHz") else None
        info["hypervisor"] = kv.get("Hypervisor vendor")
        info["threads_per_core"] = int(kv.get("Thread(s) per core", "1") or 1)
        info["l2"] = kv.get("L2 cache")
        info["l3"] = kv.get("L3 cache")
    except (OSError, subprocess.SubprocessError, ValueError, KeyError):
        pass
    flags = set()
    try:
        text = Path("/proc/cpuinfo").read_text()
        m = re.search(r"^flags\s*:\s*(.*)$", text, re.M)
        flags = set(m.group(1).split()) if m else set()
        m = re.search(r"^cpu MHz\s*:\s*([\d.]+)", text, re.M)
        info["nominal_mhz"] = float(m.group(1)) if m else None
    except OSError:
        pass
    info["cores"] = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info["flags"] = {f: f in flags for f in ("avx2", "fma", "avx512f", "avx512vl", "avx512_vnni", "avx512_bf16",
                                             "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")}
    return info


def _probe_source(bf16: bool) -> str:
    """C with inline assembly: a 1-cycle dependent add chain (clock), then independent accumulators
    (latency hidden) of VDPBF16PS and VFMADD231PS on zmm and ymm (issue rate per cycle). Best of many short
    bursts, so time slices lost to other jobs do not count."""
    regs = range(4, 24)  # 20 independent accumulators, sources in register 0

    def loop(name, op, width):
        body = "".join(f'"{op} %%{width}0, %%{width}0, %%{width}{r}\\n\\t"' for r in regs)
        clob = ",".join(f'"xmm{r}"' for r in regs)
        return (f"static double {name}(long m) {{ double t0 = now(); __asm__ volatile(\n"
                f'"vpxord %%zmm0, %%zmm0, %%zmm0\\n\\t" "mov %0, %%rcx\\n1:\\n\\t"\n{body}\n'
                f'"dec %%rcx\\n\\t" "jnz 1b\\n\\t" :: "r"(m) : "rcx", "cc", "xmm0", {clob});\n'
                f"  return {len(regs)}.0 * m / (now() - t0); }}\n")

    kernels = [("fma_zmm", "vfmadd231ps", "zmm"), ("fma_ymm", "vfmadd231ps", "ymm")]
    if bf16:
        kernels += [("dpbf16_zmm", "vdpbf16ps", "zmm"), ("dpbf16_ymm", "vdpbf16ps", "ymm")]
    src = ["#include <stdio.h>\n#include <time.h>\n",
           "static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t);"
           " return t.tv_sec + t.tv_nsec * 1e-9; }\n",
           "static double chain(long n) { double t0 = now(); long x = 0; for (long i = 0; i < n; i++) {"
           ' __asm__ volatile("add $1, %0\\n\\tadd $1, %0\\n\\tadd $1, %0\\n\\tadd $1, %0\\n\\t'
           'add $1, %0\\n\\tadd $1, %0\\n\\tadd $1, %0\\n\\tadd $1, %0" : "+r"(x)); }'
           " return 8.0 * n / (now() - t0); }\n"]
    src += [loop(*k) for k in kernels]
    names = [k[0] for k in kernels]
    src.append("int main(void) { double best[%d] = {0};\n" % (len(names) + 1))
    src.append("  for (int r = 0; r < 150; r++) { double v;\n")
    src.append("    v = chain(1000000); if (v > best[0]) best[0] = v;\n")
    for i, n in enumerate(names):
        src.append(f"    v = {n}(400000); if (v > best[{i + 1}]) best[{i + 1}] = v;\n")
    src.append("  }\n  printf(\"{\\\"clock_ghz\\\": %.4f")
    for n in names:
        src.append(f", \\\"{n}_per_cycle\\\": %.3f")
    src.append("}\\n\", best[0] / 1e9" + "".join(f", best[{i + 1}] / best[0]" for i in range(len(names))) + ");\n")
    src.append("  return 0; }\n")
    return "".join(src)


def run_probe(info: dict) -> dict | None:
    """Clock and vector issue rates from the assembly probe, or None without gcc / AVX-512."""
    cc = shutil.which("gcc") or shutil.which("cc")
    if not cc or not (info["flags"]["avx512f"] and info["flags"]["avx512vl"]):
        return None
    with tempfile.TemporaryDirectory() as d:
        src, exe = Path(d) / "probe.c", Path(d) / "probe"
        src.write_text(_probe_source(bf16=info["flags"]["avx512_bf16"]))
        try:
            subprocess.run([cc, "-O2", "-mavx512f", "-mavx512vl", str(src), "-o", str(exe)], check=True,
                           capture_output=True, timeout=60)
            runs = [json.loads(subprocess.run([str(exe)], check=True, capture_output=True, text=True,
                                              timeout=120).stdout) for _ in range(3)]
        except (OSError, subprocess.SubprocessError, json.JSONDecodeError) as e:
            return {"error": f"{type(e).__name__}: {e}"}
    return {k: max(r[k] for r in runs) for k in runs[0]}


def bf16_peak(info: dict, probe: dict | None) -> dict:
    """Theoretical bf16 matrix peak: cores x clock x bf16 FLOP/cycle/core."""
    vendor, fam, model, fl = info.get("vendor"), info.get("family"), info.get("model"), info["flags"]
    per_cycle, uarch = None, "unknown"
    if fl["amx_bf16"]:
        per_cycle, uarch = 1024, ("Intel AMX: TDPBF16PS does a 16x16x32 tile product (8192 bf16 MACs) per 16 "
                                  "cycles = 512 MAC = 1024 FLOP/cycle/core")
    elif vendor == "AuthenticAMD" and fam == 0x1A and fl["avx512_bf16"]:
        if model is not None and model < 0x20:
            per_cycle, uarch = 128, ("AMD Zen 5 server core (family 0x1A, model < 0x20): two FMA pipes with a full "
                                     "512-bit datapath -> 2 VDPBF16PS zmm per cycle x 16 fp32 lanes x 2 bf16 "
                                     "products x 2 FLOP (mul+add) = 128 FLOP/cycle/core")
        else:
            per_cycle, uarch = 64, ("AMD Zen 5 client core: 512-bit ops on a 256-bit datapath -> 1 VDPBF16PS zmm "
                                    "per cycle x 64 FLOP = 64 FLOP/cycle/core")
    elif vendor == "AuthenticAMD" and fam == 0x19 and fl["avx512_bf16"]:
        per_cycle, uarch = 64, ("AMD Zen 4 (family 0x19): two 256-bit FMA pipes, 512-bit ops issued as 2x256 -> "
                                "1 VDPBF16PS zmm per cycle x 16 lanes x 2 products x 2 FLOP = 64 FLOP/cycle/core")
    elif vendor == "GenuineIntel" and fl["avx512_bf16"]:
        per_cycle, uarch = 128, ("Intel AVX512_BF16 without AMX (Cooper Lake class): 2 FMA ports x VDPBF16PS zmm "
                                 "(64 FLOP) = 128 FLOP/cycle/core")
    measured_per_cycle = None
    if probe and "dpbf16_zmm_per_cycle" in probe:
        measured_per_cycle = probe["dpbf16_zmm_per_cycle"] * 64
        if per_cycle is None:
            per_cycle, uarch = round(measured_per_cycle / 32) * 32, "from the probe (no table entry)"
    clock_ghz, clock_src = None, None
    if probe and probe.get("clock_ghz"):
        clock_ghz, clock_src = probe["clock_ghz"], "probe: dependent 1-cycle add chain, best burst (boost clock)"
    elif info.get("max_mhz"):
        clock_ghz, clock_src = info["max_mhz"] / 1000, "lscpu CPU max MHz"
    elif info.get("nominal_mhz"):
        clock_ghz, clock_src = info["nominal_mhz"] / 1000, "/proc/cpuinfo cpu MHz"
    cores = info["cores"]
    out = {
        "formula": "peak = cores x clock (GHz) x bf16 FLOP/cycle/core; one VDPBF16PS zmm = 16 fp32 lanes x 2 bf16 "
                   "products each accumulated = 64 FLOP",
        "uarch": uarch, "cores": cores, "bf16_flop_per_cycle_per_core": per_cycle,
        "bf16_flop_per_cycle_per_core_probe": measured_per_cycle,
        "clock_ghz": clock_ghz, "clock_source": clock_src, "nominal_clock_ghz": (info.get("nominal_mhz") or 0) / 1000,
        "bf16_peak_tflops": cores * clock_ghz * per_cycle / 1000 if per_cycle and clock_ghz else None,
        "bf16_peak_tflops_at_nominal_clock":
            cores * info["nominal_mhz"] / 1000 * per_cycle / 1000 if per_cycle and info.get("nominal_mhz") else None,
        "note": "the clock is one core's boost clock; an all-core AVX-512 clock may be lower, so this peak is an "
                "upper bound",
    }
    if probe and "fma_zmm_per_cycle" in probe and clock_ghz:
        out["fp32_fma_zmm_per_cycle_probe"] = probe["fma_zmm_per_cycle"]
        out["fp32_peak_tflops"] = cores * clock_ghz * round(probe["fma_zmm_per_cycle"]) * 32 / 1000
    return out


def matmul_peak(n: int, min_time: float) -> dict:
    out = {"n": n, "threads": torch.get_num_threads()}
    for dtype, name in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        r = measure(lambda: torch.mm(a, b), 1, min_time=min_time, min_reps=3, warmup=1)
        out[f"{name}_tflops"] = 2 * n ** 3 / r["batch_s_median"] / 1e12
        out[f"{name}_tflops_best"] = 2 * n ** 3 / r["batch_s_best"] / 1e12
    return out


# ----------------------------------------------------------------------------------------------- timing

def measure(step, batch: int, min_time: float, min_reps: int = 3, warmup: int = 1, max_reps: int = 50) -> dict:
    """Warm-up calls, then timed calls until ``min_time`` has passed and at least ``min_reps`` ran."""
    for _ in range(warmup):
        step()
    times = []
    end = time.perf_counter() + min_time
    while len(times) < min_reps or (time.perf_counter() < end and len(times) < max_reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {"img_per_s": batch / med, "img_per_s_best": batch / min(times), "reps": len(times),
            "batch_s_median": med, "batch_s_best": min(times)}


# ----------------------------------------------------------------------------------------------- models

def load(spec: str):
    from hubtune.hub import ModelSpec, load_candidate

    return load_candidate(spec, pretrained=ModelSpec.parse(spec).kind != "timm")


@contextlib.contextmanager
def onednn_fp32_math(mode: str | None):
    """``torch.backends.mkldnn`` fp32 precision ("bf16": oneDNN runs fp32 convs/matmuls in bf16)."""
    be = torch.backends.mkldnn
    if mode is None or not hasattr(be, "fp32_precision"):
        yield
        return
    saved = (be.fp32_precision, be.conv.fp32_precision, be.matmul.fp32_precision)
    try:
        be.conv.fp32_precision = mode
        be.matmul.fp32_precision = mode
        yield
    finally:
        be.conv.fp32_precision, be.matmul.fp32_precision = saved[1], saved[2]


def make_step(cand, precision: str, channels_last: bool, batch: int, compile_mode: str | None = None):
    """A forward-only step over a synthetic batch in memory; returns (step, forward) so a caller can
    recompile. Uses a deep copy of the module so configurations do not leak into each other."""
    module = copy.deepcopy(cand.module).eval()
    if channels_last:
        module = module.to(memory_format=torch.channels_last)
    if precision == "bf16-weights":
        module = module.to(torch.bfloat16)
    c = dataclasses.replace(cand, module=module)
    forward = c.forward
    if compile_mode:
        forward = torch.compile(c.forward, mode=None if compile_mode == "default" else compile_mode)
    x = torch.randn(batch, *cand.data_config["input_size"], generator=torch.Generator().manual_seed(0))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if precision == "bf16-weights":
        x = x.to(torch.bfloat16)
    autocast = precision == "bf16-autocast"
    math_mode = "bf16" if precision == "fp32-onednn-bf16" else None

    def step():
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), \
                onednn_fp32_math(math_mode):
            return forward(x)

    return step, c


def flops_per_image(cand) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(1, *cand.data_config["input_size"])
    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        cand.forward(x)
    return float(fc.get_total_flops())


# ----------------------------------------------------------------------------------------------- (a) plain

def plain_loop(cand, images, batch: int = 32) -> dict:
    """The naive user loop: timm transform per image, stack, fp32 eager model(x), no_grad."""
    import timm.data

    model = copy.deepcopy(cand.module).float().eval()
    transform = timm.data.create_transform(**{k: v for k, v in cand.data_config.items()
                                              if k in ("input_size", "interpolation", "mean", "std", "crop_pct",
                                                       "crop_mode")}, is_training=False)
    t0 = time.perf_counter()
    with torch.no_grad():
        for b in range(0, len(images), batch):
            x = torch.stack([transform(img.convert("RGB")) for img in images[b:b + batch]])
            model(x)
    sec = time.perf_counter() - t0
    return {"images": len(images), "batch_size": batch, "seconds": sec, "img_per_s": len(images) / sec}


# ----------------------------------------------------------------------------------------------- (b) limit

def worker_main(cfg: dict) -> dict:
    """One configuration in a fresh process (compile, environment variables): returns its measurement."""
    torch.set_num_threads(cfg["threads"])
    if cfg.get("freezing") is not None:
        import torch._inductor.config as ic

        ic.freezing = bool(cfg["freezing"])
    cand = load(cfg["spec"])
    step, c = make_step(cand, cfg["precision"], cfg["channels_last"], cfg["batch"], cfg.get("compile_mode"))
    res = {}
    if cfg.get("compile_mode"):
        t0 = time.perf_counter()
        step()
        res["first_call_s"] = time.perf_counter() - t0
    res.update(measure(step, cfg["batch"], cfg["min_time"], cfg["min_reps"], warmup=1))
    if cfg.get("compile_mode"):
        res["compile_s"] = max(0.0, res["first_call_s"] - res["batch_s_median"])
        if cfg.get("warm_recompile"):
            # the same model compiled again in a fresh dynamo state: inductor's on-disk caches are warm
            torch._dynamo.reset()
            step2, _ = make_step(cand, cfg["precision"], cfg["channels_last"], cfg["batch"], cfg["compile_mode"])
            t0 = time.perf_counter()
            step2()
            res["warm_compile_s"] = max(0.0, time.perf_counter() - t0 - res["batch_s_median"])
    return res


def run_worker(cfg: dict, env: dict | None, timeout: float) -> dict:
    """Runs ``worker_main(cfg)`` in a child process with extra environment and a fresh inductor cache."""
    with tempfile.TemporaryDirectory(prefix="bench_extraction_inductor_") as cache:
        full_env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "PYTHONWARNINGS": "ignore", **(env or {})}
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(cfg)]
        t0 = time.perf_counter()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env,
                               cwd=str(Path(__file__).resolve().parent.parent))
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s", "wall_s": time.perf_counter() - t0}
    for line in reversed(p.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            out = json.loads(line[len(RESULT_TAG):])
            out["wall_s"] = time.perf_counter() - t0
            return out
    tail = " ".join((p.stderr or p.stdout).split()[-60:])
    return {"error": f"worker failed (rc={p.returncode}): {tail}", "wall_s": time.perf_counter() - t0}


def config_name(c: dict) -> str:
    parts = [c["precision"], "CL" if c["channels_last"] else "NCHW", f"bs{c['batch']}", f"t{c['threads']}"]
    if c.get("compile_mode"):
        parts.append(f"compile={c['compile_mode']}" + ("+freezing" if c.get("freezing") else ""))
    else:
        parts.append("eager")
    if c.get("env_name"):
        parts.append(c["env_name"])
    return " ".join(parts)


def limit_search(cand, spec: str, args, log) -> dict:
    table = []
    max_threads = args.max_threads

    def stage(name, cfgs):
        """Eager configurations of one stage, measured round-robin (one batch of each per round) so that
        drifting load from other jobs falls on all of them alike."""
        steps, rows = {}, []
        for precision, cl, batch, threads in cfgs:
            cfg = {"precision": precision, "channels_last": cl, "batch": batch, "threads": threads,
                   "compile_mode": None}
            row = {"name": config_name(cfg), "stage": name, **cfg}
            try:
                steps[row["name"]] = make_step(cand, precision, cl, batch)[0]
            except Exception as e:  # a precision this build or CPU cannot run
                row["error"] = f"{type(e).__name__}: {e}"[:300]
            rows.append(row)
        timed = {r["name"]: [] for r in rows if r["name"] in steps}

        def call(row):
            torch.set_num_threads(row["threads"])
            try:
                t0 = time.perf_counter()
                steps[row["name"]]()
                return time.perf_counter() - t0
            finally:
                torch.set_num_threads(max_threads)

        for row in rows:  # warm-up
            if row["name"] in steps:
                try:
                    call(row)
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {e}"[:300]
                    del steps[row["name"]], timed[row["name"]]
        end = time.perf_counter() + args.min_time * len(timed)
        rounds = 0
        while timed and (rounds < args.min_reps or (time.perf_counter() < end and rounds < 50)):
            for row in rows:
                if row["name"] in timed:
                    timed[row["name"]].append(call(row))
            rounds += 1
        for row in rows:
            t = timed.get(row["name"])
            if t:
                med = statistics.median(t)
                row.update({"img_per_s": row["batch"] / med, "img_per_s_best": row["batch"] / min(t),
                            "reps": len(t), "batch_s_median": med, "batch_s_best": min(t)})
            table.append(row)
            log(f"  {row['name']}: " + (f"{row['img_per_s']:.1f} img/s (best rep {row['img_per_s_best']:.1f})"
                                        if "img_per_s" in row else row["error"]))
        steps.clear()
        return rows

    def best(rows):
        ok = [r for r in rows if "img_per_s" in r]
        return max(ok, key=lambda r: r["img_per_s"]) if ok else None

    base_bs = 32 if 32 in args.batch_sizes else args.batch_sizes[0]
    precisions = [p for p in PRECISIONS if p in args.precisions]
    if "fp32-onednn-bf16" in precisions and not hasattr(torch.backends.mkldnn, "fp32_precision"):
        precisions.remove("fp32-onednn-bf16")
    # stage 1: precision x memory format at batch 32
    b1 = best(stage("precision x channels_last", [
        (p, cl, base_bs, max_threads) for p in precisions
        for cl in ((False, True) if p != "fp32-onednn-bf16" else (True,))]))
    if b1 is None:
        raise RuntimeError("no eager configuration ran")
    # stage 2: batch size (the winner of stage 1 measured again alongside)
    b2 = best(stage("batch size", [(b1["precision"], b1["channels_last"], bs, max_threads)
                                   for bs in args.batch_sizes]))
    # stage 3: threads
    b_eager = best(stage("threads", [(b2["precision"], b2["channels_last"], b2["batch"], th)
                                     for th in args.threads]))

    # stage 4: torch.compile, each configuration in a fresh process with a cold inductor cache
    compiled = []
    cprec = b_eager["precision"] if b_eager["precision"] != "fp32-onednn-bf16" else "bf16-autocast"

    def comp(mode, freezing, batch, threads=None, warm=True, precision=None):
        cfg = {"spec": spec, "precision": precision or cprec, "channels_last": b_eager["channels_last"], "batch": batch,
               "threads": threads or b_eager["threads"], "compile_mode": mode, "freezing": freezing,
               "min_time": args.min_time, "min_reps": args.min_reps, "warm_recompile": warm}
        log(f"  compiling {config_name(cfg)} (fresh process, cold cache) ...")
        r = run_worker(cfg, None, args.compile_timeout)
        row = {"name": config_name(cfg), "stage": "compile", **{k: v for k, v in cfg.items() if k != "spec"}, **r}
        table.append(row)
        compiled.append(row)
        log("    " + (f"{r['img_per_s']:.1f} img/s, compile {r['compile_s']:.1f} s cold, "
                       f"{r.get('warm_compile_s', float('nan')):.1f} s warm" if "img_per_s" in r else r["error"]))
        return row

    for mode in args.compile_modes:
        comp(mode, True, b_eager["batch"])
        if mode == "default" and not args.quick:
            comp(mode, False, b_eager["batch"])
    b_comp = best(compiled)
    if b_comp is not None and not args.quick:
        # the best compiled configuration at the neighbouring batch sizes, and with one thread fewer
        others = sorted((bs for bs in args.batch_sizes if bs != b_comp["batch"]),
                        key=lambda bs: abs(math.log2(bs / b_comp["batch"])))[:args.compile_batch_neighbours]
        for bs in others:
            r = comp(b_comp["compile_mode"], b_comp["freezing"], bs, warm=False)
            r["stage"] = "compile batch size"
        b_comp = best(compiled)
    if args.compile_modes and cprec != "fp32" and "fp32" in args.precisions and not args.quick:
        # fp32 compiled too: how much of the bf16 gain compiling recovers where fp32 is required
        r = comp(args.compile_modes[0], True, b_eager["batch"], warm=False, precision="fp32")
        r["stage"] = "compile fp32"
        b_comp = best(compiled)

    # stage 5: environment variables (OpenMP / oneDNN), eager, each in a fresh process with a baseline
    env_rows = []
    if args.env_search:
        def envrun(name, env, precision):
            cfg = {"spec": spec, "precision": precision, "channels_last": b_eager["channels_last"],
                   "batch": b_eager["batch"], "threads": b_eager["threads"], "compile_mode": None, "freezing": None,
                   "min_time": args.min_time, "min_reps": args.min_reps}
            r = run_worker(cfg, env, args.compile_timeout)
            row = {"name": config_name({**cfg, "env_name": name}), "stage": "environment", "env": env,
                   **{k: v for k, v in cfg.items() if k != "spec"}, **r}
            table.append(row)
            env_rows.append(row)
            log(f"  {row['name']}: " + (f"{r['img_per_s']:.1f} img/s" if "img_per_s" in r else r["error"]))
            return row

        # a baseline process (no extra variables) before and after the variants, per precision: a
        # variant counts as helping only if it beats the better of the two
        precs = sorted({b_eager["precision"]} | {p for _, p in ENV_VARIANTS.values() if p})
        base = {p: [envrun(f"baseline-process[{p}]", {}, p)] for p in precs}
        variants = [(envrun(name, env, prec or b_eager["precision"]), prec or b_eager["precision"])
                    for name, (env, prec) in ENV_VARIANTS.items()]
        for p in precs:
            base[p].append(envrun(f"baseline-process[{p}]", {}, p))
        for r, p in variants:
            ok = [b["img_per_s"] for b in base[p] if "img_per_s" in b]
            if "img_per_s" in r and ok:
                r["vs_baseline_process"] = r["img_per_s"] / max(ok)

    overall = best([b_eager] + ([b_comp] if b_comp else []))
    return {"table": table, "best_eager": b_eager, "best_compiled": b_comp, "best": overall,
            "environment": env_rows}


# ----------------------------------------------------------------------------------------------- (c) hubtune

def hubtune_e2e(spec: str, ds, opts: dict, log, label: str, threads: int | None = None, cand=None) -> dict:
    """``extract`` of one freshly loaded candidate, timed around the whole call; ``threads`` sets torch's
    intra-op threads for the call (as a user would: ExtractOptions has no such field unless it gains one)."""
    from hubtune.features import ExtractOptions, extract

    names = {f.name for f in dataclasses.fields(ExtractOptions)}
    if threads is not None:
        opts = {**opts, "num_threads": threads}
    passed = {k: v for k, v in opts.items() if k in names}
    if "chunk_size" in names and "batch_size" in passed:
        passed["chunk_size"] = max(passed["batch_size"], passed.get("chunk_size", ExtractOptions().chunk_size))
    cand = cand if cand is not None else load(spec)
    options = ExtractOptions(**passed)
    saved = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        t0 = time.perf_counter()
        stats = extract([cand], ds, options)
        wall = time.perf_counter() - t0
    finally:
        torch.set_num_threads(saved)
    st = stats[cand.spec]
    out = {"label": label, "options_passed": passed, "options_dropped": sorted(set(opts) - names),
           "options_used": {k: v for k, v in dataclasses.asdict(options).items() if k not in ("cache_dir",)},
           "threads": threads or saved, "images": len(ds), "wall_s": wall, "img_per_s": len(ds) / wall,
           "forward_s": st.seconds, "forward_img_per_s": st.compute_throughput, "extra": st.extra}
    log(f"  hubtune {label}: {out['img_per_s']:.1f} img/s end to end ({wall:.1f} s; forward-only part "
        f"{out['forward_img_per_s']:.1f} img/s), {st.extra}")
    out["_candidate"] = cand
    return out


def decode_rate(cand, ds, threads_list) -> dict:
    """hubtune's transform (PIL -> RGB -> timm eval transform) over the dataset, serially, at each torch
    thread count: the per-image tensor ops are tiny, and intra-op threads can cost more than they give."""
    from hubtune.data import transform_for

    tf = transform_for(cand.data_config)
    saved = torch.get_num_threads()
    out = {"images": len(ds)}
    try:
        for th in threads_list:
            torch.set_num_threads(th)
            t0 = time.perf_counter()
            torch.stack([tf(ds.image(i)) for i in range(len(ds))])
            out[f"img_per_s_threads{th}"] = len(ds) / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(saved)
    out["img_per_s"] = out[f"img_per_s_threads{saved}"] if f"img_per_s_threads{saved}" in out else \
        max(v for k, v in out.items() if k.startswith("img_per_s_threads"))
    return out


# ----------------------------------------------------------------------------------------------- driver

def bench_model(spec: str, args, ds, machine: dict, log) -> dict:
    from hubtune.data import stratified_subsample

    log(f"== {spec}")
    cand = load(spec)
    flops = flops_per_image(cand)
    log(f"  {flops / 1e9:.2f} GFLOP per image ({cand.data_config['input_size']})")
    images = [ds.image(i) for i in range(min(args.plain_samples, len(ds)))]
    plain = plain_loop(cand, images, 32)
    log(f"  plain fp32 eager loop: {plain['img_per_s']:.1f} img/s ({plain['images']} images, decode included)")

    lim = limit_search(cand, spec, args, log)
    best = lim["best"]
    log(f"  limit: {best['name']} {best['img_per_s']:.1f} img/s")

    e2e_ds = stratified_subsample(ds, max_samples=args.samples, seed=0)
    decode = decode_rate(cand, e2e_ds, sorted(set(args.threads) | {args.max_threads}))
    log("  decode + transform alone: " + ", ".join(f"{v:.1f} img/s at {k.split('threads')[1]} threads"
                                                    for k, v in decode.items() if "threads" in k))
    common = {"use_cache": False, "progress": False}
    e2e = {"defaults": hubtune_e2e(spec, e2e_ds, dict(common), log, "ExtractOptions defaults")}
    be = lim["best_eager"]
    prec = "fp32" if be["precision"] == "fp32" else "bf16"
    tuned = {**common, "batch_size": be["batch"], "precision": prec, "channels_last": be["channels_last"],
             "compile": False}
    e2e["tuned_eager"] = hubtune_e2e(spec, e2e_ds, tuned, log, "tuned, eager", be["threads"])
    from hubtune.features import ExtractOptions

    if "num_workers" in {f.name for f in dataclasses.fields(ExtractOptions)}:
        for w in args.e2e_workers:
            e2e[f"tuned_eager_workers{w}"] = hubtune_e2e(spec, e2e_ds, {**tuned, "num_workers": w}, log,
                                                         f"tuned, eager, num_workers={w}", be["threads"])
    bc = lim["best_compiled"]
    if bc is not None and bc["img_per_s"] > be["img_per_s"]:
        import torch._inductor.config as ic

        saved = ic.freezing
        ic.freezing = bool(bc.get("freezing"))
        try:
            copts = {**tuned, "batch_size": bc["batch"], "compile": True,
                     "precision": "fp32" if bc["precision"] == "fp32" else "bf16"}
            if bc["compile_mode"] != "default":
                copts["compile_mode"] = bc["compile_mode"]  # passed only if ExtractOptions has it
            torch._dynamo.reset()
            e2e["tuned_compiled_cold"] = hubtune_e2e(spec, e2e_ds, copts, log, "tuned, compiled, cold caches "
                                                     "(compile included)", bc["threads"])
            e2e["tuned_compiled_warm"] = hubtune_e2e(spec, e2e_ds, copts, log, "tuned, compiled, new model "
                                                     "object, warm inductor caches", bc["threads"])
            # the same candidate object again: dynamo's compiled code is reused (no compile): steady state
            e2e["tuned_compiled_steady"] = hubtune_e2e(spec, e2e_ds, copts, log, "tuned, compiled, same model "
                                                       "object (steady state)", bc["threads"],
                                                       cand=e2e["tuned_compiled_warm"]["_candidate"])
        finally:
            ic.freezing = saved

    for v in e2e.values():
        v.pop("_candidate", None)
    limit_ips = best["img_per_s"]
    best_e2e_key = max(e2e, key=lambda k: e2e[k]["img_per_s"])
    best_e2e = e2e[best_e2e_key]["img_per_s"]
    peak = machine["bf16_peak"]
    mm = machine["matmul"]
    achieved = flops * limit_ips / 1e12
    mm_ceiling = max(mm["bf16_tflops"], mm["bf16_tflops_best"])  # other jobs only ever slow a repetition
    ratios = {
        "e2e_best_variant": best_e2e_key,
        "e2e_over_limit": best_e2e / limit_ips, "target_e2e_over_limit": 0.85,
        "e2e_defaults_over_limit": e2e["defaults"]["img_per_s"] / limit_ips,
        "e2e_over_plain": best_e2e / plain["img_per_s"], "target_e2e_over_plain": 5.0,
        "e2e_defaults_over_plain": e2e["defaults"]["img_per_s"] / plain["img_per_s"],
        "limit_over_plain": limit_ips / plain["img_per_s"],
        "limit_eager_over_plain": be["img_per_s"] / plain["img_per_s"],
        # what e2e/limit can be when decoding is not overlapped with the forward passes
        "serial_decode_ceiling_over_limit": 1 / (1 + limit_ips / decode["img_per_s"]),
        "serial_decode_ceiling_over_limit_best_decode_threads":
            1 / (1 + limit_ips / max(v for k, v in decode.items() if k.startswith("img_per_s_threads"))),
    }
    ratios["meets_e2e_over_limit"] = ratios["e2e_over_limit"] >= 0.85
    ratios["meets_e2e_over_plain"] = ratios["e2e_over_plain"] >= 5.0
    compute = {
        "flops_per_image": flops, "limit_tflops": achieved,
        "limit_fraction_of_bf16_peak": achieved / peak["bf16_peak_tflops"] if peak.get("bf16_peak_tflops") else None,
        "limit_threads": best["threads"],
        "limit_fraction_of_bf16_peak_of_cores_used":
            achieved / (peak["bf16_peak_tflops"] * min(best["threads"], peak["cores"]) / peak["cores"])
            if peak.get("bf16_peak_tflops") else None,
        "limit_fraction_of_measured_bf16_matmul": achieved / mm_ceiling,
        "measured_bf16_matmul_tflops": mm_ceiling,
        "bf16_peak_tflops": peak.get("bf16_peak_tflops"),
        "plain_tflops": flops * plain["img_per_s"] / 1e12,
        "how": "FLOPs per image from torch.utils.flop_counter.FlopCounterMode on one fp32 image (2 FLOP per "
               "multiply-add, convolutions and matmuls only) x forward-only img/s",
    }
    breakeven = None
    m_table = lim["table"]
    if bc is not None and "img_per_s" in bc and bc["img_per_s"] > be["img_per_s"]:
        gain = 1 / be["img_per_s"] - 1 / bc["img_per_s"]
        if bc.get("warm_compile_s") is None:  # a batch-size neighbour: take the warm figure of its mode
            warm = [r["warm_compile_s"] for r in m_table if r.get("warm_compile_s") is not None
                    and r.get("compile_mode") == bc["compile_mode"] and r.get("freezing") == bc.get("freezing")]
            bc = {**bc, "warm_compile_s": warm[0] if warm else None}
        breakeven = {"compiled": bc["name"], "eager": be["name"], "seconds_saved_per_image": gain,
                     "cold_compile_s": bc.get("compile_s"), "warm_compile_s": bc.get("warm_compile_s"),
                     "rows_to_repay_cold_compile": math.ceil(bc["compile_s"] / gain),
                     "rows_to_repay_warm_compile": (math.ceil(bc["warm_compile_s"] / gain)
                                                    if bc.get("warm_compile_s") is not None else None)}
    return {"spec": spec, "input_size": list(cand.data_config["input_size"]), "num_params": cand.num_params,
            "plain": plain, "limit": {"best": best, "best_eager": be, "best_compiled": bc, "table": lim["table"]},
            "decode": decode, "hubtune": e2e, "ratios": ratios, "compute": compute, "compile_breakeven": breakeven}


def recommend(models: dict) -> dict:
    """ExtractOptions defaults suggested by the runs (the ResNet-50-class model weighs as much as the rest)."""
    rec = {}
    for spec, m in models.items():
        be, bc = m["limit"]["best_eager"], m["limit"]["best_compiled"]
        rec[spec] = {"batch_size_eager": be["batch"], "precision": be["precision"],
                     "channels_last": be["channels_last"], "threads": be["threads"],
                     "compile_wins_steady_state": bool(bc and bc["img_per_s"] > be["img_per_s"]),
                     "compile_mode": bc and bc["compile_mode"], "compile_freezing": bc and bc.get("freezing"),
                     "batch_size_compiled": bc and bc["batch"],
                     "compile_min_samples": (m["compile_breakeven"] or {}).get("rows_to_repay_cold_compile")}
    return rec


def plot(report: dict, path: str) -> str | None:
    """One panel per model: img/s of plain, every forward-only configuration and every hubtune run."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    models = report["models"]
    rows = max(len(m["limit"]["table"]) + len(m["hubtune"]) + 1 for m in models.values())
    fig, axes = plt.subplots(1, len(models), figsize=(9 * len(models), 0.26 * rows + 1.5), squeeze=False)
    for ax, (spec, m) in zip(axes[0], models.items()):
        bars = [("plain fp32 eager loop (decode incl.)", m["plain"]["img_per_s"], "tab:gray")]
        bars += [(r["name"], r["img_per_s"], "tab:orange" if r.get("compile_mode") else "tab:blue")
                 for r in m["limit"]["table"] if "img_per_s" in r]
        bars += [(f"hubtune: {v['label']}", v["img_per_s"], "tab:green") for v in m["hubtune"].values()]
        ax.barh(range(len(bars)), [b[1] for b in bars], color=[b[2] for b in bars])
        ax.set_yticks(range(len(bars)), [b[0] for b in bars], fontsize=6)
        ax.invert_yaxis()
        ax.axvline(m["limit"]["best"]["img_per_s"] * 0.85, color="k", ls=":", lw=0.8)
        ax.set_xlabel("images / s (dotted: 85% of the forward-only limit)")
        ax.set_title(f"{spec}: forward-only (blue eager, orange compiled), hubtune e2e (green)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=DEFAULT_MODELS,
                    help="comma-separated hubtune specs (timm names load with random weights)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "extraction.json"))
    ap.add_argument("--quick", action="store_true", help="tiny sizes and one compile configuration: a smoke run")
    ap.add_argument("--samples", type=int, help="images for hubtune end to end (default 1024; quick 64)")
    ap.add_argument("--plain-samples", type=int, help="images for the plain loop (default 256; quick 32)")
    ap.add_argument("--batch-sizes", help="forward-only batch sizes (default 16,32,64,128; quick 8,32)")
    ap.add_argument("--threads", help="thread counts to try (default 1 and all cores)")
    ap.add_argument("--precisions", default=",".join(PRECISIONS))
    ap.add_argument("--compile-modes", help="inductor modes (default 'default,max-autotune-no-cudagraphs'; "
                                            "quick 'default'); 'none' to skip compiling")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--compile-timeout", type=float, default=900, help="seconds per compile process")
    ap.add_argument("--compile-batch-neighbours", type=int, default=1,
                    help="other batch sizes tried for the best compiled configuration")
    ap.add_argument("--min-time", type=float, help="timed seconds per configuration (default 4; quick 0.5)")
    ap.add_argument("--min-reps", type=int, help="timed repetitions at least (default 3; quick 2)")
    ap.add_argument("--env-search", action=argparse.BooleanOptionalAction, default=None,
                    help="try OpenMP / oneDNN environment variables (default on; off with --quick)")
    ap.add_argument("--matmul-n", type=int, help="square matmul size for the measured peak (default 4096)")
    ap.add_argument("--e2e-workers", help="extra hubtune runs with these ExtractOptions.num_workers (when the "
                                          "field exists; default 0,1; quick none)")
    ap.add_argument("--no-probe", action="store_true", help="skip the gcc clock / issue-rate probe")
    ap.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True,
                    help="also write a PNG next to --out (needs matplotlib)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    q = a.quick
    a.samples = a.samples or (64 if q else 1024)
    a.plain_samples = a.plain_samples or (32 if q else 256)
    a.batch_sizes = [int(b) for b in (a.batch_sizes or ("8,32" if q else "16,32,64,128")).split(",")]
    a.max_threads = torch.get_num_threads()
    a.threads = sorted({int(t) for t in (a.threads or f"1,{a.max_threads}").split(",")})
    a.precisions = a.precisions.split(",")
    modes = a.compile_modes or ("default" if q else "default,max-autotune-no-cudagraphs")
    a.compile_modes = [] if a.no_compile or modes == "none" else modes.split(",")
    a.min_time = a.min_time if a.min_time is not None else (0.5 if q else 4.0)
    a.min_reps = a.min_reps or (2 if q else 3)
    a.env_search = (not q) if a.env_search is None else a.env_search
    a.e2e_workers = [int(w) for w in (a.e2e_workers if a.e2e_workers is not None else ("" if q else "0,1"))
                     .split(",") if w.strip()]
    a.matmul_n = a.matmul_n or (1024 if q else 4096)
    return a


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        res = worker_main(json.loads(args.worker))
        print(RESULT_TAG + json.dumps(res), flush=True)
        return
    # a private inductor cache: the in-process compiled runs start cold, whatever ran before on this machine
    tmp_cache = tempfile.mkdtemp(prefix="bench_extraction_inductor_")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tmp_cache
    t_start = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", file=sys.stderr, flush=True)

    from hubtune._io import write_json
    from hubtune.data import create_dataset

    info = cpu_info()
    probe = None if args.no_probe else run_probe(info)
    log(f"probe: {probe}")
    machine = {
        "cpu": info, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "onednn_bf16_supported": bool(torch.backends.mkldnn.is_available()
                                      and torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        "onednn_version": (re.findall(r"MKL-DNN v([\d.]+)", torch.__config__.show()) or [None])[0],
        "openmp": (re.findall(r"OpenMP (\d+)", torch.__config__.show()) or [None])[0],
        "python": platform.python_version(), "probe": probe,
        "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    machine["bf16_peak"] = bf16_peak(info, probe if probe and "error" not in probe else None)
    machine["matmul"] = matmul_peak(args.matmul_n, min_time=1.0 if args.quick else 3.0)
    log(f"peak: {machine['bf16_peak']['bf16_peak_tflops']} TFLOP/s bf16 theoretical; matmul "
        f"{machine['matmul']['bf16_tflops']:.3f} bf16 / {machine['matmul']['fp32_tflops']:.3f} fp32 TFLOP/s measured")
    ds = create_dataset("digits")
    report = {"machine": machine, "settings": {k: v for k, v in vars(args).items() if k != "worker"},
              "models": {}}
    try:
        for spec in args.models.split(","):
            report["models"][spec] = bench_model(spec.strip(), args, ds, machine, log)
            report["recommendation"] = recommend(report["models"])
            report["machine"]["load_average_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
            report["total_seconds"] = time.perf_counter() - t_start
            write_json(args.out, report)  # after each model, so a long run keeps what it has
    finally:
        shutil.rmtree(tmp_cache, ignore_errors=True)
    if args.plot and report["models"]:
        png = plot(report, str(Path(args.out).with_suffix(".png")))
        if png:
            log(f"wrote {png}")
    print(json.dumps({s: {"plain": m["plain"]["img_per_s"], "limit": m["limit"]["best"]["img_per_s"],
                          "limit_config": m["limit"]["best"]["name"],
                          "e2e": {k: v["img_per_s"] for k, v in m["hubtune"].items()}, "ratios": m["ratios"]}
                      for s, m in report["models"].items()}, indent=2, default=str))


if __name__ == "__main__":
    main()
