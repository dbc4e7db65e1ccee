"""`null:DIM`: an encoder whose model costs nothing, for benchmarks of everything else.

Audio is read and decoded for real (the feeder's work stays real), features are one
energy value per 10 ms frame (cheap), and every item embeds to the same fixed unit
vector of DIM values. Throughput measured with it is the pipeline's own: claims,
loading, dedup, messages and commits, with the model's compute taken out.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from embstore.errors import ModelError
from embstore.models.base import Capabilities, Encoder, fingerprint_of
from embstore.models.lengths import FbankLength

SAMPLE_RATE = 16000
HOP = 160  # 10 ms frames at 16 kHz


class NullEncoder(Encoder):
    capabilities = Capabilities(batching="any", dtypes=("fp32", "bf16", "fp16"))

    def __init__(self, dim: str | int = 256, device: str = "cpu", dtype: str = "fp32"):
        try:
            self.dim = int(dim)
        except (TypeError, ValueError):
            raise ModelError(f"null:{dim}: the argument is the embedding size, a whole number") from None
        if not 1 <= self.dim <= 65536:
            raise ModelError(f"null:{dim}: the embedding size must be 1..65536")
        self.name = f"null-{self.dim}"
        self.spec = f"null:{self.dim}"
        self.device, self.dtype = device, dtype
        self.sample_rate = SAMPLE_RATE
        self.frontend: dict[str, Any] = {"null": True, "hop": HOP, "dtype": dtype}
        self.fingerprint = fingerprint_of(None, self.frontend, f"null:{self.dim}".encode())
        vector = np.ones(self.dim, dtype=np.float32)
        self.vector = vector / np.linalg.norm(vector)

    @property
    def length_rule(self) -> FbankLength:
        # one frame per whole hop: n // HOP samples
        return FbankLength(window_size=HOP, window_shift=HOP)

    def features(self, wav: np.ndarray) -> np.ndarray:
        frames = len(wav) // HOP
        return np.square(wav[: frames * HOP]).reshape(frames, HOP).mean(axis=1, keepdims=True).astype(np.float32)

    def embed_batch(self, feats: Sequence[np.ndarray]) -> np.ndarray:
        return np.tile(self.vector, (len(feats), 1))

    def embed_file(self, path: str, start: float | None = None, end: float | None = None) -> np.ndarray:
        self.features(self.load(path, start, end))
        return self.vector.copy()
