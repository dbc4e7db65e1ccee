"""Reading audio: headers at scan time, samples at extraction time.

soundfile (libsndfile) reads WAV/FLAC/OGG and friends; PyAV, when installed, reads
what libsndfile cannot (mp3, m4a, opus in mp4...). Everything is returned as float32
mono at the file's own rate; `resample` converts with soxr.

Audio that is not a file of its own has an address in place of a path, understood by
`probe`, `read_audio` and `content_hash` alike (so workers, `verify` and queries read it
like any file):

- `SHARD#row=N`: the audio bytes of row N of an Arrow/Parquet dataset shard (a Hugging
  Face audio column, `struct<bytes, path>`). Only the row group (Parquet) or record batch
  (Arrow) holding the row is read, and only its audio column; the last few are cached
  per process, so a claim of neighbouring rows reads each group once.
- `FILE#channel=N`: channel N of a multi-channel file (a Lhotse supervision on one
  channel); its content hash mixes the channel in, so dedup never joins two channels.

A real file whose name looks like an address is still read as that file.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import io
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, BinaryIO, Iterator, Union

import numpy as np

from embstore.errors import AudioError, EnvironmentProblem

AUDIO_EXTENSIONS = frozenset(
    {
        ".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".m4a", ".aac", ".mp4",
        ".wma", ".aif", ".aiff", ".au", ".snd", ".caf", ".w64", ".rf64", ".sph",
        ".nist", ".webm", ".mka",
    }
)


@dataclass(frozen=True)
class AudioInfo:
    sample_rate: int
    channels: int
    frames: int
    subtype: str

    @property
    def duration(self) -> float:
        return self.frames / self.sample_rate if self.sample_rate else 0.0


def is_audio_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in AUDIO_EXTENSIONS


def probe(path: str) -> AudioInfo:
    """Header information, without decoding the samples.

    Plain WAV and FLAC headers are parsed directly (a 1 M-file scan spends most of its
    time here, and libsndfile's open is ~10x slower); anything unusual goes to
    soundfile, then PyAV. An address (`SHARD#row=N`, `FILE#channel=N`) is probed from
    its bytes, or as its file with one channel.
    """
    address = parse_address(path)
    if address is not None:
        base, row, channel = address
        if row is not None:
            return probe_bytes(read_row_bytes(base, row))
        info = probe(base)
        if channel is not None and channel >= info.channels:
            raise AudioError(f"channel {channel} requested, file has {info.channels}")
        return AudioInfo(info.sample_rate, 1, info.frames, info.subtype)
    fast = _probe_fast(path)
    if fast is not None:
        return fast
    import soundfile as sf

    try:
        info = sf.info(path)
    except Exception as sf_error:  # libsndfile raises a RuntimeError subclass with its reason
        if os.path.isdir(path):
            raise AudioError("is a directory, not an audio file") from None
        if not os.path.exists(path):
            raise AudioError("file not found") from None
        if os.path.getsize(path) == 0:
            raise AudioError("empty file (0 bytes)") from None
        try:
            return _probe_av(path)
        except AudioError as av_error:
            raise AudioError(f"unreadable header: {_short(sf_error)}; {av_error}") from None
    if info.frames <= 0:
        raise AudioError("no audio samples (header only)")
    return AudioInfo(int(info.samplerate), int(info.channels), int(info.frames), str(info.subtype))


_WAV_SUBTYPES = {(1, 8): "PCM_U8", (1, 16): "PCM_16", (1, 24): "PCM_24", (1, 32): "PCM_32",
                 (3, 32): "FLOAT", (3, 64): "DOUBLE"}


def _probe_fast(path: str) -> AudioInfo | None:
    """WAV/FLAC header parse; None whenever the file is anything but plain, so the
    libraries decide (and explain) every odd case."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
            size = os.fstat(f.fileno()).st_size
    except OSError:
        return None
    return _probe_head(head, size)


def _probe_head(head: bytes, size: int) -> AudioInfo | None:
    """`_probe_fast` on the first 4 KiB of some audio bytes and their total size."""
    import struct

    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        pos, fmt = 12, None
        while pos + 8 <= len(head):
            chunk, length = head[pos : pos + 4], struct.unpack("<I", head[pos + 4 : pos + 8])[0]
            body = pos + 8
            if chunk == b"fmt " and length >= 16 and body + 16 <= len(head):
                tag, channels, rate, _, align, bits = struct.unpack("<HHIIHH", head[body : body + 16])
                if tag == 0xFFFE and length >= 40 and body + 26 <= len(head):
                    tag = struct.unpack("<H", head[body + 24 : body + 26])[0]
                fmt = (tag, channels, rate, align, bits)
            elif chunk == b"data":
                if fmt is None:
                    return None
                tag, channels, rate, align, bits = fmt
                subtype = _WAV_SUBTYPES.get((tag, bits))
                if subtype is None or channels < 1 or rate < 1 or align != channels * bits // 8:
                    return None
                if length == 0xFFFFFFFF:
                    return None  # streamed: libsndfile's reading of it counts
                if (size - body) // align < length // align:
                    # libsndfile would quietly read the part that is there; a cut copy is an error
                    raise AudioError(
                        f"truncated file: the header declares {length // align} frames, the file holds "
                        f"{max(size - body, 0) // align}"
                    )
                frames = length // align
                return AudioInfo(rate, channels, frames, subtype) if frames > 0 else None
            pos = body + length + (length & 1)
        return None
    if head[:4] == b"fLaC" and len(head) >= 42 and head[4] & 0x7F == 0:
        info = int.from_bytes(head[18:26], "big")
        rate = info >> 44
        channels = ((info >> 41) & 0x7) + 1
        bits = ((info >> 36) & 0x1F) + 1
        frames = info & ((1 << 36) - 1)
        if rate < 1 or frames < 1 or bits not in (8, 16, 24):
            return None
        return AudioInfo(rate, channels, frames, f"PCM_{bits}" if bits != 8 else "PCM_S8")
    return None


def probe_bytes(data: bytes) -> AudioInfo:
    """`probe` of encoded audio held in memory (a dataset row's bytes)."""
    if not data:
        raise AudioError("empty audio bytes (0 bytes)")
    fast = _probe_head(data[:4096], len(data))
    if fast is not None:
        return fast
    import soundfile as sf

    try:
        info = sf.info(io.BytesIO(data))
    except Exception as sf_error:
        try:
            return _probe_av(io.BytesIO(data))
        except AudioError as av_error:
            raise AudioError(f"unreadable header: {_short(sf_error)}; {av_error}") from None
    if info.frames <= 0:
        raise AudioError("no audio samples (header only)")
    return AudioInfo(int(info.samplerate), int(info.channels), int(info.frames), str(info.subtype))


# -- addresses: a dataset row's bytes, one channel of a file ------------------------------

_ROW = re.compile(r"^(?P<base>.+\.(?:parquet|arrow))#row=(?P<n>\d+)$")
_CHANNEL = re.compile(r"^(?P<base>.+)#channel=(?P<n>\d+)$")
Source = Union[str, BinaryIO]


def row_address(shard: str, row: int) -> str:
    """The address of row `row`'s audio in an Arrow/Parquet shard."""
    return f"{shard}#row={row}"


def channel_address(path: str, channel: int) -> str:
    """The address of one channel of a multi-channel file."""
    return f"{path}#channel={channel}"


def parse_address(path: str) -> tuple[str, int | None, int | None] | None:
    """(file, row, channel) of an address; None for a plain path (or a real file whose
    name only looks like an address)."""
    if "#" not in path:
        return None
    row, channel = _ROW.match(path), _CHANNEL.match(path)
    if (row is None and channel is None) or os.path.exists(path):
        return None
    if row is not None:
        return row["base"], int(row["n"]), None
    return channel["base"], None, int(channel["n"])


def dataset_audio_column(schema: Any) -> str:
    """The audio column of an Arrow schema: the one Hugging Face's metadata calls Audio,
    else the first `struct<bytes: binary, ...>` column."""
    import json

    import pyarrow as pa

    meta = (schema.metadata or {}).get(b"huggingface")
    if meta:
        try:
            features = json.loads(meta).get("info", {}).get("features") or {}
        except (ValueError, AttributeError):
            features = {}
        for name, feature in features.items():
            if isinstance(feature, dict) and feature.get("_type") == "Audio" and name in schema.names:
                return name
    for f in schema:
        if pa.types.is_struct(f.type) and f.type.get_field_index("bytes") >= 0:
            return f.name
    raise AudioError("no audio column (struct<bytes, path>) in the dataset")


class _Groups:
    """The audio column of the last few row groups / record batches read, per process.
    Keyed by the shard's size and mtime too, so a rewritten shard is read afresh.

    A group is read outside the lock, so threads reading different groups read at
    once; a thread wanting a group another is reading waits for that read instead of
    reading it again."""

    def __init__(self, keep: int = 4):
        self.keep = keep
        self.lock = threading.Lock()
        self.groups: OrderedDict[tuple, Any] = OrderedDict()
        # shard key -> (reader, group row starts), the last few shards: each holds a file open
        self.layouts: OrderedDict[tuple, tuple[Any, list[int]]] = OrderedDict()
        self.reading: dict[tuple, _Reading] = {}  # groups being read now, by (*shard key, group)

    def row(self, shard: str, row: int) -> bytes:
        st = os.stat(shard)  # FileNotFoundError: the reader says "file not found"
        key = (shard, st.st_size, st.st_mtime_ns)
        with self.lock:
            try:
                reader, starts = self._layout(key)
            except AudioError:
                raise
            except ImportError:  # the machine's problem, not the item's: the worker stops and says so
                raise EnvironmentProblem("reading dataset rows needs pyarrow: pip install 'embstore[parquet]'") from None
            except Exception as exc:  # pyarrow's ArrowInvalid/OSError on a cut or foreign file
                raise AudioError(f"unreadable dataset shard: {_short(exc)}") from None
            if row >= starts[-1]:
                raise AudioError(f"row {row} is not in the shard (it has {starts[-1]} rows)")
            group = bisect.bisect_right(starts, row) - 1
            gkey = (*key, group)
            column = self.groups.get(gkey)
            reading = None
            if column is not None:
                self.groups.move_to_end(gkey)
            elif gkey in self.reading:
                reading, mine = self.reading[gkey], False
            else:
                reading = self.reading[gkey] = _Reading()
                mine = True
        if reading is not None:
            column = self._read(reader, starts, group, gkey, reading) if mine else reading.wait()
        value = column[row - starts[group]].as_py()
        if not value:
            raise AudioError(f"row {row} has no audio bytes")
        return value

    def _read(self, reader: Any, starts: list[int], group: int, gkey: tuple, reading: "_Reading") -> Any:
        """Read group `group` (outside the lock), cache it, and hand it to the threads
        waiting for it; its failure is theirs too."""
        column, error = None, None
        try:
            column = reader(group)
        except Exception as exc:
            error = AudioError(f"unreadable rows {starts[group]}-{starts[group + 1] - 1}: {_short(exc)}")
        finally:  # even on KeyboardInterrupt: no waiter may wait forever
            with self.lock:
                del self.reading[gkey]
                if column is not None:
                    self.groups[gkey] = column
                    while len(self.groups) > self.keep:
                        self.groups.popitem(last=False)
            reading.done(column, error if column is None else None)
        if error is not None:
            raise error from None
        return column

    def _layout(self, key: tuple) -> tuple[Any, list[int]]:
        if key not in self.layouts:
            # a shard rewritten since: forget its old layout
            for old in [k for k in self.layouts if k[0] == key[0]]:
                del self.layouts[old]
            self.layouts[key] = _parquet_layout(key[0]) if key[0].endswith(".parquet") else _arrow_layout(key[0])
            while len(self.layouts) > 2 * self.keep:
                self.layouts.popitem(last=False)
        self.layouts.move_to_end(key)
        return self.layouts[key]


class _Reading:
    """One group being read by one thread, awaited by the others that want it."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.column: Any = None
        self.error: AudioError | None = None

    def done(self, column: Any, error: AudioError | None) -> None:
        self.column, self.error = column, error
        self.event.set()

    def wait(self) -> Any:
        self.event.wait()
        if self.column is None:
            raise AudioError(str(self.error) if self.error is not None else "the row group's read was interrupted")
        return self.column


def _parquet_layout(shard: str) -> tuple[Any, list[int]]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(shard)
    column = dataset_audio_column(pf.schema_arrow)
    starts = [0]
    for g in range(pf.metadata.num_row_groups):
        starts.append(starts[-1] + pf.metadata.row_group(g).num_rows)

    def read(group: int) -> Any:
        table = pf.read_row_group(group, columns=[column])
        return table.column(0).combine_chunks().field("bytes")

    return read, starts


def _arrow_layout(shard: str) -> tuple[Any, list[int]]:
    """An Arrow IPC shard (`save_to_disk` writes the stream format), memory-mapped: a
    record batch costs nothing until its audio bytes are read."""
    import pyarrow as pa

    source = pa.memory_map(shard)
    try:
        batches = list(pa.ipc.open_stream(source))
    except pa.ArrowInvalid:  # the IPC file format (`.arrow` written by other tools)
        ipc_file = pa.ipc.open_file(source)
        batches = [ipc_file.get_batch(i) for i in range(ipc_file.num_record_batches)]
    if not batches:
        raise AudioError("the shard holds no rows")
    column = dataset_audio_column(batches[0].schema)
    starts = [0]
    for b in batches:
        starts.append(starts[-1] + b.num_rows)
    return (lambda group: batches[group].column(column).field("bytes")), starts


_GROUPS = _Groups()


def read_row_bytes(shard: str, row: int) -> bytes:
    """The encoded audio of one row of an Arrow/Parquet shard."""
    return _GROUPS.row(shard, row)


def _open_source(path: str) -> tuple[Source, str, int | None]:
    """(what soundfile/PyAV open, the file it lives in, the channel an address picks)."""
    address = parse_address(path)
    if address is None:
        return path, path, None
    base, row, channel = address
    if row is not None:
        return io.BytesIO(read_row_bytes(base, row)), base, None
    return base, base, channel


def _short(exc: BaseException) -> str:
    if isinstance(getattr(exc, "strerror", None), str) and getattr(exc, "filename", None):
        return exc.strerror  # PyAV/OSError: the reason without "[Errno N]" and the path
    text = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
    # libsndfile repeats the path inside its message; keep only the reason
    return text.split(": ", 1)[-1] if text.startswith("Error opening") else text


@contextlib.contextmanager
def _av_audio(path: Source) -> Iterator[tuple[Any, Any, int]]:
    """(container, first audio stream, its rate) from PyAV; every failure an AudioError."""
    try:
        import av
    except ImportError:
        raise AudioError("format not readable by soundfile (install embstore[av] for mp3/m4a)") from None
    try:
        with av.open(path) as container:
            if not container.streams.audio:
                raise AudioError("no audio stream")
            stream = container.streams.audio[0]
            yield container, stream, int(stream.rate or stream.codec_context.sample_rate)
    except AudioError:
        raise
    except Exception as exc:
        raise AudioError(f"PyAV: {_short(exc)}") from None


def _probe_av(path: Source) -> AudioInfo:
    with _av_audio(path) as (container, stream, rate):
        channels = int(stream.codec_context.channels)
        # stream.frames counts codec packets (1024 samples each for AAC), not samples
        if stream.duration and stream.time_base:
            frames = int(round(float(stream.duration * stream.time_base) * rate))
        elif container.duration:
            frames = int(round(container.duration / 1_000_000 * rate))
        else:
            frames = int(stream.frames or 0) * int(stream.codec_context.frame_size or 0)
    if frames <= 0 or rate <= 0:
        raise AudioError("no audio samples (header only)")
    return AudioInfo(rate, channels, frames, "av")


def read_audio(
    path: str,
    start: float | None = None,
    end: float | None = None,
    channel: int | None = None,
) -> tuple[np.ndarray, int]:
    """Samples of `path` (a span in seconds if given) as float32 mono in [-1, 1].

    Several channels are averaged unless `channel` (or the address) picks one. Integer
    PCM of any width is scaled by libsndfile; non-finite samples are an error, never
    passed on.
    """
    import soundfile as sf

    source, base, picked = _open_source(path)
    channel = picked if channel is None else channel
    try:
        with sf.SoundFile(source) as f:
            rate = f.samplerate
            first = int(round(start * rate)) if start else 0
            last = int(round(end * rate)) if end is not None else f.frames
            if first:
                f.seek(first)
            data = f.read(max(last - first, 0), dtype="float32", always_2d=True)
    except Exception as sf_error:
        if not os.path.exists(base):
            raise AudioError("file not found") from None
        if os.path.isdir(base):
            raise AudioError("is a directory, not an audio file") from None
        if not isinstance(source, str):
            source.seek(0)
        try:
            data, rate = _read_av(source, start, end)
        except AudioError as av_error:
            raise AudioError(f"cannot decode: {_short(sf_error)}; {av_error}") from None
    return _to_mono(data, channel, path), int(rate)


def _read_av(path: Source, start: float | None, end: float | None) -> tuple[np.ndarray, int]:
    import av

    parts = []
    with _av_audio(path) as (container, stream, rate):
        resampler = av.AudioResampler(format="fltp", layout=stream.layout, rate=rate)
        for frame in container.decode(stream):
            for out in resampler.resample(frame):
                parts.append(out.to_ndarray())
        for out in resampler.resample(None):
            parts.append(out.to_ndarray())
    if not parts:
        raise AudioError("no audio samples decoded")
    data = np.concatenate(parts, axis=1).T.astype(np.float32)  # [frames, channels]
    first = int(round(start * rate)) if start else 0
    last = int(round(end * rate)) if end is not None else len(data)
    return data[first:last], rate


def _to_mono(data: np.ndarray, channel: int | None, path: str) -> np.ndarray:
    if data.shape[0] == 0:
        raise AudioError("no audio samples (empty or truncated data)")
    if channel is not None:
        if channel >= data.shape[1]:
            raise AudioError(f"channel {channel} requested, file has {data.shape[1]}")
        mono = data[:, channel]
    elif data.shape[1] == 1:
        mono = data[:, 0]
    else:
        mono = data.mean(axis=1, dtype=np.float32)
    mono = np.ascontiguousarray(mono, dtype=np.float32)
    if not np.isfinite(mono).all():
        raise AudioError("non-finite samples (NaN or inf) in the audio")
    return mono


def resample(wav: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """soxr high-quality resampling; a no-op at equal rates."""
    if from_rate == to_rate:
        return wav
    import soxr

    return soxr.resample(wav, from_rate, to_rate, quality="HQ").astype(np.float32, copy=False)


def resampled_length(frames: int, from_rate: int, to_rate: int) -> int:
    """Number of samples `resample` returns for `frames` input samples (soxr rounds)."""
    if from_rate == to_rate:
        return frames
    return (2 * frames * to_rate + from_rate) // (2 * from_rate)


def span_frames(info_frames: int, rate: int, start: float | None, end: float | None) -> int:
    """Frames that `read_audio` returns for a span, from header information alone."""
    first = int(round(start * rate)) if start else 0
    last = int(round(end * rate)) if end is not None else info_frames
    return max(min(last, info_frames) - first, 0)


def load_for_model(
    path: str,
    sample_rate: int,
    start: float | None = None,
    end: float | None = None,
    channel: int | None = None,
) -> np.ndarray:
    """float32 mono samples at `sample_rate`: what every encoder consumes."""
    wav, rate = read_audio(path, start, end, channel)
    return resample(wav, rate, sample_rate)


def content_hash(path: str, block: int = 1 << 20) -> str:
    """blake2b of the file's bytes; dedup identifies identical audio by it. A dataset
    row: of its audio bytes (the same hash as the file they were read from); one
    channel of a file: of the file's bytes and the channel."""
    digest = hashlib.blake2b(digest_size=16)
    address = parse_address(path)
    if address is not None:
        base, row, channel = address
        if row is not None:
            return bytes_hash(read_row_bytes(base, row))
        path = base
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    if address is not None:
        digest.update(f"#channel={address[2]}".encode())
    return digest.hexdigest()


def bytes_hash(data: bytes) -> str:
    """`content_hash` of audio bytes held in memory (a dataset row's, read by a scan)."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()
