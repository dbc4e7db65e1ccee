"""Embeddings of the windows of one waveform (see `embstore.windows`), in flat memory.

Every window is embedded from its own samples only, so a window's embedding does not
depend on how the item was chunked, on its neighbours or on the batch it ran in:
rerunning or resuming gives the same rows. Windows are processed `batch` at a time
(a one-hour item is ~4800 windows at 1.5:0.75, whose activations never coexist).

Two paths:

- "mel" (Resemblyzer only, its default): the GE2E network on the window's own mel
  frames (151 frames for 1.5 s, no VAD trimming and no 1.6 s partial slicing, which
  are utterance-level steps: VAD is done before windowing, and a partial longer than
  the window would pad it with silence). `gain`: "window" scales each window to
  resemblyzer's -30 dBFS (increase only), as `preprocess_wav` does per utterance;
  "none" keeps the samples as they are. The mel is resemblyzer's own
  (`wav_to_mel_spectrogram`, librosa), computed for a whole batch of equal-length
  windows in one call; the forward is `VoiceEncoder.forward`, with the short windows
  packed into the same LSTM call (exact: each window runs over its own frames).
- "features": any Encoder: `encoder.features(window samples)` then `embed_batch`,
  batched as the encoder's `batching` allows (equal-length groups for "equal").
  For WeSpeaker models this is WeSpeaker's own per-subsegment fbank + CMN; for
  Resemblyzer it is its full utterance pipeline on each window (VAD trim + partials).

A window the encoder cannot embed (its `features` raise ValueError, e.g. Resemblyzer's
own VAD found nothing in it) or that embeds to NaN/inf gets a NaN row: callers drop
those with `embstore.models.base.check_finite`.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np

from embstore.models.base import Encoder, check_finite
from embstore.windows import WindowPlan

MODES = ("auto", "mel", "features")
GAINS = ("window", "none")
DEFAULT_BATCH = 128


def _groups_by_length(lengths: Sequence[int]) -> list[list[int]]:
    groups: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        groups.setdefault(int(n), []).append(i)
    return list(groups.values())


class WindowEmbedder:
    """`embed(wav, plan) -> [len(plan), dim]` for one encoder (see the module docstring)."""

    def __init__(self, encoder: Encoder, mode: str = "auto", gain: str = "window", batch: int = DEFAULT_BATCH) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown window embedding mode {mode!r}: use one of {', '.join(MODES)}")
        if gain not in GAINS:
            raise ValueError(f"unknown gain {gain!r}: use one of {', '.join(GAINS)}")
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        is_resemblyzer = getattr(encoder, "frontend", {}).get("kind") == "resemblyzer"
        if mode == "auto":
            mode = "mel" if is_resemblyzer else "features"
        if mode == "mel" and not is_resemblyzer:
            raise ValueError(f"window mode 'mel' is Resemblyzer's; {encoder.name} takes 'features'")
        self.encoder = encoder
        self.mode = mode
        self.gain = gain
        self.batch = int(batch)

    def describe(self) -> dict[str, Any]:
        """What changes the numbers (for a window model's fingerprint)."""
        out: dict[str, Any] = {"mode": self.mode}
        if self.mode == "mel":
            out["gain"] = self.gain
        return out

    @property
    def dim(self) -> int:
        return int(self.encoder.dim)

    def embed(self, wav: np.ndarray, plan: WindowPlan) -> np.ndarray:
        out = np.full((len(plan), self.dim), np.nan, dtype=np.float32)
        for first, rows in self.iter_embed(wav, plan):
            out[first : first + len(rows)] = rows
        return out

    def iter_embed(self, wav: np.ndarray, plan: WindowPlan) -> Iterator[tuple[int, np.ndarray]]:
        """(index of the block's first window, [block, dim] rows), block by block."""
        wav = np.asarray(wav, dtype=np.float32)
        rate = self.encoder.sample_rate
        bounds = np.stack([np.round(plan.starts * rate), np.round(plan.ends * rate)], axis=1).astype(np.int64)
        bounds = np.clip(bounds, 0, len(wav))
        for first in range(0, len(plan), self.batch):
            spans = bounds[first : first + self.batch]
            pieces = [wav[a:b] for a, b in spans]
            rows = self._embed_mel(pieces) if self.mode == "mel" else self._embed_features(pieces)
            bad = ~check_finite(rows)
            rows[bad] = np.nan
            yield first, rows

    # ------------------------------------------------------------ mel (Resemblyzer)

    def _embed_mel(self, pieces: Sequence[np.ndarray]) -> np.ndarray:
        enc: Any = self.encoder
        out = np.full((len(pieces), self.dim), np.nan, dtype=np.float32)
        mels: list[np.ndarray] = []
        index: list[int] = []
        for group in _groups_by_length([len(p) for p in pieces]):
            if len(pieces[group[0]]) < enc._hp.mel_window_length * enc.sample_rate // 1000:
                continue  # shorter than one mel frame: nothing to embed
            group_mels = self._mels(np.stack([self._gain(pieces[i]) for i in group]))
            mels.extend(group_mels)
            index.extend(group)
        if mels:
            out[index] = self._forward_packed(mels)
        return out

    def _forward_packed(self, mels: Sequence[np.ndarray]) -> np.ndarray:
        """`VoiceEncoder.forward` of windows of mixed lengths in one LSTM call.

        A CPU LSTM costs per time step almost regardless of the batch, so a short window
        alone costs as much as a whole batch; packed sequences run every window over its
        own frames only, and the last hidden state of each is exactly what a forward of
        that window alone gives.
        """
        import torch
        from torch.nn.utils.rnn import pack_padded_sequence

        from embstore.models import autocast

        enc: Any = self.encoder
        model = enc.model
        lengths = torch.tensor([len(m) for m in mels])
        padded = np.zeros((len(mels), int(lengths.max()), mels[0].shape[1]), dtype=np.float32)
        for k, m in enumerate(mels):
            padded[k, : len(m)] = m
        with torch.inference_mode(), autocast(enc.device, enc.dtype):
            batch = torch.from_numpy(padded).to(model.device)
            if int(lengths.min()) == int(lengths.max()):
                rows = model(batch)
            else:
                packed = pack_padded_sequence(batch, lengths, batch_first=True, enforce_sorted=False)
                _, (hidden, _) = model.lstm(packed)
                raw = model.relu(model.linear(hidden[-1]))
                rows = raw / torch.norm(raw, dim=1, keepdim=True)
        return rows.float().cpu().numpy()

    def _mels(self, audio: np.ndarray) -> np.ndarray:
        """[B, frames, 40]: resemblyzer's `wav_to_mel_spectrogram` of each row, in one
        librosa call (its own function transposes all axes, so it takes one row only)."""
        import librosa

        hp: Any = self.encoder._hp  # type: ignore[attr-defined]
        mel = librosa.feature.melspectrogram(
            y=audio,
            sr=hp.sampling_rate,
            n_fft=int(hp.sampling_rate * hp.mel_window_length / 1000),
            hop_length=int(hp.sampling_rate * hp.mel_window_step / 1000),
            n_mels=hp.mel_n_channels,
        )
        return np.ascontiguousarray(np.swapaxes(mel, 1, 2), dtype=np.float32)

    def _gain(self, piece: np.ndarray) -> np.ndarray:
        if self.gain == "none" or not np.any(piece):
            return piece
        from resemblyzer.audio import normalize_volume

        enc: Any = self.encoder
        return normalize_volume(piece, enc._hp.audio_norm_target_dBFS, increase_only=True).astype(np.float32)

    # ------------------------------------------------------------ features (any encoder)

    def _embed_features(self, pieces: Sequence[np.ndarray]) -> np.ndarray:
        enc = self.encoder
        out = np.full((len(pieces), self.dim), np.nan, dtype=np.float32)
        feats: list[Any] = []
        index: list[int] = []
        for i, piece in enumerate(pieces):
            try:
                feats.append(enc.features(piece))
            except ValueError:
                continue  # e.g. no speech for the encoder's own VAD: a NaN row
            index.append(i)
        if not feats:
            return out
        groups = [list(range(len(feats)))] if enc.batching in ("any", "masked") else _groups_by_length(
            [len(f) for f in feats]
        )
        for group in groups:
            rows = enc.embed_batch([feats[k] for k in group])
            out[[index[k] for k in group]] = rows
        return out
