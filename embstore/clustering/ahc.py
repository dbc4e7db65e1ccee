"""Average-linkage agglomerative clustering on cosine distance (SciPy), exact: O(n^2)
memory, for up to a few thousand vectors. Diarization runs it on an item's windows, the
corpus engine on each cell and on small datasets whole."""

from __future__ import annotations

import numpy as np


def average_linkage(
    vectors: np.ndarray,
    threshold: float | None = None,
    num_clusters: int | None = None,
    max_clusters: int | None = None,
) -> np.ndarray:
    """fcluster labels 1..k of n >= 2 vectors (unit length, or cosine does not care):
    the tree cut at cosine similarity `threshold`, or into `num_clusters`; a cut at the
    threshold that leaves more than `max_clusters` is cut again into that many."""
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import pdist

    tree = linkage(np.maximum(pdist(np.asarray(vectors, dtype=np.float64), "cosine"), 0.0), method="average")
    if num_clusters is not None:
        return fcluster(tree, t=min(num_clusters, len(vectors)), criterion="maxclust")
    labels = fcluster(tree, t=1.0 - float(threshold), criterion="distance")  # type: ignore[arg-type]
    if max_clusters is not None and labels.max() > max_clusters:
        labels = fcluster(tree, t=max_clusters, criterion="maxclust")
    return labels
