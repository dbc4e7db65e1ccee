"""Shared by the torch and ONNX/OpenVINO WeSpeaker encoders: Kaldi fbank features, the
WeSpeaker config's frontend settings, the long-item policy, equal/masked batching.

Long items: an item of up to `max_frames` feature frames (default 6000 = 60 s) is
embedded whole, exactly as WeSpeaker does. A longer one is cut, after utterance-level
CMN, into windows of `max_frames` frames (consecutive, the last one aligned to the end
of the item, so it may overlap its neighbour) whose embeddings are averaged (plain mean
of the raw embeddings, so the scale matches whole-item embeddings). The policy is
recorded in `frontend` and therefore in the fingerprint.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from embstore.errors import ModelError
from embstore.audio.fbank import WINDOW_TYPES, FbankConfig, fbank, fbank_batch, num_frames
from embstore.models.base import Encoder
from embstore.models.common import short_error
from embstore.models.lengths import FbankLength

if TYPE_CHECKING:
    import torch

DEFAULT_MAX_FRAMES = 6000
# pieces of a long item forwarded together; bounds memory for hour-long items
DEFAULT_WINDOW_BATCH = 8
# model families whose hub checkpoints (converted from 3D-Speaker) expect floats + povey
_NORMALISED_FAMILIES = ("CAMPPlus", "ERes2Net")


def read_config(path: str) -> dict[str, Any]:
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            config = yaml.safe_load(f)
    except OSError as exc:
        raise ModelError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        raise ModelError(f"{path}: not valid YAML ({short_error(exc)})") from None
    if not isinstance(config, dict):
        raise ModelError(f"{path}: not a WeSpeaker config (expected a mapping)")
    return config


def fbank_config_from(config: dict[str, Any], model_name: str | None = None) -> FbankConfig:
    """The fbank settings WeSpeaker's CLI would use for this config (see module doc)."""
    dataset_args = config.get("dataset_args") or {}
    fbank_args = dataset_args.get("fbank_args") or {}
    overrides = config.get("embstore") or {}
    family_norm = bool(model_name) and str(model_name).startswith(_NORMALISED_FAMILIES)
    window = overrides.get("window_type", fbank_args.get("window_type", "povey" if family_norm else "hamming"))
    norm = overrides.get("waveform_norm", family_norm)
    if window not in WINDOW_TYPES:
        raise ModelError(f"window_type {window!r} is not one of {', '.join(WINDOW_TYPES)}")
    if not isinstance(norm, bool):
        raise ModelError(f"embstore.waveform_norm must be true or false, got {norm!r}")
    try:
        return FbankConfig(
            sample_rate=int(dataset_args.get("resample_rate", 16000)),
            num_mel_bins=int(fbank_args.get("num_mel_bins", 80)),
            frame_length_ms=float(fbank_args.get("frame_length", 25)),
            frame_shift_ms=float(fbank_args.get("frame_shift", 10)),
            window_type=window,
            int16_scale=not norm,
            cmn=True,
        )
    except (TypeError, ValueError) as exc:
        raise ModelError(f"bad fbank settings in config: {short_error(exc)}") from None


def long_item_windows(total: int, max_frames: int) -> list[tuple[int, int]]:
    """Frame ranges a `total`-frame item is embedded from (the long-item policy)."""
    if max_frames <= 0 or total <= max_frames:
        return [(0, total)]
    starts = list(range(0, total - max_frames + 1, max_frames))
    if starts[-1] + max_frames < total:
        starts.append(total - max_frames)  # last window ends with the item
    return [(s, s + max_frames) for s in starts]


class FbankEncoder(Encoder):
    """Shared by the torch, ONNX and OpenVINO WeSpeaker encoders: features, long items,
    batching.

    Subclasses set `fbank_config`, `max_frames`, `frontend`, `capabilities` and
    `_torch_device`, and implement `_forward`.
    """

    fbank_config: FbankConfig
    # where `features_batch` / `device_features` compute (the GPU next to the model)
    _torch_device: "torch.device"
    max_frames: int = DEFAULT_MAX_FRAMES
    window_batch: int = DEFAULT_WINDOW_BATCH

    def _policy(self) -> dict[str, Any]:
        return {
            "long_items": "mean of raw embeddings of max_frames windows, last window aligned to the end"
            if self.max_frames > 0
            else "whole",
            "max_frames": int(self.max_frames),
        }

    @property
    def length_rule(self) -> FbankLength:
        return FbankLength(self.fbank_config.window_size, self.fbank_config.window_shift)

    def features(self, wav: np.ndarray) -> np.ndarray:
        feats = fbank(wav, self.fbank_config)
        if len(feats) == 0:
            raise ValueError(
                f"audio too short: {len(wav)} samples, one {self.fbank_config.frame_length_ms:g} ms frame "
                f"needs {self.fbank_config.window_size}"
            )
        return feats

    def _forward(self, batch: Any) -> np.ndarray:
        """[B, T, F] equal-length features (NumPy or a tensor on the device) -> [B, dim] float32."""
        raise NotImplementedError

    def _forward_padded(self, pieces: Sequence[Any]) -> np.ndarray:
        """Mixed-length pieces in one forward; only encoders with a masked adapter have it."""
        raise ValueError(
            f"batching='{self.batching}': all items of a batch must have the same number of frames, "
            f"got {sorted({len(p) for p in pieces})}"
        )

    def _embed_pieces(self, pieces: Sequence[Any]) -> np.ndarray:
        if len({len(p) for p in pieces}) == 1:
            return self._forward(_stack(pieces))
        return self._forward_padded(pieces)

    def embed_batch(self, feats: Sequence[Any]) -> np.ndarray:
        """[len(feats), dim] float32; `feats` is a list of [T, F] matrices or one [B, T, F] array/tensor."""
        if len(feats) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        lengths = [len(f) for f in feats]
        if self.batching != "masked" and len(set(lengths)) > 1:
            raise ValueError(
                f"batching='{self.batching}': all items of a batch must have the same number of frames, "
                f"got {sorted(set(lengths))}"
            )
        windows = [long_item_windows(n, self.max_frames) for n in lengths]
        if all(len(w) == 1 for w in windows):
            return self._embed_pieces(feats)
        owners = [i for i, w in enumerate(windows) for _ in w]
        pieces = [feats[i][a:b] for i, w in enumerate(windows) for a, b in w]
        vectors: list[np.ndarray] = []
        step = max(self.window_batch, len(feats))
        for k in range(0, len(pieces), step):
            vectors.append(self._embed_pieces(pieces[k : k + step]))
        return _average(np.concatenate(vectors), owners, len(feats))

    def features_batch(self, wavs: Sequence[np.ndarray]) -> "torch.Tensor":
        """[B, T, F] features of equal-length waveforms computed on the model's device
        (`fbank_batch`, ~1e-4 from `features`); feed the result to `embed_batch`."""
        import torch

        if len({len(w) for w in wavs}) != 1:
            raise ValueError("features_batch needs waveforms of equal length")
        batch = torch.from_numpy(np.stack([np.asarray(w, dtype=np.float32) for w in wavs])).to(self._torch_device)
        return fbank_batch(batch, self.fbank_config)

    def device_features(self, wavs: Sequence[np.ndarray], max_frames: int) -> list["torch.Tensor"]:
        """Kaldi fbank of many waveforms in padded passes on the model's device, each pass
        at most `max_frames` frames of padded samples; `fbank_batch` with per-row lengths,
        so each item equals its own computation (~1e-4 from `features`)."""
        import torch

        max_samples = max(max_frames * self.fbank_config.window_shift, 1)
        order = sorted(range(len(wavs)), key=lambda k: len(wavs[k]))
        out: list[Any] = [None] * len(wavs)
        start = 0
        while start < len(order):
            # sorted ascending: the pass's last item is its longest
            stop = start + 1
            while stop < len(order) and (stop - start + 1) * len(wavs[order[stop]]) <= max_samples:
                stop += 1
            chunk = order[start:stop]
            longest = len(wavs[chunk[-1]])
            batch = torch.zeros(len(chunk), longest, dtype=torch.float32, device=self._torch_device)
            for row, k in enumerate(chunk):
                batch[row, : len(wavs[k])] = torch.from_numpy(np.asarray(wavs[k], dtype=np.float32)).to(self._torch_device)
            lengths = torch.tensor([len(wavs[k]) for k in chunk], device=self._torch_device)
            feats = fbank_batch(batch, self.fbank_config, lengths)
            for row, k in enumerate(chunk):
                out[k] = feats[row, : num_frames(len(wavs[k]), self.fbank_config)]
            start = stop
        return out

    def embed_file(self, path: str, start: float | None = None, end: float | None = None) -> np.ndarray:
        """The reference: one item, one piece per forward, batch size 1."""
        feats = self.features(self.load(path, start, end))
        vectors = [self._forward(feats[None, a:b]) for a, b in long_item_windows(len(feats), self.max_frames)]
        return np.concatenate(vectors).mean(axis=0, dtype=np.float64).astype(np.float32)


def _stack(pieces: Sequence[Any]) -> Any:
    torch = sys.modules.get("torch")
    if isinstance(pieces, np.ndarray) or (torch is not None and isinstance(pieces, torch.Tensor)):
        return pieces  # already one [B, T, F] array or tensor
    if torch is not None and isinstance(pieces[0], torch.Tensor):
        return torch.stack(list(pieces))
    return np.stack([np.asarray(p, dtype=np.float32) for p in pieces])


def _average(vectors: np.ndarray, owners: list[int], count: int) -> np.ndarray:
    out = np.zeros((count, vectors.shape[1]), dtype=np.float64)
    np.add.at(out, owners, vectors)
    out /= np.bincount(owners, minlength=count)[:, None]
    return out.astype(np.float32)


