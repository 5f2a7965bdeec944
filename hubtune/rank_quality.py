"""How good is a ranking? Agreement of predicted scores with measured fine-tune accuracies.

    >>> from hubtune.rank_quality import ranking_quality
    >>> ranking_quality({"a": 0.3, "b": 0.1}, {"a": 0.91, "b": 0.88}, noise=0.005)

``truth`` holds each model's measured accuracy (a fraction, e.g. the mean over seeds at the best learning
rate). Ground truth has noise of its own: two seeds of the same fine-tune differ. Rewarding or punishing a
ranker for how it orders models whose accuracies are closer than that noise measures nothing, so with
``noise`` > 0 the accuracies are first grouped into **tiers**: sorted from the best, a tier starts at its
best model and holds every following model within ``noise`` of that best (so a tier never spans more than
``noise``); the tie-aware truth is the tier (models in one tier are tied). Both the raw and the tie-aware
figures are returned:

- ``weighted_tau``: SciPy's weighted Kendall τ (hyperbolic weights 1/(r+1) on the ranks, averaged over the
  two rankings: swaps at the top cost more), the measure of the transferability literature (LogME, SFDA,
  ETran report it);
- ``kendall_tau`` (τ-b, ties in the truth accounted for) and ``spearman``;
- ``top1_regret``: accuracy of the truly best model minus that of the predicted top-1, in points; tie-aware,
  0 when the predicted top-1 is in the top tier.
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
        if top is None or truth[k] < top - noise or (noise == 0 and truth[k] < top):
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

    def block(truth_values, regret):
        return {"weighted_tau": float(weightedtau(truth_values, p)[0]),
                "kendall_tau": float(kendalltau(truth_values, p)[0]),
                "spearman": float(spearmanr(truth_values, p)[0]),
                "top1_regret": regret}

    raw_regret = 100.0 * (best - truth[top])
    return {"n_models": len(names), "noise": float(noise), "predicted_top1": top,
            "raw": block(t, raw_regret),
            "tie_aware": block(tt, 0.0 if tier[top] == 0 else raw_regret),
            "n_tiers": int(max(tier.values()) + 1)}
