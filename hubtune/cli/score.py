"""`hubtune score`: score saved features with the registered estimators."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .. import __version__
from .._io import ArrayFile, _InMemory, check_writable, load_array, open_array, write_json
from ..errors import EmptyInputError, InputError
from ..scoring import ESTIMATORS, create_estimator
from ..scoring.base import check_lengths, target_type, to_numpy
from ..scoring.gram import block_rows as gram_block_rows
from ..scoring.leep import softmax as to_probabilities

DEFAULT_METRICS = ("logme", "hscore-shrunk")


# ------------------------------------------------------------------------------------------- score
def score_arrays(x, labels, metrics, task: str = "auto", softmax: bool = False,
                 backend: str | None = None, block_rows: int | None = None) -> dict:
    """Score one array (in memory, or an :class:`~hubtune._io.ArrayFile` read in blocks) with each metric;
    returns {metric: result}. One pass over the rows: each block is fed to every estimator's ``update`` (the
    probabilities for LEEP computed per block with --softmax), so memory is one block plus the estimators'
    states, whatever n is."""
    source = x if isinstance(x, ArrayFile) else _InMemory(np.asarray(x))
    labels = to_numpy(labels, "labels")
    if len(source) == 0:
        raise EmptyInputError(f"{source.path} has no rows (shape {source.shape}); pass at least one sample")
    check_lengths(len(source), labels)
    estimators = {}
    for name in metrics:
        kwargs = {"task": task, "backend": backend} if name == "logme" else {}
        estimators[name] = create_estimator(name, **kwargs)
    width = int(np.prod(source.shape[1:], dtype=np.int64)) or 1
    rows = block_rows or gram_block_rows(width)
    for sl, block in source.blocks(rows):
        probs = None
        for est in estimators.values():
            inputs = block
            if est.input_kind == "probs" and softmax:
                probs = to_probabilities(block) if probs is None else probs
                inputs = probs
            est.update(inputs, labels[sl])
    return {name: est.result() for name, est in estimators.items()}


def choose_metrics(requested, task: str) -> tuple[list[str], list[str]]:
    """(metrics to run, notes). Requested metrics that cannot score ``task`` are an error naming them; the
    default metrics that cannot are left out, with a note saying which and why."""
    can = [n for n in ESTIMATORS.names() if task in ESTIMATORS.get(n).tasks]
    if requested:
        bad = [m for m in requested if task not in ESTIMATORS.get(m).tasks]
        if bad:
            raise InputError(f"--metric {' '.join(bad)} cannot score {task} targets (only class labels); "
                             f"metrics that can: {', '.join(can)}")
        return list(requested), []
    keep = [m for m in DEFAULT_METRICS if task in ESTIMATORS.get(m).tasks]
    left = [m for m in DEFAULT_METRICS if m not in keep]
    if not keep:
        raise InputError(f"no default metric scores {task} targets; pass --metric with one of {', '.join(can)}")
    notes = [f"note: default metric {m} left out: it scores class labels only, and the targets are {task}"
             for m in left]
    return keep, notes


def digits_feature_sets(seed: int = 0):
    """The embedded default: scikit-learn's bundled digits, seen through three feature extractors of
    known quality (full 8×8 pixels, 2×2 average-pooled 4×4 pixels, and Gaussian noise as a control)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = digits.images.astype(np.float32) / 16.0                     # (n, 8, 8)
    pooled = pixels.reshape(-1, 4, 2, 4, 2).mean(axis=(2, 4))
    noise = np.random.default_rng(seed).standard_normal((len(pixels), 64)).astype(np.float32)
    y = digits.target.astype(np.int64)
    return [("pixels-8x8", pixels.reshape(len(y), -1), y), ("pixels-4x4", pooled.reshape(len(y), -1), y),
            ("gaussian-noise", noise, y)]


def _cmd_score(args) -> int:
    if args.regression and args.multilabel:
        raise InputError("--regression and --multilabel contradict each other; pass one of them (or neither, "
                         "to decide from the labels)")
    flag = "regression" if args.regression else ("multilabel" if args.multilabel else None)
    if args.json:
        check_writable(Path(args.json).parent)  # before the work, not at the final write
    if args.features is None:
        sets = digits_feature_sets()
        print("No FEATURES given: scoring the embedded default, scikit-learn's digits "
              f"({len(sets[0][2])} images, 10 classes) under three feature extractors.")
    else:
        x = open_array(args.features, args.features_key)
        if args.labels is not None:
            y = load_array(args.labels, args.labels_key, default_keys=("labels",))
        elif Path(args.features).suffix.lower() in (".npz", ".pt", ".pth"):
            y = load_array(args.features, args.labels_key or "labels")
        else:
            raise InputError("LABELS is missing; pass a labels file, or an .npz/.pt holding 'labels'")
        sets = [(Path(args.features).stem, x, y)]
    task = flag or target_type(sets[0][2])
    metrics, notes = choose_metrics(args.metric, task)
    for note in notes:
        print(note)
    rows = []
    for name, x, y in sets:
        start = time.perf_counter()
        results = score_arrays(x, y, metrics, task=task, softmax=args.softmax,
                               backend=args.backend)
        dim = int(np.prod(x.shape[1:], dtype=np.int64)) if len(x.shape) > 1 else 1
        rows.append({"name": name, "n": int(len(x)), "dim": dim, "task": task,
                     "seconds": time.perf_counter() - start,
                     "scores": {m: r.score for m, r in results.items()},
                     "details": {m: _details(r) for m, r in results.items()}})
    _print_table(rows, metrics)
    if args.json:
        write_json(args.json, {"hubtune": __version__, "metrics": metrics, "task": task,
                               "left_out": notes, "rows": rows})
        print(f"wrote {args.json}")
    return 0


def _details(result) -> dict:
    d = result.to_dict()
    d.pop("weights", None)  # C×D posterior means: available from Python, too large for a summary
    return d


def _print_table(rows, metrics) -> None:
    header = ["features", "n", "dim"] + list(metrics)
    body = [[r["name"], str(r["n"]), str(r["dim"])] + [f"{r['scores'][m]:.6g}" for m in metrics] for r in rows]
    widths = [max(len(c) for c in col) for col in zip(header, *body)]
    for line in [header, ["-" * w for w in widths]] + body:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip())


_READS = {"features": "penultimate features (n, D)",
          "probs": "source-model probabilities (n, Z) (--softmax for logits)",
          "source_labels": "source-class ids (n,) or the argmax of probabilities/logits"}


def _what_they_read() -> str:
    """What each registered estimator reads, grouped, from its ``input_kind`` (nothing listed by hand)."""
    groups: dict[str, list[str]] = {}
    for name in ESTIMATORS.names():
        groups.setdefault(getattr(ESTIMATORS.get(name), "input_kind", "features"), []).append(name)
    return "; ".join(f"{', '.join(v)} read{'s' if len(v) == 1 else ''} {_READS.get(k, k)}"
                     for k, v in groups.items()) + "."


def add_parser(sub, lazy: bool = False) -> None:
    names = ESTIMATORS.names()
    sc = sub.add_parser(
        "score", help="score saved features with transferability estimators",
        description="Score features saved as .npy/.npz/.pt against target labels. With no FEATURES, "
                    "scores the embedded default (scikit-learn's digits under three feature extractors). "
                    f"Estimators: {', '.join(names)}. {_what_they_read()} Files are read in blocks (.npy and uncompressed .npz "
                    "memory-mapped, compressed .npz decompressed as a stream), so memory stays bounded "
                    "whatever their size. Without --regression/--multilabel the task is decided from the "
                    "labels (integral values: classes).")
    sc.add_argument("features", nargs="?", help="features (n, D), probabilities (n, Z) or source ids (n,)")
    sc.add_argument("labels", nargs="?", help="target labels (n,) or targets (n, C); optional for .npz/.pt "
                                              "files that hold 'labels'")
    sc.add_argument("--metric", action="append", choices=names,
                    help=f"repeatable; default: {' '.join(DEFAULT_METRICS)}")
    sc.add_argument("--regression", action="store_true",
                    help="targets are continuous (n,) or (n, C); the default metrics become those that can "
                         "score them (logme)")
    sc.add_argument("--multilabel", action="store_true",
                    help="targets are multi-hot (n, C); the default metrics become those that can score them "
                         "(logme)")
    sc.add_argument("--softmax", action="store_true", help="LEEP: FEATURES are logits, apply softmax")
    sc.add_argument("--features-key", help="array name inside an .npz/.pt (default: 'features')")
    sc.add_argument("--labels-key", help="array name inside an .npz/.pt (default: 'labels')")
    sc.add_argument("--backend", choices=("auto", "numpy", "numba"),
                    help="LogME fixed-point backend (default: $HUBTUNE_BACKEND, else auto)")
    sc.add_argument("--json", metavar="OUT", help="also write the scores and diagnostics as JSON")
    sc.set_defaults(func=_cmd_score)
