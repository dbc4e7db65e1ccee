"""Corpus clustering (pseudo-speakers of whole items): direct AHC and the streamed two-stage path."""

from __future__ import annotations

import numpy as np
import pytest

from embstore.clustering.corpus import ClusteringError, cluster_corpus, weighted_average_linkage
from embstore.clustering.labels import first_appearance, purity_coverage


def _corpus(speakers: int, per: int, dim: int = 32, noise: float = 0.35, seed: int = 0):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((speakers, dim))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    truth = rng.permutation(np.repeat(np.arange(speakers), per))
    x = centers[truth] + noise * rng.standard_normal((len(truth), dim)) / np.sqrt(dim)
    return x.astype(np.float32), truth


def test_purity_coverage_definitions():
    truth = np.array([0, 0, 0, 1, 1, 2])
    assert purity_coverage(truth, truth) == (1.0, 1.0)
    assert purity_coverage(np.zeros(6, int), truth) == (0.5, 1.0)  # one cluster for all
    assert purity_coverage(np.arange(6), truth) == (1.0, 0.5)  # singletons
    # clusters {0,0} {0,1,1} {2 (unlabelled)}: majorities 2+2+1; speakers' best clusters 2+2+1
    assert purity_coverage(np.array([0, 0, 1, 1, 1, -1]), truth) == (pytest.approx(5 / 6), pytest.approx(5 / 6))
    # speaker 0 split 2/1 and speaker 1 joined to it: purity 4/6, coverage 5/6
    assert purity_coverage(np.array([0, 0, 1, 0, 0, 2]), truth) == (pytest.approx(4 / 6), pytest.approx(5 / 6))


def test_direct_ahc_recovers_speakers():
    x, truth = _corpus(12, 20)
    result = cluster_corpus(x, threshold=0.6)
    assert result.cells == 0 and result.num_clusters == 12
    assert purity_coverage(result.labels, truth) == (1.0, 1.0)
    assert cluster_corpus(x, num_speakers=12).num_clusters == 12
    assert cluster_corpus(x, num_speakers=3).num_clusters == 3


def test_two_stage_streams_a_memmap_and_matches_direct(tmp_path):
    x, truth = _corpus(40, 60, seed=1)
    path = tmp_path / "m.npy"
    np.save(path, x)
    mapped = np.load(path, mmap_mode="r")
    staged = cluster_corpus(mapped, threshold=0.6, max_direct=100, cell_size=100)
    assert staged.cells == 24 and staged.passes >= 1 and staged.local_clusters >= 40
    purity, coverage = purity_coverage(staged.labels, truth)
    assert purity > 0.99 and coverage > 0.99
    assert staged.num_clusters == 40
    again = cluster_corpus(mapped, threshold=0.6, max_direct=100, cell_size=100)
    assert np.array_equal(again.labels, staged.labels)  # deterministic by seed
    counted = cluster_corpus(mapped, num_speakers=40, max_direct=100, cell_size=100)
    assert purity_coverage(counted.labels, truth)[0] > 0.99


def _scipy_average(x: np.ndarray, threshold=None, k=None) -> np.ndarray:
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import pdist

    tree = linkage(pdist(x.astype(np.float64), "cosine"), method="average")
    if k is not None:
        return fcluster(tree, t=k, criterion="maxclust")
    return fcluster(tree, t=1 - threshold, criterion="distance")


def test_weighted_average_linkage_equals_scipy():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((60, 8))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    for threshold in (0.0, 0.2, 0.5):
        ours = weighted_average_linkage(x, np.ones(len(x)), threshold=threshold)
        assert np.array_equal(first_appearance(ours), first_appearance(_scipy_average(x, threshold)))
    for k in (1, 4, 13):
        ours = weighted_average_linkage(x, np.ones(len(x)), num_clusters=k)
        assert np.array_equal(first_appearance(ours), first_appearance(_scipy_average(x, k=k)))
    # clusters of two identical items each: their means and sizes continue scipy's tree
    doubled = np.repeat(x, 2, axis=0)
    theirs = _scipy_average(doubled, 0.3)[::2]
    ours = weighted_average_linkage(x, np.full(len(x), 2), threshold=0.3)
    assert np.array_equal(first_appearance(ours), first_appearance(theirs))


def test_more_speakers_than_cells_and_agreement_with_direct():
    x, truth = _corpus(300, 10, dim=64, noise=0.3, seed=2)
    staged = cluster_corpus(x, threshold=0.6, max_direct=100, cell_size=100)
    assert staged.cells == 30
    purity, coverage = purity_coverage(staged.labels, truth)
    assert purity > 0.99 and coverage > 0.99
    direct = cluster_corpus(x, threshold=0.6, max_direct=len(x))
    assert direct.cells == 0
    agree, _ = purity_coverage(staged.labels, direct.labels)
    assert agree > 0.99


def test_bad_rows_get_minus_one_and_arguments_are_checked():
    x, _ = _corpus(3, 10)
    x[4] = np.nan
    x[7] = 0.0
    for kwargs in ({}, {"max_direct": 5, "cell_size": 4}):
        labels = cluster_corpus(x, threshold=0.6, **kwargs).labels
        assert labels[4] == -1 and labels[7] == -1 and (np.delete(labels, [4, 7]) >= 0).all()
    with pytest.raises(ClusteringError, match="not both"):
        cluster_corpus(x, threshold=0.5, num_speakers=2)
    with pytest.raises(ClusteringError, match="cosine similarity"):
        cluster_corpus(x, threshold=3.0)
    with pytest.raises(ClusteringError, match=">= 1"):
        cluster_corpus(x, num_speakers=0)
    with pytest.raises(ClusteringError, match="matrix"):
        cluster_corpus(np.zeros(5))
    assert cluster_corpus(np.zeros((0, 4), np.float32)).num_clusters == 0


def test_edge_and_dense_limits_give_one_line(monkeypatch):
    import embstore.clustering.corpus as cc

    x, _ = _corpus(40, 60)
    monkeypatch.setattr(cc, "MAX_EDGES", 5)
    with pytest.raises(ClusteringError, match="too low for this model"):
        cluster_corpus(x, threshold=-1.0, max_direct=100, cell_size=100)
    monkeypatch.setattr(cc, "MAX_DENSE", 10)
    with pytest.raises(ClusteringError, match="clusters to merge at once"):
        cluster_corpus(x, num_speakers=2, max_direct=100, cell_size=100)


@pytest.mark.slow
@pytest.mark.exhaustive
def test_real_speakers_with_the_default_model(shared_data):
    """Default threshold on Resemblyzer embeddings of the 10 LibriSpeech speakers.

    Real speech only: the default threshold is tuned on real voices. The synthetic speakers
    of tests/audio_factory.py sit closer together in Resemblyzer's space (different speakers
    at cosine 0.67 on average, real ones at 0.52), so the default threshold joins them (3
    clusters for 5 speakers); with the count given they split exactly (test_clustering.py)."""
    from embstore import models

    encoder = models.load("resemblyzer")
    files = sorted(shared_data.glob("*/*.flac"))
    x = np.stack([encoder.embed_file(str(f)) for f in files])
    truth = np.array([f.parent.name for f in files])
    result = cluster_corpus(x)
    purity, coverage = purity_coverage(result.labels, truth)
    assert purity > 0.85 and coverage > 0.6
