"""Pseudo-speaker labels for the whole items of an unlabelled corpus (`embstore cluster`).

The clustering is average-linkage AHC on cosine similarity, cut at `threshold` (two
clusters merge while the mean similarity of their items' pairs exceeds it) or into
`num_speakers` clusters. A corpus of at most `max_direct` items gets exactly that
(scipy, O(n^2) memory). A larger one, up to millions of items on 2 cores in bounded
memory, goes through three stages that keep average linkage's criterion:

1. cells: streamed spherical k-means into K = n / `cell_size` cells. Every pass reads
   the [n, dim] matrix in blocks (a NumPy array, a `np.load(mmap_mode="r")` file or a
   Zarr array) and accumulates per-centroid sums: memory O(K * dim + block * K), never
   O(n * dim). Seeds: k-means++ in 16 batched rounds on a sample of 8K rows. A cell
   that still holds more than `max_direct` items is split again in memory.
2. local clusters: exact average-linkage AHC of each cell's items, cut at the
   threshold. Cells are gathered a batch of ~64k rows at a time (sorted row reads).
3. merging: for unit vectors the mean pairwise similarity of clusters A and B is
   mA . mB, the dot product of their (unnormalised) mean vectors, and a merge updates
   it by the size-weighted average (Lance-Williams), so average linkage can continue
   from the local clusters with their sizes. Clusters whose mean vectors are never
   more similar than the threshold can never merge, so the work splits exactly into
   the connected components of the graph "mA . mB > threshold", and each component
   runs a weighted average-linkage (NN-chain) of its own. Each cluster looks for
   partners in the `probe` (16) cells whose centroids are nearest to its mean: a
   speaker's items lie in neighbouring cells, and all pairs would cost O(L^2).

The result equals AHC on the items except where a cell boundary cut a pair that
global AHC would have merged first (such pieces still merge in stage 3 when their
clusters are similar enough), or where neither of two similar clusters has the
other's cell among its `probe` nearest. `num_speakers` (large corpora): local clusters and
components at the default threshold, then the remaining clusters, at most
`MAX_DENSE`, are merged down to `num_speakers`.

Why not a kNN graph over items (connected components / Leiden): exact kNN of 1 M
items is 1e12 dot products (hours on 2 cores), approximate indexes bring a
dependency, and the k-means cells are the coarse index such a graph would need; the
components of stage 3 are a kNN-style graph, over clusters instead of items.
Rows that are not finite or all zero get label -1.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from embstore.clustering.ahc import average_linkage
from embstore.clustering.kmeans import kmeans
from embstore.errors import ClusteringError

# The cut when neither a threshold nor a count is given and the caller knows no better:
# Resemblyzer's tuned value. Each model has its own (`embstore.models.thresholds`: 0.725
# for Resemblyzer, 0.5 for CAM++); `clustering.stored` passes the store model's.
DEFAULT_THRESHOLD = 0.725
MAX_DIRECT = 4096
CELL_SIZE = 1024
# the largest set of clusters merged with a dense similarity matrix (8192^2 float64: 512 MB)
MAX_DENSE = 8192
# stage 3 compares a cell's clusters with those of its `PROBE` most similar cells only
PROBE = 16
# rows gathered per stage-2 batch
GATHER_ROWS = 65536
# stage-3 edges kept in memory at once (int32 pairs): ~160 MB
MAX_EDGES = 20_000_000
# bytes for one block's [block, K] similarity matrix
_BLOCK_BYTES = 1 << 26


@dataclass
class CorpusClusters:
    labels: np.ndarray  # [n] int32, -1 for unusable rows
    num_clusters: int
    cells: int = 0  # 0: AHC on the items directly
    local_clusters: int = 0
    passes: int = 0
    timings: dict[str, float] = field(default_factory=dict)

    def sizes(self) -> np.ndarray:
        return np.bincount(self.labels[self.labels >= 0], minlength=self.num_clusters)


def _normalized(block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows as unit float32 vectors, and which of them are usable."""
    block = np.asarray(block, dtype=np.float32)
    norms = np.linalg.norm(block, axis=1)
    valid = np.isfinite(norms) & (norms > 0)
    block = np.where(valid[:, None], block, 0.0).astype(np.float32, copy=False)
    block /= np.where(valid, norms, 1.0)[:, None].astype(np.float32)
    return block, valid


def _normalized_block(matrix: Any, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
    return _normalized(matrix[a:b])


def _rows(matrix: Any, index: np.ndarray) -> np.ndarray:
    """matrix[index] for sorted row numbers: NumPy/memmap fancy indexing, Zarr's oindex."""
    if hasattr(matrix, "oindex"):
        return np.asarray(matrix.oindex[index, :])
    return np.asarray(matrix[index])


def _ahc(vectors: np.ndarray, threshold: float | None, num_speakers: int | None) -> np.ndarray:
    """Average-linkage cosine AHC labels 0.. of unit vectors (singletons: one cluster)."""
    if len(vectors) == 1:
        return np.zeros(1, dtype=np.int32)
    return (average_linkage(vectors, threshold, num_speakers) - 1).astype(np.int32)


def weighted_average_linkage(
    means: np.ndarray, sizes: np.ndarray, threshold: float | None = None, num_clusters: int | None = None
) -> np.ndarray:
    """Average-linkage AHC continued from clusters given by their mean unit-vector sums.

    `means[i]` is the (unnormalised) mean of cluster i's unit vectors and `sizes[i]` its
    item count, so means[i] . means[j] is the mean item-pair similarity. NN-chain
    (exact for average linkage, O(m^2) time and memory); the dendrogram is cut at
    `threshold` or into `num_clusters`. Labels 0.. per cluster.
    """
    m = len(means)
    if m <= 1:
        return np.zeros(m, dtype=np.int32)
    if m > MAX_DENSE:
        raise ClusteringError(
            f"{m} clusters to merge at once (at most {MAX_DENSE}): raise --threshold or use --threshold "
            "instead of --num-speakers"
        )
    sim = means.astype(np.float64) @ means.astype(np.float64).T
    weight = sizes.astype(np.float64).copy()
    np.fill_diagonal(sim, -np.inf)
    active = np.ones(m, dtype=bool)
    merges: list[tuple[float, int, int]] = []
    chain: list[int] = []
    for _ in range(m - 1):
        while True:
            if not chain:
                chain.append(int(np.flatnonzero(active)[0]))
            a = chain[-1]
            b = int(np.argmax(sim[a]))
            if len(chain) > 1 and sim[a, chain[-2]] >= sim[a, b]:
                b = chain[-2]  # ties go back down the chain, which keeps NN-chain finite
            if len(chain) > 1 and b == chain[-2]:
                break
            chain.append(b)
        chain.pop()
        chain.pop()
        merges.append((float(sim[a, b]), a, b))
        row = (weight[a] * sim[a] + weight[b] * sim[b]) / (weight[a] + weight[b])  # Lance-Williams
        weight[a] += weight[b]
        active[b] = False
        sim[b, :] = -np.inf
        sim[:, b] = -np.inf
        row[~active] = -np.inf
        row[a] = -np.inf
        sim[a, :] = row
        sim[:, a] = row
    # average linkage is monotone: cutting the sorted merges gives the dendrogram's clusters
    merges.sort(key=lambda item: -item[0])
    keep = m - num_clusters if num_clusters is not None else sum(1 for s, _, _ in merges if s > threshold)  # type: ignore[operator]
    parent = np.arange(m)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for _, a, b in merges[: max(keep, 0)]:
        parent[root(b)] = root(a)
    roots = np.array([root(i) for i in range(m)])
    return np.unique(roots, return_inverse=True)[1].astype(np.int32)


def cluster_corpus(
    matrix: Any,
    threshold: float | None = None,
    num_speakers: int | None = None,
    max_direct: int = MAX_DIRECT,
    cell_size: int = CELL_SIZE,
    iters: int = 4,
    probe: int = PROBE,
    seed: int = 0,
    progress: Callable[[str, int, int], None] | None = None,
    default_threshold: float = DEFAULT_THRESHOLD,
) -> CorpusClusters:
    """Cluster labels of the rows of an [n, dim] matrix (see the module docstring);
    `default_threshold` is the cut without `threshold` (and the local clusters' cut
    of the staged path with `num_speakers`): the model's tuned value."""
    if threshold is not None and num_speakers is not None:
        raise ClusteringError("give --threshold or --num-speakers, not both")
    if num_speakers is not None and num_speakers < 1:
        raise ClusteringError(f"--num-speakers must be >= 1, got {num_speakers}")
    if threshold is not None and not -1.0 <= threshold <= 1.0:
        raise ClusteringError(f"--threshold is a cosine similarity in [-1, 1], got {threshold}")
    if len(getattr(matrix, "shape", ())) != 2:
        raise ClusteringError("expected an [items, dim] matrix")
    n = int(matrix.shape[0])
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    if n == 0:
        return CorpusClusters(np.zeros(0, dtype=np.int32), 0)
    if n <= max_direct:
        vectors, valid = _normalized_block(matrix, 0, n)
        labels = np.full(n, -1, dtype=np.int32)
        if valid.any():
            cut = threshold if threshold is not None or num_speakers is not None else default_threshold
            labels[valid] = _ahc(vectors[valid], cut, num_speakers)
        timings["ahc"] = time.perf_counter() - t0
        return CorpusClusters(labels, int(labels.max()) + 1, timings=timings)
    local_threshold = default_threshold if threshold is None else threshold
    # stage 1: cells
    k = int(min(n, max(2, math.ceil(n / cell_size))))
    centroids = _seed_centroids(matrix, n, k, np.random.default_rng(seed))
    timings["seed"] = time.perf_counter() - t0
    cell = np.full(n, -1, dtype=np.int32)
    passes = 0
    for passes in range(1, iters + 1):
        t = time.perf_counter()
        centroids, changed = _lloyd_pass(matrix, n, centroids, cell, progress, passes)
        timings[f"pass{passes}"] = time.perf_counter() - t
        if changed < 1e-3 * n:
            break
    # stage 2: local clusters of each cell
    t = time.perf_counter()
    local = np.full(n, -1, dtype=np.int64)
    means, sizes, owner = _local_clusters(matrix, cell, local, local_threshold, max_direct, cell_size, seed, progress)
    timings["local"] = time.perf_counter() - t
    # stage 3: merge local clusters, component by component
    t = time.perf_counter()
    merged = _merge(means, sizes, owner, centroids, local_threshold, num_speakers, probe)
    timings["merge"] = time.perf_counter() - t
    labels = np.where(local >= 0, merged[np.maximum(local, 0)], -1).astype(np.int32)
    return CorpusClusters(labels, int(labels.max()) + 1, k, len(sizes), passes, timings)


def _local_clusters(
    matrix: Any,
    cell: np.ndarray,
    local: np.ndarray,
    threshold: float,
    max_direct: int,
    cell_size: int,
    seed: int,
    progress: Callable[[str, int, int], None] | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AHC inside every cell; fills `local` with global local-cluster ids and returns
    their mean unit vectors [L, dim], sizes [L] and cells [L]."""
    order = np.argsort(cell, kind="stable")
    order = order[cell[order] >= 0]
    bounds = np.flatnonzero(np.diff(cell[order])) + 1
    groups = np.split(order, bounds) if len(order) else []
    means: list[np.ndarray] = []
    sizes: list[int] = []
    cells: list[int] = []
    done = 0
    batch: list[np.ndarray] = []

    def flush() -> None:
        rows = np.sort(np.concatenate(batch))
        vectors, _ = _normalized(_rows(matrix, rows))
        for members in batch:
            x = vectors[np.searchsorted(rows, members)]
            parts = [np.arange(len(members))]
            if len(members) > max_direct:
                # an oversized cell: split it again in memory before the O(m^2) AHC
                split = kmeans(x, math.ceil(len(members) / cell_size), seed=seed, n_init=1, iters=20)
                parts = [np.flatnonzero(split == c) for c in np.unique(split)]
            for part in parts:
                labels = _ahc(x[part], threshold, None)
                for c in range(int(labels.max()) + 1):
                    chosen = part[labels == c]
                    local[members[chosen]] = len(sizes)
                    means.append(x[chosen].mean(axis=0, dtype=np.float64))
                    sizes.append(len(chosen))
                    cells.append(int(cell[members[0]]))
        batch.clear()

    pending = 0
    for members in groups:
        batch.append(members)
        pending += len(members)
        if pending >= GATHER_ROWS:
            flush()
            done += pending
            pending = 0
            if progress is not None:
                progress("local clusters", done, len(order))
    if batch:
        flush()
    return (
        np.array(means, dtype=np.float64).reshape(len(sizes), -1),
        np.array(sizes, dtype=np.int64),
        np.array(cells, dtype=np.int64),
    )


def _merge(
    means: np.ndarray,
    sizes: np.ndarray,
    owner: np.ndarray,
    centroids: np.ndarray,
    threshold: float,
    num_speakers: int | None,
    probe: int,
) -> np.ndarray:
    """Labels of the local clusters after average linkage at `threshold` (components of
    the mean-similarity graph) and, for `num_speakers`, down to that count.

    Each cluster is compared with the clusters of the `probe` cells whose k-means
    centroids are nearest to its mean (and of its own cell): all pairs would be
    O(L^2), and a speaker's items lie in neighbouring cells.
    """
    from scipy import sparse
    from scipy.sparse.csgraph import connected_components

    count = len(sizes)
    vectors = means.astype(np.float32)
    by_cell = np.argsort(owner, kind="stable")
    starts = np.searchsorted(owner[by_cell], np.arange(len(centroids) + 1))
    # every cluster probes the cells whose centroids are nearest to its own mean (its
    # own cell among them), not just its cell's neighbours: a small fragment of a
    # speaker lands next to that speaker's main cell even when its own cell is elsewhere
    width = min(probe, len(centroids))
    probes = np.empty((count, width), dtype=np.int64)
    for a in range(0, count, 8192):
        sims = vectors[a : a + 8192] @ centroids.T
        probes[a : a + 8192] = np.argpartition(-sims, width - 1, axis=1)[:, :width]
    askers = np.concatenate([np.repeat(np.arange(count), width), np.arange(count)])
    targets = np.concatenate([probes.reshape(-1), owner])
    order = np.argsort(targets, kind="stable")
    askers, targets = askers[order], targets[order]
    bounds = np.searchsorted(targets, np.arange(len(centroids) + 1))
    heads, tails = [], []
    edges = 0
    for d in range(len(centroids)):
        members = by_cell[starts[d] : starts[d + 1]]
        queries = np.unique(askers[bounds[d] : bounds[d + 1]])
        if not len(members) or not len(queries):
            continue
        i, j = np.nonzero(vectors[queries] @ vectors[members].T > threshold)
        a, b = np.minimum(queries[i], members[j]), np.maximum(queries[i], members[j])
        keep = a < b  # no self-pairs; a pair seen twice is one edge to the components
        heads.append(a[keep].astype(np.int32))
        tails.append(b[keep].astype(np.int32))
        edges += int(keep.sum())
        if edges > MAX_EDGES:
            raise ClusteringError(
                f"--threshold {threshold:g} links more than {MAX_EDGES} pairs of clusters: it is too low for this model"
            )
    graph = sparse.coo_matrix(
        (np.ones(edges, dtype=np.int8), (np.concatenate(heads), np.concatenate(tails))), shape=(count, count)
    )
    _, component = connected_components(graph, directed=False)
    labels = np.zeros(count, dtype=np.int64)
    next_label = 0
    order = np.argsort(component, kind="stable")
    for members in np.split(order, np.flatnonzero(np.diff(component[order])) + 1):
        if len(members) == 1:
            sub = np.zeros(1, dtype=np.int32)
        else:
            sub = weighted_average_linkage(means[members], sizes[members], threshold=threshold)
        labels[members] = sub + next_label
        next_label += int(sub.max()) + 1
    if num_speakers is None or next_label <= num_speakers:
        return labels.astype(np.int32)
    # --num-speakers: merge the threshold's clusters further, all together
    counts = np.bincount(labels, weights=sizes, minlength=next_label)
    joined = np.zeros((next_label, means.shape[1]))
    np.add.at(joined, labels, means * sizes[:, None])
    joined /= counts[:, None]
    return weighted_average_linkage(joined, counts, num_clusters=num_speakers)[labels]


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
