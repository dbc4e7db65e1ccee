"""The one interface every model source implements.

The extraction pipeline only talks to an `Encoder`:

- on the loader side (CPU, any thread): `load(path, start, end)` gives float32 mono
  samples at `sample_rate`; `features(wav)` gives one item's feature matrix (a NumPy
  array, first axis = time frames); `feature_length(num_samples)` predicts its number of
  frames from header information alone, so the manifest can group equal lengths before
  anything is decoded;
- on the compute side: `embed_batch(feats)` embeds a list of feature matrices at once.
  What may be mixed in one batch is declared by `capabilities.batching`:
    "any"    - items of any lengths (e.g. fixed-size windows are batched inside);
    "masked" - padded batches of mixed lengths are exact (masked adapter);
    "equal"  - only items with equal feature length are batched together.
- `device_features(wavs, max_frames)`: only where `capabilities.device_features`;
  features of many waveforms in padded passes on the model's device (GPU fbank);
- `embed_file(path, start, end)`: the plain reference, one item at a time, no batching.
  Tests and the benchmark's fidelity check compare everything against it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from embstore.audio.io import load_for_model
from embstore.models.lengths import LengthRule

BATCHING_MODES = ("any", "masked", "equal")
RUNTIMES = ("torch", "onnxruntime", "openvino", "none")  # none: no network (the null model)


@dataclass(frozen=True)
class Capabilities:
    """What an encoder can do, declared by its adapter (never probed with hasattr).

    batching         what `embed_batch` may mix in one batch (see the module doc)
    device_features  `device_features(wavs)` computes its features batched on the model's
                     device (GPU fbank), so loaders only decode
    onnx_export      `embstore.models.onnx.export_onnx` can export its network
    runtime          where its forward runs: torch, onnxruntime or openvino
    dtypes           compute precisions it accepts
    packed_windows   `embed_packed_windows(mels)` embeds short windows' mel frames of mixed
                     lengths in one packed forward, each window over its own frames only
                     (the "mel" window path of `segments.window_embed`)
    """

    batching: str = "equal"
    device_features: bool = False
    onnx_export: bool = False
    runtime: str = "torch"
    dtypes: tuple[str, ...] = ("fp32",)
    packed_windows: bool = False

    def __post_init__(self) -> None:
        if self.batching not in BATCHING_MODES:
            raise ValueError(f"batching {self.batching!r} is not one of {BATCHING_MODES}")
        if self.runtime not in RUNTIMES:
            raise ValueError(f"runtime {self.runtime!r} is not one of {RUNTIMES}")


class Encoder:
    name: str
    spec: str
    fingerprint: str
    dim: int
    sample_rate: int
    device: str = "cpu"
    dtype: str = "fp32"
    capabilities: Capabilities = Capabilities()
    # settings that change the numbers (window, scaling, cmn, ...); hashed into fingerprint
    frontend: dict[str, Any]

    @property
    def batching(self) -> str:
        return self.capabilities.batching

    def load(self, path: str, start: float | None = None, end: float | None = None) -> np.ndarray:
        return load_for_model(path, self.sample_rate, start, end)

    @property
    def length_rule(self) -> LengthRule:
        """How many feature frames `num_samples` samples give (see `models.lengths`)."""
        raise NotImplementedError

    def feature_length(self, num_samples: int) -> int:
        return self.length_rule(num_samples)

    def features(self, wav: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def embed_batch(self, feats: Sequence[np.ndarray]) -> np.ndarray:
        """[len(feats), dim] float32 embeddings."""
        raise NotImplementedError

    def device_features(self, wavs: Sequence[np.ndarray], max_frames: int) -> list[Any]:
        """Each waveform's features, computed on the model's device in padded passes of
        about `max_frames` feature frames; only when `capabilities.device_features`."""
        raise NotImplementedError(f"{self.name} computes its features on the CPU only")

    def embed_packed_windows(self, mels: Sequence[np.ndarray]) -> np.ndarray:
        """[len(mels), dim] float32: each window's embedding from its own [frames, mels]
        matrix (lengths may differ), as a forward of that window alone would give; only
        when `capabilities.packed_windows`."""
        raise NotImplementedError(f"{self.name} does not embed packed windows")

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


# a model row's fingerprint is the encoder's own, or the encoder's plus "-" and what the
# run changes about its rows (trimming, VAD, windows): the encoder's is a hex digest
VARIANT_SEP = "-"


def variant_fingerprint(fingerprint: str, variant: str) -> str:
    """Rows computed from one encoder in another way (trimmed, speech only, per window)
    are their own model: the way is in the key."""
    return f"{fingerprint}{VARIANT_SEP}{variant}"


def trimmed_fingerprint(fingerprint: str, max_trim_frames: int) -> str:
    """The rows of trimmed equal batching are their own model: the policy is in the key."""
    return variant_fingerprint(fingerprint, f"trim{max_trim_frames}")


def untrimmed_fingerprint(fingerprint: str) -> str:
    """The encoder's own fingerprint behind a model row's (see `variant_fingerprint`)."""
    return fingerprint.split(VARIANT_SEP, 1)[0]
