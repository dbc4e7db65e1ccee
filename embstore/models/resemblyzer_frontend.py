"""Resemblyzer's preprocessing, vectorised: the package's numbers, few large NumPy calls.

`resemblyzer.audio` runs `preprocess_wav` (volume normalisation, webrtcvad trimming) and
`wav_to_mel_spectrogram` (`librosa.feature.melspectrogram`). Here the same steps are:

- volume normalisation: resemblyzer's own expression, same dtypes, so the same samples;
- VAD trimming: the same webrtcvad calls on the same 30 ms frames, then the same smoothing
  and dilation in NumPy, so the kept samples are identical. The VAD is stateful: the
  frames go through one `Vad` in order, one C call each (~3 us, ~0.1 ms per second of
  audio), and webrtcvad never releases the GIL, so this is the part of an item that
  threads cannot overlap (py-spy: ~16 % of decode + features, the GIL held ~28 % in all,
  against ~65 % with librosa's mel);
- mel: a strided frame view of the zero-padded signal (librosa's `center=True`,
  `pad_mode="constant"`), a periodic Hann window, one float64 `rfft` per block of frames,
  |X|^2 in float32 and one matmul with a cached Slaney filterbank. librosa computes the
  FFT in float64 as well (float32 frames times a float64 window) and casts to complex64;
  the result matches it to ~1e-7 relative per element. FFT, ufuncs and BLAS release the
  GIL, so loader threads run this part in parallel.

Importing this module loads NumPy only: no librosa (whose first melspectrogram costs
~1.4 s of lazy imports per process), no scipy, no `pkg_resources` (webrtcvad's wrapper).
`resemblyzer_features(path, start, end)` is a picklable top-level function for a process
pool.
"""

from __future__ import annotations

import itertools
from functools import cache

import numpy as np

# resemblyzer.hparams (0.1.x); checked against the package in tests/test_resemblyzer_frontend.py
SAMPLE_RATE = 16000
MEL_WINDOW_MS = 25
MEL_STEP_MS = 10
N_MELS = 40
PARTIAL_FRAMES = 160
VAD_WINDOW_MS = 30
VAD_AVERAGE_WIDTH = 8
VAD_MAX_SILENCE = 6
NORM_TARGET_DBFS = -30
VAD_MODE = 3  # hard-coded in resemblyzer.audio.trim_long_silences

N_FFT = SAMPLE_RATE * MEL_WINDOW_MS // 1000  # 400
HOP = SAMPLE_RATE * MEL_STEP_MS // 1000  # 160
VAD_WINDOW = VAD_WINDOW_MS * SAMPLE_RATE // 1000  # 480 samples
_INT16_MAX = (2**15) - 1
# Frames per block. Small enough that (a) the float64 frames (200 KB) stay in L2, measured
# ~1.5x faster than 2048-frame blocks, and an hour of audio never makes a 1 GB copy; (b)
# OpenBLAS runs the [64, 201] x [201, 40] matmul on the calling thread (measured: 128 rows
# already wake its thread pool when OMP_NUM_THREADS is unset, whose threads then spin on
# the cores the model runs on: 25x slower per row on a busy machine). Large enough that
# the ~7 NumPy calls per block hold the GIL for a few % of the block's time.
_BLOCK_FRAMES = 64


# Slaney's mel scale (librosa's htk=False): linear below 1 kHz, logarithmic above
_F_SP = 200.0 / 3
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP
_LOGSTEP = np.log(6.4) / 27.0


def _hz_to_mel(hz: float) -> float:
    return _MIN_LOG_MEL + np.log(hz / _MIN_LOG_HZ) / _LOGSTEP if hz >= _MIN_LOG_HZ else hz / _F_SP


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    hz = _F_SP * mel
    log = mel >= _MIN_LOG_MEL
    hz[log] = _MIN_LOG_HZ * np.exp(_LOGSTEP * (mel[log] - _MIN_LOG_MEL))
    return hz


@cache
def mel_filterbank(sr: int = SAMPLE_RATE, n_fft: int = N_FFT, n_mels: int = N_MELS) -> np.ndarray:
    """[n_mels, 1 + n_fft // 2] float32, as `librosa.filters.mel(sr=, n_fft=, n_mels=)` builds it
    (fmin 0, fmax sr/2, Slaney scale and area normalisation). Read-only: it is shared."""
    fft_hz = np.fft.rfftfreq(n_fft, 1.0 / sr)
    mel_hz = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(sr / 2.0), n_mels + 2))
    fdiff = np.diff(mel_hz)
    ramps = mel_hz[:, None] - fft_hz[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    # librosa fills a float32 array row by row, then scales it in float32
    weights = np.maximum(0, np.minimum(lower, upper)).astype(np.float32)
    weights *= (2.0 / (mel_hz[2:] - mel_hz[:-2]))[:, None]
    weights.flags.writeable = False
    return weights


@cache
def hann_window(n: int = N_FFT) -> np.ndarray:
    """Periodic Hann window, float64 (scipy.signal.get_window("hann", n, fftbins=True))."""
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n) / n)
    window.flags.writeable = False
    return window


def mel_spectrogram(wav: np.ndarray) -> np.ndarray:
    """[frames, n_mels] float32 power mel spectrogram, = resemblyzer.audio.wav_to_mel_spectrogram.

    Frames: 1 + len(wav) // hop, centred on multiples of the hop, zero padding at both ends.
    """
    wav = np.asarray(wav, dtype=np.float32)
    if wav.ndim != 1:
        raise ValueError(f"expected a mono waveform, got shape {wav.shape}")
    padded = np.pad(wav, N_FFT // 2)
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP]
    fb_t = mel_filterbank().T
    window = hann_window()
    out = np.empty((len(frames), N_MELS), dtype=np.float32)
    for a in range(0, len(frames), _BLOCK_FRAMES):
        spec = np.fft.rfft(frames[a : a + _BLOCK_FRAMES] * window, axis=-1)
        # librosa stores the STFT as complex64 before |X|^2 and the float32 einsum
        spec = spec.astype(np.complex64)
        power = np.square(spec.real)
        power += np.square(spec.imag)
        np.matmul(power, fb_t, out=out[a : a + _BLOCK_FRAMES])
    return out


def normalize_volume(wav: np.ndarray, target_dbfs: float = NORM_TARGET_DBFS) -> np.ndarray:
    """resemblyzer.audio.normalize_volume(wav, target_dbfs, increase_only=True), same expression
    and dtypes, so the same samples."""
    rms = np.sqrt(np.mean((wav * _INT16_MAX) ** 2))
    change = target_dbfs - 20 * np.log10(rms / _INT16_MAX)
    if change < 0:
        return wav
    return wav * (10 ** (change / 20))


def _new_vad():
    # the C module directly: webrtcvad.py imports pkg_resources (slow, warns) just for a version
    import _webrtcvad

    vad = _webrtcvad.create()
    _webrtcvad.init(vad)
    _webrtcvad.set_mode(vad, VAD_MODE)
    return _webrtcvad.process, vad


def vad_flags(wav: np.ndarray) -> np.ndarray:
    """webrtcvad's speech decision per 30 ms frame of `wav` (a multiple of the frame length),
    through one Vad in order, as trim_long_silences makes them."""
    process, vad = _new_vad()
    pcm = memoryview(np.round(wav * _INT16_MAX).astype(np.int16).tobytes())
    step = VAD_WINDOW * 2
    n = len(wav) // VAD_WINDOW
    frames = (pcm[k : k + step] for k in range(0, n * step, step))  # views, not copies; flat memory
    return np.fromiter(
        map(process, itertools.repeat(vad, n), itertools.repeat(SAMPLE_RATE, n), frames, itertools.repeat(VAD_WINDOW, n)),
        dtype=bool, count=n,
    )


def smooth_flags(flags: np.ndarray) -> np.ndarray:
    """trim_long_silences' moving average of VAD_AVERAGE_WIDTH flags, rounded to bool."""
    width = VAD_AVERAGE_WIDTH
    padded = np.concatenate((np.zeros((width - 1) // 2), flags, np.zeros(width // 2)))
    ret = np.cumsum(padded, dtype=float)
    ret[width:] = ret[width:] - ret[:-width]
    return np.round(ret[width - 1 :] / width).astype(bool)


def dilate(mask: np.ndarray) -> np.ndarray:
    """scipy's binary_dilation(mask, ones(VAD_MAX_SILENCE + 1)) for this odd size: a frame is
    kept when any frame within VAD_MAX_SILENCE // 2 on either side is, zeros beyond the ends."""
    half = VAD_MAX_SILENCE // 2
    counts = np.concatenate(([0], np.cumsum(np.pad(mask, half), dtype=np.int64)))
    return (counts[2 * half + 1 :] - counts[: len(counts) - 2 * half - 1]) > 0


def trim_long_silences(wav: np.ndarray) -> np.ndarray:
    """= resemblyzer.audio.trim_long_silences(wav), without one Python int per sample."""
    wav = wav[: len(wav) - (len(wav) % VAD_WINDOW)]
    mask = dilate(smooth_flags(vad_flags(wav)))
    return wav[np.repeat(mask, VAD_WINDOW)]


def preprocess(wav: np.ndarray) -> np.ndarray:
    """= resemblyzer.preprocess_wav(wav) for 16 kHz float32 audio; ValueError where the package
    would embed nothing meaningful (all zeros: it divides by a zero RMS; no speech found)."""
    wav = np.asarray(wav, dtype=np.float32)
    if wav.ndim != 1:
        raise ValueError(f"expected a mono waveform, got shape {wav.shape}")
    if not np.any(wav):
        raise ValueError("silent audio (all samples are zero)")
    wav = trim_long_silences(normalize_volume(wav))
    if len(wav) == 0:
        raise ValueError("no speech found by the VAD (audio too short or silent)")
    return wav


def partial_slices(n_samples: int, rate: float = 1.3, min_coverage: float = 0.75) -> tuple[int, list[slice]]:
    """(samples needed, mel slices) as VoiceEncoder.compute_partial_slices cuts an utterance."""
    if not 0 < min_coverage <= 1:
        raise ValueError(f"min_coverage must be in (0, 1], got {min_coverage}")
    frame_step = int(np.round((SAMPLE_RATE / rate) / HOP))
    if not 0 < frame_step <= PARTIAL_FRAMES:
        raise ValueError(f"rate {rate} gives a step of {frame_step} frames; it must be in 1..{PARTIAL_FRAMES}"
                         f" (rate >= {SAMPLE_RATE / (HOP * PARTIAL_FRAMES)})")
    n_frames = int(np.ceil((n_samples + 1) / HOP))
    starts = range(0, max(1, n_frames - PARTIAL_FRAMES + frame_step + 1), frame_step)
    slices = [slice(i, i + PARTIAL_FRAMES) for i in starts]
    last_wav_start = slices[-1].start * HOP
    coverage = (n_samples - last_wav_start) / (slices[-1].stop * HOP - last_wav_start)
    if coverage < min_coverage and len(slices) > 1:
        slices = slices[:-1]
    return slices[-1].stop * HOP, slices


def partial_windows(wav: np.ndarray, rate: float = 1.3, min_coverage: float = 0.75) -> np.ndarray:
    """[n_partials, 160, 40] float32 windows of a preprocessed utterance, as embed_utterance cuts
    them: the audio zero-padded to cover the last partial, one mel over it, windows copied out."""
    needed, slices = partial_slices(len(wav), rate, min_coverage)
    if needed >= len(wav):
        wav = np.pad(wav, (0, needed - len(wav)))
    mel = mel_spectrogram(wav)
    return np.stack([mel[s] for s in slices])


def features(wav: np.ndarray, rate: float = 1.3, min_coverage: float = 0.75) -> np.ndarray:
    """Resemblyzer's model input for one 16 kHz item: preprocess, then the partial windows."""
    return partial_windows(preprocess(wav), rate, min_coverage)


def resemblyzer_features(path: str, start: float | None = None, end: float | None = None,
                         rate: float = 1.3, min_coverage: float = 0.75) -> np.ndarray:
    """Load one item and return its [n_partials, 160, 40] windows: a top-level function a process
    pool can call (no model, no torch; the same numbers as ResemblyzerEncoder.features)."""
    from embstore.audio.io import load_for_model

    return features(load_for_model(path, SAMPLE_RATE, start, end), rate, min_coverage)
