"""Lhotse manifests: the items they hold, and cuts that carry embeddings.

Reading (for `scan --lhotse`): a CutSet, or a RecordingSet with the SupervisionSet beside
it (`*recordings*` -> `*supervisions*`), `.jsonl(.gz)` read lazily. One item per
supervision, clipped to its cut; a cut (or recording) without supervisions is one item.
Times become seconds in the audio file: a supervision's start is relative to its cut,
a cut's to its recording. Audio is a file path, or `FILE#channel=N` when the item is one
channel of a multi-channel file (`embstore.audio.io` addresses); a recording split into
one file per channel gives the file of the supervision's channel. What embstore cannot
read is refused per item with the reason: sources that are commands, URLs or in-memory
bytes, mixed cuts, a subset of several channels, transforms other than resampling.
Relative source paths are relative to the current folder, as Lhotse reads them.

Writing (for `export-lhotse`): `EmbeddingArrays` stores each vector with Lhotse's own
`NumpyHdf5Writer` (lossless; never lilcom) and returns the `Array` manifest that
`cut.with_custom("embedding", array)` attaches and `cut.load_embedding()` reads back.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from typing import Any, Iterator

from embstore.audio.io import channel_address
from embstore.errors import ScanError
from embstore.interop import need
from embstore.models.common import short_error


@dataclass(frozen=True)
class Segment:
    """One item of a manifest as the scan records it: `address` (file or channel
    address) and seconds in it (`start` None: from the file's start; `end` None: to its
    end), or `error` (then `source` says what could not be read)."""

    uid: str
    recording_id: str
    address: str | None
    start: float | None
    end: float | None
    speaker: str
    error: str | None = None
    source: str = ""


@dataclass(frozen=True)
class Original:
    """What a manifest says of one item, for writing it back as a cut: the recording,
    the supervision (None: a whole cut), the span in the recording, its channel, and
    the cut's custom fields."""

    recording: Any
    supervision: Any
    start: float
    duration: float
    channel: Any
    custom: dict[str, Any] | None


def dataset_name(path: str) -> str:
    """`librispeech_cuts_dev-clean.jsonl.gz` -> `librispeech_dev-clean`: the file's name
    without its extensions and Lhotse's manifest-type words."""
    name = os.path.basename(path)
    name = re.sub(r"(\.jsonl|\.json|\.yaml|\.yml)(\.gz)?$", "", name)
    words = [w for w in re.split(r"_", name) if w not in ("cuts", "recordings", "supervisions")]
    return "_".join(words) or name


def _load(path: str) -> tuple[Any, Any]:
    """(cuts or recordings, supervisions: None for cuts, a SupervisionSet or [] for
    recordings) of a manifest file; one-line errors."""
    need("lhotse", "lhotse", "reading Lhotse manifests")
    from lhotse import CutSet, RecordingSet, SupervisionSet
    from lhotse.serialization import load_manifest_lazy_or_eager

    try:
        manifest = load_manifest_lazy_or_eager(path)
    except Exception as exc:
        raise ScanError(f"{path}: not a Lhotse manifest ({type(exc).__name__}: {short_error(exc)})") from None
    if manifest is None:
        return [], None
    if isinstance(manifest, CutSet):
        return manifest, None
    if isinstance(manifest, SupervisionSet):
        raise ScanError(f"{path}: a SupervisionSet alone has no audio; give its RecordingSet (or a CutSet)")
    if not isinstance(manifest, RecordingSet):
        raise ScanError(f"{path}: a {type(manifest).__name__}; embstore reads CutSets and RecordingSets")
    name = os.path.basename(path)
    beside = os.path.join(os.path.dirname(path), name.replace("recordings", "supervisions"))
    supervisions: Any = []
    if "recordings" in name and os.path.isfile(beside):
        try:
            supervisions = SupervisionSet.from_file(beside)
        except Exception as exc:
            raise ScanError(f"{beside}: not a Lhotse SupervisionSet ({type(exc).__name__}: {short_error(exc)})") from None
    return manifest, supervisions


def _entries(path: str) -> Iterator[tuple[str, Any, Any, float, float, Any, dict | None, str | None]]:
    """(uid, recording, supervision or None, start, end in the recording, channel, the
    cut's custom fields, error) per item of the manifest."""
    from lhotse.cut import PaddingCut
    from lhotse.cut.data import DataCut

    top, supervisions = _load(path)
    if supervisions is not None:
        by_recording: dict[str, list[Any]] = {}
        for sup in supervisions:
            by_recording.setdefault(sup.recording_id, []).append(sup)
        for rec in top:
            for sup in by_recording.get(rec.id) or [None]:
                if sup is None:
                    yield rec.id, rec, None, 0.0, rec.duration, None, None, None
                else:
                    start = max(sup.start, 0.0)
                    yield sup.id, rec, sup, start, min(sup.end, rec.duration), sup.channel, None, None
        return
    for cut in top:
        if isinstance(cut, PaddingCut):
            continue
        if not isinstance(cut, DataCut):
            yield cut.id, None, None, 0.0, 0.0, None, None, f"a {type(cut).__name__} (mixed audio) is not read"
            continue
        if cut.recording is None:
            yield cut.id, None, None, 0.0, 0.0, None, None, "the cut has no recording"
            continue
        if not cut.supervisions:
            yield cut.id, cut.recording, None, cut.start, cut.end, cut.channel, cut.custom, None
        for sup in cut.supervisions:
            # a supervision may stick out of its cut: the item is the part inside it
            start = cut.start + max(sup.start, 0.0)
            end = cut.start + min(sup.end, cut.duration)
            channel = sup.channel if sup.channel is not None else cut.channel
            yield sup.id, cut.recording, sup, start, end, channel, cut.custom, None


def _source_of(rec: Any, channel: Any) -> tuple[str | None, str | None, str]:
    """(address, error, what the source is) for a recording's channel(s)."""
    transforms = [t if isinstance(t, dict) else t.to_dict() for t in (rec.transforms or [])]
    odd = [t.get("name", "?") for t in transforms if t.get("name") != "Resample"]
    if odd:
        return None, f"audio transforms are not applied by embstore ({', '.join(odd)})", rec.id
    wanted = list(channel) if isinstance(channel, (list, tuple)) else [channel] if channel is not None else None
    if wanted is None or sorted(wanted) == sorted(rec.channel_ids):
        if len(rec.sources) != 1:
            return None, f"spans {len(rec.sources)} audio sources (one per channel); embstore reads one", rec.id
        source, index = rec.sources[0], None
    elif len(wanted) == 1:
        source = next((s for s in rec.sources if wanted[0] in s.channels), None)
        if source is None:
            return None, f"channel {wanted[0]} is not in the recording", rec.id
        index = source.channels.index(wanted[0]) if len(source.channels) > 1 else None
    else:
        return None, f"a subset of channels ({wanted}) is not read; use one channel or all", rec.id
    where = source.source if isinstance(source.source, str) else f"<{len(source.source)} bytes>"
    if source.type != "file":
        shown = where if len(where) <= 120 else where[:117] + "..."
        return None, f"audio source is a {source.type} ({shown}); embstore reads files only", f"{rec.id}: {shown}"
    path = os.path.abspath(where)
    return (path if index is None else channel_address(path, index)), None, path


def read_segments(path: str) -> Iterator[Segment]:
    """Every item of a manifest (see the module's docstring), in manifest order."""
    for uid, rec, sup, start, end, channel, _, error in _entries(path):
        speaker = (sup.speaker if sup is not None else None) or "unknown"
        rec_id = rec.id if rec is not None else uid
        if error is not None:
            yield Segment(uid, rec_id, None, None, None, speaker, error, uid)
            continue
        if end <= start:
            yield Segment(uid, rec_id, None, None, None, speaker, "empty span (it ends where it starts)", uid)
            continue
        address, error, where = _source_of(rec, channel)
        # to the recording's end, give or take float rounding: read to the file's end
        to_end = end >= rec.duration - 1e-4
        yield Segment(uid, rec_id, address, None if start <= 0.0 else round(start, 6),
                      None if to_end else round(end, 6), speaker, error, where)


def originals(path: str) -> dict[str, Original]:
    """Every readable item of a manifest by id, as the manifest has it."""
    out = {}
    for uid, rec, sup, start, end, channel, custom, error in _entries(path):
        if error is None and end > start:
            out[uid] = Original(rec, sup, start, end - start, channel, custom)
    return out


# -- writing cuts with embeddings ---------------------------------------------------------


def h5_key(uid: str) -> str:
    """An HDF5 dataset name for an item id: `/` would nest groups, so it (and `%`) are
    escaped; unique and readable."""
    return uid.replace("%", "%25").replace("/", "%2F")


class EmbeddingArrays:
    """Vectors into one HDF5 file with Lhotse's `NumpyHdf5Writer`, written at `tmp_path`
    and recorded in the manifests as `final_path` (renamed there once complete)."""

    def __init__(self, tmp_path: str, final_path: str):
        need("lhotse", "lhotse", "writing Lhotse cuts")
        need("h5py", "lhotse", "writing Lhotse cuts (HDF5 arrays)")
        from lhotse import NumpyHdf5Writer

        self.writer = NumpyHdf5Writer(tmp_path, mode="w")
        self.final_path = final_path

    def store(self, uid: str, vector: Any) -> Any:
        array = self.writer.store_array(h5_key(uid), vector)
        return replace(array, storage_path=self.final_path)

    def close(self) -> None:
        self.writer.close()


def cut_of(uid: str, original: Original | None, start: float, duration: float, speaker: str | None,
           recording: Any, source: str | None) -> Any:
    """A MonoCut (MultiCut for several channels) for one embedded span: `original`'s
    recording and supervision when the item came from a manifest, else `recording`
    (None: audio Lhotse cannot address, e.g. a dataset row; `source` names it)."""
    from lhotse import SupervisionSegment
    from lhotse.cut import MonoCut, MultiCut
    from lhotse.utils import fastcopy

    custom = dict(original.custom or {}) if original is not None else {}
    if source is not None:
        custom["source"] = source
    if original is not None:
        recording, channel = original.recording, original.channel
        sup = original.supervision
        if sup is not None:
            sup = fastcopy(sup, id=uid, start=0.0, duration=duration)
    else:
        channel = None
        sup = None
    if channel is None:
        channel = recording.channel_ids if recording is not None and recording.num_channels > 1 else 0
    if sup is None:
        sup = SupervisionSegment(id=uid, recording_id=recording.id if recording is not None else uid, start=0.0,
                                 duration=duration, channel=channel, speaker=speaker)
    kind = MultiCut if isinstance(channel, (list, tuple)) and len(channel) > 1 else MonoCut
    if kind is MonoCut and isinstance(channel, (list, tuple)):
        channel = channel[0]
    return kind(id=uid, start=round(start, 6), duration=round(duration, 6), channel=channel,
                supervisions=[sup], recording=recording, custom=custom or None)


def file_recording(rec_id: str, path: str, sample_rate: int, channels: int, frames: int) -> Any:
    """A Recording of one audio file from what the scan read of its header."""
    from lhotse import AudioSource, Recording

    return Recording(id=rec_id, sources=[AudioSource(type="file", channels=list(range(channels)), source=path)],
                     sampling_rate=int(sample_rate), num_samples=int(frames), duration=frames / sample_rate)
