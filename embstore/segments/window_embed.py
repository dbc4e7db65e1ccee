"""Embeddings of the windows of one waveform (see `embstore.segments.windows`), in flat memory.

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
  "none" keeps the samples as they are. The mel is resemblyzer's
  (`embstore.models.resemblyzer_frontend`, equal to its `wav_to_mel_spectrogram`); the
  forward is the encoder's declared `embed_packed_windows` (`Capabilities.packed_windows`):
  `VoiceEncoder.forward` with the short windows packed into the same LSTM call (exact:
  each window runs over its own frames).
- "features": any Encoder: `encoder.features(window samples)` then `embed_batch`,
  batched as the encoder's `batching` allows (equal-length groups for "equal").
  For WeSpeaker models this is WeSpeaker's own per-subsegment fbank + CMN; for
  Resemblyzer it is its full utterance pipeline on each window (VAD trim + partials).

The two halves follow the Encoder split, for the extraction pipeline's loader and
compute sides: `window_features(pieces)` (CPU, any thread) and `embed_features(feats)`
(one forward per block); `iter_embed`/`embed` chain them for one waveform.

Out of memory: `iter_embed` halves a block's forward until it fits, and plans later
blocks at the size that fitted (`embstore.segments.oom`, as the extraction worker
does), so a long item on a small GPU embeds to the same vectors as on a large one.
`embed_features` alone does not: the worker's `ItemEmbedder` halves around it itself.

A window the encoder cannot embed (its `features` raise ValueError, e.g. Resemblyzer's
own VAD found nothing in it) or that embeds to NaN/inf gets a NaN vector: callers drop
those with `embstore.vectors.finite_nonzero`.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np

from embstore.models import resemblyzer_frontend as rf
from embstore.models.base import Encoder
from embstore.segments.oom import embed_halving
from embstore.vectors import finite_nonzero
from embstore.segments.windows import WindowPlan

MODES = ("auto", "mel", "features")
GAINS = ("window", "none")
DEFAULT_BATCH = 128


def _groups_by_length(lengths: Sequence[int]) -> list[list[int]]:
    groups: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        groups.setdefault(int(n), []).append(i)
    return list(groups.values())


def window_mode(frontend: dict[str, Any], runtime: str = "torch", gain: str = "window") -> dict[str, Any]:
    """How `WindowEmbedder(mode="auto")` embeds windows for an encoder of this frontend
    and runtime (its `describe()`), known before the encoder is loaded: "mel" for
    Resemblyzer on torch (its own LSTM call packs windows), else "features"."""
    if frontend.get("kind") == "resemblyzer" and runtime == "torch":
        return {"mode": "mel", "gain": gain}
    return {"mode": "features"}


class WindowEmbedder:
    """`embed(wav, plan) -> [len(plan), dim]` for one encoder (see the module docstring)."""

    def __init__(self, encoder: Encoder, mode: str = "auto", gain: str = "window", batch: int = DEFAULT_BATCH) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown window embedding mode {mode!r}: use one of {', '.join(MODES)}")
        if gain not in GAINS:
            raise ValueError(f"unknown gain {gain!r}: use one of {', '.join(GAINS)}")
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        frontend = getattr(encoder, "frontend", {})
        runtime = encoder.capabilities.runtime
        if mode == "auto":
            mode = window_mode(frontend, runtime, gain)["mode"]
        if mode == "mel" and (window_mode(frontend, runtime)["mode"] != "mel"
                              or not encoder.capabilities.packed_windows):
            # the packed forward is declared by the encoder, never reached into
            raise ValueError(f"window mode 'mel' is Resemblyzer's on torch (an encoder that embeds packed"
                             f" windows); {encoder.name} takes 'features'")
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
        """[len(plan), dim] vectors of the windows (NaN for those without one)."""
        out = np.full((len(plan), self.dim), np.nan, dtype=np.float32)
        for first, vectors in self.iter_embed(wav, plan):
            out[first : first + len(vectors)] = vectors
        return out

    def sample_ranges(self, plan: WindowPlan, num_samples: int) -> np.ndarray:
        """[len(plan), 2] (first, end) sample of each window at the encoder's rate."""
        rate = self.encoder.sample_rate
        ranges = np.stack([np.round(plan.starts * rate), np.round(plan.ends * rate)], axis=1).astype(np.int64)
        return np.clip(ranges, 0, num_samples)

    def iter_embed(self, wav: np.ndarray, plan: WindowPlan) -> Iterator[tuple[int, np.ndarray]]:
        """(index of the block's first window, [block, dim] vectors), block by block; a
        block that runs out of memory is embedded in halves (see the module docstring)."""
        wav = np.asarray(wav, dtype=np.float32)
        ranges = self.sample_ranges(plan, len(wav))
        first = 0
        while first < len(plan):
            size = self.batch  # read per block: an out-of-memory lowers it for the rest
            pieces = [wav[a:b] for a, b in ranges[first : first + size]]
            feats = self.window_features(pieces)
            yield first, embed_halving(self.embed_features, feats, self._fitted)
            first += len(pieces)

    def _fitted(self, failed: int) -> None:
        # later blocks start at half the size that failed: each would otherwise fail once first
        self.batch = max(1, min(self.batch, failed // 2))

    def window_features(self, pieces: Sequence[np.ndarray]) -> list[np.ndarray | None]:
        """Loader side (CPU, any thread): each window's model input, None where there is
        none (the encoder's `features` refused it, or it is shorter than one frame)."""
        if self.mode == "mel":
            return self._mel_features(pieces)
        out: list[np.ndarray | None] = []
        for piece in pieces:
            try:
                out.append(self.encoder.features(piece))
            except ValueError:
                out.append(None)  # e.g. no speech for the encoder's own VAD: a NaN vector
        return out

    def embed_features(self, feats: Sequence[np.ndarray | None]) -> np.ndarray:
        """Compute side: [len(feats), dim] vectors in as few forwards as the encoder
        allows; NaN vectors for None and for non-finite embeddings."""
        out = np.full((len(feats), self.dim), np.nan, dtype=np.float32)
        index = [i for i, f in enumerate(feats) if f is not None]
        if not index:
            return out
        present = [feats[i] for i in index]
        if self.mode == "mel":
            out[index] = self.encoder.embed_packed_windows(present)  # type: ignore[arg-type]
        elif self.encoder.batching in ("any", "masked"):
            out[index] = self.encoder.embed_batch(present)
        else:
            for group in _groups_by_length([len(f) for f in present]):  # type: ignore[arg-type]
                out[[index[k] for k in group]] = self.encoder.embed_batch([present[k] for k in group])
        out[~finite_nonzero(out)] = np.nan
        return out

    # ------------------------------------------------------------ mel (Resemblyzer)

    def _mel_features(self, pieces: Sequence[np.ndarray]) -> list[np.ndarray | None]:
        out: list[np.ndarray | None] = [None] * len(pieces)
        for group in _groups_by_length([len(p) for p in pieces]):
            if len(pieces[group[0]]) < rf.N_FFT:
                continue  # shorter than one mel frame: nothing to embed
            for i, mel in zip(group, self._mels(np.stack([self._gain(pieces[i]) for i in group]))):
                out[i] = mel
        return out

    def _mels(self, audio: np.ndarray) -> np.ndarray:
        """[B, frames, 40]: resemblyzer's mel spectrogram of each clip (`resemblyzer_frontend`,
        equal to its `wav_to_mel_spectrogram`)."""
        return np.stack([rf.mel_spectrogram(clip) for clip in audio])

    def _gain(self, piece: np.ndarray) -> np.ndarray:
        if self.gain == "none" or not np.any(piece):
            return piece
        return rf.normalize_volume(piece).astype(np.float32)
