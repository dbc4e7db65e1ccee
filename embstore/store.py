"""A store: `manifest.db` (the truth about every file and embedding) + `embeddings.zarr`.

`Store` is the library's front door; the CLI is a thin layer over its methods.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from embstore.arrays import ModelArrays, zarr_path_of


class StoreError(Exception):
    """A problem with the store or a request against it; one line for the user."""


class NewerStoreError(StoreError):
    pass


TASK_STATES = ("pending", "claimed", "done", "failed", "stale")


def utcnow() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def connect(db_path: str | os.PathLike) -> sqlite3.Connection:
    """A connection in autocommit mode: transactions are explicit (`Store.write`)."""
    conn = sqlite3.connect(str(db_path), timeout=60, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout = 60000")
    conn.execute("PRAGMA foreign_keys = ON")
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if mode.lower() != "wal":
        raise StoreError(f"{db_path}: cannot switch SQLite to WAL mode (got {mode}); is it on a network filesystem?")
    # WAL + NORMAL survives process crashes (kill -9) without losing committed work
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.row_factory = sqlite3.Row
    return conn


@contextlib.contextmanager
def immediate(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE ... COMMIT on an autocommit connection; ROLLBACK on any error.

    Taking the write lock at BEGIN means a transaction never fails half-way on a lock
    another writer holds (busy_timeout waits for it instead)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        if conn.in_transaction:  # SQLite already rolled back on SQLITE_FULL / IOERR
            conn.execute("ROLLBACK")
        raise
    else:
        conn.execute("COMMIT")


class Store:
    """Open with `embstore.open(path)`; creates or upgrades the store as needed."""

    def __init__(self, path: str | os.PathLike, create: bool = True):
        self.path = Path(path).expanduser().absolute()
        self.db_path = self.path / "manifest.db"
        if not self.db_path.exists():
            if not create:
                raise StoreError(f"no store at {self.path} (manifest.db missing)")
            if self.path.exists() and not self.path.is_dir():
                raise StoreError(f"{self.path} exists and is not a directory")
            self.path.mkdir(parents=True, exist_ok=True)
        self.conn = connect(self.db_path)
        self._migrate()

    # -- plumbing ---------------------------------------------------------------------

    @property
    def db(self):
        from sqlite_utils import Database

        return Database(self.conn)

    def _migrate(self) -> None:
        from embstore.migrations import LATEST, migrations

        db = self.db
        applied = [m.name for m in migrations.applied(db)]
        unknown = [name for name in applied if name not in LATEST]
        if unknown:
            raise NewerStoreError(
                f"{self.path} was written by a newer embstore (schema {unknown[-1]}); upgrade embstore to open it"
            )
        if len(applied) < len(LATEST):
            with self._write_lock():
                # another process may have migrated while we waited for the lock
                migrations.apply(db)

    @contextlib.contextmanager
    def _write_lock(self) -> Iterator[None]:
        """Serialise migrations between processes opening the same fresh store."""
        import fcntl

        with open(self.path / ".migrate.lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken at once (BEGIN IMMEDIATE) so it never deadlocks."""
        with immediate(self.conn) as conn:
            yield conn

    def query(self, sql: str, params: Sequence[Any] | dict = ()) -> list[sqlite3.Row]:
        return self.conn.execute(sql, params).fetchall()

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def zarr_path(self) -> Path:
        return zarr_path_of(self.path)

    # -- scanning ---------------------------------------------------------------------

    def scan(self, roots: Sequence[str | os.PathLike] = (), **options: Any):
        """Add or refresh files; see `embstore.scan.scan_into` for the options."""
        from embstore.scan import scan_into

        return scan_into(self, roots, **options)

    # -- models -----------------------------------------------------------------------

    def register_model(self, description: dict[str, Any]) -> sqlite3.Row:
        """The `models` row for an encoder's description, created on first use."""
        fp = description["fingerprint"]
        row = self.conn.execute("SELECT * FROM models WHERE fingerprint = ?", (fp,)).fetchone()
        if row is not None:
            return row
        with self.write() as conn:
            row = conn.execute("SELECT * FROM models WHERE fingerprint = ?", (fp,)).fetchone()
            if row is None:
                cur = conn.execute(
                    "INSERT INTO models (name, spec, fingerprint, dim, sample_rate, batching, frontend,"
                    " array_path, rows, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, '', 0, ?)",
                    (
                        description["name"], description["spec"], fp, int(description["dim"]),
                        int(description["sample_rate"]), description["batching"],
                        json.dumps(description.get("frontend", {}), sort_keys=True, default=str), utcnow(),
                    ),
                )
                model_id = cur.lastrowid
                conn.execute("UPDATE models SET array_path = ? WHERE id = ?", (f"m{model_id}-{fp[:12]}", model_id))
                row = conn.execute("SELECT * FROM models WHERE id = ?", (model_id,)).fetchone()
        return row

    def models(self) -> list[sqlite3.Row]:
        return self.query("SELECT * FROM models ORDER BY id")

    def model_key(self, row: sqlite3.Row) -> str:
        """How a model is named to users: its name, plus the fingerprint when names repeat."""
        same = self.conn.execute("SELECT count(*) FROM models WHERE name = ?", (row["name"],)).fetchone()[0]
        return row["name"] if same == 1 else f"{row['name']}@{row['fingerprint'][:8]}"

    def resolve_model(self, model: str | None = None) -> sqlite3.Row:
        """A model row by name, spec, `name@fp` or fingerprint prefix; None = the only one."""
        rows = self.models()
        if not rows:
            raise StoreError(f"{self.path} holds no embeddings yet; run `embstore extract` first")
        if model is None:
            if len(rows) == 1:
                return rows[0]
            names = ", ".join(self.model_key(r) for r in rows)
            raise StoreError(f"the store holds several models ({names}); pick one with --model")
        matches = [
            r for r in rows
            if model in (r["name"], r["spec"], self.model_key(r)) or r["fingerprint"].startswith(model)
        ]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            names = ", ".join(self.model_key(r) for r in rows)
            raise StoreError(f"no model {model!r} in the store (it has: {names})")
        names = ", ".join(self.model_key(r) for r in matches)
        raise StoreError(f"model {model!r} is ambiguous ({names}); use name@fingerprint")

    def model_arrays(self, row: sqlite3.Row) -> ModelArrays:
        return ModelArrays(self.zarr_path, row["array_path"], row["dim"])

    # -- extraction -------------------------------------------------------------------

    def extract(self, **options: Any):
        """Embed every pending item; see `embstore.extract.run.run_extraction`."""
        from embstore.extract.run import run_extraction

        return run_extraction(self, **options)

    # -- reading ----------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        one = lambda sql, p=(): self.conn.execute(sql, p).fetchone()[0]  # noqa: E731
        status: dict[str, Any] = {
            "store": str(self.path),
            "files": one("SELECT count(*) FROM files WHERE status = 'ok'"),
            "items": one("SELECT count(*) FROM items WHERE removed = 0"),
            "speakers": one("SELECT count(DISTINCT speaker) FROM items WHERE removed = 0"),
            "datasets": one("SELECT count(DISTINCT dataset) FROM items WHERE removed = 0"),
            "audio_seconds": round(one("SELECT coalesce(sum(duration), 0) FROM items WHERE removed = 0"), 3),
            "scan_failed": one("SELECT count(*) FROM files WHERE status = 'scan_failed'"),
            "removed_files": one("SELECT count(*) FROM files WHERE status = 'removed'"),
            "models": {},
        }
        for row in self.models():
            counts = dict.fromkeys(TASK_STATES, 0)
            for state, n in self.conn.execute(
                "SELECT t.status, count(*) FROM tasks t JOIN items i ON i.id = t.item_id"
                " WHERE t.model_id = ? AND i.removed = 0 GROUP BY t.status",
                (row["id"],),
            ):
                counts[state] = n
            # items scanned since the last extract have no task yet: they are pending too
            counts["pending"] += one(
                "SELECT count(*) FROM items i WHERE i.removed = 0 AND NOT EXISTS"
                " (SELECT 1 FROM tasks t WHERE t.item_id = i.id AND t.model_id = ?)",
                (row["id"],),
            )
            counts.update(
                {"batching": row["batching"], "dim": row["dim"], "fingerprint": row["fingerprint"], "rows": row["rows"]}
            )
            counts["failures_by_reason"] = group_reasons(
                self.conn.execute(
                    # live items only, like the counts above: the reasons add up to "failed"
                    "SELECT coalesce(t.stage, '?') || ': ' || coalesce(t.error, '?'), count(*) FROM tasks t"
                    " JOIN items i ON i.id = t.item_id WHERE t.model_id = ? AND t.status = 'failed'"
                    " AND i.removed = 0 GROUP BY 1 ORDER BY 2 DESC LIMIT 100000",
                    (row["id"],),
                )
            )
            last = self.conn.execute(
                "SELECT summary, status, ended_at FROM runs WHERE model_id = ? AND summary IS NOT NULL"
                " ORDER BY id DESC LIMIT 1",
                (row["id"],),
            ).fetchone()
            if last is not None:
                run = json.loads(last["summary"])
                # how the last run batched (masked / equal / any), on what runtime, how well
                counts["last_run"] = {
                    key: run.get(key)
                    for key in ("batching", "runtime", "features", "mean_batch_items", "padding_overhead",
                                "items_per_second", "x_realtime", "done", "failed", "devices")
                } | {"status": last["status"], "ended_at": last["ended_at"]}
            status["models"][self.model_key(row)] = counts
        status["scan_failures_by_reason"] = group_reasons(
            self.conn.execute(
                "SELECT error, count(*) FROM files WHERE status = 'scan_failed' GROUP BY error ORDER BY 2 DESC"
                " LIMIT 100000"
            )
        )
        return status

    def errors(self, model: str | None = None) -> list[dict[str, Any]]:
        """Failed items (per model) and files whose header could not be read."""
        out: list[dict[str, Any]] = []
        models = [self.resolve_model(model)] if model or len(self.models()) == 1 else self.models()
        for m in models:
            for r in self.conn.execute(
                "SELECT i.uid, r.path AS root, f.path, t.stage, t.error, t.attempts FROM tasks t"
                " JOIN items i ON i.id = t.item_id JOIN files f ON f.id = i.file_id JOIN roots r ON r.id = f.root_id"
                " WHERE t.model_id = ? AND t.status = 'failed' AND i.removed = 0 ORDER BY i.id",
                (m["id"],),
            ):
                out.append(
                    {
                        "id": r["uid"], "path": os.path.join(r["root"], r["path"]), "stage": r["stage"] or "extract",
                        "error": r["error"], "attempts": r["attempts"], "model": self.model_key(m),
                    }
                )
        for r in self.conn.execute(
            "SELECT r.path AS root, f.path, f.error FROM files f JOIN roots r ON r.id = f.root_id"
            " WHERE f.status = 'scan_failed' ORDER BY f.id"
        ):
            path = os.path.join(r["root"], r["path"])
            out.append({"id": None, "path": path, "stage": "scan", "error": r["error"], "attempts": 0, "model": None})
        return out

    def done_rows(
        self,
        model: str | None = None,
        speaker: str | None = None,
        dataset: str | None = None,
        ids: Sequence[str] | None = None,
    ) -> tuple[sqlite3.Row, list[sqlite3.Row]]:
        """(model row, [(uid, speaker, dataset, row, path...)]) of finished, current items."""
        m = self.resolve_model(model)
        # unary + keeps SQLite off the items_uid_removed index when a narrower one applies
        narrow = speaker is not None or ids is not None
        where = ["t.model_id = ?", "t.status = 'done'", "+i.removed = 0" if narrow else "i.removed = 0"]
        params: list[Any] = [m["id"]]
        if speaker is not None:
            where.append("i.speaker = ?")
            params.append(speaker)
        if dataset is not None:
            where.append("i.dataset = ?")
            params.append(dataset)
        select = "SELECT i.id AS item_id, i.uid, i.speaker, i.dataset, i.start, i.end, t.row, f.path, r.path AS root"
        joins = " JOIN files f ON f.id = i.file_id JOIN roots r ON r.id = f.root_id"
        if ids is not None:
            # look the ids up by their unique index instead of reading every done row
            wanted = list(dict.fromkeys(ids))
            rows: list[sqlite3.Row] = []
            for start in range(0, len(wanted), 900):
                chunk = wanted[start : start + 900]
                rows += self.query(
                    select + " FROM items i CROSS JOIN tasks t ON t.item_id = i.id" + joins + " WHERE "
                    + " AND ".join(where) + f" AND i.uid IN ({','.join('?' * len(chunk))})",
                    [*params, *chunk],
                )
            rows.sort(key=lambda r: r["item_id"])
            return m, rows
        # with a speaker, start from its items (items_speaker index): CROSS JOIN fixes the
        # join order, else SQLite walks every done task of the model (~0.4 s at 1 M rows)
        source = " FROM items i CROSS JOIN tasks t ON t.item_id = i.id" if speaker is not None else (
            " FROM tasks t JOIN items i ON i.id = t.item_id"
        )
        sql = select + source + joins + " WHERE " + " AND ".join(where) + " ORDER BY i.id"
        return m, self.query(sql, params)

    def embeddings(
        self,
        model: str | None = None,
        speaker: str | None = None,
        dataset: str | None = None,
    ) -> tuple[list[str], np.ndarray]:
        """(item ids, float32 [n, dim] vectors in the same order) of finished items."""
        m, rows = self.done_rows(model, speaker, dataset)
        vectors = self.model_arrays(m).read_rows(np.array([r["row"] for r in rows], dtype=np.int64))
        return [r["uid"] for r in rows], vectors

    # -- queries, scoring, exports (embstore.query / score / export) ------------------

    def speakers(self, model: str | None = None) -> list[dict[str, Any]]:
        """Speakers with their datasets, live items and done items; see `embstore.query.speakers`."""
        from embstore.query import speakers

        return speakers(self, model)

    def speaker_items(self, speaker: str, model: str | None = None, vectors: bool = False) -> list[dict[str, Any]]:
        """One speaker's items (with embeddings when `vectors`); see `embstore.query.speaker_items`."""
        from embstore.query import speaker_items

        return speaker_items(self, speaker, model, vectors)

    def similar(
        self,
        item_id: str | None = None,
        audio: str | os.PathLike | None = None,
        k: int = 10,
        model: str | None = None,
        vector: np.ndarray | None = None,
    ) -> list[dict[str, Any]]:
        """Cosine nearest neighbours [{id, speaker, dataset, path, score}]; see `embstore.query.similar`."""
        from embstore.query import similar

        return similar(self, item_id=item_id, audio=audio, k=k, model=model, vector=vector)

    def centroids(self, model: str | None = None) -> tuple[list[str], np.ndarray]:
        """(speakers, float32 [n, dim] mean L2-normalised embedding per speaker)."""
        from embstore.query import centroids

        return centroids(self, model)

    def score(self, trials: str | os.PathLike | Sequence[str | os.PathLike], model: str | None = None,
              **options: Any) -> dict[str, Any]:
        """EER, minDCF, actual DCF of trial lists under none/mean/S-norm/AS-norm; score files
        and plots. See `embstore.eval.scoring.score` for the options."""
        from embstore.eval.scoring import score

        return score(self, trials, model=model, **options)

    def outliers(self, model: str | None = None, **options: Any) -> list[dict[str, Any]]:
        """Items furthest from their own speaker; see `embstore.eval.outliers.find_outliers`."""
        from embstore.eval.outliers import find_outliers

        return find_outliers(self, model=model, **options)

    def report(self, out: str | os.PathLike, **options: Any) -> dict[str, Any]:
        """Write the self-contained HTML report; see `embstore.eval.report.build_report`."""
        from embstore.eval.report import build_report

        return build_report(self, out, **options)

    def export_pkl(self, out: str | os.PathLike, **options: Any):
        """One pickle per item under OUT; see `embstore.export.export_pkl`."""
        from embstore.export import export_pkl

        return export_pkl(self, out, **options)

    def export_kaldi(self, out: str | os.PathLike, model: str | None = None) -> dict[str, Any]:
        from embstore.export import export_kaldi

        return export_kaldi(self, out, model)

    def export_npy(self, out: str | os.PathLike, model: str | None = None) -> dict[str, Any]:
        from embstore.export import export_npy

        return export_npy(self, out, model)


_QUOTED_PATH = re.compile(r"""(['"])[^'"]*[/\\][^'"]*\1""")
_BARE_PATH = re.compile(r"(?<![\w.])/[^\s:;,'\"()]+")
_BIG_NUMBER = re.compile(r"\d{3,}")


def reason_key(message: str | None) -> str:
    """A failure message without what makes each one unique (paths, counts), so that
    failures group by their cause."""
    text = _QUOTED_PATH.sub("'...'", message or "?")
    text = _BARE_PATH.sub("<path>", text)
    return _BIG_NUMBER.sub("N", text)


def group_reasons(rows: Iterable[tuple[str | None, int]], top: int = 20) -> dict[str, int]:
    """{reason: count} of the `top` most frequent reasons, messages grouped by `reason_key`."""
    grouped: dict[str, int] = {}
    for message, n in rows:
        key = reason_key(message)
        grouped[key] = grouped.get(key, 0) + n
    return dict(sorted(grouped.items(), key=lambda kv: -kv[1])[:top])


def wait_for(predicate, timeout: float, interval: float = 0.05) -> bool:
    """Poll `predicate` until true or `timeout` seconds pass (tests and shutdown paths)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
