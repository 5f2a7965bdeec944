"""`hubtune score`: score saved features with the registered estimators."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .. import __version__
from .._io import load_array, write_json
from ..errors import InputError
from ..scoring import ESTIMATORS, create_estimator
from ..scoring.leep import softmax as to_probabilities

DEFAULT_METRICS = ("logme", "hscore-shrunk")


# ------------------------------------------------------------------------------------------- score
def score_arrays(x: np.ndarray, labels: np.ndarray, metrics, task: str = "auto", softmax: bool = False,
                 backend: str | None = None) -> dict:
    """Score one array with each metric; returns {metric: result}. Feeds each estimator what it reads."""
    results = {}
    for name in metrics:
        cls = ESTIMATORS.get(name)
        kwargs = {}
        if name == "logme":
            kwargs = {"task": task, "backend": backend}
        inputs = x
        if cls.input_kind == "probs" and softmax:
            inputs = to_probabilities(x)
        results[name] = create_estimator(name, **kwargs).update(inputs, labels).result()
    return results


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
    metrics = args.metric or list(DEFAULT_METRICS)
    task = "regression" if args.regression else ("multilabel" if args.multilabel else "auto")
    if args.features is None:
        sets = digits_feature_sets()
        print("No FEATURES given: scoring the embedded default, scikit-learn's digits "
              f"({len(sets[0][2])} images, 10 classes) under three feature extractors.")
    else:
        x = load_array(args.features, args.features_key)
        if args.labels is not None:
            y = load_array(args.labels, args.labels_key, default_keys=("labels",))
        elif Path(args.features).suffix in (".npz", ".pt", ".pth"):
            y = load_array(args.features, args.labels_key or "labels")
        else:
            raise InputError("LABELS is missing; pass a labels file, or an .npz/.pt holding 'labels'")
        sets = [(Path(args.features).stem, x, y)]
    rows = []
    for name, x, y in sets:
        start = time.perf_counter()
        results = score_arrays(x, y, metrics, task=task, softmax=args.softmax, backend=args.backend)
        rows.append({"name": name, "n": int(len(x)), "dim": int(x.shape[1]) if x.ndim == 2 else 1,
                     "seconds": time.perf_counter() - start,
                     "scores": {m: r.score for m, r in results.items()},
                     "details": {m: _details(r) for m, r in results.items()}})
    _print_table(rows, metrics)
    if args.json:
        write_json(args.json, {"hubtune": __version__, "metrics": metrics, "rows": rows})
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


def add_parser(sub, lazy: bool = False) -> None:
    names = ESTIMATORS.names()
    sc = sub.add_parser(
        "score", help="score saved features with transferability estimators",
        description="Score features saved as .npy/.npz/.pt against target labels. With no FEATURES, "
                    "scores the embedded default (scikit-learn's digits under three feature extractors). "
                    f"Estimators: {', '.join(names)}. logme and hscore read features; leep reads source-"
                    "model probabilities (use --softmax for logits); nce reads source-class ids or the "
                    "argmax of probabilities/logits.")
    sc.add_argument("features", nargs="?", help="features (n, D), probabilities (n, Z) or source ids (n,)")
    sc.add_argument("labels", nargs="?", help="target labels (n,) or targets (n, C); optional for .npz/.pt "
                                              "files that hold 'labels'")
    sc.add_argument("--metric", action="append", choices=names,
                    help=f"repeatable; default: {' '.join(DEFAULT_METRICS)}")
    sc.add_argument("--regression", action="store_true", help="LogME: targets are continuous")
    sc.add_argument("--multilabel", action="store_true", help="LogME: targets are multi-hot (n, C)")
    sc.add_argument("--softmax", action="store_true", help="LEEP: FEATURES are logits, apply softmax")
    sc.add_argument("--features-key", help="array name inside an .npz/.pt (default: 'features')")
    sc.add_argument("--labels-key", help="array name inside an .npz/.pt (default: 'labels')")
    sc.add_argument("--backend", choices=("auto", "numpy", "numba"),
                    help="LogME fixed-point backend (default: $HUBTUNE_BACKEND, else auto)")
    sc.add_argument("--json", metavar="OUT", help="also write the scores and diagnostics as JSON")
    sc.set_defaults(func=_cmd_score)
