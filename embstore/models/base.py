"""The one interface every model source implements.

The extraction pipeline only talks to an `Encoder`:

- on the loader side (CPU, any thread): `load(path, start, end)` gives float32 mono
  samples at `sample_rate`; `features(wav)` gives one item's feature matrix (a NumPy
  array, first axis = time frames); `feature_length(num_samples)` predicts its number of
  frames from header information alone, so the manifest can group equal lengths before
  anything is decoded;
- on the compute side: `embed_batch(feats)` embeds a list of feature matrices at once.
  What may be mixed in one batch is declared by `batching`:
    "any"    - items of any lengths (e.g. fixed-size windows are batched inside);
    "masked" - padded batches of mixed lengths are exact (masked adapter);
    "equal"  - only items with equal feature length are batched together.
- `embed_file(path, start, end)`: the plain reference, one item at a time, no batching.
  Tests and the benchmark's fidelity check compare everything against it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Sequence

import numpy as np

BATCHING_MODES = ("any", "masked", "equal")


class ModelError(Exception):
    """A model spec that cannot be loaded; the message says why in one line."""


class NonFiniteEmbedding(Exception):
    """A model returned NaN or inf for an item; it is never stored."""


class Encoder:
    name: str
    spec: str
    fingerprint: str
    dim: int
    sample_rate: int
    device: str = "cpu"
    dtype: str = "fp32"
    batching: str = "equal"
    # settings that change the numbers (window, scaling, cmn, ...); hashed into fingerprint
    frontend: dict[str, Any]

    def load(self, path: str, start: float | None = None, end: float | None = None) -> np.ndarray:
        from embstore.audio import load_for_model

        return load_for_model(path, self.sample_rate, start, end)

    def feature_length(self, num_samples: int) -> int:
        raise NotImplementedError

    def features(self, wav: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def embed_batch(self, feats: Sequence[np.ndarray]) -> np.ndarray:
        """[len(feats), dim] float32 embeddings."""
        raise NotImplementedError

    def embed_file(self, path: str, start: float | None = None, end: float | None = None) -> np.ndarray:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """What the `models` table records about this encoder."""
        return {
            "name": self.name,
            "spec": self.spec,
            "fingerprint": self.fingerprint,
            "dim": int(self.dim),
            "sample_rate": int(self.sample_rate),
            "batching": self.batching,
            "frontend": self.frontend,
        }


def fingerprint_of(weights: dict[str, Any] | None, frontend: dict[str, Any], extra: bytes = b"") -> str:
    """Hash of the weights and of every frontend setting: two different models never share rows."""
    digest = hashlib.blake2b(digest_size=12)
    digest.update(json.dumps(frontend, sort_keys=True, default=str).encode())
    digest.update(extra)
    if weights:
        for key in sorted(weights):
            value = weights[key]
            digest.update(key.encode())
            if hasattr(value, "detach"):
                value = value.detach().cpu().contiguous().numpy()
            arr = np.ascontiguousarray(value)
            digest.update(str(arr.dtype).encode() + str(arr.shape).encode())
            digest.update(arr.tobytes())
    return digest.hexdigest()


def check_finite(vectors: np.ndarray) -> np.ndarray:
    """Boolean mask of rows that are finite and non-zero."""
    vectors = np.asarray(vectors)
    finite = np.isfinite(vectors).all(axis=1)
    nonzero = np.abs(np.where(np.isfinite(vectors), vectors, 0)).sum(axis=1) > 0
    return finite & nonzero
