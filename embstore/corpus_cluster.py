"""Pseudo-speaker labels for the whole items of an unlabelled corpus (`embstore cluster`).

Two stages, so that 1 M items cluster on 2 cores in bounded memory:

1. spherical k-means to K centroids (K = n / `items_per_centroid`, at most
   `max_centroids`), streamed: every pass reads the [n, dim] matrix in blocks (a NumPy
   array, a `np.memmap`/`np.load(mmap_mode="r")` file or a Zarr array all work) and
   accumulates per-centroid sums, so memory is O(K * dim + block * K), never O(n * dim).
   Seeding is k-means++ (in 16 batched rounds) on a random sample of 8K rows; Lloyd
   passes until fewer than 0.1 % of the rows change centroid or `iters` passes.
2. average-linkage agglomerative clustering (cosine) of the K centroids, cut at the
   cosine-similarity `threshold` or into `num_speakers` clusters. Memory O(K^2).

An item's label is its centroid's cluster. With K well above the number of speakers,
stage 1 only splits speakers (each centroid holds one speaker's items) and stage 2
joins the pieces, so the result approaches AHC on the items themselves, which is
what a corpus at most `max_direct` items long gets directly (O(n^2) memory, exact).

Why not a kNN graph (connected components / Leiden on item neighbours): exact kNN of
1 M items is 1e12 dot products (hours on 2 cores) and approximate indexes bring a
dependency; a k-means partition is itself the coarse index such a graph would need.
Rows that are not finite or all zero get label -1.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

# Resemblyzer (the default model), whole utterances: the middle of the plateau of best
# purity + coverage on 5 of the 10 shared LibriSpeech speakers (0.675-0.775); the other 5
# scored purity 1.0 / coverage 1.0 with it (benchmarks/corpus_cluster.py real). Other
# models need their own threshold.
DEFAULT_THRESHOLD = 0.725
MAX_DIRECT = 4096
MAX_CENTROIDS = 4096
ITEMS_PER_CENTROID = 32
# bytes for one block's [block, K] similarity matrix
_BLOCK_BYTES = 1 << 26


class ClusteringError(ValueError):
    """Bad corpus clustering arguments; one line."""


@dataclass
class CorpusClusters:
    labels: np.ndarray  # [n] int32, -1 for unusable rows
    num_clusters: int
    stage1_centroids: int  # 0: AHC on the items directly
    passes: int = 0
    timings: dict[str, float] = field(default_factory=dict)

    def sizes(self) -> np.ndarray:
        return np.bincount(self.labels[self.labels >= 0], minlength=self.num_clusters)


def _normalized_block(matrix: Any, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows a:b as unit float32 vectors, and which of them are usable."""
    block = np.asarray(matrix[a:b], dtype=np.float32)
    norms = np.linalg.norm(block, axis=1)
    valid = np.isfinite(norms) & (norms > 0)
    block = np.where(valid[:, None], block, 0.0).astype(np.float32, copy=False)
    block /= np.where(valid, norms, 1.0)[:, None].astype(np.float32)
    return block, valid


def _ahc(vectors: np.ndarray, threshold: float | None, num_speakers: int | None) -> np.ndarray:
    """Average-linkage cosine AHC labels 0.. of unit vectors."""
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import pdist

    if len(vectors) == 1:
        return np.zeros(1, dtype=np.int32)
    tree = linkage(np.maximum(pdist(vectors.astype(np.float64), "cosine"), 0.0), method="average")
    if num_speakers is not None:
        labels = fcluster(tree, t=min(num_speakers, len(vectors)), criterion="maxclust")
    else:
        labels = fcluster(tree, t=1.0 - float(threshold), criterion="distance")  # type: ignore[arg-type]
    return (labels - 1).astype(np.int32)


def cluster_corpus(
    matrix: Any,
    threshold: float | None = None,
    num_speakers: int | None = None,
    max_direct: int = MAX_DIRECT,
    max_centroids: int = MAX_CENTROIDS,
    items_per_centroid: int = ITEMS_PER_CENTROID,
    iters: int = 6,
    seed: int = 0,
    progress: Callable[[str, int, int], None] | None = None,
) -> CorpusClusters:
    """Cluster labels of the rows of an [n, dim] matrix (see the module docstring)."""
    if threshold is not None and num_speakers is not None:
        raise ClusteringError("give --threshold or --num-speakers, not both")
    if num_speakers is not None and num_speakers < 1:
        raise ClusteringError(f"--num-speakers must be >= 1, got {num_speakers}")
    if threshold is None and num_speakers is None:
        threshold = DEFAULT_THRESHOLD
    if threshold is not None and not -1.0 <= threshold <= 1.0:
        raise ClusteringError(f"--threshold is a cosine similarity in [-1, 1], got {threshold}")
    if len(getattr(matrix, "shape", ())) != 2:
        raise ClusteringError("expected an [items, dim] matrix")
    n = int(matrix.shape[0])
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    if n == 0:
        return CorpusClusters(np.zeros(0, dtype=np.int32), 0, 0)
    if n <= max_direct:
        vectors, valid = _normalized_block(matrix, 0, n)
        labels = np.full(n, -1, dtype=np.int32)
        if valid.any():
            labels[valid] = _ahc(vectors[valid], threshold, num_speakers)
        timings["ahc"] = time.perf_counter() - t0
        return CorpusClusters(labels, int(labels.max()) + 1, 0, timings=timings)
    k = int(min(max_centroids, max(2, math.ceil(n / items_per_centroid)), n))
    centroids = _seed_centroids(matrix, n, k, np.random.default_rng(seed))
    timings["seed"] = time.perf_counter() - t0
    assign = np.full(n, -1, dtype=np.int32)
    passes = 0
    for passes in range(1, iters + 1):
        t = time.perf_counter()
        centroids, changed = _lloyd_pass(matrix, n, centroids, assign, progress, passes)
        timings[f"pass{passes}"] = time.perf_counter() - t
        if changed < 1e-3 * n:
            break
    t = time.perf_counter()
    used = np.unique(assign[assign >= 0])
    merged = np.full(k, -1, dtype=np.int32)
    if len(used):
        merged[used] = _ahc(centroids[used], threshold, num_speakers)
    labels = np.where(assign >= 0, merged[np.maximum(assign, 0)], -1).astype(np.int32)
    timings["ahc"] = time.perf_counter() - t
    return CorpusClusters(labels, int(labels.max()) + 1, k, passes, timings)


def _block_size(k: int) -> int:
    return int(max(256, min(65536, _BLOCK_BYTES // (4 * k))))


def _seed_centroids(matrix: Any, n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++-style (cosine) seeds from a random sample of at most 8k rows."""
    size = min(n, 8 * k)
    rows = np.sort(rng.choice(n, size=size, replace=False))
    # gather the sample block by block: fancy indexing a memmap/Zarr row by row is slow
    parts = []
    step = _block_size(k)
    for a in range(0, n, step):
        pick = rows[(rows >= a) & (rows < a + step)]
        if len(pick):
            block, valid = _normalized_block(matrix, a, min(a + step, n))
            chosen = block[pick - a]
            parts.append(chosen[valid[pick - a]])
    sample = np.concatenate(parts) if parts else np.zeros((0, int(matrix.shape[1])), dtype=np.float32)
    if len(sample) == 0:
        return np.zeros((k, int(matrix.shape[1])), dtype=np.float32)
    k = min(k, len(sample))
    # k-means++ picks one centre per step (k sequential passes over the sample); here
    # each of 16 rounds draws k/16 centres by the same D^2 rule, which keeps its
    # coverage of small speakers at 1/k-th of the sequential cost
    rounds = min(16, k)
    picks = [int(rng.integers(len(sample)))]
    closest = np.maximum(2.0 - 2.0 * (sample @ sample[picks[0]]), 0.0)
    for r in range(rounds):
        want = (k - 1) * (r + 1) // rounds - (len(picks) - 1)
        if want <= 0:
            continue
        weights = closest.astype(np.float64)
        total = weights.sum()
        candidates = np.flatnonzero(weights > 0) if total > 0 else np.arange(len(sample))
        if len(candidates) < want:
            extra = np.setdiff1d(np.arange(len(sample)), picks)
            new = list(candidates) + list(rng.choice(extra, size=min(want - len(candidates), len(extra)), replace=False))
        else:
            p = weights[candidates] / weights[candidates].sum() if total > 0 else None
            new = list(rng.choice(candidates, size=want, replace=False, p=p))
        picks.extend(int(i) for i in new)
        sims = sample @ sample[new].T
        closest = np.minimum(closest, np.maximum(2.0 - 2.0 * sims.max(axis=1), 0.0))
    return sample[np.array(picks[:k])].copy()


def _lloyd_pass(
    matrix: Any,
    n: int,
    centroids: np.ndarray,
    assign: np.ndarray,
    progress: Callable[[str, int, int], None] | None,
    number: int,
) -> tuple[np.ndarray, int]:
    """One streamed pass: assign every row to its nearest centroid, recompute the means."""
    from scipy import sparse

    k, dim = centroids.shape
    sums = np.zeros((k, dim), dtype=np.float64)
    counts = np.zeros(k, dtype=np.int64)
    changed = 0
    worst: list[tuple[float, np.ndarray]] = []
    step = _block_size(k)
    for a in range(0, n, step):
        b = min(a + step, n)
        block, valid = _normalized_block(matrix, a, b)
        sims = block @ centroids.T
        best = sims.argmax(axis=1).astype(np.int32)
        best[~valid] = -1
        changed += int((best != assign[a:b]).sum())
        assign[a:b] = best
        ok = np.flatnonzero(valid)
        if len(ok):
            onehot = sparse.csr_matrix(
                (np.ones(len(ok), dtype=np.float32), (best[ok], np.arange(len(ok)))), shape=(k, len(ok))
            )
            sums += onehot @ block[ok]
            counts += np.bincount(best[ok], minlength=k)
            # remember the worst-fitting rows: they restart centroids that end up empty
            fit = sims[ok, best[ok]]
            far = ok[np.argsort(fit)[:4]]
            worst.extend((float(sims[i, best[i]]), block[i].copy()) for i in far)
        if progress is not None:
            progress(f"pass {number}", b, n)
    new = sums / np.maximum(counts, 1)[:, None]
    empty = np.flatnonzero(counts == 0)
    worst.sort(key=lambda item: item[0])
    for slot, (_, row) in zip(empty, worst):
        new[slot] = row
    norms = np.linalg.norm(new, axis=1, keepdims=True)
    new = np.where(norms > 0, new / np.where(norms > 0, norms, 1.0), centroids)
    return new.astype(np.float32), changed


def purity_coverage(labels: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """(purity, coverage) as pyannote.metrics defines them for clusters of whole items.

    purity: the share of items that belong to their cluster's majority speaker;
    coverage: the share of items that sit in their speaker's majority cluster.
    Unlabelled rows (-1) count as singleton clusters.
    """
    labels = np.asarray(labels).copy()
    truth = np.asarray(truth)
    if len(labels) == 0:
        return 1.0, 1.0
    lone = labels < 0
    labels[lone] = labels.max() + 1 + np.arange(int(lone.sum()))
    _, cl = np.unique(labels, return_inverse=True)
    _, sp = np.unique(truth, return_inverse=True)
    table = np.zeros((cl.max() + 1, sp.max() + 1), dtype=np.int64)
    np.add.at(table, (cl, sp), 1)
    return float(table.max(axis=1).sum() / len(labels)), float(table.max(axis=0).sum() / len(labels))
