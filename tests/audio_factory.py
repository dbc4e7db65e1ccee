"""Audio files made by the tests themselves: no data needed beyond numpy + soundfile."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

from embstore.synthetic import voice


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
