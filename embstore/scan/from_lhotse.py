"""`scan --lhotse`: the items of a Lhotse manifest as scan candidates.

One candidate per audio file (or channel address) the manifest's items read, carrying
its items as segments, like a Kaldi recording with `segments`; what cannot be read is a
candidate with its reason (a missing file, a command or URL source...), recorded as a
scan failure while every other item goes on.
"""

from __future__ import annotations

import os
from collections import defaultdict
from typing import Iterator

from embstore.audio.io import parse_address
from embstore.interop.lhotse import read_segments
from embstore.scan.sources import Candidate


def _file_of(address: str) -> str:
    parsed = parse_address(address)
    return parsed[0] if parsed is not None else address


def lhotse_candidates(manifest: str, dataset: str) -> Iterator[tuple[str, list[Candidate]]]:
    """(folder, candidates) of a manifest's items, grouped by folder as the sync wants."""
    segments: dict[str, list[tuple[str, float | None, float, str]]] = defaultdict(list)
    refused: dict[str, str] = {}
    for seg in read_segments(manifest):
        if seg.address is None:
            # one failure per unreadable source, as a file would be
            refused.setdefault(seg.source, f"{seg.uid}: {seg.error}")
            continue
        segments[seg.address].append((seg.uid, seg.start, -1 if seg.end is None else seg.end, seg.speaker))
    by_dir: dict[str, list[Candidate]] = defaultdict(list)
    for address, segs in segments.items():
        path = _file_of(address)
        speaker = segs[0][3]
        try:
            st = os.stat(path)
            if not os.path.isfile(path):
                cand = Candidate(address, address, -1, -1, dataset, speaker, segs[0][0], segs, error="not a regular file")
            else:
                cand = Candidate(address, address, st.st_size, st.st_mtime_ns, dataset, speaker, segs[0][0], segs)
        except OSError as exc:
            reason = f"file not found ({exc.strerror}), named by {', '.join(s[0] for s in segs[:3])}"
            cand = Candidate(address, address, -1, -1, dataset, speaker, segs[0][0], segs, error=reason)
        cand.dir = os.path.dirname(path)
        by_dir[cand.dir].append(cand)
    for source, error in refused.items():
        by_dir[""].append(Candidate(source, source, -1, -1, dataset, "unknown", source, [], error=error, dir=""))
    yield from by_dir.items()
