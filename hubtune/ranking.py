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
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import __version__
from ._checks import check_count
from ._io import atomic_path, atomic_savez, atomic_write_text, check_writable, write_json
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


@dataclass
class Ranking:
    dataset: str
    metrics: list[str]
    candidates: list[CandidateResult]
    skipped: dict[str, str] = field(default_factory=dict)   # spec -> reason
    budget: dict | None = None
    weights: dict[str, dict] = field(default_factory=dict, repr=False)  # spec -> LogME columns/weights
    dataset_info: dict | None = None  # spec, split, fingerprint, base_fingerprint, num_classes, max_samples, per_class

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

        header = ["rank", "model"] + self.metrics + ["dim", "n", "params", "img/s", "all img/s", "cache"]
        rows = [[str(c.rank), c.spec_given or c.spec] + [f"{c.scores.get(m, float('nan')):.5g}" for m in self.metrics]
                + [str(c.feature_dim), str(c.n), f"{c.num_params / 1e6:.1f}M", rate(c.images_per_second),
                   rate(c.overall_images_per_second),
                   "hit" if c.cache_hit else (f"{c.cached}/{c.n}" if c.cached else "miss")] for c in self.candidates]
        widths = [max(len(x) for x in col) for col in zip(header, *rows)]
        lines = ["  ".join(x.ljust(w) for x, w in zip(r, widths)).rstrip()
                 for r in [header, ["-" * w for w in widths]] + rows]
        lines += [f"skipped {spec}: {why}" for spec, why in self.skipped.items()]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"hubtune": __version__, "dataset": self.dataset, "dataset_info": self.dataset_info,
                "metrics": self.metrics, "budget": self.budget, "skipped": self.skipped,
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
        w.writerow(["rank", "spec"] + self.metrics + ["feature_dim", "n", "num_params", "seconds",
                                                      "images_per_second", "cache_hit"])
        for c in self.candidates:
            w.writerow([c.rank, c.spec] + [c.scores.get(m) for m in self.metrics]
                       + [c.feature_dim, c.n, c.num_params, f"{c.seconds:.4f}", f"{c.images_per_second:.2f}",
                          c.cache_hit])
        atomic_write_text(out / "ranking.csv", buf.getvalue())
        try:
            self.plot(out / "ranking.png")
        except MissingExtraError as e:
            warnings.warn(f"ranking.png not written: {e}", stacklevel=2)
        return out

    def plot(self, path: str | Path) -> Path:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            raise MissingExtraError("matplotlib", "plot", "the ranking plot") from None
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
        path = Path(path)
        try:
            with atomic_path(path) as tmp:
                fig.savefig(tmp, dpi=100, format="png")
        finally:
            plt.close(fig)
        return path

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
                   budget=d.get("budget"), weights=weights, dataset_info=info if isinstance(info, dict) else None)


def _safe(spec: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in spec)[:80]


# ------------------------------------------------------------------------------------------- rank
def _score_candidates(candidates, dataset, metrics, options, rows=None):
    """Stream every candidate's chunks into fresh accumulators; returns (results, stats, failed) where
    ``failed`` maps the spec of each candidate dropped on the way to the reason."""
    from .features import extract

    accs = {c.spec: {m: create_estimator(m) for m in metrics} for c in candidates}

    def on_chunk(spec, feats, logits, labels):
        for m, acc in accs[spec].items():
            kind = ESTIMATORS.get(m).input_kind
            if kind == "features":
                acc.update(feats, labels)
            else:
                if logits is None:
                    raise InputError(f"{spec} has no source classifier head, so {m} cannot score it; "
                                     "use logme or hscore for headless models")
                acc.update(softmax(logits) if kind == "probs" else logits, labels)

    stats = extract(candidates, dataset, options, on_chunk, rows=rows, on_error="skip")
    results, failed = {}, {}
    for spec, a in accs.items():
        if stats[spec].error is not None:
            failed[spec] = stats[spec].error
            continue
        try:
            results[spec] = {m: acc.result() for m, acc in a.items()}
        except InputError as e:  # e.g. NaN in a result, an estimator that cannot score these features
            failed[spec] = f"{spec}: {e}"
            continue
        bad = [m for m, r in results[spec].items() if not np.isfinite(r.score)]
        if bad:
            failed[spec] = f"{spec}: its {', '.join(bad)} score is not finite"
            del results[spec]
    for spec, why in failed.items():
        warnings.warn(f"skipping {spec}: {why}", stacklevel=3)
    return results, stats, failed


def _check_count(name: str, flag: str, value) -> int | None:
    return check_count(name, value, flag=flag, cure=f"pass a positive integer, or leave {flag} out to use "
                                                    f"{'every image' if name != 'top_k' else 'the default'}")


def check_rank_args(max_samples=None, per_class=None, budget=None, top_k=None) -> None:
    """Validate the counts of a rank before any work: each is None or an integer >= 1 (0 is refused, not
    taken to mean everything). Raises :class:`~hubtune.errors.InputError` naming the argument and its flag."""
    _check_count("max_samples", "--max-samples", max_samples)
    _check_count("per_class", "--per-class", per_class)
    _check_count("budget", "--budget", budget)
    _check_count("top_k", "--top-k", top_k)


def resolve_spec(spec: str) -> str:
    """The canonical spec with ``local-dir:``/``file:`` paths made absolute (other kinds unchanged); a spec
    that does not parse is returned as given (loading it reports the error)."""
    from .errors import SpecError
    from .hub import ModelSpec

    try:
        return str(ModelSpec.parse(spec).resolved())
    except SpecError:
        return spec


def rank(models, dataset="digits", metrics=("logme",), *, split="train", data_dir=None, download=False, max_samples=None,
         per_class=None, seed=0, options=None, budget: int | None = None, top_k: int | None = None,
         out=None, trust_remote_code: bool = False) -> Ranking:
    """Rank hub models on a dataset.

    models: specs (see ``hubtune.hub.ModelSpec``) or loaded ``Candidate`` objects. ``local-dir:`` and
        ``file:`` paths are resolved to absolute paths: the ranking stores both (``spec``, ``spec_given``).
    dataset: a registered name, ``imagefolder:PATH``, an ``ImageDataset`` or a torch Dataset.
    metrics: estimator names; the first orders the ranking.
    max_samples, per_class, budget, top_k: None or an integer >= 1, checked before any work (0 is refused).
    trust_remote_code: let Hugging Face repos that ship their own model code run it (off by default).
    budget: successive halving: score every candidate on a stratified sample of ``budget`` images, keep
        the better half, double the sample, and repeat until ``top_k`` (default 1) candidates remain or
        the sample is the whole dataset. Samples are prefixes of one stratified order, so each round
        extracts only the images its sample adds (the rest come from the cache). Scores of candidates
        dropped early come from smaller samples; the ranking lists candidates by rounds survived, then
        by score.

    One bad candidate never sinks the hub: a model that does not load (missing, truncated or damaged
    weights, a bad ``config.json``), whose outputs are NaN/Inf, or that a metric cannot score is skipped
    with a warning naming it and the reason, and listed in ``Ranking.skipped``. The output folder and the
    cache are checked writable before extraction starts.
    """
    from .data import ImageDataset, create_dataset, stratified_subsample
    from .features import ExtractOptions, FeatureCache

    check_rank_args(max_samples, per_class, budget, top_k)
    metrics = list(metrics)
    if not metrics:
        raise InputError("metrics is empty; pass at least one of " + ", ".join(ESTIMATORS.names()))
    for m in metrics:
        ESTIMATORS.get(m)
    options = options or ExtractOptions()
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
        from .hub import load_candidate

        try:
            cand = load_candidate(resolve_spec(m), trust_remote_code=trust_remote_code)
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
        candidates.append(cand)
        given[cand.spec] = m
    if not candidates:
        raise InputError("no candidate could be loaded: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))

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
            results, stats, failed = _score_candidates(keep, ds_order, metrics, options, rows=size)
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
        results, stats, failed = _score_candidates(candidates, ds, metrics, options)
        drop(failed)
        _record([c for c in candidates if c.spec in results], results, stats, rounds, recorded)
    entries = list(recorded.values())
    if not entries:
        raise InputError("no candidate could be ranked: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))

    params = {c.spec: c.num_params for c in candidates}
    weights = {}
    for e in entries:
        e.num_params = params.get(e.spec, 0)
        e.spec_given = given.get(e.spec, e.spec)
        res = e.__dict__.pop("_logme", None)
        if res is not None:
            weights[e.spec] = {"columns": res.columns, "weights": res.weights.astype(np.float32),
                               "evidence": res.evidence, "alpha": res.alpha, "beta": res.beta}
    entries.sort(key=lambda e: (-e.rounds, -e.scores[metrics[0]]))
    for i, e in enumerate(entries, 1):
        e.rank = i
    ranking = Ranking(dataset=ds.name, metrics=metrics, candidates=entries, skipped=skipped, budget=budget_info,
                      weights=weights, dataset_info=dataset_info)
    if out is not None:
        ranking.save(out)
    return ranking


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
        r = CandidateResult(spec=c.spec, scores={m: float(res.score) for m, res in results[c.spec].items()},
                            feature_dim=st.feature_dim, num_source_classes=st.num_classes, n=st.n,
                            seconds=st.seconds, images_per_second=_finite(st.compute_throughput),
                            cache_hit=st.cache_hit, rounds=rounds[c.spec], computed=st.computed,
                            cached=st.cached, cache_seconds=st.cache_seconds,
                            overall_images_per_second=_finite(st.throughput))
        if "logme" in results[c.spec]:
            r.__dict__["_logme"] = results[c.spec]["logme"]
        into[c.spec] = r


def _finite(v: float) -> float:
    return float(v) if np.isfinite(v) else 0.0
