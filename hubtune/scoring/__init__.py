"""Transferability estimators as streaming accumulators, and one-shot helpers for arrays you hold.

    >>> from hubtune.scoring import logme, create_estimator
    >>> logme(F, y).score                      # one shot
    >>> acc = create_estimator("logme")        # streaming: update any number of times, merge shards
    >>> for f, y in chunks: acc.update(f, y)
    >>> acc.result().score
"""
from .base import (
    ESTIMATORS, Accumulator, ScoreResult, create_estimator, list_estimators, register_estimator,
)
from .hscore import HScore, HScoreResult, ShrunkHScore, hscore
from .leep import LEEP, LEEPResult, leep
from .logme import LogME, LogMEResult, logme
from .nce import NCE, NCEResult, nce
from .etran import ETran, ETranResult, etran
from .gbc import GBC, GBCResult, gbc
from .ncti import NCTI, NCTIResult, ncti
from .nleep import NLEEP, NLEEPResult, nleep
from .parc import PARC, PARCResult, parc
from .sfda import SFDA, SFDAResult, sfda
from .transrate import TransRate, TransRateProj, TransRateResult, transrate

__all__ = [
    "ESTIMATORS", "Accumulator", "ScoreResult", "create_estimator", "list_estimators", "register_estimator",
    "LogME", "LogMEResult", "logme", "LEEP", "LEEPResult", "leep", "NCE", "NCEResult", "nce",
    "HScore", "ShrunkHScore", "HScoreResult", "hscore",
    "TransRate", "TransRateProj", "TransRateResult", "transrate", "ETran", "ETranResult", "etran",
    "NLEEP", "NLEEPResult", "nleep", "SFDA", "SFDAResult", "sfda", "PARC", "PARCResult", "parc",
    "GBC", "GBCResult", "gbc", "NCTI", "NCTIResult", "ncti",
]

from .auto import Auto, AutoResult, aggregate_ranks  # noqa: E402  (after its components are registered)

__all__ += ["Auto", "AutoResult", "aggregate_ranks"]
