"""Label noise: items far from their own speaker, and the speaker they sit closest to.

An item's score is the cosine between its L2-normalised embedding and the mean of its
speaker's *other* items (the leave-one-out centroid), so an item cannot pull its own
centroid towards itself; speakers with a single item have no score. Crawled corpora
(VoxCeleb-like) carry wrong labels: the lowest scores are where to look first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from embstore.errors import StoreError
from embstore.manifest.database import Manifest
from embstore.query import centroid_table, unit_rows

BLOCK = 65536


def leave_one_out_scores(
    unit: np.ndarray, speaker_sums: np.ndarray, counts: np.ndarray, index: np.ndarray
) -> np.ndarray:
    """Cosine of each unit row with (its speaker's sum - itself) / (n - 1); NaN for n = 1."""
    rest = speaker_sums[index] - unit
    norms = np.linalg.norm(rest, axis=1)
    valid = (counts[index] > 1) & (norms > 0)
    out = np.full(len(unit), np.nan)
    out[valid] = np.einsum("ij,ij->i", unit[valid], rest[valid]) / norms[valid]
    return out


def nearest_other(unit: np.ndarray, centroids: np.ndarray, own: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(index, cosine) of the closest speaker centroid other than the item's own."""
    unit_centroids = centroids / np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
    best = np.full(len(unit), -1, dtype=np.int64)
    best_score = np.full(len(unit), np.nan)
    if len(centroids) < 2:
        return best, best_score
    for start in range(0, len(unit), 4096):
        scores = unit[start : start + 4096] @ unit_centroids.T
        scores[np.arange(len(scores)), own[start : start + 4096]] = -np.inf
        best[start : start + len(scores)] = scores.argmax(axis=1)
        best_score[start : start + len(scores)] = scores.max(axis=1)
    return best, best_score


@dataclass(frozen=True)
class OutlierOptions:
    """Which items `find_outliers` ranks and how many it returns; checked when made.
    model: the model (the only one by default); dataset / speaker: only those items; top:
    the lowest `top`; below: instead, every item scoring under this cosine."""

    model: str | None = None
    dataset: str | None = None
    speaker: str | None = None
    top: int | None = 20
    below: float | None = None

    def __post_init__(self) -> None:
        if self.below is None and (self.top is None or self.top < 1):
            raise StoreError(f"--top must be at least 1 (got {self.top})")
        if self.below is not None and not -1.0 <= self.below <= 1.0:
            raise StoreError(f"--below is a cosine, between -1 and 1 (got {self.below})")


def find_outliers(store: Manifest, options: OutlierOptions | None = None) -> list[dict[str, Any]]:
    """Items of the store (or of one dataset / speaker) by how far they sit from their
    own speaker, worst first: the `top` lowest, or all with a score under `below`.

    Each: {id, speaker, dataset, score (cosine to the leave-one-out centroid), items (of
    that speaker), nearest_speaker, nearest_score (cosine to that speaker's centroid),
    margin (score - nearest_score; negative = closer to another speaker)}. Centroids are
    over every dataset: a speaker label means one person store-wide."""
    opts = options or OutlierOptions()
    model, dataset, speaker, top, below = opts.model, opts.dataset, opts.speaker, opts.top, opts.below
    m, rows = store.done_rows(model, speaker, dataset)
    if not rows:
        parts = [f"speaker {speaker!r}" if speaker else "", f"dataset {dataset!r}" if dataset else ""]
        where = " ".join(x for x in parts if x)
        raise StoreError(f"no embedded items{' of ' + where if where else ''} in the store")
    names, means, counts = centroid_table(store, store.model_key(m))
    position = {n: k for k, n in enumerate(names)}
    sums = means.astype(np.float64) * counts[:, None]
    index = np.array([position[r["speaker"] if r["speaker"] is not None else ""] for r in rows], dtype=np.int64)
    source = unit_rows(store, m)
    zarr_rows = np.array([r["row"] for r in rows], dtype=np.int64)
    scores = np.empty(len(rows))
    for start in range(0, len(rows), BLOCK):
        part = slice(start, start + BLOCK)
        unit = source.take(zarr_rows[part]).astype(np.float64)
        scores[part] = leave_one_out_scores(unit, sums, counts, index[part])
    scored = np.flatnonzero(~np.isnan(scores))
    if not len(scored):
        raise StoreError(
            "no speaker in the selection has two embedded items; outliers need a centroid to leave one out of"
        )
    order = scored[np.lexsort((scored, scores[scored]))]
    chosen = order[scores[order] < below] if below is not None else order[:top]
    unit = source.take(zarr_rows[chosen]).astype(np.float64)
    best, best_score = nearest_other(unit, means.astype(np.float64), index[chosen])
    out = []
    for k, b, bs in zip(chosen, best, best_score):
        r = rows[int(k)]
        score = float(scores[k])
        out.append({
            "id": r["uid"], "speaker": r["speaker"], "dataset": r["dataset"], "score": score,
            "items": int(counts[index[k]]),
            "nearest_speaker": names[b] if b >= 0 else None,
            "nearest_score": float(bs) if b >= 0 else None,
            "margin": score - float(bs) if b >= 0 else None,
        })
    return out


__all__ = ["find_outliers", "OutlierOptions", "leave_one_out_scores", "nearest_other"]
