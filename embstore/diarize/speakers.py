"""Clustering one item's window embeddings into speakers (NumPy/SciPy only, deterministic);
k-means, AHC and label numbering are `embstore.clustering`'s.

spectral (default), as in WeSpeaker's `spectral_clusterer.py` and 3D-Speaker's
`SpectralCluster`: cosine affinity; p-pruning keeps, per row, only the strongest
`max(ceil(p * n), min_neighbors)` affinities; symmetrise; unnormalised Laplacian
L = D - A; the speaker count is the position of the largest gap among the smallest
`max_speakers + 1` eigenvalues (eigengap), unless `num_speakers` fixes it; k-means on
the first k eigenvectors labels the windows. WeSpeaker binarises the kept affinities
(its VoxConverse setting); 3D-Speaker keeps their values: `binarize` chooses.

ahc: average-linkage agglomerative clustering on cosine distance (scipy), cut at
`1 - threshold` (a cosine similarity threshold, default 0.6 for Resemblyzer windows),
or into `num_speakers` clusters; a `max_speakers` cap re-cuts into that many clusters
if the threshold left more. Clusters of fewer than 8 windows then join their nearest
larger cluster.

Labels are renumbered by first appearance (0 = the first window's speaker), so equal
input gives equal output and RTTM labels read in time order.
"""

from __future__ import annotations

import math

import numpy as np

from embstore.clustering.ahc import average_linkage
from embstore.clustering.kmeans import kmeans
from embstore.clustering.labels import first_appearance
from embstore.errors import ClusteringError

METHODS = ("spectral", "ahc")
DEFAULT_MAX_SPEAKERS = 8
# Defaults tuned on synthetic LibriSpeech conversations (benchmarks/diarize_der.py,
# tuning seeds kept apart from the reported ones) with the default Resemblyzer model:
# DER was flat for 15-20 neighbours and p in 0.01-0.1; WeSpeaker's 10 neighbours
# under-connected 4-speaker minutes. AHC at 0.6 splits off small spurious clusters,
# which absorbing clusters of < 8 windows (3D-Speaker's filter_minor_cluster) undoes.
AHC_MIN_CLUSTER = 8


def check_speaker_counts(num_speakers: int | None, max_speakers: int | None) -> None:
    if num_speakers is not None and max_speakers is not None:
        raise ClusteringError("give --num-speakers or --max-speakers, not both")
    if num_speakers is not None and num_speakers < 1:
        raise ClusteringError(f"--num-speakers must be >= 1, got {num_speakers}")
    if max_speakers is not None and max_speakers < 1:
        raise ClusteringError(f"--max-speakers must be >= 1, got {max_speakers}")


def l2_normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def spectral_cluster(
    embeddings: np.ndarray,
    num_speakers: int | None = None,
    max_speakers: int | None = None,
    min_speakers: int = 1,
    p: float = 0.03,
    min_neighbors: int = 15,
    binarize: bool = True,
    seed: int = 0,
) -> np.ndarray:
    """Speaker labels of n window embeddings [n, dim] (see the module docstring)."""
    check_speaker_counts(num_speakers, max_speakers)
    x = l2_normalize(embeddings)
    n = len(x)
    if n <= 2:
        # WeSpeaker's trivial case: too few windows for an affinity graph
        return np.zeros(n, dtype=np.int32) if num_speakers is None else first_appearance(np.arange(n) % num_speakers)
    # WeSpeaker keeps at most n - 2 per row, so that tiny items still form a sparse graph
    keep = min(n - 2, max(int(math.ceil(p * n)), min_neighbors))
    laplacian = _pruned_laplacian(x.astype(np.float32), keep, binarize)
    from scipy.linalg import eigh

    cap = max_speakers or DEFAULT_MAX_SPEAKERS
    upper = min(max(cap, num_speakers or 1), n - 1)
    # one partial decomposition gives both the eigengap and the spectral embedding;
    # overwrite_a: the Laplacian is the only n x n matrix held (memory O(n^2) once)
    values, vectors = eigh(laplacian, subset_by_index=[0, upper], overwrite_a=True, check_finite=False)
    if num_speakers is not None:
        k = min(num_speakers, n)
    else:
        gaps = np.diff(values[min_speakers - 1 :])
        k = int(np.argmax(gaps)) + min_speakers if len(gaps) else 1
    if k <= 1:
        return np.zeros(n, dtype=np.int32)
    vectors = vectors[:, :k]
    return first_appearance(kmeans(vectors, k, seed=seed))


def _pruned_laplacian(x: np.ndarray, keep: int, binarize: bool, block: int = 1024) -> np.ndarray:
    """Dense unnormalised Laplacian of the p-pruned, symmetrised cosine affinity.

    Rows of the affinity are computed `block` at a time and only their `keep` largest
    entries (the row's own 1.0 among them) survive, as a sparse matrix: the only dense
    n x n array is the returned Laplacian (a one-hour item: ~4800 windows, 180 MB).
    """
    from scipy import sparse

    n = len(x)
    rows, cols, vals = [], [], []
    for a in range(0, n, block):
        sims = x[a : a + block] @ x.T
        top = np.argpartition(-sims, keep - 1, axis=1)[:, :keep]
        rows.append(np.repeat(np.arange(a, a + len(sims)), keep))
        cols.append(top.reshape(-1))
        kept = np.take_along_axis(sims, top, axis=1).reshape(-1)
        vals.append(np.ones_like(kept) if binarize else 0.5 * (1.0 + kept))  # cosine mapped to [0, 1]
    pruned = sparse.csr_matrix(
        (np.concatenate(vals).astype(np.float64), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n)
    )
    pruned = (0.5 * (pruned + pruned.T)).tocsr()
    pruned.setdiag(0.0)
    laplacian = -pruned.toarray()
    laplacian[np.diag_indices(n)] = np.asarray(pruned.sum(axis=1)).reshape(-1)
    return laplacian


def ahc_cluster(
    embeddings: np.ndarray,
    threshold: float = 0.6,
    num_speakers: int | None = None,
    max_speakers: int | None = None,
) -> np.ndarray:
    """Average-linkage AHC on cosine distance, cut at similarity `threshold` (or into N)."""
    check_speaker_counts(num_speakers, max_speakers)
    x = l2_normalize(embeddings)
    if len(x) <= 1:
        return np.zeros(len(x), dtype=np.int32)
    return first_appearance(average_linkage(x, threshold, num_speakers, max_speakers))


def absorb_small_clusters(embeddings: np.ndarray, labels: np.ndarray, min_size: int) -> np.ndarray:
    """Windows of clusters smaller than `min_size` join the closest (cosine to the
    centroid) cluster that is not small, as 3D-Speaker's `filter_minor_cluster` does."""
    labels = np.asarray(labels).copy()
    sizes = np.bincount(labels)
    big = np.flatnonzero(sizes >= min_size)
    small = np.isin(labels, np.flatnonzero((sizes > 0) & (sizes < min_size)))
    if min_size <= 1 or len(big) == 0 or not small.any():
        return first_appearance(labels)
    x = l2_normalize(embeddings)
    centroids = l2_normalize(np.stack([x[labels == c].mean(axis=0) for c in big]))
    labels[small] = big[(x[small] @ centroids.T).argmax(axis=1)]
    return first_appearance(labels)


def cluster_windows(
    embeddings: np.ndarray,
    method: str = "spectral",
    num_speakers: int | None = None,
    max_speakers: int | None = None,
    min_cluster_size: int | None = None,
    **options: float,
) -> np.ndarray:
    """Labels [n] int32 of one item's window embeddings, by `method` (spectral or ahc).

    `min_cluster_size` > 1 folds smaller clusters into the nearest larger one (not when
    `num_speakers` fixes the count); None means 8 windows for ahc, off for spectral.
    """
    if min_cluster_size is None:
        min_cluster_size = AHC_MIN_CLUSTER if method == "ahc" else 0
    if method == "spectral":
        labels = spectral_cluster(embeddings, num_speakers=num_speakers, max_speakers=max_speakers, **options)  # type: ignore[arg-type]
    elif method == "ahc":
        labels = ahc_cluster(embeddings, num_speakers=num_speakers, max_speakers=max_speakers, **options)
    else:
        raise ClusteringError(f"unknown clustering method {method!r}: use one of {', '.join(METHODS)}")
    if min_cluster_size > 1 and num_speakers is None and len(labels):
        labels = absorb_small_clusters(embeddings, labels, min_cluster_size)
    return labels
