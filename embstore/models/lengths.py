"""How many feature frames an item will have, from its sample count alone.

The manifest groups items by predicted length before anything is decoded (exact
batching), so the parent of a run needs each model's length rule. A rule is a small
frozen dataclass of numbers, torch-free and JSON-serialisable: it is kept in the model's
card (`embstore.models.cards`), so a known model needs no loading in the parent at all.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Union


@dataclass(frozen=True)
class FbankLength:
    """Kaldi frames with snip_edges: windows fully inside the signal."""

    window_size: int
    window_shift: int
    kind: str = "fbank"

    def __call__(self, num_samples: int) -> int:
        if num_samples < self.window_size:
            return 0
        return 1 + (num_samples - self.window_size) // self.window_shift


@dataclass(frozen=True)
class PartialsLength:
    """Resemblyzer's partial windows (`VoiceEncoder.compute_partial_slices`), counted on
    the audio cut to whole VAD windows: an upper bound, since the VAD only removes audio."""

    samples_per_frame: int
    frame_step: int
    partial_frames: int
    min_coverage: float
    vad_window: int
    kind: str = "partials"

    @classmethod
    def of(cls, sampling_rate: int, mel_step_ms: int, partial_frames: int, rate: float, min_coverage: float,
           vad_window_ms: int) -> "PartialsLength":
        samples_per_frame = int(sampling_rate * mel_step_ms / 1000)
        return cls(
            samples_per_frame=samples_per_frame,
            frame_step=int(round((sampling_rate / rate) / samples_per_frame)),
            partial_frames=partial_frames,
            min_coverage=float(min_coverage),
            vad_window=vad_window_ms * sampling_rate // 1000,
        )

    def __call__(self, num_samples: int) -> int:
        n = max(num_samples - num_samples % self.vad_window, 0)
        n_frames = int(math.ceil((n + 1) / self.samples_per_frame))
        steps = max(1, n_frames - self.partial_frames + self.frame_step + 1)
        count = len(range(0, steps, self.frame_step))
        last_start = (count - 1) * self.frame_step * self.samples_per_frame
        coverage = (n - last_start) / (self.partial_frames * self.samples_per_frame)
        return count - 1 if coverage < self.min_coverage and count > 1 else count


LengthRule = Union[FbankLength, PartialsLength]
_KINDS = {"fbank": FbankLength, "partials": PartialsLength}


def rule_to_dict(rule: LengthRule) -> dict[str, Any]:
    return asdict(rule)


def rule_from_dict(data: dict[str, Any]) -> LengthRule:
    kind = _KINDS.get(data.get("kind", ""))
    if kind is None:
        raise ValueError(f"unknown length rule {data.get('kind')!r}")
    return kind(**data)
