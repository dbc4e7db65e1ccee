"""Verification metrics over trial scores: EER, minDCF, actual DCF, DET curves (NumPy only).

`labels` are 1/True for target trials (same speaker) and 0/False for non-target ones;
higher scores mean "more likely the same speaker". Every metric sweeps the decision
threshold over every distinct score (ties are decided together, never split); a trial
is accepted when its score is >= the threshold.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

ArrayLike = Sequence[float] | np.ndarray


@dataclass
class ErrorCurve:
    """Miss and false-alarm rates at every distinct threshold, from accept-all to reject-all.

    `thresholds[k]` is the decision threshold of point k: accept-all is the lowest score,
    reject-all is just above the highest, the points between sit half-way between two
    neighbouring distinct scores."""

    miss: np.ndarray
    fa: np.ndarray
    thresholds: np.ndarray
    targets: int
    nontargets: int


def error_curve(scores: ArrayLike, labels: ArrayLike) -> ErrorCurve:
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel().astype(bool)
    if s.shape != y.shape:
        raise ValueError(f"{len(s)} scores but {len(y)} labels")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or inf")
    n_target = int(y.sum())
    n_nontarget = len(y) - n_target
    if n_target == 0 or n_nontarget == 0:
        raise ValueError("need both target and non-target trials")
    order = np.argsort(s, kind="mergesort")
    s, y = s[order], y[order]
    # threshold between sorted positions i-1 and i: trials [0, i) rejected, [i, n) accepted
    misses = np.concatenate([[0], np.cumsum(y)])
    rejected_nontargets = np.concatenate([[0], np.cumsum(~y)])
    cut = np.concatenate([[True], s[1:] != s[:-1], [True]])  # only between distinct scores
    positions = np.flatnonzero(cut)
    n = len(s)
    lo = s[np.maximum(positions - 1, 0)]
    hi = s[np.minimum(positions, n - 1)]
    mid = lo + (hi - lo) / 2
    mid = np.where(mid > lo, mid, hi)  # two neighbouring floats: the upper one still splits them
    thresholds = np.where(positions == n, np.nextafter(s[-1], np.inf), mid)
    return ErrorCurve(
        miss=misses[cut] / n_target,
        fa=1.0 - rejected_nontargets[cut] / n_nontarget,
        thresholds=thresholds,
        targets=n_target,
        nontargets=n_nontarget,
    )


def _error_rates(scores: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    curve = error_curve(scores, labels)
    return curve.miss, curve.fa


def _eer_of(curve: ErrorCurve) -> tuple[float, int]:
    """(EER interpolated where the curves cross, the sweep point closest to the crossing)."""
    miss, fa = curve.miss, curve.fa
    # miss rises and fa falls along the sweep; find the first point where miss >= fa
    i = int(np.argmax(miss >= fa))
    if i == 0:
        return float((miss[0] + fa[0]) / 2), 0
    gap_before = fa[i - 1] - miss[i - 1]
    gap_after = fa[i] - miss[i]
    t = gap_before / (gap_before - gap_after)
    nearest = i - 1 if abs(gap_before) < abs(gap_after) else i
    return float(miss[i - 1] + t * (miss[i] - miss[i - 1])), nearest


def _check_costs(p_target: float, c_miss: float, c_fa: float) -> None:
    if not 0.0 < p_target < 1.0:
        raise ValueError(f"p_target must be in (0, 1), got {p_target}")
    if c_miss <= 0 or c_fa <= 0:
        raise ValueError("c_miss and c_fa must be positive")


def _dcf(miss: np.ndarray, fa: np.ndarray, p_target: float, c_miss: float, c_fa: float) -> np.ndarray:
    """Normalised detection cost (NIST SRE): divided by the cost of the best trivial system."""
    cost = c_miss * miss * p_target + c_fa * fa * (1.0 - p_target)
    return cost / min(c_miss * p_target, c_fa * (1.0 - p_target))


def compute_eer(scores: ArrayLike, labels: ArrayLike) -> float:
    """Equal error rate in [0, 1], interpolated where the miss and false-alarm curves cross."""
    return _eer_of(error_curve(scores, labels))[0]


def compute_min_dcf(
    scores: ArrayLike, labels: ArrayLike, p_target: float = 0.01, c_miss: float = 1.0, c_fa: float = 1.0
) -> float:
    """Minimum normalised detection cost: min over thresholds of
    (c_miss * P_miss * p_target + c_fa * P_fa * (1 - p_target)) / min(c_miss * p_target, c_fa * (1 - p_target))."""
    _check_costs(p_target, c_miss, c_fa)
    curve = error_curve(scores, labels)
    return float(_dcf(curve.miss, curve.fa, p_target, c_miss, c_fa).min())


def compute_act_dcf(
    scores: ArrayLike, labels: ArrayLike, threshold: float, p_target: float = 0.01,
    c_miss: float = 1.0, c_fa: float = 1.0,
) -> float:
    """Normalised detection cost of deciding at a fixed threshold (accept score >= threshold)."""
    _check_costs(p_target, c_miss, c_fa)
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel().astype(bool)
    if not y.any() or y.all():
        raise ValueError("need both target and non-target trials")
    accepted = s >= threshold
    miss = np.array([np.mean(~accepted[y])])
    fa = np.array([np.mean(accepted[~y])])
    return float(_dcf(miss, fa, p_target, c_miss, c_fa)[0])


@dataclass
class Evaluation:
    """Every number one trial list gets: EER (and its threshold), minDCF and the actual
    DCF at the EER threshold per p_target, with the DET points to mark."""

    eer: float
    eer_threshold: float
    min_dcf: dict[float, float]
    min_dcf_threshold: dict[float, float]
    min_dcf_point: dict[float, tuple[float, float]]  # (P_fa, P_miss) at the minimum
    act_dcf: dict[float, float]
    curve: ErrorCurve

    def as_dict(self) -> dict:
        key = lambda p: f"{p:g}"  # noqa: E731
        return {
            "eer": self.eer,
            "eer_threshold": self.eer_threshold,
            "min_dcf": {key(p): v for p, v in self.min_dcf.items()},
            "min_dcf_threshold": {key(p): v for p, v in self.min_dcf_threshold.items()},
            "act_dcf": {key(p): v for p, v in self.act_dcf.items()},
        }


def evaluate(
    scores: ArrayLike, labels: ArrayLike, p_targets: Sequence[float] = (0.01, 0.05),
    c_miss: float = 1.0, c_fa: float = 1.0,
) -> Evaluation:
    """EER, minDCF and actual DCF (at the EER threshold) from one sort of the scores."""
    for p in p_targets:
        _check_costs(p, c_miss, c_fa)
    curve = error_curve(scores, labels)
    eer, at = _eer_of(curve)
    min_dcf, min_threshold, min_point, act = {}, {}, {}, {}
    for p in p_targets:
        dcf = _dcf(curve.miss, curve.fa, p, c_miss, c_fa)
        k = int(np.argmin(dcf))
        min_dcf[p] = float(dcf[k])
        min_threshold[p] = float(curve.thresholds[k])
        min_point[p] = (float(curve.fa[k]), float(curve.miss[k]))
        # the sweep point at the EER threshold is exactly "accept >= that threshold"
        act[p] = float(dcf[at])
    return Evaluation(eer, float(curve.thresholds[at]), min_dcf, min_threshold, min_point, act, curve)


__all__ = [
    "ErrorCurve", "Evaluation", "error_curve", "compute_eer", "compute_min_dcf", "compute_act_dcf", "evaluate",
]
