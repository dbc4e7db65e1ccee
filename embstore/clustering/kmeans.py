"""Lloyd's k-means with k-means++ seeding, in memory (NumPy; deterministic for a seed).

Diarization runs it on an item's spectral embedding; the corpus engine splits cells
that grew too large with it. (The corpus engine's streamed passes over millions of rows
are its own: `embstore.clustering.corpus`.)
"""

from __future__ import annotations

import math

import numpy as np


def kmeans(data: np.ndarray, k: int, seed: int = 0, n_init: int = 10, iters: int = 100) -> np.ndarray:
    """Lloyd's k-means with k-means++ seeding; best of `n_init` runs by inertia."""
    data = np.asarray(data, dtype=np.float64)
    n = len(data)
    if k <= 1 or n <= 1:
        return np.zeros(n, dtype=np.int32)
    k = min(k, n)
    rng = np.random.default_rng(seed)
    best, best_inertia = np.zeros(n, dtype=np.int32), math.inf
    sq = (data**2).sum(axis=1)
    for _ in range(n_init):
        centers = _kmeans_pp(data, sq, k, rng)
        labels = np.zeros(n, dtype=np.int32)
        for it in range(iters):
            dist = sq[:, None] - 2 * data @ centers.T + (centers**2).sum(axis=1)[None, :]
            new = dist.argmin(axis=1).astype(np.int32)
            if it and np.array_equal(new, labels):
                break
            labels = new
            for c in range(k):
                members = data[labels == c]
                # an emptied cluster restarts at the point farthest from its centre
                centers[c] = members.mean(axis=0) if len(members) else data[dist.min(axis=1).argmax()]
        inertia = float(np.maximum(dist[np.arange(n), labels], 0).sum())
        if inertia < best_inertia - 1e-12:
            best, best_inertia = labels, inertia
    return best


def _kmeans_pp(data: np.ndarray, sq: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    centers = [data[rng.integers(len(data))]]
    closest = np.maximum(sq - 2 * data @ centers[0] + centers[0] @ centers[0], 0)
    for _ in range(1, k):
        total = closest.sum()
        index = int(rng.choice(len(data), p=closest / total)) if total > 0 else int(rng.integers(len(data)))
        centers.append(data[index])
        closest = np.minimum(closest, np.maximum(sq - 2 * data @ data[index] + sq[index], 0))
    return np.array(centers)
