"""Speaker segments: from labelled windows, to and from RTTM.

RTTM (NIST), one line per segment, times in seconds with millisecond precision:

    SPEAKER <item> 1 <start> <duration> <NA> <NA> <label> <NA> <NA>

Fields are separated by whitespace, so an item id or a label containing whitespace
cannot be written (`RttmError`); comment lines (`;;`) and other record types are
skipped when reading.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import IO, Iterable, Mapping, Sequence

import numpy as np

from embstore.errors import RttmError


@dataclass(frozen=True)
class Segment:
    start: float
    end: float
    speaker: str

    @property
    def duration(self) -> float:
        return self.end - self.start


def speaker_name(label: int) -> str:
    return f"spk{int(label):02d}"


def windows_to_segments(
    starts: Sequence[float] | np.ndarray,
    ends: Sequence[float] | np.ndarray,
    labels: Sequence[int] | np.ndarray,
) -> list[Segment]:
    """Merge time-ordered labelled windows into speaker segments (WeSpeaker's make_rttm).

    A window continues its predecessor's segment when it overlaps or touches it with
    the same label; where it overlaps with a different label, the boundary is put halfway
    through the overlap; a gap (no overlap) always starts a new segment.
    """
    order = np.lexsort((np.asarray(ends), np.asarray(starts)))
    rows = [(float(starts[i]), float(ends[i]), int(labels[i])) for i in order]
    segments: list[Segment] = []
    if not rows:
        return segments
    begin, end, label = rows[0]
    for b, e, la in rows[1:]:
        if b > end + 1e-9:
            segments.append(Segment(begin, end, speaker_name(label)))
            begin, end, label = b, e, la
        elif la == label:
            end = max(end, e)
        else:
            pivot = round((b + end) / 2.0, 6)
            segments.append(Segment(begin, pivot, speaker_name(label)))
            begin, end, label = pivot, e, la
    segments.append(Segment(begin, end, speaker_name(label)))
    return [s for s in segments if s.end - s.start > 1e-9]


def writable(value: str) -> bool:
    """Whether `value` can be one RTTM field: readers split lines on whitespace, so an
    empty value or one containing whitespace would shift every field after it."""
    return bool(value) and not any(c.isspace() for c in value)


def _field(value: str, what: str) -> str:
    if not writable(value):
        raise RttmError(f"RTTM {what} {value!r} is empty or contains whitespace")
    return value


def rttm_lines(item: str, segments: Iterable[Segment], channel: int = 1) -> list[str]:
    item = _field(item, "item id")
    return [
        f"SPEAKER {item} {channel} {s.start:.3f} {s.end - s.start:.3f} <NA> <NA> {_field(s.speaker, 'label')} <NA> <NA>"
        for s in segments
    ]


def write_rttm(target: str | os.PathLike[str] | IO[str], items: Mapping[str, Iterable[Segment]]) -> None:
    """One RTTM file (or open text stream) for all items, in the mapping's order."""
    lines = [line for item, segs in items.items() for line in rttm_lines(item, segs)]
    text = "".join(line + "\n" for line in lines)
    if isinstance(target, (str, os.PathLike)):
        with open(target, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        target.write(text)


def read_rttm(source: str | os.PathLike[str] | IO[str]) -> dict[str, list[Segment]]:
    """{item: [Segment, ...] sorted by start} from an RTTM file (or text stream)."""
    if isinstance(source, (str, os.PathLike)):
        with open(source, encoding="utf-8") as f:
            return _parse(f, str(source))
    return _parse(source, "<stream>")


def parse_rttm(text: str) -> dict[str, list[Segment]]:
    return _parse(io.StringIO(text), "<text>")


def _parse(stream: IO[str], where: str) -> dict[str, list[Segment]]:
    out: dict[str, list[Segment]] = {}
    for number, line in enumerate(stream, 1):
        fields = line.split()
        if not fields or fields[0].startswith(";;") or fields[0] != "SPEAKER":
            continue
        if len(fields) < 8:
            raise RttmError(f"{where}:{number}: a SPEAKER line needs at least 8 fields, got {len(fields)}")
        try:
            start, duration = float(fields[3]), float(fields[4])
        except ValueError:
            raise RttmError(f"{where}:{number}: start/duration {fields[3]!r} {fields[4]!r} are not numbers") from None
        if not (np.isfinite(start) and np.isfinite(duration)) or start < 0 or duration < 0:
            raise RttmError(f"{where}:{number}: negative or non-finite time ({fields[3]} {fields[4]})")
        out.setdefault(fields[1], []).append(Segment(start, start + duration, fields[7]))
    for segs in out.values():
        segs.sort(key=lambda s: (s.start, s.end, s.speaker))
    return out
