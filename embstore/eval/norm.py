"""Score normalisation as WeSpeaker's recipe does it (`score_norm.py`, VoxCeleb v2):

1. `m` = mean of the raw embeddings of the `--mean-from` items; every embedding `x`
   becomes `(x - m) / |x - m|`. The raw score of a trial is the cosine of its two sides.
2. The cohort holds one vector per cohort speaker: the mean of that speaker's raw item
   embeddings, minus `m`, L2-normalised.
3. Each trial side is scored against every cohort vector; its statistics are the mean
   and population standard deviation (ddof 0) of the top `n` of those scores (AS-norm)
   or of all of them (S-norm).
4. `normed = 0.5 * ((s - mu_e) / sigma_e + (s - mu_t) / sigma_t)`.

Everything is blocked matrix products on arrays: no Python loop per trial or per item.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from embstore.errors import StoreError

NORMS = ("none", "mean", "snorm", "asnorm")
STAT_BLOCK = 2048      # trial sides per cohort product: 2048 x 6k float32 = 48 MB
PAIR_BLOCK = 65536     # trials per gathered dot product
READ_BLOCK = 65536     # rows read from Zarr at a time when summing

RowReader = Callable[[np.ndarray], np.ndarray]


def grouped_sums(
    read_rows: RowReader, rows: np.ndarray, group: np.ndarray, n_groups: int, dim: int
) -> tuple[np.ndarray, np.ndarray]:
    """(float64 [n_groups, dim] sums of the raw rows of each group, items per group).

    `rows[k]` is item k's Zarr row and `group[k]` its group; a row listed twice counts
    twice. Rows are read in sorted blocks, so a million-item cohort never sits in memory."""
    from scipy.sparse import csr_matrix

    rows = np.asarray(rows, dtype=np.int64)
    group = np.asarray(group, dtype=np.int64)
    order = np.argsort(rows, kind="stable")
    rows, group = rows[order], group[order]
    sums = np.zeros((n_groups, dim), dtype=np.float64)
    for start in range(0, len(rows), READ_BLOCK):
        part = slice(start, start + READ_BLOCK)
        block = np.asarray(read_rows(rows[part]), dtype=np.float64)
        # one sparse (group x item) product per block instead of a scatter-add
        onehot = csr_matrix(
            (np.ones(len(block)), (group[part], np.arange(len(block)))), shape=(n_groups, len(block))
        )
        sums += onehot @ block
    return sums, np.bincount(group, minlength=n_groups)


def to_unit(vectors: np.ndarray, mean: np.ndarray | None = None) -> np.ndarray:
    """float32 rows `(x - mean) / |x - mean|`; a zero row stays zero (cosine 0 with anything)."""
    x = np.asarray(vectors, dtype=np.float64)
    if mean is not None:
        x = x - mean
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.where(norms > 0, norms, 1.0)).astype(np.float32)


def cohort_vectors(speaker_sums: np.ndarray, counts: np.ndarray, mean: np.ndarray | None) -> np.ndarray:
    """One unit vector per cohort speaker: the mean of its raw embeddings, minus `mean`."""
    return to_unit(speaker_sums / np.maximum(counts, 1)[:, None], mean)


def cohort_stats(
    unit: np.ndarray, cohort: np.ndarray, top_ns: Sequence[int | None]
) -> dict[int | None, tuple[np.ndarray, np.ndarray]]:
    """{top_n: (mu, sigma)} per row of `unit` against the cohort; None = all of it (S-norm).

    One blocked product serves every requested top_n: float32 scores, float64 statistics."""
    n_cohort = len(cohort)
    stats = {k: (np.empty(len(unit)), np.empty(len(unit))) for k in top_ns}
    cohort_t = np.ascontiguousarray(np.asarray(cohort, dtype=np.float32).T)
    for start in range(0, len(unit), STAT_BLOCK):
        scores = np.asarray(unit[start : start + STAT_BLOCK], dtype=np.float32) @ cohort_t
        stop = start + len(scores)
        # all of the cohort first: the top-n statistics then partition `scores` in place
        for k in sorted(top_ns, key=lambda k: -(n_cohort if k is None else min(k, n_cohort))):
            if k is None or k >= n_cohort:
                top = scores
            else:
                # the k largest of each row, unordered: mean and std do not need the order
                scores.partition(n_cohort - k, axis=1)
                top = scores[:, n_cohort - k :]
            mu, sigma = stats[k]
            mu[start:stop] = top.mean(axis=1, dtype=np.float64)
            sigma[start:stop] = top.std(axis=1, dtype=np.float64)
    return stats


def pair_scores(unit: np.ndarray, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """float64 cosine of unit[left[k]] and unit[right[k]] for every trial k, in blocks."""
    out = np.empty(len(left), dtype=np.float64)
    for start in range(0, len(left), PAIR_BLOCK):
        a = unit[left[start : start + PAIR_BLOCK]]
        b = unit[right[start : start + PAIR_BLOCK]]
        out[start : start + len(a)] = np.einsum("ij,ij->i", a, b, dtype=np.float64)
    return out


def symmetric_norm(
    raw: np.ndarray, left: np.ndarray, right: np.ndarray, mu: np.ndarray, sigma: np.ndarray
) -> np.ndarray:
    """`0.5 * ((s - mu_e) / sigma_e + (s - mu_t) / sigma_t)`, the statistics indexed by side."""
    flat = np.flatnonzero(sigma[np.concatenate([left, right])] <= 0)
    if len(flat):
        raise StoreError(
            f"{len(flat)} trial sides score the same against every cohort vector they are normalised by"
            " (zero spread); the cohort is degenerate"
        )
    return 0.5 * ((raw - mu[left]) / sigma[left] + (raw - mu[right]) / sigma[right])


def check_norm_options(norms: Sequence[str], mean_from: str | None, cohort: str | None, top_n: int) -> None:
    """Reject option sets that cannot mean anything, before anything is read."""
    for norm in norms:
        if norm not in NORMS:
            raise StoreError(f"unknown --norm {norm!r} (choose from {', '.join(NORMS)})")
    if "mean" in norms and mean_from is None:
        raise StoreError("--norm mean needs --mean-from SEL (the items whose mean is subtracted)")
    needs_cohort = [n for n in norms if n in ("snorm", "asnorm")]
    if needs_cohort and cohort is None:
        raise StoreError(f"--norm {needs_cohort[0]} needs --cohort SEL (the cohort speakers' items)")
    if "asnorm" in norms and top_n < 2:
        raise StoreError(f"--top-n must be at least 2 (got {top_n}): one score has no spread")


__all__ = [
    "NORMS", "grouped_sums", "to_unit", "cohort_vectors", "cohort_stats", "pair_scores", "symmetric_norm",
    "check_norm_options",
]
