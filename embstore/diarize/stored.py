"""`embstore diarize`: who spoke when in each item, from its stored window embeddings.

Per item of a window model (`extract --windows`): spectral clustering with an eigengap
speaker count (or AHC), adjacent windows of one speaker merged, overlaps split halfway
(`embstore.diarize`). Results are kept per item, model and settings in the manifest,
so diarizing a finished store again only reads them; items extracted since are
diarized on the next call.
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable

from embstore.diarize.speakers import check_speaker_counts
from embstore.diarize.pipeline import diarize_windows
from embstore.diarize.rttm import Segment, writable
from embstore.errors import ClusteringError, RttmError, StoreError
from embstore.manifest import diarization as stored
from embstore.manifest.database import Manifest
from embstore.manifest.selection import Selection, select_items
from embstore.models.thresholds import thresholds_for
from embstore.query import windows

METHODS = ("spectral", "ahc")


def check_options(method: str, num_speakers: int | None, max_speakers: int | None) -> None:
    """One-line StoreError for settings that cannot work (before any extraction runs)."""
    if method not in METHODS:
        raise StoreError(f"unknown diarization method {method!r}: use {', '.join(METHODS)}")
    check_speaker_counts(num_speakers, max_speakers)  # ClusteringError, a StoreError


def check_rttm_ids(store: Manifest, dataset: str | None = None) -> None:
    """RttmError (one line) when an item id of the selection cannot be an RTTM file id
    (it contains whitespace); asked before any extraction or clustering, so a run that
    must end in an RTTM file does no work it could not write out."""
    where, params = Selection(dataset=dataset).where()
    rows = store.conn.execute(f"SELECT i.uid FROM items i WHERE {' AND '.join(where)} ORDER BY i.id", params)
    first: str | None = None
    bad = 0
    for (uid,) in rows:  # counted as they stream: a million ids need no list
        if not writable(uid):
            first = uid if first is None else first
            bad += 1
    if bad:
        which = (f"{bad} item ids contain whitespace (the first: {first!r})" if bad > 1
                 else f"item id {first!r} contains whitespace")
        raise RttmError(f"{which}, which an RTTM file cannot hold: rename (the files or the ids in the list) and"
                        " scan again, or diarize without --rttm (--json gives the same segments)")


def diarize_store(
    store: Manifest,
    model: str | None = None,
    num_speakers: int | None = None,
    max_speakers: int | None = None,
    method: str = "spectral",
    dataset: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Diarize every done item of a window model; returns a report with `segments`
    {item uid: [Segment, ...]} in item order, and `failed` {item uid: reason} for items
    whose windows could not be clustered (each fails alone)."""
    check_options(method, num_speakers, max_speakers)
    started = time.monotonic()
    m = store.resolve_model(model, kind="windows")
    settings: dict[str, Any] = {"method": method, "num_speakers": num_speakers, "max_speakers": max_speakers}
    options: dict[str, float] = {}
    if method == "ahc":  # its cut is a cosine: the model's own (models/thresholds.py), and part of the result's key
        options["threshold"] = settings["threshold"] = thresholds_for(m.name).diarize_ahc
    params = json.dumps(settings, sort_keys=True)
    items = select_items(store.conn, m.id, Selection(dataset=dataset))
    known = stored.results_of(store.conn, m.id, params, [r["item_id"] for r in items])
    fresh: list[tuple[int, int, stored.Segments]] = []
    out: dict[str, list[Segment]] = {}
    failed: dict[str, str] = {}  # item uid -> why its windows could not be clustered
    for n, r in enumerate(items):
        segs = known.get(r["item_id"])
        if segs is None:
            starts, ends, matrix = windows(store, r["uid"], store.model_key(m))
            try:
                _, segments = diarize_windows(starts, ends, matrix, method=method, num_speakers=num_speakers,
                                              max_speakers=max_speakers, **options)
            except ClusteringError as exc:
                failed[r["uid"]] = str(exc)  # this item alone: the others go on
                continue
            segs = [(s.start, s.end, s.speaker) for s in segments]
            fresh.append((r["item_id"], len({s for _, _, s in segs}), segs))
            if len(fresh) >= 256:
                stored.save_results(store.conn, m.id, params, fresh)
                fresh = []
        out[r["uid"]] = [Segment(a, b, s) for a, b, s in segs]
        if progress is not None:
            progress(n + 1, len(items))
    if fresh:
        stored.save_results(store.conn, m.id, params, fresh)
    speech = sum(s.end - s.start for segs in out.values() for s in segs)
    return {
        "model": store.model_key(m), "items": len(out), "computed": len(items) - len(known) - len(failed),
        "failed": failed,
        "reused": len(known), "speakers": {uid: len({s.speaker for s in segs}) for uid, segs in out.items()},
        "speech_seconds": round(speech, 3), "seconds": round(time.monotonic() - started, 3), "segments": out,
    }
