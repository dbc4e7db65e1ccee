"""Verification metrics over trial scores: EER and minDCF (NumPy only).

`labels` are 1/True for target trials (same speaker) and 0/False for non-target ones;
higher scores mean "more likely the same speaker". Both metrics sweep the decision
threshold over every distinct score (ties are decided together, never split).
"""

from __future__ import annotations

from typing import Sequence

import os
from typing import TYPE_CHECKING

import numpy as np

from embstore.errors import StoreError
from embstore.manifest.connection import select_in
from embstore.query import resolve_ids
from embstore.vectors import cosine_rows  # noqa: F401 - re-exported for callers of score

if TYPE_CHECKING:
    from embstore.manifest.database import Manifest


def _error_rates(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Miss and false-alarm rates at every distinct threshold, from accept-all to reject-all."""
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
    miss_rate = misses[cut] / n_target
    fa_rate = 1.0 - rejected_nontargets[cut] / n_nontarget
    return miss_rate, fa_rate


def compute_eer(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray) -> float:
    """Equal error rate in [0, 1], interpolated where the miss and false-alarm curves cross."""
    miss, fa = _error_rates(scores, labels)
    # miss rises and fa falls along the sweep; find the first point where miss >= fa
    i = int(np.argmax(miss >= fa))
    if i == 0:
        return float((miss[0] + fa[0]) / 2)
    gap_before = fa[i - 1] - miss[i - 1]
    gap_after = fa[i] - miss[i]
    t = gap_before / (gap_before - gap_after)
    return float(miss[i - 1] + t * (miss[i] - miss[i - 1]))


def compute_min_dcf(
    scores: Sequence[float] | np.ndarray,
    labels: Sequence[int] | np.ndarray,
    p_target: float = 0.01,
    c_miss: float = 1.0,
    c_fa: float = 1.0,
) -> float:
    """Minimum normalised detection cost (NIST SRE): min over thresholds of
    (c_miss * P_miss * p_target + c_fa * P_fa * (1 - p_target)) / min(c_miss * p_target, c_fa * (1 - p_target))."""
    if not 0.0 < p_target < 1.0:
        raise ValueError(f"p_target must be in (0, 1), got {p_target}")
    miss, fa = _error_rates(scores, labels)
    cost = c_miss * miss * p_target + c_fa * fa * (1.0 - p_target)
    return float(cost.min() / min(c_miss * p_target, c_fa * (1.0 - p_target)))


# -- trial lists and scoring a store -------------------------------------------------------
# (below: parsing Kaldi/VoxCeleb trial lists, resolving their ids, scoring a store's items)

TRIAL_LABELS = {
    "target": True, "tgt": True, "true": True, "1": True, "same": True,
    "nontarget": False, "non-target": False, "nontgt": False, "impostor": False, "imp": False,
    "false": False, "0": False, "different": False,
}


def parse_trials(path: str) -> list[tuple[str, str, bool]]:
    """(id1, id2, is_target) per line of a trial list: `id1 id2 target|nontarget` (Kaldi),
    or the label first as in VoxCeleb's `1 id10270/x/00001.wav id10309/y/00002.wav`.
    Labels: target/nontarget, 1/0, true/false. The first line decides where the label is."""
    trials: list[tuple[str, str, bool]] = []
    label_at: int | None = None
    try:
        f = open(path, encoding="utf-8")
    except OSError as exc:
        raise StoreError(f"{path}: cannot read the trial list ({exc.strerror})") from None
    with f:
        for lineno, line in enumerate(f, 1):
            fields = line.split()
            if not fields or fields[0].startswith("#"):
                continue
            if len(fields) != 3:
                raise StoreError(f"{path}:{lineno}: expected 3 fields (id id label), got {len(fields)}: {line.strip()!r}")
            if label_at is None:
                label_at = 2 if fields[2].lower() in TRIAL_LABELS else 0 if fields[0].lower() in TRIAL_LABELS else None
                if label_at is None:
                    raise StoreError(
                        f"{path}:{lineno}: no target/nontarget (or 1/0) label in the first or last column"
                    )
            label = fields[label_at].lower()
            if label not in TRIAL_LABELS:
                raise StoreError(f"{path}:{lineno}: {fields[label_at]!r} is not a trial label (target/nontarget, 1/0)")
            a, b = (fields[0], fields[1]) if label_at == 2 else (fields[1], fields[2])
            trials.append((a, b, TRIAL_LABELS[label]))
    if not trials:
        raise StoreError(f"{path}: no trials in the file")
    return trials


def score_trials(
    store: "Manifest",
    trials: str | os.PathLike,
    model: str | None = None,
    p_target: float = 0.01,
    c_miss: float = 1.0,
    c_fa: float = 1.0,
    scores_out: str | None = None,
) -> dict:
    """Cosine-score every trial whose two ids are in the store (see
    `embstore.query.resolve_ids`), then EER and minDCF over them.

    Returns {"eer", "min_dcf", "trials" (scored), "missing" (skipped: an id not in the
    store or without an embedding), "targets", "nontargets", "model"}. `scores_out`
    gets one `id1 id2 score target|nontarget` line per scored trial."""
    if not 0.0 < p_target < 1.0:
        raise StoreError(f"--p-target must be between 0 and 1 (got {p_target})")
    if c_miss <= 0 or c_fa <= 0:
        raise StoreError("--c-miss and --c-fa must be positive")
    m = store.resolve_model(model)
    parsed = parse_trials(str(trials))
    item_of = resolve_ids(store, [x for a, b, _ in parsed for x in (a, b)])
    wanted = sorted({i for i in item_of.values() if i is not None})
    row_of: dict[int, int] = dict(
        (r[0], r[1]) for r in select_in(
            store.conn, "SELECT item_id, row FROM tasks WHERE model_id = ? AND status = 'done' AND item_id IN ({marks})",
            wanted, params_before=(m["id"],),
        )
    )
    slot = {item: k for k, item in enumerate(row_of)}
    vectors = store.model_arrays(m).read_rows(np.array(list(row_of.values()), dtype=np.int64)).astype(np.float64)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    vectors /= np.where(norms > 0, norms, 1.0)
    left, right, labels, kept = [], [], [], []
    for a, b, is_target in parsed:
        ia, ib = item_of[a], item_of[b]
        if ia in slot and ib in slot:
            left.append(slot[ia])
            right.append(slot[ib])
            labels.append(is_target)
            kept.append((a, b, is_target))
    scores = (vectors[left] * vectors[right]).sum(axis=1) if kept else np.zeros(0)
    result = {
        "eer": None, "min_dcf": None, "trials": len(kept), "missing": len(parsed) - len(kept),
        "targets": int(sum(labels)), "nontargets": len(labels) - int(sum(labels)), "model": store.model_key(m),
    }
    if scores_out:
        with open(scores_out, "w", encoding="utf-8") as f:
            for (a, b, is_target), s in zip(kept, scores):
                f.write(f"{a} {b} {s:.6f} {'target' if is_target else 'nontarget'}\n")
    if not kept:
        raise StoreError(f"none of the {len(parsed)} trials has both ids in the store ({result['model']})")
    try:
        result["eer"] = compute_eer(scores, labels)
        result["min_dcf"] = compute_min_dcf(scores, labels, p_target=p_target, c_miss=c_miss, c_fa=c_fa)
    except ValueError as exc:
        raise StoreError(f"cannot score {trials}: {exc} ({len(kept)} trials scored, {result['missing']} missing)") from None
    return result
