"""Sources of audio files: folder trees, Kaldi data dirs and list files.

Each source yields (folder, [Candidate]) one folder at a time, so a scan's memory stays
flat at any corpus size.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from embstore.audio.io import is_audio_name
from embstore.errors import ScanError


@dataclass
class Candidate:
    """A file the scan found, with what its source says about it."""

    path: str  # as stored: relative to the root, or absolute for kaldi/list sources
    abspath: str
    size: int
    mtime_ns: int
    dataset: str
    speaker: str
    uid: str
    # kaldi segments / lhotse items: [(uid, start, end, speaker)] (end -1: to the file's end,
    # start None: from its start); None = the whole file is one item
    segments: list[tuple[str, float, float, str]] | None = None
    error: str | None = None  # known bad before probing (broken symlink...)
    dir: str | None = None  # the sync's folder when not the path's (a dataset row: its shard)
    # (sample_rate, channels, frames, duration, subtype) when the source read it (dataset rows)
    header: tuple | None = None


# -- sources ------------------------------------------------------------------------------


def _walk(root: str) -> Iterator[tuple[str, list[os.DirEntry]]]:
    """(relative folder, its entries) depth-first in sorted order; symlinked folders are
    followed once (loops are cut by inode)."""
    seen: set[tuple[int, int]] = set()
    stack = [""]
    while stack:
        rel = stack.pop()
        full = os.path.join(root, rel) if rel else root
        try:
            st = os.stat(full)
            key = (st.st_dev, st.st_ino)
            if key in seen:
                continue
            seen.add(key)
            with os.scandir(full) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            continue
        subdirs = []
        files = []
        for e in entries:
            if e.name.startswith("."):
                continue
            try:
                if e.is_dir():
                    subdirs.append(e.name)
                    continue
            except OSError:
                pass
            if is_audio_name(e.name):
                files.append(e)
        yield rel, files
        stack.extend(os.path.join(rel, d) if rel else d for d in reversed(subdirs))


def tree_candidates(root: str, layout: str, ignore: Callable[[int], None]) -> Iterator[tuple[str, list[Candidate]]]:
    root_name = os.path.basename(os.path.normpath(root))
    for rel, entries in _walk(root):
        parts = rel.split(os.sep) if rel else []
        if layout == "dataset":
            if len(parts) < 2:
                ignore(len(entries))
                yield rel, []
                continue
            dataset, speaker = parts[0], parts[1]
        else:
            if len(parts) < 1:
                ignore(len(entries))
                yield rel, []
                continue
            dataset, speaker = root_name, parts[0]
        out = []
        for e in entries:
            path = os.path.join(rel, e.name)
            stem = os.path.splitext(path)[0]
            uid = stem if layout == "dataset" else f"{dataset}/{stem}"
            try:
                st = e.stat()
                out.append(Candidate(path, e.path, st.st_size, st.st_mtime_ns, dataset, speaker, uid))
            except OSError as exc:
                reason = "broken symlink" if e.is_symlink() else f"cannot stat: {exc.strerror}"
                out.append(Candidate(path, e.path, -1, -1, dataset, speaker, uid, error=reason))
        yield rel, out


def _stat_candidate(path: str, abspath: str, dataset: str, speaker: str, uid: str, segments=None) -> Candidate:
    try:
        st = os.stat(abspath)
        if not os.path.isfile(abspath):
            return Candidate(path, abspath, -1, -1, dataset, speaker, uid, segments, error="not a regular file")
        return Candidate(path, abspath, st.st_size, st.st_mtime_ns, dataset, speaker, uid, segments)
    except OSError as exc:
        reason = "broken symlink" if os.path.islink(abspath) else f"file not found ({exc.strerror})"
        return Candidate(path, abspath, -1, -1, dataset, speaker, uid, segments, error=reason)


def _read_table(path: Path, min_fields: int) -> Iterator[tuple[int, list[str]]]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            fields = line.split(None, min_fields - 1) if min_fields > 1 else [line]
            if len(fields) < min_fields:
                raise ScanError(f"{path}:{lineno}: expected {min_fields} fields, got {line!r}")
            yield lineno, fields


def kaldi_candidates(datadir: Path) -> Iterator[tuple[str, list[Candidate]]]:
    wav_scp = datadir / "wav.scp"
    if not wav_scp.exists():
        raise ScanError(f"{datadir}: no wav.scp (is it a Kaldi data dir?)")
    dataset = datadir.name
    utt2spk = {}
    if (datadir / "utt2spk").exists():
        utt2spk = {f[0]: f[1].strip() for _, f in _read_table(datadir / "utt2spk", 2)}
    recordings: dict[str, str] = {}
    for lineno, (rec, value) in _read_table(wav_scp, 2):
        value = value.strip()
        if value.endswith("|") or " | " in value or value.startswith("-"):
            raise ScanError(
                f"{wav_scp}:{lineno}: piped commands are not supported ({rec}); convert the audio to files first"
            )
        if ".ark:" in value or value.endswith(".ark"):
            raise ScanError(f"{wav_scp}:{lineno}: ark offsets are not supported ({rec}); point to audio files")
        recordings[rec] = os.path.abspath(value)
    segments: dict[str, list[tuple[str, float, float, str]]] | None = None
    if (datadir / "segments").exists():
        segments = defaultdict(list)
        for lineno, fields in _read_table(datadir / "segments", 4):
            utt, rec, start, end = fields[0], fields[1], fields[2], fields[3].split()[0]
            if rec not in recordings:
                raise ScanError(f"{datadir / 'segments'}:{lineno}: recording {rec} is not in wav.scp")
            try:
                span = (float(start), float(end))
            except ValueError:
                raise ScanError(f"{datadir / 'segments'}:{lineno}: bad start/end {start!r} {end!r}") from None
            if span[1] <= span[0] and span[1] != -1:
                raise ScanError(f"{datadir / 'segments'}:{lineno}: segment {utt} ends before it starts")
            segments[rec].append((utt, span[0], span[1], utt2spk.get(utt, "unknown")))
    by_dir: dict[str, list[Candidate]] = defaultdict(list)
    for rec, abspath in recordings.items():
        if segments is not None:
            segs = segments.get(rec, [])
            speaker = segs[0][3] if segs else "unknown"
            cand = _stat_candidate(abspath, abspath, dataset, speaker, rec, segs)
        else:
            cand = _stat_candidate(abspath, abspath, dataset, utt2spk.get(rec, "unknown"), rec)
        by_dir[os.path.dirname(abspath)].append(cand)
    yield from by_dir.items()


def list_candidates(list_file: Path) -> Iterator[tuple[str, list[Candidate]]]:
    base = list_file.parent.absolute()
    dataset = list_file.stem
    by_dir: dict[str, list[Candidate]] = defaultdict(list)
    for _, (line,) in _read_table(list_file, 1):
        path, _, speaker = line.partition("\t")
        path = path.strip()
        abspath = os.path.normpath(os.path.join(base, path))
        speaker = speaker.strip() or os.path.basename(os.path.dirname(abspath)) or "unknown"
        rel = os.path.relpath(abspath, base)
        uid_path = rel if not rel.startswith("..") else abspath.lstrip("/")
        uid = f"{dataset}/{os.path.splitext(uid_path)[0]}"
        by_dir[os.path.dirname(abspath)].append(_stat_candidate(abspath, abspath, dataset, speaker, uid))
    yield from by_dir.items()
