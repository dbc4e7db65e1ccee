"""Sliding windows inside speech regions: `--windows WINDOW:SHIFT` (seconds).

Policy (WeSpeaker's `subsegment`, used by its diarization recipes, in seconds instead
of frames), applied to each speech region [a, b] of length L separately:

- L <= window: one window [a, b]; if L < window it is marked `short`.
- otherwise a window starts at a, a + shift, a + 2*shift, ... while
  start < b - window + shift, and ends at min(start + window, b). All windows are
  full length except possibly the last, which is kept whenever it is longer than
  window - shift (at 1.5:0.75: more than half a window) and is then marked `short`.

So windows never leave speech, every speech instant is covered, full windows all have
the same length (exact equal-length batches) and the few short ones (at most one per
region) need masked batching or their own forward. Times are rounded to the
millisecond, the resolution of Kaldi subsegment ids and RTTM files.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from embstore.errors import WindowSpecError

DEFAULT_WINDOW = 1.5
DEFAULT_SHIFT = 0.75
# float slack when comparing seconds (times are kept at 1 ms resolution)
_EPS = 1e-6


@dataclass(frozen=True)
class WindowSpec:
    window: float = DEFAULT_WINDOW
    shift: float = DEFAULT_SHIFT

    def __post_init__(self) -> None:
        for name in ("window", "shift"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise WindowSpecError(f"--windows: {name} must be a positive number of seconds, got {value:g}")
        if self.shift > self.window + _EPS:
            raise WindowSpecError(
                f"--windows: shift {self.shift:g} s is longer than the window {self.window:g} s "
                "(audio between windows would never be embedded)"
            )
        if self.window < 0.01:
            raise WindowSpecError(f"--windows: window {self.window:g} s is shorter than 10 ms")

    def __str__(self) -> str:
        return f"{self.window:g}:{self.shift:g}"

    def as_dict(self) -> dict[str, float | str]:
        """What goes into a fingerprint: the numbers and the last-window policy."""
        return {"window": self.window, "shift": self.shift, "last": "kept if longer than window - shift"}


def parse_window_spec(spec: str | WindowSpec) -> WindowSpec:
    """`"1.5:0.75"` (window:shift, seconds) or `"1.5"` (shift = half the window)."""
    if isinstance(spec, WindowSpec):
        return spec
    text = str(spec).strip()
    match = re.fullmatch(r"([^:]+)(?::([^:]+))?", text)
    if not match:
        raise WindowSpecError(f"--windows {text!r}: expected WINDOW:SHIFT in seconds, e.g. 1.5:0.75")
    numbers = []
    for part in match.groups():
        if part is None:
            continue
        try:
            numbers.append(float(part))
        except ValueError:
            raise WindowSpecError(
                f"--windows {text!r}: {part.strip()!r} is not a number (expected WINDOW:SHIFT, e.g. 1.5:0.75)"
            ) from None
    window = numbers[0]
    shift = numbers[1] if len(numbers) > 1 else window / 2
    return WindowSpec(window, shift)


@dataclass(frozen=True)
class WindowPlan:
    """The windows of one item: parallel arrays, sorted by start."""

    starts: np.ndarray  # float64 seconds
    ends: np.ndarray  # float64 seconds
    short: np.ndarray  # bool: shorter than the spec's window

    def __len__(self) -> int:
        return len(self.starts)

    def __iter__(self) -> Iterator[tuple[float, float]]:
        return iter(zip(self.starts.tolist(), self.ends.tolist()))

    @property
    def durations(self) -> np.ndarray:
        return self.ends - self.starts

    def spans(self) -> list[tuple[float, float]]:
        """(start, end) of each window in seconds (sample ranges: `WindowEmbedder.sample_ranges`)."""
        return list(self)


def windows_in_regions(
    regions: Sequence[tuple[float, float]],
    window: float = DEFAULT_WINDOW,
    shift: float = DEFAULT_SHIFT,
    total_duration: float | None = None,
) -> WindowPlan:
    """Windows of `window` s every `shift` s inside each region (the policy above).

    Regions are clipped to [0, total_duration] when it is given; empty ones are skipped.
    """
    spec = WindowSpec(float(window), float(shift))
    starts: list[float] = []
    ends: list[float] = []
    for a, b in regions:
        a = max(float(a), 0.0)
        b = float(b) if total_duration is None else min(float(b), float(total_duration))
        if b - a <= _EPS:
            continue
        length = b - a
        if length <= spec.window + _EPS:
            starts.append(a)
            ends.append(b)
            continue
        limit = length - spec.window + spec.shift
        # integer steps: repeated float addition would drift over an hour of windows
        count = int(math.ceil(limit / spec.shift - _EPS))
        for k in range(count):
            start = a + k * spec.shift
            starts.append(start)
            ends.append(min(start + spec.window, b))
    s = np.round(np.asarray(starts, dtype=np.float64), 3)
    e = np.round(np.asarray(ends, dtype=np.float64), 3)
    return WindowPlan(s, e, (e - s) < spec.window - 5e-4)
