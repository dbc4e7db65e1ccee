"""Diarization error rate (DER), NIST md-eval style, in NumPy/SciPy.

    DER = (missed speech + false alarm + speaker confusion) / total reference speech

- `collar` seconds on EACH side of every reference segment boundary are not scored
  (md-eval's `-c 0.25` is `collar=0.25`; pyannote.metrics takes the full width, so the
  same scoring is `DiarizationErrorRate(collar=0.5)`);
- overlapping speech counts once per active speaker (skip_overlap=False);
- hypothesis labels are mapped one-to-one to reference labels by the Hungarian
  algorithm (`scipy.optimize.linear_sum_assignment`) maximising the scored overlap,
  the mapping that minimises the confusion.

Scoring runs on the elementary intervals between all boundaries (segments and collars),
so it is exact up to float rounding. Tested against hand-computed cases and, where
pyannote.metrics is installed, against it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np

from embstore.diarize.rttm import Segment


@dataclass(frozen=True)
class DerResult:
    total: float  # scored reference speech, seconds (speaker-weighted)
    missed: float
    false_alarm: float
    confusion: float
    mapping: tuple[tuple[str, str], ...] = ()  # (hypothesis label, reference label)

    @property
    def error(self) -> float:
        return self.missed + self.false_alarm + self.confusion

    @property
    def der(self) -> float:
        if self.total > 0:
            return self.error / self.total
        return 0.0 if self.error <= 0 else float("inf")

    def __add__(self, other: DerResult) -> DerResult:
        """Corpus-level accumulation: components add, the rate is their ratio."""
        return DerResult(
            self.total + other.total,
            self.missed + other.missed,
            self.false_alarm + other.false_alarm,
            self.confusion + other.confusion,
        )


EMPTY = DerResult(0.0, 0.0, 0.0, 0.0)


def _activity(segments: Sequence[Segment], bounds: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Labels and a [intervals, labels] bool matrix: who speaks in each elementary interval."""
    labels = sorted({s.speaker for s in segments})
    index = {name: k for k, name in enumerate(labels)}
    change = np.zeros((len(bounds), len(labels)), dtype=np.int64)
    for s in segments:
        if s.end <= s.start:
            continue
        a, b = np.searchsorted(bounds, [s.start, s.end])
        change[a, index[s.speaker]] += 1
        change[b, index[s.speaker]] -= 1
    return labels, np.cumsum(change, axis=0)[:-1] > 0


def diarization_error(
    reference: Sequence[Segment],
    hypothesis: Sequence[Segment],
    collar: float = 0.25,
    uem: tuple[float, float] | None = None,
) -> DerResult:
    """DER components of one item (see the module docstring)."""
    if collar < 0:
        raise ValueError(f"collar must be >= 0, got {collar}")
    points = [t for s in (*reference, *hypothesis) for t in (s.start, s.end)]
    zones = [(t - collar, t + collar) for s in reference for t in (s.start, s.end)] if collar > 0 else []
    points += [t for z in zones for t in z]
    if uem is not None:
        points += list(uem)
    bounds = np.unique(np.asarray(points, dtype=np.float64))
    if len(bounds) < 2:
        return EMPTY
    ref_labels, ref = _activity(reference, bounds)
    hyp_labels, hyp = _activity(hypothesis, bounds)
    dur = np.diff(bounds)
    mid = bounds[:-1] + dur / 2
    scored = np.ones(len(dur), dtype=bool)
    for a, b in zones:
        scored &= ~((mid > a) & (mid < b))
    if uem is not None:
        scored &= (mid > uem[0]) & (mid < uem[1])
    weight = np.where(scored, dur, 0.0)
    ref_count = ref.sum(axis=1)
    hyp_count = hyp.sum(axis=1)
    overlap = (ref.T * weight) @ hyp.astype(np.float64) if ref_labels and hyp_labels else np.zeros((0, 0))
    pairs: list[tuple[int, int]] = []
    if overlap.size:
        from scipy.optimize import linear_sum_assignment

        rows, cols = linear_sum_assignment(-overlap)
        pairs = [(int(r), int(c)) for r, c in zip(rows, cols)]
    correct = np.zeros(len(dur))
    for r, c in pairs:
        correct += ref[:, r] & hyp[:, c]
    return DerResult(
        total=float(weight @ ref_count),
        missed=float(weight @ np.maximum(ref_count - hyp_count, 0)),
        false_alarm=float(weight @ np.maximum(hyp_count - ref_count, 0)),
        confusion=float(weight @ (np.minimum(ref_count, hyp_count) - correct)),
        mapping=tuple((hyp_labels[c], ref_labels[r]) for r, c in pairs if overlap[r, c] > 0),
    )


def corpus_der(
    references: Mapping[str, Sequence[Segment]],
    hypotheses: Mapping[str, Sequence[Segment]],
    collar: float = 0.25,
) -> tuple[DerResult, dict[str, DerResult]]:
    """(corpus total, per item) over the reference's items; a missing hypothesis is all missed."""
    per_item = {item: diarization_error(ref, hypotheses.get(item, []), collar) for item, ref in references.items()}
    return sum(per_item.values(), EMPTY), per_item


def speaker_count(segments: Iterable[Segment]) -> int:
    return len({s.speaker for s in segments})
