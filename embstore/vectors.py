"""Small vector helpers shared by queries, scoring and verification. NumPy only."""

from __future__ import annotations

import numpy as np


def l2_normalise(vectors: np.ndarray, dtype: type = np.float32) -> np.ndarray:
    """Rows scaled to unit length; non-finite values become 0 and zero rows stay zero
    (a NaN row must never poison a matrix product over millions of rows)."""
    block = np.nan_to_num(np.asarray(vectors, dtype=dtype), nan=0.0, posinf=0.0, neginf=0.0)
    norms = np.linalg.norm(block, axis=-1, keepdims=True)
    norms[norms == 0] = 1.0
    return block / norms


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of each row of `a` with the same row of `b` (float64 for the sums)."""
    a = np.atleast_2d(np.asarray(a, dtype=np.float64))
    b = np.atleast_2d(np.asarray(b, dtype=np.float64))
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def finite_nonzero(vectors: np.ndarray) -> np.ndarray:
    """Boolean mask of rows that are finite and not all zero: the rows worth storing."""
    vectors = np.asarray(vectors)
    finite = np.isfinite(vectors).all(axis=1)
    nonzero = np.abs(np.where(np.isfinite(vectors), vectors, 0)).sum(axis=1) > 0
    return finite & nonzero
