"""``auto``: the estimators hubtune ranks with when you do not choose, combined by rank aggregation.

No single estimator is right on every zoo: LogME tracks the linear separability of frozen features, not
what full fine-tuning reaches, and the stronger published estimators each fail somewhere. ``auto`` feeds
the same rows to each of :data:`COMPONENTS` and, across the candidates being ranked, averages their
normalised ranks (Borda count):

    auto(m) = (1/|K|) Σ_{k∈K} (rank_k(m) - 1) / (N - 1)        rank_k: 1 for the lowest score of k, ties averaged

so a candidate best by every component scores 1, worst by every component 0. Ranks, not scores, are
averaged, so the components' scales do not matter and one estimator's outlier cannot dominate. With one
candidate its score is 1.

Which components: chosen on hubtune's zoos with measured fine-tune ground truth (``bench/zoo``), as the
subset whose aggregation had the best tie-aware weighted Kendall τ, and validated leave-one-zoo-out (chosen
on one target, measured on the other); the evidence is in ``bench/results/rank_quality.json`` and the README.

Like ETran's, the score is defined across candidates: the per-model ``score`` is the first component's
(so ``hubtune score`` of one feature file still reports a number), and :meth:`Auto.combine` gives the
ranking's. Streaming, merging and memory are those of the components.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError
from .base import ESTIMATORS, Accumulator, ScoreResult, create_estimator, register_estimator

#: the estimators ``auto`` aggregates (chosen on the zoos; see the module doc)
COMPONENTS: tuple[str, ...] = ("transrate-proj",)


@dataclass
class AutoResult(ScoreResult):
    """``score`` is the first component's score (the ranking's ``auto`` is :meth:`Auto.combine`);
    ``components`` holds every component's score."""

    components: dict = field(default_factory=dict)


@register_estimator("auto")
class Auto(Accumulator):
    """Rank aggregation of :data:`COMPONENTS` (see the module doc); ``components`` overrides the list."""

    input_kind = "features"

    def __init__(self, components=None):
        comps = tuple(COMPONENTS if components is None else components)
        if not comps:
            raise InputError("components is empty; name at least one estimator, or leave it out for "
                             f"{', '.join(COMPONENTS)}")
        for c in comps:
            cls = ESTIMATORS.get(c)  # an unknown name raises, listing the registered ones
            if c == "auto" or cls.input_kind != "features":
                raise InputError(f"auto cannot aggregate {c!r}: its components read features "
                                 "(not 'auto', nor LEEP/NCE, which read a source head)")
        self.components = comps
        self._accs = {c: create_estimator(c) for c in comps}
        self.n = 0

    def update(self, x, labels) -> "Auto":
        for acc in self._accs.values():
            acc.update(x, labels)
        self.n += len(labels)
        return self

    def merge(self, other: "Auto") -> "Auto":
        self._check_merge(other)
        if other.components != self.components:
            raise InputError(f"cannot merge auto over {other.components} into auto over {self.components}")
        for c in self.components:
            self._accs[c].merge(other._accs[c])
        self.n += other.n
        return self

    def result(self) -> AutoResult:
        res = {c: acc.result() for c, acc in self._accs.items()}
        first = res[self.components[0]]
        return AutoResult(score=float(first.score), n=first.n,
                          components={c: float(r.score) for c, r in res.items()})

    def state_dict(self) -> dict:
        return {"components": list(self.components), "n": self.n,
                "states": {c: acc.state_dict() for c, acc in self._accs.items()}}

    def load_state_dict(self, state: dict) -> "Auto":
        if tuple(state["components"]) != self.components:
            raise InputError(f"this state is of auto over {tuple(state['components'])}, not {self.components}")
        for c in self.components:
            self._accs[c].load_state_dict(state["states"][c])
        self.n = int(state["n"])
        return self

    @staticmethod
    def combine(results: dict) -> dict:
        """{model: AutoResult} → {model: mean normalised rank over the components} (see the module doc)."""
        return aggregate_ranks({k: r.components for k, r in results.items()})


def aggregate_ranks(scores: dict[str, dict[str, float]], components=None) -> dict[str, float]:
    """{model: {estimator: score}} → {model: mean over the estimators of (rank - 1) / (N - 1)}, ranks ascending
    with ties averaged (1.0 for everyone when N = 1). Every model must have every estimator's score."""
    from scipy.stats import rankdata

    names = list(scores)
    if not names:
        return {}
    comps = list(components or next(iter(scores.values())))
    if len(names) == 1:
        return {names[0]: 1.0}
    total = np.zeros(len(names))
    for c in comps:
        try:
            v = np.array([scores[k][c] for k in names], dtype=np.float64)
        except KeyError:
            raise InputError(f"aggregate_ranks: some model has no {c!r} score") from None
        total += (rankdata(v, method="average") - 1.0) / (len(names) - 1)
    return {k: float(t / len(comps)) for k, t in zip(names, total)}
