"""`scan`: find audio files, read their headers, and keep `files` / `items` in step.

Trees are walked one folder at a time and each folder is compared with the manifest's
rows for it, so memory stays flat at any corpus size and an unchanged rescan only stats.
Headers of new or changed files are read in a small process pool.

Lhotse manifests (`scan/from_lhotse.py`) sync like Kaldi dirs: a file per audio source,
its items as segments that can change while the file does not. Hugging Face datasets
(`scan/from_hf.py`) sync a shard as a folder of row "files", each row's header read by
the source from its bytes; a shard unchanged in size and mtime is kept without reading.
"""

from __future__ import annotations

import os
import sqlite3
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from embstore.api import Report
from embstore.audio.io import probe
from embstore.errors import AudioError, ScanError
from embstore.manifest.connection import LIVE_ITEM, execute_in, utcnow
from embstore.manifest.database import Manifest
from embstore.manifest.tasks import mark_items_stale
from embstore.progress import progress_bar
from embstore.scan.sources import Candidate, kaldi_candidates, list_candidates, tree_candidates

Folders = Iterable[tuple[str, "list[Candidate] | None"]]

BATCH_FILES = 2000

@dataclass
class ScanReport(Report):
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

    def ignore(self, files: int) -> None:
        """Audio files outside the layout (e.g. directly under a dataset folder)."""
        self.ignored += files

    @property
    def no_changes(self) -> bool:
        return not (self.added or self.changed or self.removed or self.items_added or self.items_removed)

    def as_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "failures"}
        d["failures"] = self.failures[:100]
        d["no_changes"] = self.no_changes
        return d


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

    def __init__(self, store: Manifest, root_id: int, report: ScanReport, prober: _Prober, item_sync: bool,
                 moves: bool = False):
        self.store = store
        self.conn: sqlite3.Connection = store.conn
        self.root_id = root_id
        self.report = report
        self.prober = prober
        self.item_sync = item_sync  # kaldi segments: items can change while the file does not
        # dataset rows: a rewritten shard may hold an id at another row (a row inserted
        # before it); the item follows its id there instead of clashing with itself
        self.moves = moves
        self.claimed: set[str] = set()  # ids rows of this scan hold: a second claim is a duplicate
        self.released: set[int] = set()  # items this scan took off their file (maybe to move them)
        self.pending_new: list[Candidate] = []
        self.pending_changed: list[tuple[int, Candidate]] = []
        self.pending_removed: list[int] = []
        self.pending_items: list[tuple[int, Candidate]] = []  # unchanged files whose segments may differ
        self.now = utcnow()

    def keep(self, rel: str) -> None:
        """A folder its source knows to be unchanged (a dataset shard): its rows stay."""
        self.report.unchanged += self.conn.execute(
            "SELECT count(*) FROM files WHERE root_id = ? AND dir = ? AND status != 'removed'", (self.root_id, rel),
        ).fetchone()[0]

    def unchanged(self, rel: str, size: int, mtime_ns: int) -> bool:
        """Whether every row of folder `rel` was recorded with this size and mtime (a
        shard's rows all carry the shard's)."""
        n, low, high, t_low, t_high = self.conn.execute(
            "SELECT count(*), min(size), max(size), min(mtime_ns), max(mtime_ns) FROM files"
            " WHERE root_id = ? AND dir = ? AND status != 'removed'", (self.root_id, rel),
        ).fetchone()
        return n > 0 and low == high == size and t_low == t_high == mtime_ns

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
        to_probe = [c for c in new if c.error is None and c.header is None] + [
            c for _, c in changed if c.error is None and c.header is None]
        headers = dict(zip((c.abspath for c in to_probe), self.prober([c.abspath for c in to_probe])))
        with self.store.write() as conn:
            if not self.moves:
                self._insert_new(conn, new, headers)
            for file_id, cand in changed:
                self._update_changed(conn, file_id, cand, _header_of(cand, headers))
            if self.moves:
                # rows a shard kept claim their ids before rows it gained: a new row reusing
                # an id is the duplicate, never the row that had it
                self._insert_new(conn, new, headers)
            if removed:
                self._remove(conn, removed)
            for file_id, cand in items:
                self._sync_items(conn, file_id, cand)

    def _file_values(self, cand: Candidate, header, error: str | None) -> dict[str, Any]:
        values = {
            "root_id": self.root_id, "dir": os.path.dirname(cand.path) if cand.dir is None else cand.dir,
            "path": cand.path,
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
                "start": start, "end": None if end == -1 else end, "duration": max(stop - (start or 0.0), 0.0),
                "removed": 0,
            })
        return out

    def _insert_new(self, conn: sqlite3.Connection, new: list[Candidate], headers) -> None:
        if not new:
            return
        base = conn.execute("SELECT coalesce(max(id), 0) FROM files").fetchone()[0]
        file_rows, item_rows = [], []
        for offset, cand in enumerate(new, 1):
            header, error = _header_of(cand, headers) or (None, cand.error)
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
            if self.moves:
                self.claimed.update(r["uid"] for r in item_rows)
            return
        # an id already taken (a.wav beside a.flac, or the same path under two roots)
        for r in item_rows:
            owner = conn.execute("SELECT file_id FROM items WHERE uid = ?", (r["uid"],)).fetchone()
            if owner is not None and owner[0] == r["file_id"]:
                self.claimed.add(r["uid"])
                continue
            if self.moves and self._move_within_folder(conn, r):
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

    def _move_within_folder(self, conn: sqlite3.Connection, r: dict[str, Any]) -> bool:
        """Give item `r["uid"]` to file `r["file_id"]` when its owner sits in the same
        folder (shard) of this root and no row of this scan holds the id yet; its
        embedding goes stale (re-extracted, or reused by dedup when the bytes are the same)."""
        owner = conn.execute("SELECT i.id, i.removed, f.root_id, f.dir FROM items i JOIN files f ON f.id = i.file_id"
                             " WHERE i.uid = ?", (r["uid"],)).fetchone()
        new_dir = conn.execute("SELECT dir FROM files WHERE id = ?", (r["file_id"],)).fetchone()[0]
        if owner is None or r["uid"] in self.claimed or (owner["root_id"], owner["dir"]) != (self.root_id, new_dir):
            return False
        conn.execute(
            "UPDATE items SET file_id = ?, dataset = ?, speaker = ?, start = ?, end = ?, duration = ?, removed = 0"
            " WHERE id = ?",
            (r["file_id"], r["dataset"], r["speaker"], r["start"], r["end"], r["duration"], owner["id"]),
        )
        self.report.items_stale += mark_items_stale(conn, owner["id"]) and 1
        if owner["removed"] and owner["id"] in self.released:
            self.report.items_removed -= 1  # counted as removed a moment ago: it moved instead
        self.claimed.add(r["uid"])
        return True

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
            self.claimed.add(w["uid"])
            span_changed = (row["start"], row["end"]) != (w["start"], w["end"])
            if content_changed or span_changed or row["removed"]:
                conn.execute(
                    "UPDATE items SET dataset = ?, speaker = ?, start = ?, end = ?, duration = ?, removed = 0"
                    " WHERE id = ?",
                    (w["dataset"], w["speaker"], w["start"], w["end"], w["duration"], row["id"]),
                )
                stale = mark_items_stale(conn, row["id"])
                self.report.items_stale += stale and 1
        for row in current.values():
            if not row["removed"]:
                conn.execute("UPDATE items SET removed = 1 WHERE id = ?", (row["id"],))
                self.report.items_removed += 1
                self.released.add(row["id"])
        self._insert_items(conn, fresh)

    def _remove(self, conn: sqlite3.Connection, file_ids: list[int]) -> None:
        execute_in(conn, "UPDATE files SET status = 'removed', scanned_at = ? WHERE id IN ({marks})", file_ids,
                   params_before=(self.now,))
        self.report.items_removed += execute_in(
            conn, "UPDATE items AS i SET removed = 1 WHERE " + LIVE_ITEM + " AND file_id IN ({marks})", file_ids
        )
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


def _header_of(cand: Candidate, headers: dict[str, Any]) -> tuple[Any, str | None] | None:
    """(header, error) of a candidate: read by its source (dataset rows) or probed."""
    if cand.header is not None:
        return cand.header, None
    return headers.get(cand.abspath)


def _root_row(store: Manifest, kind: str, path: str, layout: str | None, dataset: str | None) -> int:
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


@dataclass(frozen=True)
class ScanOptions:
    """What a scan reads besides its roots; checked when made.

    layout: how a root's folders name things ("dataset": ROOT/<dataset>/<speaker>/...;
    "speaker": ROOT/<speaker>/..., the root naming the dataset). kaldi: Kaldi data dirs
    (wav.scp, utt2spk, segments). lists: list files (one audio path per line, optional
    speaker). lhotse: Lhotse manifests (a CutSet, or a RecordingSet with its
    SupervisionSet beside it). hf: Hugging Face audio datasets (a Parquet file, a folder
    of shards, a `save_to_disk` folder). dataset: the dataset name of lhotse/hf items
    (default: from the manifest's or dataset's name; an HF `dataset` column wins).
    id_column / speaker_column: the HF columns of item ids / speakers (default: the
    usual names, `id`, `speaker_id`, `speaker`, `client_id`...). jobs: processes reading
    headers (default: up to 2). progress: a bar on stderr."""

    layout: str = "dataset"
    kaldi: Sequence[str | os.PathLike] = ()
    lists: Sequence[str | os.PathLike] = ()
    lhotse: Sequence[str | os.PathLike] = ()
    hf: Sequence[str | os.PathLike] = ()
    dataset: str | None = None
    id_column: str | None = None
    speaker_column: str | None = None
    jobs: int | None = None
    progress: bool = False

    def __post_init__(self) -> None:
        if self.layout not in ("dataset", "speaker"):
            raise ScanError(f"unknown layout {self.layout!r}: use dataset or speaker")
        if self.jobs is not None and self.jobs < 1:
            raise ScanError(f"jobs must be at least 1 (got {self.jobs})")
        for name in ("kaldi", "lists", "lhotse", "hf"):
            if isinstance(getattr(self, name), (str, os.PathLike)):
                raise ScanError(f"{name} takes a list of paths (got one path: {getattr(self, name)!r})")
        if (self.id_column or self.speaker_column) and not self.hf:
            raise ScanError("--id-column and --speaker-column name columns of an --hf dataset; give one")
        if self.dataset is not None and not (self.lhotse or self.hf):
            raise ScanError("--dataset names the items of --lhotse or --hf sources; give one")


# (kind, root path, layout, dataset, folders; or a function of the sync giving them)
_Source = tuple[str, str, "str | None", "str | None", "Folders | Callable[[_Syncer], Folders]"]


def _sources(roots: Sequence[str | os.PathLike], opts: ScanOptions, report: ScanReport) -> list[_Source]:
    """Every source of a scan, checked before anything is written."""
    from embstore.scan.from_hf import check_columns, hf_candidates
    from embstore.scan.from_lhotse import lhotse_candidates

    sources: list[_Source] = []
    for root in roots:
        path = os.path.abspath(os.fspath(root))
        if not os.path.isdir(path):
            raise ScanError(f"{root}: not a folder")
        dataset = os.path.basename(os.path.normpath(path)) if opts.layout == "speaker" else None
        sources.append(("tree", path, opts.layout, dataset, tree_candidates(path, opts.layout, report.ignore)))
    for datadir in opts.kaldi:
        path = Path(datadir).absolute()
        if not path.is_dir():
            raise ScanError(f"{datadir}: not a Kaldi data dir")
        sources.append(("kaldi", str(path), None, path.name, list(kaldi_candidates(path))))
    for list_file in opts.lists:
        path = Path(list_file).absolute()
        if not path.is_file():
            raise ScanError(f"{list_file}: no such list file")
        sources.append(("list", str(path), None, path.stem, list(list_candidates(path))))
    for manifest in opts.lhotse:
        from embstore.interop.lhotse import dataset_name

        path = Path(manifest).absolute()
        if not path.is_file():
            raise ScanError(f"{manifest}: no such Lhotse manifest")
        name = opts.dataset or dataset_name(str(path))
        sources.append(("lhotse", str(path), None, name, list(lhotse_candidates(str(path), name))))
    for dataset_path in opts.hf:
        from embstore.interop.hf import dataset_name as hf_name, find_shards

        path = os.path.abspath(os.fspath(dataset_path))
        shards = find_shards(path)
        check_columns(shards, opts.id_column, opts.speaker_column)
        name = opts.dataset or hf_name(path)
        sources.append(("hf", path, None, name, lambda syncer, shards=shards, name=name: hf_candidates(
            path, shards, name, syncer.unchanged, opts.id_column, opts.speaker_column)))
    return sources


def scan_into(
    store: Manifest, roots: Sequence[str | os.PathLike] = (), options: ScanOptions | None = None,
) -> ScanReport:
    """Scan trees (`roots`, in `options.layout`), Kaldi data dirs, list files, Lhotse
    manifests and Hugging Face datasets into the store."""
    opts = options or ScanOptions()
    if not (roots or opts.kaldi or opts.lists or opts.lhotse or opts.hf):
        raise ScanError("nothing to scan: give a ROOT folder, --kaldi DATADIR, --list FILE, --lhotse MANIFEST or --hf PATH")
    started = time.monotonic()
    report = ScanReport()
    sources = _sources(roots, opts, report)
    prober = _Prober(opts.jobs if opts.jobs is not None else min(2, os.cpu_count() or 1))
    bar = progress_bar(opts.progress, unit=" files", desc="scan", smoothing=0.1)
    try:
        for kind, path, src_layout, dataset, folders in sources:
            root_id = _root_row(store, kind, path, src_layout, dataset)
            syncer = _Syncer(store, root_id, report, prober, item_sync=kind in ("kaldi", "lhotse"), moves=kind == "hf")
            seen: set[str] = set()
            for rel, candidates in (folders(syncer) if callable(folders) else folders):
                # a tree's folders are relative to it; other sources key on absolute folders
                seen.add(rel)
                if candidates is None:
                    syncer.keep(rel)
                    continue
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
