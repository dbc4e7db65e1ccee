"""Kaldi log-mel filterbanks as WeSpeaker computes them.

Two implementations of the same computation:

- `fbank(wav, config)`: one item on the CPU with kaldi-native-fbank, the reference (the
  same C++ code path as Kaldi's `compute-fbank-feats`, which WeSpeaker's
  `torchaudio.compliance.kaldi.fbank` reproduces);
- `fbank_batch(wavs, config)`: a batch of equal-length (or zero-padded, with `lengths`)
  waveforms as one torch computation on any device, so a GPU worker can compute
  features next to the model. It matches the reference to ~1e-4 on real speech.

Both take float32 mono samples in [-1, 1] at `config.sample_rate` and apply the
model's waveform scaling (`int16_scale`: multiply by 32768 as WeSpeaker's ResNet
recipes see int16 PCM; CAM++/ERes2Net from 3D-Speaker see normalised floats) and
per-utterance mean normalisation (CMN) over time. Dither is always 0 so features are
deterministic.

Kaldi details reproduced: snip_edges (frames fully inside the signal only), DC offset
removal per frame, pre-emphasis 0.97 (first sample against itself), povey/hamming/hann/
rectangular windows, zero-padding to a power-of-two FFT, power spectrum, Kaldi mel bank
(mel = 1127 ln(1 + f/700), low 20 Hz, high = Nyquist, the Nyquist bin unused), log with
a float32-epsilon floor.

Importing this module imports neither torch nor kaldi-native-fbank.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

WINDOW_TYPES = ("povey", "hamming", "hanning", "rectangular")
# Kaldi floors the mel energies at float epsilon before the log
LOG_FLOOR = float(np.finfo(np.float32).eps)
INT16_SCALE = 32768.0


@dataclass(frozen=True)
class FbankConfig:
    """Every setting that changes the features; `as_dict()` goes into a fingerprint."""

    sample_rate: int = 16000
    num_mel_bins: int = 80
    frame_length_ms: float = 25.0
    frame_shift_ms: float = 10.0
    window_type: str = "hamming"
    int16_scale: bool = True
    cmn: bool = True
    low_freq: float = 20.0
    high_freq: float = 0.0  # <= 0: offset from Nyquist, Kaldi's convention
    preemph_coeff: float = 0.97
    remove_dc_offset: bool = True

    def __post_init__(self) -> None:
        if self.window_type not in WINDOW_TYPES:
            raise ValueError(f"window_type {self.window_type!r} is not one of {', '.join(WINDOW_TYPES)}")
        if self.window_size <= 0 or self.window_shift <= 0:
            raise ValueError("frame_length_ms and frame_shift_ms must give at least one sample")

    @property
    def window_size(self) -> int:
        # Kaldi truncates: 25 ms at 16 kHz = 400 samples
        return int(self.sample_rate * 0.001 * self.frame_length_ms)

    @property
    def window_shift(self) -> int:
        return int(self.sample_rate * 0.001 * self.frame_shift_ms)

    @property
    def padded_window_size(self) -> int:
        return 1 << (self.window_size - 1).bit_length()

    def as_dict(self) -> dict[str, Any]:
        return {"kind": "kaldi-fbank", **asdict(self), "dither": 0.0, "snip_edges": True}


def num_frames(num_samples: int, config: FbankConfig) -> int:
    """Frames Kaldi produces with snip_edges=True: only windows fully inside the signal."""
    if num_samples < config.window_size:
        return 0
    return 1 + (num_samples - config.window_size) // config.window_shift


def fbank(wav: np.ndarray, config: FbankConfig) -> np.ndarray:
    """[frames, num_mel_bins] float32 log-mel features of one float waveform (kaldi-native-fbank)."""
    import kaldi_native_fbank as knf

    wav = np.asarray(wav, dtype=np.float32)
    if wav.ndim != 1:
        raise ValueError(f"fbank expects a mono 1-D waveform, got shape {wav.shape}")
    n = num_frames(len(wav), config)
    if n == 0:
        return np.zeros((0, config.num_mel_bins), dtype=np.float32)
    opts = knf.FbankOptions()
    opts.frame_opts.samp_freq = float(config.sample_rate)
    opts.frame_opts.frame_length_ms = float(config.frame_length_ms)
    opts.frame_opts.frame_shift_ms = float(config.frame_shift_ms)
    opts.frame_opts.dither = 0.0
    opts.frame_opts.preemph_coeff = float(config.preemph_coeff)
    opts.frame_opts.remove_dc_offset = bool(config.remove_dc_offset)
    opts.frame_opts.window_type = config.window_type
    opts.frame_opts.round_to_power_of_two = True
    opts.frame_opts.snip_edges = True
    opts.mel_opts.num_bins = int(config.num_mel_bins)
    opts.mel_opts.low_freq = float(config.low_freq)
    opts.mel_opts.high_freq = float(config.high_freq)
    opts.use_energy = False
    opts.use_log_fbank = True
    opts.use_power = True
    computer = knf.OnlineFbank(opts)
    samples = wav * INT16_SCALE if config.int16_scale else wav
    computer.accept_waveform(float(config.sample_rate), samples)
    computer.input_finished()
    feats = np.array([computer.get_frame(i) for i in range(computer.num_frames_ready)], dtype=np.float32)
    if config.cmn:
        feats -= feats.mean(axis=0, keepdims=True)
    return feats


def _window(config: FbankConfig, dtype: Any, device: Any) -> "torch.Tensor":
    import torch

    size = config.window_size
    # Kaldi's windows are symmetric: cosine argument 2*pi*i/(N-1)
    a = 2 * math.pi / (size - 1)
    i = torch.arange(size, dtype=torch.float64)
    if config.window_type == "hanning":
        w = 0.5 - 0.5 * torch.cos(a * i)
    elif config.window_type == "hamming":
        w = 0.54 - 0.46 * torch.cos(a * i)
    elif config.window_type == "povey":
        w = (0.5 - 0.5 * torch.cos(a * i)).pow(0.85)
    else:
        w = torch.ones(size, dtype=torch.float64)
    return w.to(device=device, dtype=dtype)


def mel_banks(config: FbankConfig) -> np.ndarray:
    """Kaldi's triangular mel filters as a [padded_window_size // 2 + 1, num_mel_bins] matrix."""
    n_fft = config.padded_window_size
    num_fft_bins = n_fft // 2
    nyquist = 0.5 * config.sample_rate
    high = config.high_freq if config.high_freq > 0 else nyquist + config.high_freq
    if not (0.0 <= config.low_freq < high <= nyquist):
        raise ValueError(f"bad mel range: low_freq {config.low_freq}, high_freq {config.high_freq}")

    def mel(f: np.ndarray | float) -> np.ndarray:
        return 1127.0 * np.log(1.0 + np.asarray(f, dtype=np.float64) / 700.0)

    mel_low, mel_high = mel(config.low_freq), mel(high)
    delta = (mel_high - mel_low) / (config.num_mel_bins + 1)
    b = np.arange(config.num_mel_bins, dtype=np.float64)[None, :]
    left, center, right = mel_low + b * delta, mel_low + (b + 1) * delta, mel_low + (b + 2) * delta
    m = mel(np.arange(num_fft_bins, dtype=np.float64) * (config.sample_rate / n_fft))[:, None]
    up = (m - left) / (center - left)
    down = (right - m) / (right - center)
    weights = np.where((m > left) & (m < right), np.where(m <= center, up, down), 0.0)
    # Kaldi's filters cover bins 0 .. n_fft/2 - 1; the Nyquist bin gets no weight
    return np.concatenate([weights, np.zeros((1, config.num_mel_bins))], axis=0)


def fbank_batch(
    wavs: "torch.Tensor",
    config: FbankConfig,
    lengths: "torch.Tensor | None" = None,
) -> "torch.Tensor":
    """[B, T, num_mel_bins] features of a [B, N] float waveform batch, on the batch's device.

    Same numbers as `fbank` per row (to float rounding). With `lengths` (samples per row,
    rows zero-padded after them), each row gets its own frame count: frames past it are
    zero and CMN averages only the row's own frames, so a padded batch equals the rows
    computed one by one.
    """
    import torch

    if wavs.dim() != 2:
        raise ValueError(f"fbank_batch expects [B, N] waveforms, got shape {tuple(wavs.shape)}")
    dtype = wavs.dtype if wavs.dtype in (torch.float32, torch.float64) else torch.float32
    x = wavs.to(dtype)
    if config.int16_scale:
        x = x * INT16_SCALE
    size, shift, n_fft = config.window_size, config.window_shift, config.padded_window_size
    total = num_frames(x.shape[1], config)
    if total == 0:
        return x.new_zeros((x.shape[0], 0, config.num_mel_bins))
    frames = x.unfold(1, size, shift)  # [B, T, size], a view: no copy until the arithmetic
    if config.remove_dc_offset:
        frames = frames - frames.mean(dim=-1, keepdim=True)
    if config.preemph_coeff != 0.0:
        previous = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)
        frames = frames - config.preemph_coeff * previous
    frames = frames * _window(config, dtype, x.device)
    spectrum = torch.fft.rfft(frames, n=n_fft)
    power = spectrum.real.square() + spectrum.imag.square()
    banks = torch.from_numpy(mel_banks(config)).to(device=x.device, dtype=dtype)
    feats = torch.clamp(power @ banks, min=LOG_FLOOR).log()
    if lengths is not None:
        counts = _frame_counts(lengths.to(x.device), config)
        valid = torch.arange(total, device=x.device)[None, :] < counts[:, None]
        feats = feats * valid[..., None]
        if config.cmn:
            mean = feats.sum(dim=1, keepdim=True) / counts.clamp(min=1)[:, None, None].to(dtype)
            feats = (feats - mean) * valid[..., None]
    elif config.cmn:
        feats = feats - feats.mean(dim=1, keepdim=True)
    return feats.to(torch.float32)


def _frame_counts(lengths: "torch.Tensor", config: FbankConfig) -> "torch.Tensor":
    import torch

    lengths = lengths.to(torch.long)
    counts = torch.div(lengths - config.window_size, config.window_shift, rounding_mode="floor") + 1
    return torch.where(lengths >= config.window_size, counts, torch.zeros_like(counts))
