"""How good is a ranking? Agreement of predicted scores with measured fine-tune accuracies.

    >>> from hubtune.rank_quality import ranking_quality
    >>> ranking_quality({"a": 0.3, "b": 0.1}, {"a": 0.91, "b": 0.88}, noise=0.005)

``truth`` holds each model's measured accuracy (a fraction, e.g. the mean over seeds at the best learning
rate). Ground truth has noise of its own: two seeds of the same fine-tune differ. Rewarding or punishing a
ranker for how it orders models whose accuracies are closer than that noise measures nothing, so with
``noise`` > 0 the accuracies are first grouped into **tiers**: sorted from the best, a tier starts at its
best model and holds every following model within ``noise`` of that best (so a tier never spans more than
``noise``). Both the raw and the tie-aware figures are returned:

- ``weighted_tau``: the weighted Kendall τ of the transferability literature (LogME, SFDA, ETran report
  it): over pairs of models, +1 when the prediction orders the pair as the truth does, −1 when it does not,
  weighted by hyperbolic weights of the pair's ranks, 1/(r_i+1) + 1/(r_j+1) (r = 0 for the best: swaps at
  the top cost more), computed once with the ranks of the prediction and once with those of the truth and
  averaged (SciPy's ``weightedtau(truth, pred)``, which the raw figure is);
- ``kendall_tau`` (the same without weights; SciPy's τ-b for the raw figure) and ``spearman``;
- ``top1_regret``: accuracy of the truly best model minus that of the predicted top-1, in points.

**Tie-aware**: a pair of models in one tier is left out (neither rewarded nor punished, whichever way the
prediction orders it), so a prediction that orders every tier correctly scores 1 however it orders models
within a tier; the truth's ranks for the weights are the mean rank of each tier. The regret is 0 when the
predicted top-1 is in the top tier. (τ-b over tied truths would punish any strict order of a tie: on the
digits zoo the perfect prediction, the truth itself, only reaches 0.84 that way.)
"""
from __future__ import annotations

import numpy as np

from .errors import InputError


def tiers(truth: dict[str, float], noise: float) -> dict[str, int]:
    """{model: tier}, tier 0 the best (see the module doc); noise 0 gives distinct accuracies distinct tiers."""
    if not (np.isfinite(noise) and noise >= 0):
        raise InputError(f"noise={noise!r} must be a finite number >= 0 (an accuracy difference, e.g. 0.005)")
    order = sorted(truth, key=lambda k: -truth[k])
    out, tier, top = {}, -1, None
    for k in order:
        if top is None or truth[k] < top - noise:
            tier, top = tier + 1, truth[k]
        out[k] = tier
    return out


def ranking_quality(pred: dict[str, float], truth: dict[str, float], noise: float = 0.0) -> dict:
    """Raw and tie-aware agreement of ``pred`` (higher = predicted better) with ``truth`` (accuracies); see
    the module doc. Models are those of ``truth``; each needs a finite prediction."""
    from scipy.stats import kendalltau, spearmanr, weightedtau

    names = list(truth)
    if len(names) < 2:
        raise InputError(f"ranking_quality needs at least 2 models with a truth, got {len(names)}")
    missing = [k for k in names if k not in pred or not np.isfinite(pred[k])]
    if missing:
        raise InputError(f"no finite prediction for {', '.join(missing)}; score every model of the truth")
    p = np.array([pred[k] for k in names], dtype=np.float64)
    t = np.array([truth[k] for k in names], dtype=np.float64)
    tier = tiers(truth, noise)
    tt = -np.array([tier[k] for k in names], dtype=np.float64)  # higher is better
    top = names[int(np.argmax(p))]  # a tie in the prediction: the first listed
    best = float(t.max())

    raw_regret = 100.0 * (best - truth[top])
    raw = {"weighted_tau": float(weightedtau(t, p)[0]), "kendall_tau": float(kendalltau(t, p)[0]),
           "spearman": float(spearmanr(t, p)[0]), "top1_regret": raw_regret}
    tie_aware = {"weighted_tau": pair_tau(tt, p, weighted=True), "kendall_tau": pair_tau(tt, p, weighted=False),
                 "spearman": float(spearmanr(tt, p)[0]), "top1_regret": 0.0 if tier[top] == 0 else raw_regret}
    return {"n_models": len(names), "noise": float(noise), "predicted_top1": top, "raw": raw,
            "tie_aware": tie_aware, "n_tiers": int(max(tier.values()) + 1)}


def pair_tau(truth, pred, weighted: bool = True) -> float:
    """(Weighted) Kendall τ over the pairs the truth orders (pairs tied in ``truth`` are left out; a pair tied
    in ``pred`` counts 0). Weights: 1/(r_i+1) + 1/(r_j+1), with r the 0-based rank by ``pred`` and, apart, by
    ``truth`` (ties: their mean rank); τ is the mean of the two weighted averages (see the module doc).
    Without ties it equals SciPy's ``weightedtau(truth, pred)`` (weighted) and ``kendalltau`` (unweighted)."""
    from scipy.stats import rankdata

    truth, pred = np.asarray(truth, dtype=np.float64), np.asarray(pred, dtype=np.float64)
    i, j = np.triu_indices(len(truth), 1)
    keep = truth[i] != truth[j]
    if not keep.any():
        return float("nan")
    i, j = i[keep], j[keep]
    s = np.sign(truth[i] - truth[j]) * np.sign(pred[i] - pred[j])
    if not weighted:
        return float(s.mean())
    taus = []
    for v in (pred, truth):
        r = len(v) - rankdata(v, method="average")  # 0 for the best, ties share their mean rank
        w = 1.0 / (r[i] + 1) + 1.0 / (r[j] + 1)
        taus.append(float((w * s).sum() / w.sum()))
    return float(np.mean(taus))
