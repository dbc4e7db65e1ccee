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
from functools import partial
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
    items_relabelled: int = 0  # same audio, another id, speaker or dataset (embeddings kept)
    seconds: float = 0.0
    failures: list[dict[str, str]] = field(default_factory=list)

    def ignore(self, files: int) -> None:
        """Audio files outside the layout (e.g. directly under a dataset folder)."""
        self.ignored += files

    @property
    def no_changes(self) -> bool:
        return not (self.added or self.changed or self.removed or self.items_added or self.items_removed
                    or self.items_relabelled)

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


DUPLICATE_ID = "duplicate item id"


def _lost_its_id(row: sqlite3.Row) -> bool:
    """A file that failed only because another held its item id: every scan looks again
    (the other may be gone, or a new --id-column gives it an id of its own)."""
    return row["status"] == "scan_failed" and (row["error"] or "").startswith(DUPLICATE_ID)


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
        self.removed_files: set[int] = set()  # files this scan marked removed (a shard gone)
        self.hash_before: dict[int, str | None] = {}  # content hash of files this scan rewrote, as it was
        self.deferred: list[dict[str, Any]] = []  # rows taking an id another shard had: see settle_moves
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
        n, low, high, t_low, t_high, bare = self.conn.execute(
            "SELECT count(*), min(size), max(size), min(mtime_ns), max(mtime_ns),"
            # a row without its item: a scan cut short before settle_moves gave it one
            " sum(status = 'ok' AND NOT EXISTS (SELECT 1 FROM items i WHERE i.file_id = files.id AND i.removed = 0))"
            " FROM files WHERE root_id = ? AND dir = ? AND status != 'removed'", (self.root_id, rel),
        ).fetchone()
        return n > 0 and low == high == size and t_low == t_high == mtime_ns and not bare

    def folder(self, rel: str, candidates: list[Candidate]) -> None:
        known = {
            r[1]: r
            for r in self.conn.execute(
                "SELECT id, path, size, mtime_ns, status, error FROM files WHERE root_id = ? AND dir = ?",
                (self.root_id, rel),
            )
        }
        for cand in candidates:
            row = known.pop(cand.path, None)
            if row is None:
                self.pending_new.append(cand)
            elif (row["status"] == "removed" or row["size"] != cand.size or row["mtime_ns"] != cand.mtime_ns
                  or _lost_its_id(row)):
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
            # a dataset row's hash is read with its bytes; a file's by extraction
            "content_hash": getattr(cand, "content_hash", None), "status": "ok", "error": None, "scanned_at": self.now,
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

    ITEM_COLUMNS = ("uid", "file_id", "dataset", "speaker", "start", "end", "duration", "removed")

    def _insert_items(self, conn: sqlite3.Connection, item_rows: list[dict[str, Any]]) -> None:
        if not item_rows:
            return
        cols = self.ITEM_COLUMNS
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
            if self.moves and self._move(conn, r):
                continue
            self._clash(conn, r)

    def _clash(self, conn: sqlite3.Connection, r: dict[str, Any]) -> None:
        """Item row `r` whose id another file keeps: the id with the file's extension,
        else a duplicate (its file fails)."""
        cols = self.ITEM_COLUMNS
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
            error = f"{DUPLICATE_ID} {r['uid']!r} (another file already has it)"
            conn.execute("UPDATE files SET status = 'scan_failed', error = ? WHERE id = ?", (error, r["file_id"]))
            self.report.failed += 1
            self.report.failures.append({"path": path, "error": error})

    def _move(self, conn: sqlite3.Connection, r: dict[str, Any], settling: bool = False) -> bool:
        """Give item `r["uid"]` to dataset row `r["file_id"]` when its owner is a row of
        this root that no row of this scan holds: in the same shard at once (its kept
        rows claimed their ids first); from another shard only once every shard is read
        (`settle_moves`), and only if its row is gone from there (else `r` is the
        duplicate). Its embeddings stay when the row's audio is the same bytes (content
        hash); otherwise they go stale."""
        owner = conn.execute("SELECT i.id, i.removed, i.file_id, f.root_id, f.dir, f.content_hash FROM items i"
                             " JOIN files f ON f.id = i.file_id WHERE i.uid = ?", (r["uid"],)).fetchone()
        new_dir, new_hash = conn.execute("SELECT dir, content_hash FROM files WHERE id = ?", (r["file_id"],)).fetchone()
        if owner is None or r["uid"] in self.claimed or owner["root_id"] != self.root_id:
            return False
        if owner["dir"] != new_dir:
            if not settling:
                self.deferred.append(r)  # re-sharded: its shard may not have been read yet
                return True
            if not owner["removed"]:
                return False
        conn.execute(
            "UPDATE items SET file_id = ?, dataset = ?, speaker = ?, start = ?, end = ?, duration = ?, removed = 0"
            " WHERE id = ?",
            (r["file_id"], r["dataset"], r["speaker"], r["start"], r["end"], r["duration"], owner["id"]),
        )
        before = self._embedded_hash(owner)
        if before is None or before != new_hash:
            self.report.items_stale += mark_items_stale(conn, owner["id"]) and 1
        if owner["removed"] and (owner["id"] in self.released or owner["file_id"] in self.removed_files):
            self.report.items_removed -= 1  # counted as removed a moment ago: it moved instead
        self.claimed.add(r["uid"])
        return True

    def _embedded_hash(self, owner: sqlite3.Row) -> str | None:
        """The content hash of the audio an item's embeddings were made from, as far as
        this scan knows (None: unknown, e.g. removed by an earlier scan, its file may
        hold other bytes since)."""
        if owner["removed"] and owner["id"] not in self.released and owner["file_id"] not in self.removed_files:
            return None
        return self.hash_before.get(owner["file_id"], owner["content_hash"])

    def settle_moves(self) -> None:
        """Rows of this scan that took an id another shard of the dataset had (a
        re-sharded dataset): every shard read, each takes the item when the id's old row
        is gone, and clashes as a duplicate when it is still there."""
        deferred, self.deferred = self.deferred, []
        if not deferred:
            return
        with self.store.write() as conn:
            for r in deferred:
                if not self._move(conn, r, settling=True):
                    self._clash(conn, r)

    def _update_changed(self, conn: sqlite3.Connection, file_id: int, cand: Candidate, probed) -> None:
        header, error = probed if probed else (None, cand.error)
        values = self._file_values(cand, header, error or cand.error)
        values.pop("root_id")
        values.pop("path")
        before = conn.execute("SELECT content_hash FROM files WHERE id = ?", (file_id,)).fetchone()[0]
        self.hash_before.setdefault(file_id, before)
        sets = ", ".join(f"{k} = ?" for k in values)
        conn.execute(f"UPDATE files SET {sets} WHERE id = ?", (*values.values(), file_id))
        self.report.changed += 1
        wanted = self._items_of(cand, file_id, values)
        # a dataset row rewritten with the same audio bytes keeps its embeddings
        same = before is not None and before == values["content_hash"]
        self._apply_items(conn, file_id, wanted, content_changed=not same)

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
            relabelled = (row["dataset"], row["speaker"]) != (w["dataset"], w["speaker"])
            if content_changed or span_changed or row["removed"] or relabelled:
                conn.execute(
                    "UPDATE items SET dataset = ?, speaker = ?, start = ?, end = ?, duration = ?, removed = 0"
                    " WHERE id = ?",
                    (w["dataset"], w["speaker"], w["start"], w["end"], w["duration"], row["id"]),
                )
            if content_changed or span_changed or row["removed"]:
                stale = mark_items_stale(conn, row["id"])
                self.report.items_stale += stale and 1
            elif relabelled:
                self.report.items_relabelled += 1
        live = [row for row in current.values() if not row["removed"]]
        if self.moves and not content_changed and len(live) == len(fresh) == 1 and self._rename(conn, live[0], fresh[0]):
            return
        for row in current.values():
            if not row["removed"]:
                conn.execute("UPDATE items SET removed = 1 WHERE id = ?", (row["id"],))
                self.report.items_removed += 1
                self.released.add(row["id"])
        self._insert_items(conn, fresh)

    def _rename(self, conn: sqlite3.Connection, row: sqlite3.Row, w: dict[str, Any]) -> bool:
        """A dataset row whose audio stayed while its id changed (another id column):
        its item takes the new id when no item has it, keeping its embeddings."""
        if (row["start"], row["end"]) != (w["start"], w["end"]):
            return False
        if conn.execute("SELECT 1 FROM items WHERE uid = ?", (w["uid"],)).fetchone() is not None:
            return False
        conn.execute("UPDATE items SET uid = ?, dataset = ?, speaker = ? WHERE id = ?",
                     (w["uid"], w["dataset"], w["speaker"], row["id"]))
        self.claimed.add(w["uid"])
        self.report.items_relabelled += 1
        return True

    def _remove(self, conn: sqlite3.Connection, file_ids: list[int]) -> None:
        self.removed_files.update(file_ids)
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
    row = store.conn.execute("SELECT id, layout, dataset FROM roots WHERE kind = ? AND path = ?", (kind, path)).fetchone()
    if row is not None:
        if kind == "tree" and row["layout"] != layout:
            raise ScanError(
                f"{path} was scanned with --layout {row['layout']}; rescanning it as {layout} would rename its items"
            )
        if kind == "hf" and layout is not None and (row["layout"], row["dataset"]) != (layout, dataset):
            from embstore.scan.from_hf import applying

            # another mapping, applied shard by shard: marked until the scan ends, so one
            # cut short leaves the next rereading every shard
            with store.write() as conn:
                conn.execute("UPDATE roots SET layout = ?, dataset = ? WHERE id = ?", (applying(layout), dataset, row["id"]))
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
    usual names, `id`, `speaker_id`, `speaker`, `client_id`...); an HF dataset keeps
    the columns and name it was scanned with until a rescan names others, which are
    then applied to every shard, changed or not (labels updated, items renamed, their
    embeddings kept). jobs: processes reading
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


def _sources(store: Manifest, roots: Sequence[str | os.PathLike], opts: ScanOptions, report: ScanReport) -> list[_Source]:
    """Every source of a scan, checked before anything is written."""
    from embstore.scan.from_hf import check_columns, dataset_mapping
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
        from embstore.interop.hf import find_shards

        path = os.path.abspath(os.fspath(dataset_path))
        shards = find_shards(path)
        recorded = store.conn.execute("SELECT layout, dataset FROM roots WHERE kind = 'hf' AND path = ?", (path,)).fetchone()
        # the columns and name recorded for this dataset, or the ones given in their place
        mapping, reread = dataset_mapping(path, recorded, opts.id_column, opts.speaker_column, opts.dataset)
        check_columns(shards, mapping.id_column, mapping.speaker_column)
        sources.append(("hf", path, mapping.layout(), mapping.dataset, partial(_hf_folders, path, shards, mapping, reread)))
    return sources


def _hf_folders(path: str, shards: list[str], mapping: Any, reread: bool, syncer: _Syncer) -> Folders:
    """A dataset's shards; every one of them read when its mapping changed (the rows'
    ids and labels are then applied to unchanged shards too)."""
    from embstore.scan.from_hf import hf_candidates

    unchanged = (lambda shard, size, mtime_ns: False) if reread else syncer.unchanged
    return hf_candidates(path, shards, mapping.dataset, unchanged, mapping.id_column, mapping.speaker_column)


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
    sources = _sources(store, roots, opts, report)
    prober = _Prober(opts.jobs if opts.jobs is not None else min(2, os.cpu_count() or 1))
    bar = progress_bar(opts.progress, unit=" files", desc="scan", smoothing=0.1)
    try:
        for kind, path, src_layout, dataset, folders in sources:
            root_id = _root_row(store, kind, path, src_layout, dataset)
            # dataset rows: a shard reread unchanged (a new mapping) applies ids and labels
            syncer = _Syncer(store, root_id, report, prober, item_sync=kind in ("kaldi", "lhotse", "hf"), moves=kind == "hf")
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
            syncer.settle_moves()
            with store.write() as conn:
                # the layout and name this scan applied (an HF dataset's mapping) are the root's now
                conn.execute("UPDATE roots SET scanned_at = ?, layout = ?, dataset = ? WHERE id = ?",
                             (utcnow(), src_layout, dataset, root_id))
    finally:
        prober.close()
        if bar is not None:
            bar.close()
    report.seconds = round(time.monotonic() - started, 3)
    return report
