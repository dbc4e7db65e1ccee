"""Resemblyzer's GE2E speaker encoder: the default model, its weights ship in the wheel.

Reproduces `VoiceEncoder().embed_utterance(preprocess_wav(path))` with resemblyzer's own
functions: volume normalisation to -30 dBFS (increase only), webrtcvad trimming of long
silences, 40-band mel frames, partial windows of 160 frames at 1.3 partials/s (the last
kept if it covers >= 75 %), one LSTM forward over all partials, and the L2-normalised
mean of the partial embeddings. Audio is read with `embstore.audio` (soundfile + soxr)
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

from typing import Any, Sequence

import numpy as np

from embstore.models.base import Capabilities, Encoder, fingerprint_of
from embstore.models.common import DTYPES, autocast, torch_device
from embstore.models.lengths import PartialsLength

# webrtcvad aggressiveness hard-coded in resemblyzer.audio.trim_long_silences
_VAD_MODE = 3


def _trim_long_silences(wav: np.ndarray, hp: Any) -> np.ndarray:
    """resemblyzer.audio.trim_long_silences, same output, in flat memory.

    Resemblyzer packs the PCM with `struct.pack(*samples)`, one Python int per sample:
    ~3.5 GB and ~15 s for a one-hour item, enough for the OOM killer on long files. The
    same bytes come from `ndarray.tobytes()`; the VAD decisions and the smoothing are
    resemblyzer's own steps, so the kept samples are identical.
    """
    import webrtcvad
    from scipy.ndimage import binary_dilation

    window = (hp.vad_window_length * hp.sampling_rate) // 1000
    wav = wav[: len(wav) - (len(wav) % window)]
    # identical to struct.pack("%dh", ...) of the same int16 values (native byte order)
    pcm = np.round(wav * ((2**15) - 1)).astype(np.int16).tobytes()
    vad = webrtcvad.Vad(mode=_VAD_MODE)
    step = window * 2
    flags = np.fromiter(
        (vad.is_speech(pcm[k : k + step], sample_rate=hp.sampling_rate) for k in range(0, len(pcm), step)),
        dtype=bool, count=len(wav) // window,
    )
    width = hp.vad_moving_average_width
    padded = np.concatenate((np.zeros((width - 1) // 2), flags, np.zeros(width // 2)))
    ret = np.cumsum(padded, dtype=float)
    ret[width:] = ret[width:] - ret[:-width]
    mask = np.round(ret[width - 1 :] / width).astype(bool)
    mask = binary_dilation(mask, np.ones(hp.vad_max_silence_length + 1))
    return wav[np.repeat(mask, window)]


class ResemblyzerEncoder(Encoder):
    name = "resemblyzer-ge2e"
    # fixed 1.6 s partials: items of any lengths batch together exactly
    capabilities = Capabilities(batching="any", runtime="torch", dtypes=DTYPES)

    def __init__(self, device: str = "cpu", dtype: str = "fp32", rate: float = 1.3, min_coverage: float = 0.75) -> None:
        import warnings

        import torch

        with warnings.catch_warnings():
            # its webrtcvad import warns that pkg_resources is deprecated, once per process
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            from resemblyzer import hparams
            from resemblyzer.voice_encoder import VoiceEncoder

        self._hp = hparams
        self.device = device
        self.dtype = dtype
        self.spec = "resemblyzer"
        self.sample_rate = int(hparams.sampling_rate)
        self.dim = int(hparams.model_embedding_size)
        self.rate = float(rate)
        self.min_coverage = float(min_coverage)
        # validates rate/min_coverage the way embed_utterance would, before any audio
        VoiceEncoder.compute_partial_slices(self.sample_rate, self.rate, self.min_coverage)
        self.model = VoiceEncoder(device=torch_device(device), verbose=False).eval()
        self._torch = torch
        self.frontend: dict[str, Any] = {
            "kind": "resemblyzer",
            "sample_rate": self.sample_rate,
            "norm_target_dBFS": hparams.audio_norm_target_dBFS,
            "norm_increase_only": True,
            "vad": {
                "window_ms": hparams.vad_window_length,
                "moving_average_width": hparams.vad_moving_average_width,
                "max_silence_length": hparams.vad_max_silence_length,
                "mode": _VAD_MODE,
            },
            "mel": {
                "window_ms": hparams.mel_window_length,
                "step_ms": hparams.mel_window_step,
                "n_mels": hparams.mel_n_channels,
                "scale": "librosa power melspectrogram",
            },
            "partial_frames": hparams.partials_n_frames,
            "partial_rate": self.rate,
            "min_coverage": self.min_coverage,
            "pooling": "l2norm(mean(partial embeddings))",
            "compute_dtype": dtype,
        }
        self.fingerprint = fingerprint_of(self.model.state_dict(), self.frontend)

    def _preprocess(self, wav: np.ndarray) -> np.ndarray:
        from resemblyzer.audio import normalize_volume

        wav = np.asarray(wav, dtype=np.float32)
        if wav.ndim != 1:
            raise ValueError(f"expected a mono waveform, got shape {wav.shape}")
        if not np.any(wav):
            # resemblyzer would divide by a zero RMS and embed NaN
            raise ValueError("silent audio (all samples are zero)")
        wav = normalize_volume(wav, self._hp.audio_norm_target_dBFS, increase_only=True)
        wav = _trim_long_silences(wav, self._hp)
        if len(wav) == 0:
            raise ValueError("no speech found by the VAD (audio too short or silent)")
        return wav

    @property
    def length_rule(self) -> PartialsLength:
        """Upper bound on the number of partial windows (the VAD can only shorten the audio)."""
        hp = self._hp
        return PartialsLength.of(self.sample_rate, hp.mel_window_step, hp.partials_n_frames, self.rate,
                                 self.min_coverage, hp.vad_window_length)

    def features(self, wav: np.ndarray) -> np.ndarray:
        """[n_partials, 160, 40] mel windows of one item, as embed_utterance cuts them."""
        from resemblyzer.audio import wav_to_mel_spectrogram
        from resemblyzer.voice_encoder import VoiceEncoder

        wav = self._preprocess(wav)
        wav_slices, mel_slices = VoiceEncoder.compute_partial_slices(len(wav), self.rate, self.min_coverage)
        needed = wav_slices[-1].stop
        if needed >= len(wav):
            wav = np.pad(wav, (0, needed - len(wav)), "constant")
        mel = wav_to_mel_spectrogram(wav)
        return np.stack([mel[s] for s in mel_slices]).astype(np.float32, copy=False)

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

    def embed_file(self, path: str, start: float | None = None, end: float | None = None) -> np.ndarray:
        mels = self.features(self.load(path, start, end))
        return self._pool(self._partial_embeddings(mels)).astype(np.float32, copy=False)
