"""Resemblyzer's GE2E speaker encoder: the default model, its weights ship in the wheel.

Reproduces `VoiceEncoder().embed_utterance(preprocess_wav(path))`: volume normalisation
to -30 dBFS (increase only), webrtcvad trimming of long silences, 40-band mel frames,
partial windows of 160 frames at 1.3 partials/s (the last kept if it covers >= 75 %), one
LSTM forward over all partials, and the L2-normalised mean of the partial embeddings.
The preprocessing is `resemblyzer_frontend`, a vectorised copy of the package's (the same
kept samples, the mel to ~1e-7; no librosa), and the network is `_ge2e`, VoiceEncoder's
forward on the wheel's own weights without importing the package (whose import pulls
librosa and scipy.ndimage). Audio is read with `embstore.audio.io` (soundfile + soxr)
instead of librosa: identical samples for 16 kHz files, a different (high quality)
resampler for other rates.

Batching is "any": `features(wav)` gives one item's stack of partial windows
[n_partials, 160, 40]; `embed_batch` runs the partials of all items through one LSTM
forward and averages per item, so any mix of lengths equals `embed_file`. The first
axis is partials, not frames, and `feature_length` is an upper bound on it (VAD only
ever removes audio).

Where the package would embed nothing meaningful, `features` raises ValueError instead
(the item is recorded as failed with that reason): all-zero audio (the package divides by
a zero RMS and returns NaN) and audio in which webrtcvad finds no speech at all.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from embstore.models import resemblyzer_frontend as rf
from embstore.models.base import Capabilities, Encoder, fingerprint_of
from embstore.models.common import DTYPES, autocast, torch_device
from embstore.models.lengths import PartialsLength


class ResemblyzerEncoder(Encoder):
    name = "resemblyzer-ge2e"
    # fixed 1.6 s partials: items of any lengths batch together exactly; its LSTM runs
    # windows of mixed lengths packed, each over its own frames (window models)
    capabilities = Capabilities(batching="any", runtime="torch", dtypes=DTYPES, packed_windows=True)

    def __init__(self, device: str = "cpu", dtype: str = "fp32", rate: float = 1.3, min_coverage: float = 0.75) -> None:
        import torch

        from embstore.models._ge2e import EMBEDDING, GE2E

        self.device = device
        self.dtype = dtype
        self.spec = "resemblyzer"
        self.sample_rate = rf.SAMPLE_RATE
        self.dim = EMBEDDING
        self.rate = float(rate)
        self.min_coverage = float(min_coverage)
        # validates rate/min_coverage the way embed_utterance would, before any audio
        rf.partial_slices(self.sample_rate, self.rate, self.min_coverage)
        self.model = GE2E(torch_device(device)).eval()
        self._torch = torch
        # unchanged since the librosa-based frontend: the numbers are the same, so is the key
        self.frontend: dict[str, Any] = {
            "kind": "resemblyzer",
            "sample_rate": self.sample_rate,
            "norm_target_dBFS": rf.NORM_TARGET_DBFS,
            "norm_increase_only": True,
            "vad": {
                "window_ms": rf.VAD_WINDOW_MS,
                "moving_average_width": rf.VAD_AVERAGE_WIDTH,
                "max_silence_length": rf.VAD_MAX_SILENCE,
                "mode": rf.VAD_MODE,
            },
            "mel": {
                "window_ms": rf.MEL_WINDOW_MS,
                "step_ms": rf.MEL_STEP_MS,
                "n_mels": rf.N_MELS,
                "scale": "librosa power melspectrogram",
            },
            "partial_frames": rf.PARTIAL_FRAMES,
            "partial_rate": self.rate,
            "min_coverage": self.min_coverage,
            "pooling": "l2norm(mean(partial embeddings))",
            "compute_dtype": dtype,
        }
        self.fingerprint = fingerprint_of(self.model.state_dict(), self.frontend)

    @property
    def length_rule(self) -> PartialsLength:
        """Upper bound on the number of partial windows (the VAD can only shorten the audio)."""
        return PartialsLength.of(self.sample_rate, rf.MEL_STEP_MS, rf.PARTIAL_FRAMES, self.rate, self.min_coverage,
                                 rf.VAD_WINDOW_MS)

    def features(self, wav: np.ndarray) -> np.ndarray:
        """[n_partials, 160, 40] mel windows of one item, as embed_utterance cuts them."""
        return rf.features(wav, self.rate, self.min_coverage)

    def path_features(self) -> Callable[..., np.ndarray]:
        """`f(path, start, end)` -> features(load(path, start, end)), picklable (a partial of a
        top-level function, no model, no torch): what a loader process pool can run."""
        return functools.partial(rf.resemblyzer_features, rate=self.rate, min_coverage=self.min_coverage)

    def _partial_embeddings(self, mels: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode(), autocast(self.device, self.dtype):
            out = self.model(torch.from_numpy(np.ascontiguousarray(mels)).to(self.model.device))
        return out.float().cpu().numpy()

    @staticmethod
    def _pool(partials: np.ndarray) -> np.ndarray:
        raw = np.mean(partials, axis=0)
        return raw / np.linalg.norm(raw, 2)

    def embed_batch(self, feats: Sequence[np.ndarray]) -> np.ndarray:
        if len(feats) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        for f in feats:
            if f.ndim != 3 or f.shape[0] == 0:
                raise ValueError(f"expected [n_partials, frames, mels] windows, got shape {f.shape}")
        counts = [len(f) for f in feats]
        partials = self._partial_embeddings(np.concatenate(feats, axis=0))
        bounds = np.cumsum([0] + counts)
        out = np.stack([self._pool(partials[a:b]) for a, b in zip(bounds[:-1], bounds[1:])])
        return out.astype(np.float32, copy=False)

    def embed_packed_windows(self, mels: Sequence[np.ndarray]) -> np.ndarray:
        """`VoiceEncoder.forward` of windows of mixed lengths ([frames, 40] mels) in one LSTM call.

        A CPU LSTM costs per time step almost regardless of the batch, so a short window
        alone costs as much as a whole batch; packed sequences run every window over its
        own frames only, and the last hidden state of each is exactly what a forward of
        that window alone gives.
        """
        torch = self._torch
        from torch.nn.utils.rnn import pack_padded_sequence

        if len(mels) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        lengths = torch.tensor([len(m) for m in mels])
        padded = np.zeros((len(mels), int(lengths.max()), mels[0].shape[1]), dtype=np.float32)
        for k, m in enumerate(mels):
            padded[k, : len(m)] = m
        with torch.inference_mode(), autocast(self.device, self.dtype):
            batch = torch.from_numpy(padded).to(self.model.device)
            if int(lengths.min()) == int(lengths.max()):
                rows = self.model(batch)
            else:  # the LSTM takes the packed sequence; the head reads each one's last state
                rows = self.model(pack_padded_sequence(batch, lengths, batch_first=True, enforce_sorted=False))
        return rows.float().cpu().numpy()

    def embed_file(self, path: str, start: float | None = None, end: float | None = None) -> np.ndarray:
        mels = self.features(self.load(path, start, end))
        return self._pool(self._partial_embeddings(mels)).astype(np.float32, copy=False)
