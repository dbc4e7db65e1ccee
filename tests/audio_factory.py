"""Audio files made by the tests themselves: no data needed beyond numpy + soundfile."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf


def voice(seconds: float, rate: int = 16000, pitch: float = 140.0, seed: int = 0) -> np.ndarray:
    """A crude voiced signal (harmonics with vibrato and syllable-like bursts plus noise)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    f0 = pitch * (1 + 0.05 * np.sin(2 * np.pi * 3 * t + rng.uniform(0, 6)))
    phase = 2 * np.pi * np.cumsum(f0) / rate
    sig = sum((0.6 / k) * np.sin(k * phase + rng.uniform(0, 6)) for k in range(1, 12))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t + rng.uniform(0, 6)) ** 2
    sig = sig * envelope + 0.01 * rng.standard_normal(len(t))
    return (0.3 * sig / np.max(np.abs(sig))).astype(np.float32)


def write(path: Path, seconds: float = 1.0, rate: int = 16000, pitch: float = 140.0, seed: int = 0,
          subtype: str | None = None, channels: int = 1) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = voice(seconds, rate, pitch, seed)
    if channels > 1:
        data = np.stack([data * (1 - 0.1 * c) for c in range(channels)], axis=1)
    sf.write(str(path), data, rate, subtype=subtype)
    return path


def make_tree(root: Path, speakers: int = 3, per_speaker: int = 2, seconds: float = 1.0,
              dataset: str = "ds", ext: str = "wav") -> list[Path]:
    """ROOT/<dataset>/<speaker>/<speaker>-<n>.<ext>, distinct pitch per speaker."""
    out = []
    for s in range(speakers):
        for n in range(per_speaker):
            p = root / dataset / f"spk{s}" / f"spk{s}-{n}.{ext}"
            out.append(write(p, seconds + 0.13 * n, pitch=110 + 35 * s, seed=100 * s + n))
    return out
