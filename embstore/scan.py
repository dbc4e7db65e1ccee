"""`scan`: find audio files, read their headers, and keep `files` / `items` in step.

Trees are walked one folder at a time and each folder is compared with the manifest's
rows for it, so memory stays flat at any corpus size and an unchanged rescan only stats.
Headers of new or changed files are read in a small process pool.
"""

from __future__ import annotations

import os
import sqlite3
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from embstore.audio import AudioError, is_audio_name, probe
from embstore.store import Store, StoreError, utcnow

BATCH_FILES = 2000


class ScanError(StoreError):
    pass


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
    # kaldi segments: [(uid, start, end, speaker)]; None = the whole file is one item
    segments: list[tuple[str, float, float, str]] | None = None
    error: str | None = None  # known bad before probing (broken symlink...)


@dataclass
class ScanReport:
    added: int = 0
    changed: int = 0
    removed: int = 0
    unchanged: int = 0
    failed: int = 0
    ignored: int = 0
    items_added: int = 0
    items_stale: int = 0
    items_removed: int = 0
    seconds: float = 0.0
    failures: list[dict[str, str]] = field(default_factory=list)

    @property
    def no_changes(self) -> bool:
        return not (self.added or self.changed or self.removed or self.items_added or self.items_removed)

    def as_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "failures"}
        d["failures"] = self.failures[:100]
        d["no_changes"] = self.no_changes
        return d


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


def _tree_candidates(root: str, layout: str, report: ScanReport) -> Iterator[tuple[str, list[Candidate]]]:
    root_name = os.path.basename(os.path.normpath(root))
    for rel, entries in _walk(root):
        parts = rel.split(os.sep) if rel else []
        if layout == "dataset":
            if len(parts) < 2:
                report.ignored += len(entries)
                yield rel, []
                continue
            dataset, speaker = parts[0], parts[1]
        else:
            if len(parts) < 1:
                report.ignored += len(entries)
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


def _kaldi_candidates(datadir: Path) -> Iterator[tuple[str, list[Candidate]]]:
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


def _list_candidates(list_file: Path) -> Iterator[tuple[str, list[Candidate]]]:
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


# -- header reading -----------------------------------------------------------------------


def _probe_one(abspath: str) -> tuple[Any, str | None]:
    try:
        info = probe(abspath)
        return (info.sample_rate, info.channels, info.frames, info.duration, info.subtype), None
    except AudioError as exc:
        return None, str(exc)
    except Exception as exc:  # a header parser bug must fail one file, not the scan
        return None, f"unreadable header: {type(exc).__name__}: {exc}"


class _Prober:
    """Reads headers serially for a few files, in a process pool for many."""

    def __init__(self, jobs: int):
        self.jobs = jobs
        self.pool = None

    def __call__(self, paths: list[str]) -> list[tuple[Any, str | None]]:
        if self.jobs <= 1 or len(paths) < 64:
            return [_probe_one(p) for p in paths]
        if self.pool is None:
            import multiprocessing

            self.pool = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn").Pool(self.jobs)
        return self.pool.map(_probe_one, paths, chunksize=64)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool.join()


# -- syncing ------------------------------------------------------------------------------


class _Syncer:
    """Applies a source's folders to the manifest in batched write transactions."""

    def __init__(self, store: Store, root_id: int, report: ScanReport, prober: _Prober, item_sync: bool):
        self.store = store
        self.conn: sqlite3.Connection = store.conn
        self.root_id = root_id
        self.report = report
        self.prober = prober
        self.item_sync = item_sync  # kaldi segments: items can change while the file does not
        self.pending_new: list[Candidate] = []
        self.pending_changed: list[tuple[int, Candidate]] = []
        self.pending_removed: list[int] = []
        self.pending_items: list[tuple[int, Candidate]] = []  # unchanged files whose segments may differ
        self.now = utcnow()

    def folder(self, rel: str, candidates: list[Candidate]) -> None:
        known = {
            r[1]: r
            for r in self.conn.execute(
                "SELECT id, path, size, mtime_ns, status FROM files WHERE root_id = ? AND dir = ?",
                (self.root_id, rel),
            )
        }
        for cand in candidates:
            row = known.pop(cand.path, None)
            if row is None:
                self.pending_new.append(cand)
            elif row["status"] == "removed" or row["size"] != cand.size or row["mtime_ns"] != cand.mtime_ns:
                self.pending_changed.append((row["id"], cand))
            else:
                self.report.unchanged += 1
                if self.item_sync:
                    self.pending_items.append((row["id"], cand))
        for row in known.values():
            if row["status"] != "removed":
                self.pending_removed.append(row["id"])
        if len(self.pending_new) + len(self.pending_changed) + len(self.pending_removed) >= BATCH_FILES:
            self.flush()
        elif len(self.pending_items) >= BATCH_FILES:
            self.flush()

    def flush(self) -> None:
        if not (self.pending_new or self.pending_changed or self.pending_removed or self.pending_items):
            return
        new, changed, removed, items = self.pending_new, self.pending_changed, self.pending_removed, self.pending_items
        self.pending_new, self.pending_changed, self.pending_removed, self.pending_items = [], [], [], []
        # headers are read before the write transaction so it stays short
        to_probe = [c for c in new if c.error is None] + [c for _, c in changed if c.error is None]
        headers = dict(zip((c.abspath for c in to_probe), self.prober([c.abspath for c in to_probe])))
        with self.store.write() as conn:
            self._insert_new(conn, new, headers)
            for file_id, cand in changed:
                self._update_changed(conn, file_id, cand, headers.get(cand.abspath))
            if removed:
                self._remove(conn, removed)
            for file_id, cand in items:
                self._sync_items(conn, file_id, cand)

    def _file_values(self, cand: Candidate, header, error: str | None) -> dict[str, Any]:
        values = {
            "root_id": self.root_id, "dir": os.path.dirname(cand.path), "path": cand.path,
            "dataset": cand.dataset, "speaker": cand.speaker, "size": cand.size, "mtime_ns": cand.mtime_ns,
            "sample_rate": None, "channels": None, "frames": None, "duration": None, "subtype": None,
            "content_hash": None, "status": "ok", "error": None, "scanned_at": self.now,
        }
        if error:
            values.update(status="scan_failed", error=error)
            self.report.failed += 1
            if len(self.report.failures) < 1000:
                self.report.failures.append({"path": cand.abspath, "error": error})
        else:
            values.update(zip(("sample_rate", "channels", "frames", "duration", "subtype"), header))
        return values

    def _items_of(self, cand: Candidate, file_id: int, values: dict[str, Any]) -> list[dict[str, Any]]:
        if values["status"] != "ok":
            return []
        if cand.segments is None:
            return [{
                "uid": cand.uid, "file_id": file_id, "dataset": cand.dataset, "speaker": cand.speaker,
                "start": None, "end": None, "duration": values["duration"], "removed": 0,
            }]
        out = []
        for uid, start, end, speaker in cand.segments:
            stop = values["duration"] if end == -1 else min(end, values["duration"])
            out.append({
                "uid": uid, "file_id": file_id, "dataset": cand.dataset, "speaker": speaker,
                "start": start, "end": None if end == -1 else end, "duration": max(stop - start, 0.0), "removed": 0,
            })
        return out

    def _insert_new(self, conn: sqlite3.Connection, new: list[Candidate], headers) -> None:
        if not new:
            return
        base = conn.execute("SELECT coalesce(max(id), 0) FROM files").fetchone()[0]
        file_rows, item_rows = [], []
        for offset, cand in enumerate(new, 1):
            header, error = headers.get(cand.abspath, (None, cand.error))
            values = self._file_values(cand, header, error or cand.error)
            values["id"] = base + offset
            file_rows.append(values)
            item_rows.extend(self._items_of(cand, values["id"], values))
        cols = list(file_rows[0])
        conn.executemany(
            f"INSERT INTO files ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
            [tuple(r[c] for c in cols) for r in file_rows],
        )
        self.report.added += len(new)
        self._insert_items(conn, item_rows)

    def _insert_items(self, conn: sqlite3.Connection, item_rows: list[dict[str, Any]]) -> None:
        if not item_rows:
            return
        cols = ["uid", "file_id", "dataset", "speaker", "start", "end", "duration", "removed"]
        before = conn.total_changes
        conn.executemany(
            f"INSERT OR IGNORE INTO items ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
            [tuple(r[c] for c in cols) for r in item_rows],
        )
        inserted = conn.total_changes - before
        self.report.items_added += inserted
        if inserted == len(item_rows):
            return
        # an id already taken (a.wav beside a.flac, or the same path under two roots)
        for r in item_rows:
            owner = conn.execute("SELECT file_id FROM items WHERE uid = ?", (r["uid"],)).fetchone()
            if owner is not None and owner[0] == r["file_id"]:
                continue
            path = conn.execute("SELECT path FROM files WHERE id = ?", (r["file_id"],)).fetchone()[0]
            alt = dict(r, uid=r["uid"] + os.path.splitext(path)[1])
            taken = conn.execute("SELECT 1 FROM items WHERE uid = ?", (alt["uid"],)).fetchone()
            if taken is None:
                conn.execute(
                    f"INSERT INTO items ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                    tuple(alt[c] for c in cols),
                )
                self.report.items_added += 1
            else:
                error = f"duplicate item id {r['uid']!r} (another file already has it)"
                conn.execute("UPDATE files SET status = 'scan_failed', error = ? WHERE id = ?", (error, r["file_id"]))
                self.report.failed += 1
                self.report.failures.append({"path": path, "error": error})

    def _update_changed(self, conn: sqlite3.Connection, file_id: int, cand: Candidate, probed) -> None:
        header, error = probed if probed else (None, cand.error)
        values = self._file_values(cand, header, error or cand.error)
        values.pop("root_id")
        values.pop("path")
        sets = ", ".join(f"{k} = ?" for k in values)
        conn.execute(f"UPDATE files SET {sets} WHERE id = ?", (*values.values(), file_id))
        self.report.changed += 1
        wanted = self._items_of(cand, file_id, values)
        self._apply_items(conn, file_id, wanted, content_changed=True)

    def _sync_items(self, conn: sqlite3.Connection, file_id: int, cand: Candidate) -> None:
        status, duration = conn.execute("SELECT status, duration FROM files WHERE id = ?", (file_id,)).fetchone()
        if status != "ok":
            return
        wanted = self._items_of(cand, file_id, {"status": "ok", "duration": duration})
        self._apply_items(conn, file_id, wanted, content_changed=False)

    def _apply_items(self, conn, file_id: int, wanted: list[dict[str, Any]], content_changed: bool) -> None:
        current = {r["uid"]: r for r in conn.execute("SELECT * FROM items WHERE file_id = ?", (file_id,))}
        fresh = []
        for w in wanted:
            row = current.pop(w["uid"], None)
            if row is None:
                fresh.append(w)
                continue
            span_changed = (row["start"], row["end"]) != (w["start"], w["end"])
            if content_changed or span_changed or row["removed"]:
                conn.execute(
                    "UPDATE items SET dataset = ?, speaker = ?, start = ?, end = ?, duration = ?, removed = 0"
                    " WHERE id = ?",
                    (w["dataset"], w["speaker"], w["start"], w["end"], w["duration"], row["id"]),
                )
                stale = conn.execute(
                    "UPDATE tasks SET status = 'stale', error = NULL, stage = NULL WHERE item_id = ?"
                    " AND status IN ('done', 'failed', 'claimed', 'pending')",
                    (row["id"],),
                ).rowcount
                self.report.items_stale += stale and 1
        for row in current.values():
            if not row["removed"]:
                conn.execute("UPDATE items SET removed = 1 WHERE id = ?", (row["id"],))
                self.report.items_removed += 1
        self._insert_items(conn, fresh)

    def _remove(self, conn: sqlite3.Connection, file_ids: list[int]) -> None:
        for start in range(0, len(file_ids), 500):
            chunk = file_ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            conn.execute(f"UPDATE files SET status = 'removed', scanned_at = ? WHERE id IN ({marks})", (self.now, *chunk))
            cur = conn.execute(f"UPDATE items SET removed = 1 WHERE removed = 0 AND file_id IN ({marks})", chunk)
            self.report.items_removed += cur.rowcount
        self.report.removed += len(file_ids)

    def remove_missing_dirs(self, seen_dirs: set[str]) -> None:
        gone = [
            r[0]
            for r in self.conn.execute(
                "SELECT DISTINCT dir FROM files WHERE root_id = ? AND status != 'removed'", (self.root_id,)
            )
            if r[0] not in seen_dirs
        ]
        for rel in gone:
            self.folder(rel, [])
        self.flush()


def _root_row(store: Store, kind: str, path: str, layout: str | None, dataset: str | None) -> int:
    row = store.conn.execute("SELECT id, layout FROM roots WHERE kind = ? AND path = ?", (kind, path)).fetchone()
    if row is not None:
        if kind == "tree" and row["layout"] != layout:
            raise ScanError(
                f"{path} was scanned with --layout {row['layout']}; rescanning it as {layout} would rename its items"
            )
        return row["id"]
    with store.write() as conn:
        cur = conn.execute(
            "INSERT INTO roots (kind, path, layout, dataset, created_at) VALUES (?, ?, ?, ?, ?)",
            (kind, path, layout, dataset, utcnow()),
        )
        return cur.lastrowid


def scan_into(
    store: Store,
    roots: Sequence[str | os.PathLike] = (),
    layout: str = "dataset",
    kaldi: Sequence[str | os.PathLike] = (),
    lists: Sequence[str | os.PathLike] = (),
    jobs: int | None = None,
    progress: bool = False,
) -> ScanReport:
    """Scan trees (`roots`, in `layout`), Kaldi data dirs and list files into the store."""
    import time

    if layout not in ("dataset", "speaker"):
        raise ScanError(f"unknown layout {layout!r}: use dataset or speaker")
    if not (roots or kaldi or lists):
        raise ScanError("nothing to scan: give a ROOT folder, --kaldi DATADIR or --list FILE")
    started = time.monotonic()
    report = ScanReport()
    prober = _Prober(jobs if jobs is not None else min(2, os.cpu_count() or 1))
    bar = _progress_bar(progress)
    sources: list[tuple[str, str, str | None, str | None, Iterable[tuple[str, list[Candidate]]]]] = []
    for root in roots:
        path = os.path.abspath(os.fspath(root))
        if not os.path.isdir(path):
            raise ScanError(f"{root}: not a folder")
        dataset = os.path.basename(os.path.normpath(path)) if layout == "speaker" else None
        sources.append(("tree", path, layout, dataset, _tree_candidates(path, layout, report)))
    for datadir in kaldi:
        path = Path(datadir).absolute()
        if not path.is_dir():
            raise ScanError(f"{datadir}: not a Kaldi data dir")
        sources.append(("kaldi", str(path), None, path.name, list(_kaldi_candidates(path))))
    for list_file in lists:
        path = Path(list_file).absolute()
        if not path.is_file():
            raise ScanError(f"{list_file}: no such list file")
        sources.append(("list", str(path), None, path.stem, list(_list_candidates(path))))
    try:
        for kind, path, src_layout, dataset, folders in sources:
            root_id = _root_row(store, kind, path, src_layout, dataset)
            syncer = _Syncer(store, root_id, report, prober, item_sync=(kind == "kaldi"))
            seen: set[str] = set()
            for rel, candidates in folders:
                # a tree's folders are relative to it; kaldi/list rows key on absolute folders
                seen.add(rel)
                syncer.folder(rel, candidates)
                if bar is not None:
                    bar.update(len(candidates))
            syncer.flush()
            syncer.remove_missing_dirs(seen)
            with store.write() as conn:
                conn.execute("UPDATE roots SET scanned_at = ? WHERE id = ?", (utcnow(), root_id))
    finally:
        prober.close()
        if bar is not None:
            bar.close()
    report.seconds = round(time.monotonic() - started, 3)
    return report


def _progress_bar(enabled: bool):
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(unit=" files", desc="scan", smoothing=0.1, file=sys.stderr)
