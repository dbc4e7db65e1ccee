"""`null:DIM`: an encoder whose model costs nothing, for measuring everything else.

Audio is read, decoded and resampled for real, and its features are real Kaldi fbank
(80 bins, 25/10 ms), on the CPU in the loaders or batched on the device
(`--features device`), exactly as for a WeSpeaker model; only the network is gone:
every item embeds to the same fixed unit vector of DIM values. Throughput measured with
it is the pipeline's own (the `feeder` benchmark): scan, claims, decode, features, hash,
dedup, messages, the writer and its commits.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from embstore.errors import ModelError
from embstore.audio.fbank import FbankConfig
from embstore.models.base import Capabilities, fingerprint_of
from embstore.models.common import DTYPES, check_device
from embstore.models.fbank_encoder import FbankEncoder


class NullEncoder(FbankEncoder):
    capabilities = Capabilities(batching="any", device_features=True, runtime="none", dtypes=DTYPES)

    def __init__(self, dim: str | int = 256, device: str = "cpu", dtype: str = "fp32"):
        check_device(device)
        try:
            self.dim = int(dim)
        except (TypeError, ValueError):
            raise ModelError(f"null:{dim}: the argument is the embedding size, a whole number") from None
        if not 1 <= self.dim <= 65536:
            raise ModelError(f"null:{dim}: the embedding size must be 1..65536")
        self.name = f"null-{self.dim}"
        self.spec = f"null:{self.dim}"
        self.device, self.dtype = device, dtype
        self.fbank_config = FbankConfig()
        self.sample_rate = self.fbank_config.sample_rate
        self.max_frames = 0  # items whole: there is no network whose memory to bound
        self.frontend: dict[str, Any] = {**self.fbank_config.as_dict(), "null": True, "dtype": dtype}
        self.fingerprint = fingerprint_of(None, self.frontend, f"null:{self.dim}".encode())
        vector = np.ones(self.dim, dtype=np.float32)
        self.vector = vector / np.linalg.norm(vector)

    @property
    def _torch_device(self) -> Any:
        import torch

        return torch.device(self.device if self.device.startswith("cuda") and torch.cuda.is_available() else "cpu")

    def _forward(self, batch: Any) -> np.ndarray:
        return np.tile(self.vector, (len(batch), 1))

    def embed_batch(self, feats: Sequence[Any]) -> np.ndarray:
        return self._forward(feats)  # any lengths together: nothing is computed from them
