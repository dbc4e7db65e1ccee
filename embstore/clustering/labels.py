"""Cluster labels: numbered by first appearance, and scored against known speakers."""

from __future__ import annotations

import numpy as np


def first_appearance(labels: np.ndarray) -> np.ndarray:
    """Labels renumbered 0, 1, ... in order of first appearance."""
    labels = np.asarray(labels)
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first)] = np.arange(len(first))
    return rank[inverse.reshape(-1)].astype(np.int32)


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
