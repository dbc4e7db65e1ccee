"""Moved to `embstore.eval`; this module only keeps old imports working."""

from __future__ import annotations

import numpy as np

from embstore.eval.metrics import _error_rates, compute_eer, compute_min_dcf  # noqa: F401
from embstore.eval.scoring import score_trials  # noqa: F401
from embstore.eval.trials import TRIAL_LABELS, parse_trials  # noqa: F401


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of each row of `a` with the same row of `b` (float64 for the sums)."""
    a = np.atleast_2d(np.asarray(a, dtype=np.float64))
    b = np.atleast_2d(np.asarray(b, dtype=np.float64))
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
