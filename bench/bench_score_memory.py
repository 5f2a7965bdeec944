"""Peak memory of `hubtune score` against the size of its input file, streaming against the old way.

    python bench/bench_score_memory.py [--sizes-mb 100 200 400] [--old-rev 60e1fc9]

For LEEP (source probabilities, Z = 1000, float32 .npy) and LogME (features, D = 1024, float32 .npy) at each
input size, each arm runs in a fresh process; after its imports (and the parser) are loaded the kernel's
peak-RSS mark is reset (``/proc/self/clear_refs``), and the peak while ``hubtune score`` runs, less the RSS
just before, is what scoring the file costs:

- ``streaming``: ``hubtune score`` of this working tree (the file memory-mapped, read in row blocks, each
  block widened to float64 and fed to the estimators' ``update``; pages released after each block);
- ``old``: ``hubtune score`` of revision ``--old-rev`` (the file read whole, one ``update`` of the whole array),
  extracted with ``git archive``; skipped when that revision is not in the repository;
Reported: that extra in MB and as a multiple of the input file size, and old / streaming.
Writes bench/results/score_memory.json.
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hubtune._io import write_json  # noqa: E402

SHAPES = {"leep": 1000, "logme": 1024}  # width Z or D
CLASSES = 100


def write_inputs(folder: Path, metric: str, megabytes: float, seed: int = 0) -> tuple[Path, Path]:
    """A float32 .npy of about ``megabytes`` MB and int64 labels, written in slices (never whole in RAM)."""
    width = SHAPES[metric]
    n = max(1000, int(megabytes * 1e6 / (4 * width)))
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, n)
    x_path, y_path = folder / f"{metric}-{n}.npy", folder / f"{metric}-{n}-labels.npy"
    out = np.lib.format.open_memmap(x_path, mode="w+", dtype=np.float32, shape=(n, width))
    for start in range(0, n, 8192):
        stop = min(start + 8192, n)
        block = rng.standard_normal((stop - start, width), dtype=np.float32)
        if metric == "leep":
            block[np.arange(stop - start), y[start:stop] % width] += 3.0
            block = np.exp(block - block.max(axis=1, keepdims=True))
            block /= block.sum(axis=1, keepdims=True)
        else:
            block[:, :CLASSES] += np.eye(CLASSES, dtype=np.float32)[y[start:stop]]
        out[start:stop] = block
    out.flush()
    del out
    np.save(y_path, y)
    return x_path, y_path


#: runs `hubtune score ARGS` after the imports, with the kernel's peak-RSS mark reset just before (Linux
#: clear_refs "5"), and reports the RSS at the reset and the peak during scoring, in kB
DRIVER = """
import sys
from hubtune.cli import build_parser, main
import hubtune.scoring, scipy.linalg
build_parser(sys.argv[1:])  # the subcommands' imports happen here, before the mark is reset
def status(key):
    return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1])
try:
    open("/proc/self/clear_refs", "w").write("5")
except OSError:
    pass
before = status("VmRSS:")
rc = main(sys.argv[1:])
sys.stderr.write(f"HUBTUNE-RSS {before} {status('VmHWM:')}\\n")
sys.exit(rc)
"""


def scoring_peak(args: list[str], tree: Path, env: dict) -> tuple[float, float, float, int]:
    """(RSS before scoring, peak RSS while scoring, seconds, exit) in MB for `hubtune score ARGS`."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", DRIVER, "score", *args], env=dict(env, PYTHONPATH=str(tree)),
                          cwd=tree, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("HUBTUNE-RSS")]
    if proc.returncode or not line:
        sys.stderr.write(proc.stderr)
        return float("nan"), float("nan"), time.perf_counter() - start, proc.returncode or 1
    before, peak = (int(v) / 1024 for v in line[-1].split()[1:])
    return before, peak, time.perf_counter() - start, 0


def old_tree(rev: str, folder: Path) -> Path | None:
    try:
        archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "hubtune", "hubtune_ext"],
                                 capture_output=True, check=True).stdout
    except (subprocess.CalledProcessError, FileNotFoundError):
        return None
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes-mb", type=float, nargs="+", default=[100, 200, 400])
    ap.add_argument("--metrics", nargs="+", default=["leep", "logme"], choices=sorted(SHAPES))
    ap.add_argument("--old-rev", default="60e1fc9", help="the revision that read files whole")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "score_memory.json"))
    args = ap.parse_args()

    base_env = dict(os.environ, OMP_NUM_THREADS="1", HUBTUNE_BACKEND="numpy", PYTHONDONTWRITEBYTECODE="1")
    rows = []
    with tempfile.TemporaryDirectory(prefix="hubtune-bench-mem-") as tmp:
        tmp = Path(tmp)
        (tmp / "old").mkdir()
        old = old_tree(args.old_rev, tmp / "old")
        trees = {"streaming": REPO} | ({"old": old} if old else {})
        for metric in args.metrics:
            for mb in args.sizes_mb:
                x, y = write_inputs(tmp, metric, mb)
                size_mb = x.stat().st_size / 2**20
                row = {"metric": metric, "input_mb": round(size_mb, 1), "rows": int(np.load(y, mmap_mode="r").shape[0]),
                       "width": SHAPES[metric]}
                for arm, tree in trees.items():
                    before, during, secs, rc = scoring_peak([str(x), str(y), "--metric", metric], tree, base_env)
                    row[arm] = {"scoring_extra_mb": round(during - before, 1),
                                "scoring_extra_over_input": round((during - before) / size_mb, 3),
                                "rss_before_scoring_mb": round(before, 1), "scoring_peak_mb": round(during, 1),
                                "seconds": round(secs, 2), "exit": rc}
                if "old" in row:
                    row["old_over_streaming"] = round(
                        row["old"]["scoring_extra_mb"] / max(row["streaming"]["scoring_extra_mb"], 1.0), 2)
                rows.append(row)
                print(row, flush=True)
                x.unlink()
                y.unlink()
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
        "python": platform.python_version(), "numpy": np.__version__,
        "old_rev": args.old_rev if old else None,
        "method": "scoring_extra: the kernel's peak RSS while `hubtune score` runs, after its imports (VmHWM "
                  "reset via /proc/self/clear_refs once the imports and the parser are built), minus the RSS just "
                  "before: what scoring the file costs; a fresh process per arm; inputs float32 .npy; "
                  "OMP_NUM_THREADS=1, HUBTUNE_BACKEND=numpy",
        "rows": rows,
    }
    write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
