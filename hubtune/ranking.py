"""rank(): candidates × dataset → Ranking.

Each candidate's features stream from the extractor (or its cache) straight into one accumulator per
metric, so no feature matrix is held in memory. The Ranking orders candidates by the first metric and
saves ranking.json, ranking.csv, ranking.png (with the ``plot`` extra) and each candidate's LogME
posterior weights (the projection B-Tuning consumes).
"""
from __future__ import annotations

import csv
import io
import json
import os
import sys
import warnings
from functools import partial
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import __version__
from ._checks import check_count
from ._io import atomic_savez, atomic_write_text, check_writable, pyplot, save_png, write_json
from .errors import HubtuneError, InputError, MissingExtraError
from .scoring import ESTIMATORS, create_estimator
from .scoring.leep import softmax


@dataclass
class CandidateResult:
    spec: str
    scores: dict[str, float]
    rank: int = 0
    feature_dim: int = 0
    num_source_classes: int = 0
    n: int = 0
    num_params: int = 0
    seconds: float = 0.0              # forward passes of the recomputed rows
    images_per_second: float = 0.0    # throughput of the recomputed rows (0 when all came from the cache)
    cache_hit: bool = False           # every row came from the (verified) cache
    rounds: int = 1                   # successive halving: rounds survived
    logme_weights: str | None = None  # file, relative to the ranking folder
    spec_given: str | None = None     # the spec as the user wrote it (``spec`` is resolved: absolute paths)
    computed: int = 0                 # rows that went through a forward pass in this run
    cached: int = 0                   # rows read from the cache
    cache_seconds: float = 0.0        # reading and verifying the cached rows
    overall_images_per_second: float = 0.0  # all n rows (cached + recomputed) over the time they took
    loaded: bool = False              # the model was constructed in this run (False: answered from the cache)
    precision_error: dict = field(default_factory=dict)  # metric -> half-width of the precision's tie band
    tie: str = ""                     # the ranks within the precision's error of this one ("2-4"), "" if none
    raw_scores: dict = field(default_factory=dict)  # metric -> its per-model score, for metrics combined across
                                                    # the candidates (etran, ncti, auto: ``scores`` holds the combination)
    flags: list = field(default_factory=list)       # what makes a score not to be read as is (see FLAGS)
    # rank(verify=K) (hubtune.verify.reorder): the estimators' position, and the brief fine-tune's result
    prior_rank: int = 0
    verified: bool = False
    verify_accuracy: float | None = None  # held-out accuracy at the rung reached
    verify_rung: int | None = None
    verify_steps: int = 0
    verify_dropped: str = ""


#: the flags a candidate can carry, and what they mean (printed under the table)
FLAGS = {
    "logme-not-converged": "LogME's fixed point hit max_iter without converging for some target columns "
                           "(marked * in the table); its evidence is approximate",
    "head-uniform": "the source head gives every class probability 1/Z for every image (an untrained or zeroed "
                    "head): LEEP and NCE read nothing from it (LEEP = -H(y) exactly)",
    "head-constant": "the source head gives the same probabilities for every image (its features do not vary, or "
                     "it ignores them): LEEP and NCE read nothing from it (LEEP = -H(y) exactly)",
}


@dataclass
class Ranking:
    dataset: str
    metrics: list[str]
    candidates: list[CandidateResult]
    skipped: dict[str, str] = field(default_factory=dict)   # spec -> reason
    budget: dict | None = None
    weights: dict[str, dict] = field(default_factory=dict, repr=False)  # spec -> LogME columns/weights
    dataset_info: dict | None = None  # spec, split, fingerprint, base_fingerprint, num_classes, max_samples, per_class
    precision: str | None = None      # the extraction precision (resolved: fp32, bf16, bf16-trunk, bf16-mid)
    verification: dict | None = None  # rank(verify=K): the successive-halving fine-tunes (hubtune.verify)

    def top(self, k: int) -> list[str]:
        """The specs of the best ``k`` candidates, best first (``local-dir:``/``file:`` paths absolute, so they
        load from any working directory)."""
        if not (isinstance(k, int) and not isinstance(k, bool) and k >= 1):
            raise InputError(f"k={k!r} must be a positive integer")
        if k > len(self.candidates):
            raise InputError(f"k={k} but the ranking holds only {len(self.candidates)} candidates")
        return [c.spec for c in self.candidates[:k]]

    def table(self) -> str:
        """One row per candidate. ``img/s``: throughput of the rows computed in this run; ``all img/s``: of
        all n rows, cached ones included (they differ when a rank resumed from a partial cache);
        ``cache``: hit, miss, or ``k/n`` rows from the cache."""
        def rate(v):
            return f"{v:.0f}" if v and np.isfinite(v) else "-"

        ties = any(c.tie for c in self.candidates)
        err = any(c.precision_error.get(self.metrics[0], 0) for c in self.candidates)

        def score(c, m):
            e = c.precision_error.get(m, 0.0) if m == self.metrics[0] and err else 0.0
            star = "*" if m == "logme" and "logme-not-converged" in c.flags else ""
            return f"{c.scores.get(m, float('nan')):.5g}{star}" + (f" ±{e:.2g}" if e else "")

        flagged = any(c.flags for c in self.candidates)
        verified = any(c.verified for c in self.candidates)
        header = (["rank"] + (["tie"] if ties else []) + ["model"] + self.metrics + (["held-out acc"] if verified else [])
                  + ["dim", "n", "params", "img/s", "all img/s", "cache"] + (["flags"] if flagged else []))
        rows = [[str(c.rank)] + ([c.tie or "-"] if ties else []) + [c.spec_given or c.spec]
                + [score(c, m) for m in self.metrics]
                + ([f"{c.verify_accuracy:.4f} (r{c.verify_rung})" if c.verified else "-"] if verified else [])
                + [str(c.feature_dim), str(c.n), f"{c.num_params / 1e6:.1f}M", rate(c.images_per_second),
                   rate(c.overall_images_per_second),
                   "hit" if c.cache_hit else (f"{c.cached}/{c.n}" if c.cached else "miss")]
                + ([",".join(c.flags) or "-"] if flagged else []) for c in self.candidates]
        widths = [max(len(x) for x in col) for col in zip(header, *rows)]
        lines = ["  ".join(x.ljust(w) for x, w in zip(r, widths)).rstrip()
                 for r in [header, ["-" * w for w in widths]] + rows]
        if err:
            lines.append(f"± the {self.metrics[0]} error of {self.precision} extraction (measured against fp32 on a "
                         "probe); 'tie': ranks within that error of each other, an order not to be read")
        for f in sorted({f for c in self.candidates for f in c.flags}):
            lines.append(f"{f}: {FLAGS.get(f, f)}")
        combined = [m for m in self.metrics if _combines(m)]
        if combined:
            lines.append(f"{', '.join(combined)}: combined across these candidates (the per-model terms are in "
                         "ranking.json, raw_scores)")
        if verified:
            v = self.verification or {}
            cost, split = v.get("cost", {}), v.get("split", {})
            lines.append(f"held-out acc: the top {v.get('settings', {}).get('k', '?')} fine-tuned "
                         f"{v.get('total_steps', '?')} steps in all by successive halving (r: rung reached) on "
                         f"{split.get('train', '?')} images, measured on {split.get('holdout', '?')} held out, "
                         f"in {v.get('seconds', 0):.0f} s"
                         + (f"; {cost['steps_ratio_all']:.1%} of the steps of fine-tuning all {cost['candidates']} "
                            f"for {cost['full_epochs']} epochs" if cost.get("steps_ratio_all") else ""))
        lines += [f"skipped {_why(spec, why)}" for spec, why in self.skipped.items()]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"hubtune": __version__, "dataset": self.dataset, "dataset_info": self.dataset_info,
                "precision": self.precision,
                "metrics": self.metrics, "budget": self.budget, "skipped": self.skipped,
                "verification": self.verification, "flags": {f: FLAGS[f] for f in sorted({f for c in self.candidates for f in c.flags})},
                "candidates": [asdict(c) for c in self.candidates]}

    def save(self, out: str | Path) -> Path:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        for i, c in enumerate(self.candidates):
            if c.spec in self.weights:
                rel = f"logme/{i:03d}-{_safe(c.spec)}.npz"
                atomic_savez(out / rel, spec=np.array(c.spec), **self.weights[c.spec])
                c.logme_weights = rel
        write_json(out / "ranking.json", self.to_dict())
        buf = io.StringIO()
        w = csv.writer(buf)
        verified = self.verification is not None
        w.writerow(["rank", "spec"] + self.metrics + ["feature_dim", "n", "num_params", "seconds",
                                                      "images_per_second", "cache_hit", "flags"]
                   + (["prior_rank", "verify_accuracy", "verify_rung"] if verified else []))
        for c in self.candidates:
            w.writerow([c.rank, c.spec] + [c.scores.get(m) for m in self.metrics]
                       + [c.feature_dim, c.n, c.num_params, f"{c.seconds:.4f}", f"{c.images_per_second:.2f}",
                          c.cache_hit, ";".join(c.flags)]
                       + ([c.prior_rank, c.verify_accuracy, c.verify_rung] if verified else []))
        atomic_write_text(out / "ranking.csv", buf.getvalue())
        try:
            self.plot(out / "ranking.png")
        except MissingExtraError as e:
            warnings.warn(f"ranking.png not written: {e}", stacklevel=2)
        return out

    def plot(self, path: str | Path) -> Path:
        plt = pyplot("the ranking plot")
        metrics = self.metrics
        fig, axes = plt.subplots(1, len(metrics), figsize=(4 + 3 * len(metrics), 0.5 * len(self.candidates) + 1.5),
                                 squeeze=False)
        names = [(lambda t: t if len(t) <= 40 else "…" + t[-39:])(c.spec_given or c.spec)
                 for c in self.candidates][::-1]  # long paths keep their tail, so the bars keep their width
        for ax, m in zip(axes[0], metrics):
            vals = np.array([c.scores.get(m, np.nan) for c in self.candidates][::-1], dtype=float)
            lo, hi = np.nanmin(vals), np.nanmax(vals)
            pad = 0.15 * (hi - lo) or 0.05 * abs(hi) or 1.0
            base = lo - pad  # bars start just left of the worst score, so differences are visible
            ax.barh(names, vals - base, left=base, color="tab:blue")
            for y, v in enumerate(vals):
                ax.text(v, y, f" {v:.4g}", va="center", fontsize=8)
            ax.set_xlim(base, hi + 2 * pad)
            ax.set_title(f"{m} (higher is better)")
            ax.grid(axis="x", alpha=0.3)
        fig.suptitle(f"hubtune ranking on {self.dataset}")
        fig.tight_layout()
        return save_png(fig, path, dpi=100)

    @classmethod
    def load(cls, folder: str | Path) -> "Ranking":
        folder = Path(folder)
        path = folder / "ranking.json"
        if not path.exists():
            raise InputError(f"{folder} holds no ranking.json; pass the --out folder of a `hubtune rank` run")
        try:
            d = json.loads(path.read_text())
            known = set(CandidateResult.__dataclass_fields__)
            cands = [CandidateResult(**{k: v for k, v in c.items() if k in known}) for c in d["candidates"]]
            dataset, metrics = d["dataset"], d["metrics"]
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise InputError(f"{path} is not a ranking.json hubtune can read ({type(e).__name__}: {e}); "
                             "run `hubtune rank --out` again to rewrite it") from None
        weights = {}
        for c in cands:
            if c.logme_weights:
                try:
                    with np.load(folder / c.logme_weights, allow_pickle=False) as z:
                        weights[c.spec] = {k: z[k] for k in z.files if k != "spec"}
                except (OSError, ValueError, EOFError) as e:
                    raise InputError(f"{folder / c.logme_weights} (the LogME weights of {c.spec}) is missing or "
                                     f"damaged ({type(e).__name__}: {e}); run `hubtune rank --out` again") from None
        info = d.get("dataset_info")
        return cls(dataset=dataset, metrics=metrics, candidates=cands, skipped=d.get("skipped", {}),
                   budget=d.get("budget"), weights=weights, dataset_info=info if isinstance(info, dict) else None,
                   precision=d.get("precision"), verification=d.get("verification"))


def _why(spec: str, why: str) -> str:
    """``spec: why``, without saying the spec twice when the reason starts with it already."""
    return why if why.startswith(f"{spec}: ") or why.startswith(f"{spec} ") else f"{spec}: {why}"


def _safe(spec: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in spec)[:80]


# ------------------------------------------------------------------------------------------- rank
def new_accumulators(metrics, logme_mode: str = "fast") -> dict:
    """A fresh accumulator per metric; LogME in ``logme_mode`` ("fast": float32 Gram blocks, within 1e-6 of
    "exact"; see :class:`~hubtune.scoring.logme.LogME`); plus, under :data:`HEAD`, the source-head check."""
    accs = {m: HeadStats() if m == HEAD else create_estimator(m, mode=logme_mode) if m == "logme"
            else create_estimator(m) for m in metrics}
    accs.setdefault(HEAD, HeadStats())
    return accs


#: the key of the source-head check among a candidate's accumulators (not a metric: never a column)
HEAD = "_head"


@dataclass
class HeadResult:
    score: float      # the largest range (max - min over the rows) of a source-class probability (0: constant)
    constant: bool    # below CONSTANT_TOL: the head gives the same probabilities for every image
    uniform: bool     # ... and they are 1/Z (an untrained or zeroed head)
    n: int


#: a source head whose probabilities vary by less than this over the rows is constant
CONSTANT_TOL = 1e-4


class HeadStats:
    """Streams, per source class, the smallest and largest probability of the head's softmax over the rows
    (2·Z numbers; elementwise min/max: exact under any chunking and merge order). No logits (a headless
    model): nothing to check."""

    def __init__(self):
        self.n, self.lo, self.hi = 0, None, None

    def update(self, logits, labels=None) -> "HeadStats":
        p = softmax(np.asarray(logits, dtype=np.float64))
        if len(p):
            lo, hi = p.min(axis=0), p.max(axis=0)
            self.lo = lo if self.lo is None else np.minimum(self.lo, lo)
            self.hi = hi if self.hi is None else np.maximum(self.hi, hi)
            self.n += len(p)
        return self

    def merge(self, other: "HeadStats") -> "HeadStats":
        if other.n:
            self.lo = other.lo if self.lo is None else np.minimum(self.lo, other.lo)
            self.hi = other.hi if self.hi is None else np.maximum(self.hi, other.hi)
            self.n += other.n
        return self

    def result(self) -> HeadResult:
        if not self.n:
            return HeadResult(score=0.0, constant=False, uniform=False, n=0)
        spread = float((self.hi - self.lo).max())
        constant = spread < CONSTANT_TOL
        uniform = constant and float(np.abs(self.hi - 1.0 / len(self.hi)).max()) < CONSTANT_TOL
        return HeadResult(score=spread, constant=constant, uniform=uniform, n=self.n)

    def state_dict(self) -> dict:
        return {"n": self.n, "lo": None if self.lo is None else self.lo.tolist(),
                "hi": None if self.hi is None else self.hi.tolist()}

    def load_state_dict(self, state: dict) -> "HeadStats":
        self.n = int(state["n"])
        self.lo, self.hi = (None if state[k] is None else np.asarray(state[k], dtype=np.float64) for k in ("lo", "hi"))
        return self


def _combines(metric: str) -> bool:
    """The estimator's score is defined across the candidates (``combine(results) -> {spec: score}``)."""
    return callable(getattr(ESTIMATORS.get(metric), "combine", None))


def apply_combined(entries, metrics) -> None:
    """For the metrics scored across candidates (ETran's and NCTI's min-max sums, ``auto``'s rank aggregation):
    ``scores[m]`` becomes the combination over ``entries``, the per-model score moves to ``raw_scores[m]``."""
    for m in metrics:
        if not _combines(m):
            continue
        have = [e for e in entries if m in e.__dict__.get("_results", {})]
        if not have:
            continue
        combined = ESTIMATORS.get(m).combine({e.spec: e.__dict__["_results"][m] for e in have})
        for e in have:
            e.raw_scores[m] = e.scores[m]
            e.scores[m] = float(combined[e.spec])


def _score_candidates(candidates, dataset, metrics, options, rows=None, logme_mode="fast"):
    """Stream every candidate's chunks into accumulators created at its first chunk and turned into scores
    when it is finished (so only the candidates in flight hold statistics); returns (results, stats,
    failed) where ``failed`` maps the spec of each candidate dropped on the way to the reason."""
    from .features import extract

    accs, results, failed = {}, {}, {}

    def on_chunk(spec, feats, logits, labels):
        if spec not in accs:
            accs[spec] = new_accumulators(metrics, logme_mode)
        feed(spec, accs[spec], feats, logits, labels)

    def on_done(spec, st):
        a = accs.pop(spec, None)
        if st.error is None:
            finish(spec, a, results, failed)
        if spec in failed or st.error is not None:
            return f"skipped {_why(spec, failed.get(spec) or st.error)}"
        return _done_line(spec, results[spec], metrics, st)

    stats = extract(candidates, dataset, options, on_chunk, rows=rows, on_error="skip", on_done=on_done)
    for spec, st in stats.items():
        if st.error is not None:
            failed[spec] = st.error
    for spec, why in failed.items():
        warnings.warn(f"skipping {spec}: {why}", stacklevel=3)
    return results, stats, failed


def feed(spec, accs: dict, feats, logits, labels) -> None:
    """One chunk into a candidate's accumulators, each given what its estimator reads."""
    for m, acc in accs.items():
        if m == HEAD:
            if logits is not None:
                acc.update(logits)
            continue
        kind = ESTIMATORS.get(m).input_kind
        if kind == "features":
            acc.update(feats, labels)
        else:
            if logits is None:
                raise InputError(f"{spec} has no source classifier head, so {m} cannot score it; "
                                 "use logme or hscore for headless models")
            acc.update(softmax(logits) if kind == "probs" else logits, labels)


def finish(spec, accs: dict | None, results: dict, failed: dict) -> None:
    """Scores from a finished candidate's accumulators into ``results``, or the reason into ``failed``."""
    if accs is None:
        failed[spec] = f"{spec}: no rows reached its scorers"
        return
    try:
        res = {m: acc.result() for m, acc in accs.items()}  # HEAD's score is finite too
    except InputError as e:  # e.g. NaN in a result, an estimator that cannot score these features
        failed[spec] = f"{spec}: {e}"
        return
    bad = [m for m, r in res.items() if not np.isfinite(r.score)]
    if bad:
        failed[spec] = f"{spec}: its {', '.join(bad)} score is not finite"
        return
    results[spec] = res


def _done_line(spec, res: dict, metrics, st) -> str:
    scores = "  ".join(f"{m} {res[m].score:.5g}" for m in metrics)
    how = "cache hit" if st.cache_hit else (f"{st.compute_throughput:.0f} img/s"
                                            + (f", {st.cached}/{st.n} rows cached" if st.cached else ""))
    return f"{spec}  {scores}  ({how})"


# ------------------------------------------------------------------------------------------- Ray backend
@dataclass
class RayOptions:
    """``backend="ray"``: where to run and how. ``address`` None starts a private local instance on the
    loopback address (``"auto"`` or ``HOST:PORT`` joins a cluster); ``shard_rows`` splits a candidate's rows
    into tasks of that many rows (None: one task per candidate); ``runtime_env`` is Ray's (for example
    ``{"py_modules": [...]}`` on a cluster whose nodes lack hubtune)."""

    address: str | None = None
    gpus_per_model: float = 0
    cpus_per_model: float = 1
    max_retries: int = 2
    shard_rows: int | None = None
    runtime_env: dict | None = None


def _ray_task(shared: dict, item):
    """One Ray task: a candidate's rows [lo, hi) extracted (through the cache) into fresh accumulators on the
    worker; only their state (sufficient statistics) and the extraction statistics travel back."""
    from .features import extract

    ref, lo, hi = item
    _fault_hook(ref.spec, lo)
    ds, metrics = shared["dataset"], shared["metrics"]
    # the first shard reads the first rows of the whole dataset's cache entry (the one a local run writes);
    # the others are subsets with entries of their own
    part, rows = (ds, hi) if lo == 0 else (ds.subset(np.arange(lo, hi)), None)
    accs = new_accumulators(metrics, shared["logme_mode"])
    stats = extract([ref], part, shared["options"], lambda spec, f, l, y: feed(spec, accs, f, l, y),
                    rows=rows, on_error="skip")
    st = stats[ref.spec]
    return {"states": None if st.error else {m: a.state_dict() for m, a in accs.items()}, "stats": asdict(st)}


def _fault_hook(spec: str, lo: int) -> None:
    """Tests only: ``HUBTUNE_TEST_RAY_KILL_ONCE=FOLDER`` makes a task kill its own process the first time it
    runs (a marker file in FOLDER remembers it), as a worker lost mid-task would."""
    folder = os.environ.get("HUBTUNE_TEST_RAY_KILL_ONCE")
    if folder:
        marker = Path(folder) / f"killed-{_safe(spec)}-{lo}"
        if not marker.exists():
            marker.touch()
            os._exit(1)


def _score_candidates_ray(candidates, dataset, metrics, options, rows, ray_opts: RayOptions, logme_mode="fast"):
    """The Ray counterpart of :func:`_score_candidates`: one task per (candidate, shard); the driver merges
    each candidate's shard states in shard order, so the result equals the local one (exactly, for one
    shard: the same chunks in the same order)."""
    from dataclasses import replace

    from ._ray import connect, map_tasks
    from .features.extractor import ExtractStats, _as_ref, _Display

    n = len(dataset) if rows is None else min(int(rows), len(dataset))
    step = ray_opts.shard_rows or n
    refs = [_as_ref(c) for c in candidates]
    items = [(r, lo, min(lo + step, n)) for r in refs for lo in range(0, n, step)]
    shards = {r.spec: [i for i, it in enumerate(items) if it[0].spec == r.spec] for r in refs}
    shared = {"dataset": dataset, "metrics": list(metrics), "logme_mode": logme_mode,
              "options": replace(options, progress=False)}
    progress = options.progress if options.progress is not None else sys.stderr.isatty()
    display = _Display(len(items), f"hub ({len(refs)} models, {len(items)} Ray tasks)", progress)
    outputs: dict[int, object] = {}
    results, failed, stats = {}, {}, {}

    def collect(spec):
        parts = [outputs[i] for i in shards[spec]]
        errors = [p for p in parts if isinstance(p, Exception)] + [p["stats"]["error"] for p in parts
                                                                     if not isinstance(p, Exception) and p["stats"]["error"]]
        st = ExtractStats(spec=spec, n=n)
        if not errors:
            ps = [ExtractStats(**p["stats"]) for p in parts]
            for f in ("computed", "cached", "seconds", "cache_seconds"):
                setattr(st, f, sum(getattr(x, f) for x in ps))
            st.feature_dim, st.num_classes, st.num_params = ps[0].feature_dim, ps[0].num_classes, ps[0].num_params
            st.cache_hit, st.loaded = all(x.cache_hit for x in ps), any(x.loaded for x in ps)
            st.extra = {**ps[0].extra, "ray_tasks": len(ps)}
            accs = {}
            for p in parts:  # in shard order: a fixed order of merges
                for m, state in p["states"].items():
                    acc = new_accumulators([m], logme_mode)[m].load_state_dict(state)
                    accs[m] = acc if m not in accs else accs[m].merge(acc)
            finish(spec, accs, results, failed)
        else:
            e = errors[0]
            failed[spec] = (str(e.cause if hasattr(e, "cause") else e).strip().splitlines() or ["failed"])[0]
        st.error = failed.get(spec)
        stats[spec] = st
        return (f"skipped {_why(spec, failed[spec])}" if spec in failed
                else _done_line(spec, results[spec], metrics, st))

    def on_result(i, out):
        outputs[i] = out
        display.update(1)
        spec = items[i][0].spec
        if all(j in outputs for j in shards[spec]):
            display.write(collect(spec))

    conn = connect(ray_opts.address, runtime_env=ray_opts.runtime_env)
    try:
        map_tasks(_ray_task, items, shared=shared, max_retries=ray_opts.max_retries, num_cpus=ray_opts.cpus_per_model,
                  num_gpus=ray_opts.gpus_per_model, runtime_env=ray_opts.runtime_env, on_result=on_result,
                  on_error="collect")
    finally:
        display.close()
        conn.shutdown()
    for spec, why in failed.items():
        warnings.warn(f"skipping {spec}: {why}", stacklevel=3)
    return results, {r.spec: stats[r.spec] for r in refs}, failed


def _ray_options(given) -> RayOptions:
    if given is None:
        return RayOptions()
    if isinstance(given, dict):
        unknown = set(given) - set(RayOptions.__dataclass_fields__)
        if unknown:
            raise InputError(f"ray_options has unknown keys {sorted(unknown)}; known: "
                             f"{', '.join(RayOptions.__dataclass_fields__)}")
        given = RayOptions(**given)
    if given.shard_rows is not None:
        check_count("shard_rows", given.shard_rows, flag="--ray-shard-rows", cure="pass a positive integer")
    if not (isinstance(given.max_retries, int) and given.max_retries >= 0):
        raise InputError(f"max_retries={given.max_retries!r} must be an integer >= 0")
    for f in ("gpus_per_model", "cpus_per_model"):
        v = getattr(given, f)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            raise InputError(f"{f}={v!r} (--{f.replace('_', '-')}) must be a number >= 0")
    return given


def _check_count(name: str, flag: str, value) -> int | None:
    return check_count(name, value, flag=flag, cure=f"pass a positive integer, or leave {flag} out to use "
                                                    f"{'every image' if name != 'top_k' else 'the default'}")


def check_rank_args(max_samples=None, per_class=None, budget=None, top_k=None, verify=None,
                    verify_budget=None) -> None:
    """Validate the counts of a rank before any work: each is None or an integer >= 1 (0 is refused, not
    taken to mean everything), and ``verify_budget`` needs ``verify``. Raises
    :class:`~hubtune.errors.InputError` naming the argument and its flag."""
    _check_count("max_samples", "--max-samples", max_samples)
    _check_count("per_class", "--per-class", per_class)
    _check_count("budget", "--budget", budget)
    _check_count("top_k", "--top-k", top_k)
    check_count("verify", verify, flag="--verify", cure="pass how many of the top candidates to fine-tune")
    check_count("verify_budget", verify_budget, flag="--verify-budget", cure="pass the total optimizer steps")
    if verify_budget is not None and verify is None:
        raise InputError(f"--verify-budget {verify_budget} without --verify K (verify_budget={verify_budget} without "
                         "verify): pass how many of the top candidates to fine-tune")


def resolve_spec(spec: str) -> str:
    """The canonical spec with ``local-dir:``/``file:`` paths made absolute (other kinds unchanged); a spec
    that does not parse is returned as given (loading it reports the error)."""
    from .errors import SpecError
    from .hub import ModelSpec

    try:
        return str(ModelSpec.parse(spec).resolved())
    except SpecError:
        return spec


#: what rank() scores when the caller names no metric: ``auto`` orders (see :mod:`hubtune.scoring.auto`),
#: LogME is kept beside it (its posterior weights are what B-Tuning reads from a ranking)
DEFAULT_METRICS = ("auto", "logme")


def rank(models, dataset="digits", metrics=None, *, split="train", data_dir=None, download=False, max_samples=None,
         per_class=None, seed=0, options=None, budget: int | None = None, top_k: int | None = None,
         out=None, trust_remote_code: bool = False, backend: str = "local",
         ray_options: RayOptions | dict | None = None, logme_mode: str = "fast", verify: int | None = None,
         verify_budget: int | None = None, verify_options: dict | None = None) -> Ranking:
    """Rank hub models on a dataset.

    models: specs (see ``hubtune.hub.ModelSpec``) or loaded ``Candidate`` objects. ``local-dir:`` and
        ``file:`` paths are resolved to absolute paths: the ranking stores both (``spec``, ``spec_given``).
    dataset: a registered name, ``imagefolder:PATH``, an ``ImageDataset`` or a torch Dataset.
    metrics: estimator names; the first orders the ranking. Default :data:`DEFAULT_METRICS`: ``auto`` (the
        estimators chosen on hubtune's zoos with measured fine-tune accuracy) and LogME beside it.
    max_samples, per_class, budget, top_k: None or an integer >= 1, checked before any work (0 is refused).
    trust_remote_code: let Hugging Face repos that ship their own model code run it (off by default).
    budget: successive halving: score every candidate on a stratified sample of ``budget`` images, keep
        the better half, double the sample, and repeat until ``top_k`` (default 1) candidates remain or
        the sample is the whole dataset. Samples are prefixes of one stratified order, so each round
        extracts only the images its sample adds (the rest come from the cache). Scores of candidates
        dropped early come from smaller samples; the ranking lists candidates by rounds survived, then
        by score.

    verify: after scoring, fine-tune the top ``verify`` candidates briefly on a held-out stratified split of the
        dataset by successive halving and put them first, ordered by held-out accuracy (the estimators' scores
        stay beside it; :mod:`hubtune.verify`); ``verify_budget``: total optimizer steps (default: 2 epochs of
        the training part per verified candidate); ``verify_options``: other :func:`hubtune.verify.verify`
        arguments (lr, batch_size, eta, holdout, ...).
    logme_mode: "fast" (default: float32 Gram blocks accumulated in float64, a tridiagonal solver; the score
        is within 1e-6 relative of "exact", far below the gaps between candidates and the features' own
        precision) or "exact" (float64 throughout, equal to the reference to 1e-9).
    backend: "local" (this process; candidates loaded one at a time, see ``ExtractOptions.max_resident``) or
        "ray" (one Ray task per candidate, and per ``shard_rows`` rows, each extracting through the cache and
        merging its accumulators on the worker; see :class:`RayOptions`, given as ``ray_options``). The
        result equals the local one; a failed task is retried ``max_retries`` times.

    One bad candidate never sinks the hub: a model that does not load (missing, truncated or damaged
    weights, a bad ``config.json``), whose outputs are NaN/Inf, or that a metric cannot score is skipped
    with a warning naming it and the reason, and listed in ``Ranking.skipped``. The output folder and the
    cache are checked writable before extraction starts.
    """
    from .data import ImageDataset, create_dataset, stratified_subsample
    from .features import ExtractOptions, FeatureCache

    check_rank_args(max_samples, per_class, budget, top_k, verify, verify_budget)
    metrics = list(DEFAULT_METRICS if metrics is None else metrics)
    if not metrics:
        raise InputError("metrics is empty; pass at least one of " + ", ".join(ESTIMATORS.names()))
    for m in metrics:
        ESTIMATORS.get(m)
    options = options or ExtractOptions()
    if backend not in ("local", "ray"):
        raise InputError(f"backend={backend!r} is not one of local, ray")
    if backend == "ray":
        ray_options = _ray_options(ray_options)
        from ._ray import import_ray

        import_ray()  # MissingExtraError naming the extra, before any work
    if logme_mode not in ("fast", "exact"):
        raise InputError(f"logme_mode={logme_mode!r} is not one of fast, exact")
    score = (partial(_score_candidates, logme_mode=logme_mode) if backend == "local" else
             partial(_score_candidates_ray, ray_opts=ray_options, logme_mode=logme_mode))
    if out is not None:
        check_writable(out)
    if options.use_cache:
        check_writable(FeatureCache(options.cache_dir).folder)
    base = dataset if isinstance(dataset, ImageDataset) else create_dataset(dataset, split=split, data_dir=data_dir,
                                                                            download=download)
    ds = base
    if max_samples is not None or per_class is not None:
        ds = stratified_subsample(base, max_samples=max_samples, per_class=per_class, seed=seed)
    dataset_info = {"spec": dataset if isinstance(dataset, str) else (os.fspath(dataset) if isinstance(
                        dataset, os.PathLike) else base.name),
                    "split": split, "fingerprint": ds.fingerprint, "base_fingerprint": base.fingerprint,
                    "num_classes": int(base.num_classes), "max_samples": max_samples, "per_class": per_class}

    candidates, skipped, given = [], {}, {}
    for m in models:
        if not isinstance(m, str):
            candidates.append(m)
            given[m.spec] = m.spec
            continue
        from .hub import data_config_warning, identify_candidate

        try:  # the identity and transform, without loading the weights: a candidate loads at its turn
            cand = identify_candidate(resolve_spec(m), trust_remote_code=trust_remote_code)
        except HubtuneError as e:
            warnings.warn(f"skipping {m}: {e}", stacklevel=2)
            skipped[m] = str(e)
            continue
        except Exception as e:  # one bad candidate never sinks the hub
            why = f"{m}: could not be loaded ({type(e).__name__}: {' '.join(str(e).split())[:400]})"
            warnings.warn(f"skipping {m}: {why}", stacklevel=2)
            skipped[m] = why
            continue
        if cand.spec in given:
            continue  # the same model named twice (e.g. by a relative and an absolute path)
        note = data_config_warning(cand.spec, getattr(cand, "data_config_source", None))
        if note:  # a file: checkpoint running on timm's default transform for its architecture
            warnings.warn(note, stacklevel=2)
        candidates.append(cand)
        given[cand.spec] = m
    if not candidates:
        raise InputError("no candidate could be loaded: " + "; ".join(_why(k, v) for k, v in skipped.items()))

    def drop(failed):
        for spec, why in failed.items():
            skipped[given.get(spec, spec)] = why

    rounds = {c.spec: 1 for c in candidates}
    recorded: dict[str, CandidateResult] = {}
    budget_info = None
    if budget:
        ds_order = ds.subset(stratified_order(ds.labels, seed))  # every prefix of this order is stratified
        keep, size, history = list(candidates), int(budget), []
        target = top_k or 1
        while True:
            size = min(size, len(ds_order))
            results, stats, failed = score(keep, ds_order, metrics, options, rows=size)
            drop(failed)
            history.append({"samples": size, "candidates": [c.spec for c in keep],
                            "forward_passes": int(sum(st.computed for st in stats.values()))})
            keep = [c for c in keep if c.spec in results]
            for spec in failed:
                recorded.pop(spec, None)
            _record(keep, results, stats, rounds, recorded)
            if len(keep) <= target or size >= len(ds_order):
                break
            keep.sort(key=lambda c: -results[c.spec][metrics[0]].score)
            keep = keep[: max(target, (len(keep) + 1) // 2)]
            for c in keep:
                rounds[c.spec] += 1
                recorded[c.spec].rounds = rounds[c.spec]
            if len(keep) <= target:  # the finalists are decided; another round would only re-score them
                break
            size *= 2
        budget_info = {"initial_samples": int(budget), "rounds": history,
                       "images_scored": int(sum(h["samples"] * len(h["candidates"]) for h in history)),
                       "forward_passes": int(sum(h["forward_passes"] for h in history)),
                       "forward_passes_full_ranking": len(ds_order) * len(candidates)}
    else:
        results, stats, failed = score(candidates, ds, metrics, options, rows=None)
        drop(failed)
        _record([c for c in candidates if c.spec in results], results, stats, rounds, recorded)
    entries = list(recorded.values())
    if not entries:
        raise InputError("no candidate could be ranked: " + "; ".join(_why(k, v) for k, v in skipped.items()))

    apply_combined(entries, metrics)
    weights = {}
    for e in entries:
        e.spec_given = given.get(e.spec, e.spec)
        e.__dict__.pop("_results", None)
        res = e.__dict__.pop("_logme", None)
        if res is not None:
            weights[e.spec] = {"columns": res.columns, "weights": res.weights.astype(np.float32),
                               "evidence": res.evidence, "alpha": res.alpha, "beta": res.beta}
    entries.sort(key=lambda e: (-e.rounds, -e.scores[metrics[0]]))
    for i, e in enumerate(entries, 1):
        e.rank = i
    by_spec = {c.spec: c for c in candidates}
    precision = _tie_bands(entries, [by_spec[e.spec] for e in entries], ds, metrics, options, seed)
    verification = None
    if verify:
        from .verify import reorder, verify as run_verify

        progress = options.progress if options.progress is not None else sys.stderr.isatty()
        v = run_verify([by_spec[e.spec] for e in entries], ds, k=min(verify, len(entries)),
                       budget_steps=verify_budget, seed=seed, device=options.device,
                       progress=progress, **(verify_options or {}))
        entries, verification = reorder(entries, v), v.to_dict()
        for e in entries:  # the precision's tie bands were drawn on the estimators' order
            e.tie = ""
    ranking = Ranking(dataset=ds.name, metrics=metrics, candidates=entries, skipped=skipped, budget=budget_info,
                      weights=weights, dataset_info=dataset_info, precision=precision, verification=verification)
    if out is not None:
        ranking.save(out)
    return ranking


#: rows of the stratified probe on which a low precision is compared with fp32
PROBE_ROWS = 256


def _tie_bands(entries, refs, ds, metrics, options, seed) -> str:
    """Each entry's precision error (``precision_error``) and tie group (``tie``); returns the precision.

    fp32 is the reference: its error is 0. Under a bf16 policy every candidate's first :data:`PROBE_ROWS`
    rows of a stratified order are extracted in that policy and in fp32 (through the cache, so a second run
    loads nothing) and scored; the error is ``PROBE_SAFETY`` x the largest score difference on the probe and
    its halves (:func:`hubtune.features.precision.probe_error`). Candidates whose intervals [s - e, s + e]
    chain together form a tie group (among candidates that survived the same number of halving rounds)."""
    from dataclasses import replace

    from .features import extract
    from .features.extractor import resolve_device
    from .features.precision import band_from_diffs, probe_diffs, resolve_precision, tie_labels

    precision = resolve_precision(options.precision, resolve_device(options.device))
    if precision == "fp32":
        for e in entries:
            e.precision_error = {m: 0.0 for m in metrics}
        return precision
    probe = ds.subset(stratified_order(ds.labels, seed)[:PROBE_ROWS])
    for e, ref in zip(entries, refs):
        got = {}
        try:
            for p in (precision, "fp32"):
                parts = []
                extract([ref], probe, replace(options, precision=p, progress=False),
                        lambda s, f, l, y: parts.append((f, l)), on_error="raise")
                got[p] = (np.concatenate([f for f, _ in parts]),
                          None if parts[0][1] is None else np.concatenate([l for _, l in parts]))
            _, e.precision_error = band_from_diffs(probe_diffs(metrics, got[precision], got["fp32"], probe.labels))
        except HubtuneError as err:  # the probe could not be scored: the error is unknown, ties with all
            warnings.warn(f"{e.spec}: the precision probe failed ({err}); its tie band is unknown", stacklevel=3)
            e.precision_error = {m: float("inf") for m in metrics}
    m0, start = metrics[0], 0
    for rounds in sorted({e.rounds for e in entries}, reverse=True):
        group = [e for e in entries if e.rounds == rounds]
        # a combined metric's error is measured on its per-model term, so the band is drawn there
        labels = tie_labels({e.spec: e.raw_scores.get(m0, e.scores[m0]) for e in group},
                            {e.spec: e.precision_error[m0] for e in group})
        for e in group:
            lo, _, hi = labels[e.spec].partition("-")
            e.tie = f"{int(lo) + start}-{int(hi) + start}" if hi else ""
        start += len(group)
    return precision


def stratified_order(labels, seed: int = 0) -> np.ndarray:
    """A permutation of the rows whose every prefix holds the classes in their overall proportions:
    each class is shuffled, then the classes are interleaved by fractional position within the class."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    key = np.empty(len(labels))
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        key[idx] = (np.arange(len(idx)) + rng.random()) / len(idx)
    return np.argsort(key, kind="stable")


def _record(cands, results, stats, rounds, into: dict) -> None:
    for c in cands:
        st = stats[c.spec]
        res = results[c.spec]
        r = CandidateResult(spec=c.spec, scores={m: float(v.score) for m, v in res.items() if m != HEAD},
                            feature_dim=st.feature_dim, num_source_classes=st.num_classes, n=st.n,
                            seconds=st.seconds, images_per_second=_finite(st.compute_throughput),
                            cache_hit=st.cache_hit, rounds=rounds[c.spec], computed=st.computed,
                            num_params=st.num_params, loaded=st.loaded,
                            cached=st.cached, cache_seconds=st.cache_seconds,
                            overall_images_per_second=_finite(st.throughput))
        if "logme" in res:
            r.__dict__["_logme"] = res["logme"]
            if not res["logme"].converged:
                r.flags.append("logme-not-converged")
        if HEAD in res and res[HEAD].constant:
            r.flags.append("head-uniform" if res[HEAD].uniform else "head-constant")
        r.__dict__["_results"] = {m: v for m, v in res.items() if m != HEAD}
        into[c.spec] = r


def _finite(v: float) -> float:
    return float(v) if np.isfinite(v) else 0.0
