"""Embeddings out of the store: one pickle per item, Kaldi ark/scp, or one NumPy matrix.

`export_pkl` keeps the layout older scripts wrote, `OUT/<dataset>/<speaker>/<stem>.pkl`,
so code that globs those files keeps working, without their collisions (with
by="cluster" the folder is the pseudo-speaker of `embstore cluster` instead,
`OUT/<dataset>/<cluster>/<stem>.pkl`, and unclustered items are left out):

- an item's name is its file's stem; a Kaldi item (segment or recording), a Lhotse
  supervision or a dataset row is named by its id, since it has no file of its own;
- when two live items of one speaker share a name (VoxCeleb's `id/video/00001.wav`),
  each of them is written at its path below the speaker folder instead
  (`OUT/ds/id/video/00001.pkl`); items with a unique name stay flat;
- every path component is sanitised (`/`, `\\`, NUL and control characters become `_`;
  `.`, `..` and empty names get a `_` prefix; very long names are shortened with a
  hash), and a directory that still resolves outside OUT (a symlink) is refused;
- anything still colliding (case-insensitively) gets a short hash of its item id.

Exports are incremental: `OUT/.embstore-export.db` (SQLite) records, per item id, the
model fingerprint, row and path written, so a second export writes only new or changed
items, moves items whose path changed, and deletes the files of items that are gone
from the store (only files it wrote itself).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pickle
import sqlite3
import time
from collections import Counter, defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np

from embstore.api import Report
from embstore.errors import StoreError
from embstore.export.files import export_outcome, group_of, grouped, inside, output_folder, safe_component
from embstore.manifest.clusters import check_by
from embstore.paths import write_atomic
from embstore.manifest.connection import immediate
from embstore.manifest.database import Manifest
from embstore.manifest.registry import ModelRecord
from embstore.manifest.selection import Selection, select_items
from embstore.outcome import Outcome
from embstore.progress import progress_bar, rate

INDEX_NAME = ".embstore-export.db"
FORMATS = ("dict", "array")
BATCH_ROWS = 4096
FILES_PER_TASK = 64


# -- paths --------------------------------------------------------------------------------


# items without a file of their own (a Kaldi segment or recording, a Lhotse supervision,
# a dataset row) are named by their id
NAMED_BY_ID = ("kaldi", "lhotse", "hf")


def _flat_name(item: sqlite3.Row) -> str:
    if item["root_kind"] in NAMED_BY_ID:
        return item["uid"]
    return os.path.splitext(os.path.basename(item["path"]))[0]


def _below_speaker(item: sqlite3.Row) -> list[str]:
    """The item's path below its speaker folder, taken from its id (which, unlike the
    file's stem, stays unique when a.wav and a.flac sit side by side)."""
    uid = item["uid"]
    if item["root_kind"] in NAMED_BY_ID:
        return [uid]
    rel = uid
    for prefix in (f"{item['dataset']}/{item['speaker']}/", f"{item['dataset']}/"):
        if uid.startswith(prefix):
            rel = uid[len(prefix) :]
            break
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    return parts or [uid]


def pkl_paths(
    items: Sequence[sqlite3.Row], taken: dict[str, str] | None = None, by: str = "speaker"
) -> dict[str, str]:
    """{item id: path relative to OUT} under the rules in this module's docstring.

    `items` must hold every live item of each (dataset, speaker) it touches, done or not,
    so a name a pending item will need is never handed to another. `taken` maps paths
    (case-folded) already used by other item ids, which then are not reused. by="cluster"
    names the folder below the dataset by the item's cluster label (never None here)."""
    folder_of = check_by(by)
    groups: dict[tuple, list[sqlite3.Row]] = defaultdict(list)
    for item in items:
        groups[(item["dataset"], item[folder_of])].append(item)
    paths: dict[str, str] = {}
    for (dataset, speaker), members in groups.items():
        folder = [safe_component(dataset), safe_component(speaker)]
        names = {m["uid"]: safe_component(_flat_name(m)) for m in members}
        counts = Counter(n.casefold() for n in names.values())
        for m in members:
            name = names[m["uid"]]
            if counts[name.casefold()] == 1:
                parts = [name]
            else:
                parts = [safe_component(p) for p in _below_speaker(m)]
            paths[m["uid"]] = "/".join(folder + parts[:-1] + [parts[-1] + ".pkl"])
    # sanitising can map different names onto one (a/b and a_b): give those a hash
    holders: dict[str, list[str]] = defaultdict(list)
    for uid, path in paths.items():
        holders[path.casefold()].append(uid)
    for key, uids in holders.items():
        other = (taken or {}).get(key)
        if len(uids) == 1 and (other is None or other == uids[0]):
            continue
        for uid in uids:
            digest = hashlib.blake2b(uid.encode("utf-8", "surrogatepass"), digest_size=4).hexdigest()
            paths[uid] = paths[uid][: -len(".pkl")] + f"~{digest}.pkl"
    return paths


# -- pickles ------------------------------------------------------------------------------


class _PortablePickler(pickle.Pickler):
    """Pickles 1-D arrays as `numpy.frombuffer(bytearray, dtype)`: loadable (and writable)
    with NumPy 1.x or 2.x alike; NumPy 2's own reduction names `numpy._core`, which
    NumPy 1.x cannot import."""

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is np.ndarray and obj.ndim == 1 and obj.dtype.kind == "f":
            return np.frombuffer, (bytearray(obj.tobytes()), obj.dtype.str)
        return NotImplemented


def dumps(obj: Any) -> bytes:
    buffer = io.BytesIO()
    _PortablePickler(buffer, protocol=4).dump(obj)
    return buffer.getvalue()


# -- the export index: its own database, not the store's Manifest ----------------------------


class _ExportIndex:
    """OUT/.embstore-export.db: what this folder's files hold, keyed by item id."""

    def __init__(self, out: str):
        self.path = os.path.join(out, INDEX_NAME)
        try:
            self.conn = sqlite3.connect(self.path, isolation_level=None, timeout=60)
            self.conn.execute("PRAGMA journal_mode = WAL")
            self.conn.execute("PRAGMA synchronous = NORMAL")
            self.conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
            self.conn.execute(
                "CREATE TABLE IF NOT EXISTS files (uid TEXT PRIMARY KEY, fingerprint TEXT NOT NULL,"
                " row INTEGER NOT NULL, path TEXT NOT NULL, dataset TEXT, speaker TEXT, digest TEXT NOT NULL)"
            )
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: cannot use the export index ({exc})") from None

    def meta(self) -> dict[str, str]:
        return dict(self.conn.execute("SELECT key, value FROM meta").fetchall())

    def set_meta(self, values: dict[str, str]) -> None:
        self.conn.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", list(values.items()))

    def entries(self) -> dict[str, tuple]:
        return {
            r[0]: r[1:] for r in self.conn.execute("SELECT uid, fingerprint, row, path, dataset, speaker, digest FROM files")
        }

    def record(self, rows: list[tuple]) -> None:
        with self.transaction():
            self.conn.executemany(
                "INSERT OR REPLACE INTO files (uid, fingerprint, row, path, dataset, speaker, digest)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                rows,
            )

    def forget(self, uids: list[str]) -> None:
        with self.transaction():
            self.conn.executemany("DELETE FROM files WHERE uid = ?", [(u,) for u in uids])

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        with immediate(self.conn):
            yield

    def close(self) -> None:
        self.conn.close()


# -- export-pkl ---------------------------------------------------------------------------


@dataclass
class ExportReport(Report):
    out: str
    model: str
    fingerprint: str
    format: str
    items: int = 0          # done items selected
    written: int = 0        # new or changed files written
    unchanged: int = 0      # already there, same row, model and path
    moved: int = 0          # rewritten at a new path (a later item made their name collide)
    removed: int = 0        # files of items gone from the store, deleted
    by: str = "speaker"     # folders named by the speaker label or the cluster label
    left_out: int = 0       # done items with by="cluster" but no cluster label: not written
    seconds: float = 0.0
    # done / failed / left over the selected items (the exit status)
    outcome: Outcome = field(default_factory=Outcome)

    @property
    def files_per_second(self) -> float:
        return rate(self.written, self.seconds)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"files_per_second": round(self.files_per_second, 1), "outcome": self.outcome.as_dict()}


@dataclass(frozen=True)
class ExportOptions:
    """What `export_pkl` writes; checked when made.

    model: the model (the only one by default). dataset / speaker: only those items.
    fmt="dict": {"embedding": float32 array, "id", "speaker", "dataset", "cluster"
    (pseudo-speaker label or None), "path" (source audio), "start", "end" (seconds, None
    for whole files), "model", "fingerprint"}; fmt="array": the bare float32 array.
    threads: writing files (default 2 per CPU, at most 16). force: rewrite every file.
    by="cluster": folders by pseudo-speaker. progress: a bar on stderr."""

    model: str | None = None
    dataset: str | None = None
    speaker: str | None = None
    fmt: str = "dict"
    threads: int | None = None
    force: bool = False
    progress: bool = False
    by: str = "speaker"

    def __post_init__(self) -> None:
        if self.fmt not in FORMATS:
            raise StoreError(f"unknown format {self.fmt!r}: use one of {', '.join(FORMATS)}")
        if check_by(self.by) == "cluster" and self.speaker is not None:
            # a speaker filter would cut pseudo-speaker folders apart, and names could collide unseen
            raise StoreError("--speaker selects a real speaker; with --by cluster select a --dataset instead")
        if self.threads is not None and self.threads < 1:
            raise StoreError(f"threads must be at least 1 (got {self.threads})")


def export_pkl(store: Manifest, out: str | os.PathLike, options: ExportOptions | None = None) -> ExportReport:
    """Write one pickle per done item under OUT (see the module docstring for paths and
    `ExportOptions` for what is written)."""
    opts = options or ExportOptions()
    model, dataset, speaker, fmt, by = opts.model, opts.dataset, opts.speaker, opts.fmt, opts.by
    threads, force, progress = opts.threads, opts.force, opts.progress
    started = time.monotonic()
    m = store.resolve_model(model)
    out_path = os.path.abspath(os.fspath(out))
    if os.path.exists(out_path) and not os.path.isdir(out_path):
        raise StoreError(f"{out_path} exists and is not a folder")
    output_folder(out_path)
    out_real = os.path.realpath(out_path)
    report = ExportReport(out_path, store.model_key(m), m.fingerprint, fmt, by=by)
    index = _ExportIndex(out_real)
    try:
        meta = index.meta()
        if meta.get("fingerprint") not in (None, m.fingerprint):
            raise StoreError(
                f"{out_path} holds an export of model {meta.get('model')} ({meta['fingerprint'][:12]});"
                f" export {report.model} into another folder"
            )
        index.set_meta({"fingerprint": m.fingerprint, "model": report.model, "format": fmt})
        known = index.entries()
        selected = select_items(store.conn, m.id, Selection(speaker=speaker, dataset=dataset), done_only=False)
        # an unclustered item is out of this export's scope: its old file (if any) is removed
        items, _ = grouped(selected, by)
        report.left_out = sum(1 for it in selected if _is_done(it) and group_of(it, by) is None)

        def in_scope(entry: tuple) -> bool:
            return (dataset is None or entry[3] == dataset) and (speaker is None or entry[4] == speaker)

        # the selection is every live item in scope: an entry in scope but not selected is gone
        taken = {entry[2].casefold(): uid for uid, entry in known.items() if not in_scope(entry)}
        paths = pkl_paths(items, taken, by)
        done = [it for it in items if _is_done(it)]
        report.items = len(done)
        todo = []
        for it in done:
            digest = _digest(it, fmt, report.model)
            entry = known.get(it["uid"])
            if not force and entry is not None and entry[:3] == (m.fingerprint, it["row"], paths[it["uid"]]) and (
                entry[5] == digest
            ):
                report.unchanged += 1
                continue
            todo.append((it, paths[it["uid"]], digest, entry[2] if entry else None))
        _write_all(store, m, out_real, todo, fmt, report, index, threads, progress)
        alive = {it["uid"] for it in done}
        gone = [(uid, entry[2]) for uid, entry in known.items() if uid not in alive and in_scope(entry)]
        # deletions come after every write, and spare every path in use now: a moved or
        # gone item's old path may have become another item's path
        current = {paths[uid].casefold() for uid in alive}
        for old in {old for _, rel, _, old in todo if old is not None and old != rel}:
            if old.casefold() not in current:
                with contextlib.suppress(OSError):
                    _remove_file(out_real, old)
        for _, rel in gone:
            if rel.casefold() not in current:
                with contextlib.suppress(OSError):
                    report.removed += _remove_file(out_real, rel)
        index.forget([uid for uid, _ in gone])
    finally:
        index.close()
    report.outcome = export_outcome(store, m, Selection(speaker=speaker, dataset=dataset), report.left_out)
    report.seconds = round(time.monotonic() - started, 3)
    return report


def _is_done(item: sqlite3.Row) -> bool:
    return item["status"] == "done" and item["row"] is not None


def _digest(item: sqlite3.Row, fmt: str, model_name: str) -> str:
    """What else a pickle holds; when it changes (speaker, source path...) it is rewritten."""
    text = "\0".join(
        str(x) for x in (fmt, model_name, item["dataset"], item["speaker"], item["cluster"], item["root"],
                         item["path"], item["start"], item["end"])
    )
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()


def _write_all(
    store: Manifest, m: ModelRecord, out_real: str, todo: list[tuple], fmt: str, report: ExportReport,
    index: _ExportIndex, threads: int | None, progress: bool,
) -> None:
    try:
        _write_files(store, m, out_real, todo, fmt, report, index, threads, progress)
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        raise StoreError(f"cannot write to {out_real}: {exc.strerror or exc}{where}") from None


def _write_files(store, m, out_real, todo, fmt, report, index, threads, progress) -> None:
    if not todo:
        return
    dirs = sorted({os.path.dirname(path) for _, path, _, _ in todo})
    for rel_dir in dirs:
        inside(out_real, rel_dir)  # before creating anything: a symlinked folder is refused
        os.makedirs(os.path.join(out_real, rel_dir), exist_ok=True)
        inside(out_real, rel_dir)
    todo.sort(key=lambda t: t[0]["row"])  # rows in order: each Zarr chunk is read once
    arrays = store.model_arrays(m)
    bar = progress_bar(progress, total=len(todo), unit="file", desc="export")
    # file creation is filesystem-bound; past ~2 threads per core they only contend for the GIL
    threads = threads or min(16, 2 * (os.cpu_count() or 1))
    fingerprint, model_name = m.fingerprint, report.model

    def payload(item: sqlite3.Row, vector: np.ndarray) -> bytes:
        if fmt == "array":
            return dumps(vector)
        return dumps({
            "embedding": vector, "id": item["uid"], "speaker": item["speaker"], "dataset": item["dataset"],
            "cluster": item["cluster"], "path": os.path.join(item["root"], item["path"]),
            "start": item["start"], "end": item["end"],
            "model": model_name, "fingerprint": fingerprint,
        })

    def write_some(jobs: list[tuple], vectors: np.ndarray) -> None:
        for (item, rel, _, _), vector in zip(jobs, vectors):
            write_atomic(os.path.join(out_real, rel), payload(item, vector))

    def finish(batch: list[tuple], futures: list[Future]) -> None:
        for f in futures:
            f.result()
        index.record([
            (item["uid"], fingerprint, item["row"], rel, item["dataset"], item["speaker"], digest)
            for item, rel, digest, _ in batch
        ])
        report.written += len(batch)
        report.moved += sum(1 for _, rel, _, old in batch if old is not None and old != rel)
        if bar is not None:
            bar.update(len(batch))

    pending: tuple[list, list] | None = None
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="export") as pool:
        try:
            for start in range(0, len(todo), BATCH_ROWS):
                batch = todo[start : start + BATCH_ROWS]
                vectors = arrays.read_rows(np.array([job[0]["row"] for job in batch], dtype=np.int64))
                # a few dozen files per task: one future per file costs more than its write
                futures = [
                    pool.submit(write_some, batch[k : k + FILES_PER_TASK], vectors[k : k + FILES_PER_TASK])
                    for k in range(0, len(batch), FILES_PER_TASK)
                ]
                # read the next batch while this one is written
                if pending is not None:
                    finish(*pending)
                pending = (batch, futures)
            if pending is not None:
                finish(*pending)
        finally:
            if bar is not None:
                bar.close()


def _remove_file(out_real: str, rel: str) -> bool:
    path = os.path.join(out_real, rel)
    real_dir = os.path.realpath(os.path.dirname(path))
    if real_dir != out_real and not real_dir.startswith(out_real + os.sep):
        return False
    if os.path.islink(path) or not os.path.isfile(path):
        return False
    os.unlink(path)
    # drop folders the export made empty, never OUT itself
    parent = os.path.dirname(path)
    while parent != out_real and parent.startswith(out_real + os.sep):
        try:
            os.rmdir(parent)
        except OSError:
            break
        parent = os.path.dirname(parent)
    return True
