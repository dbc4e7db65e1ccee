"""The manifest's schema, one migration per change.

Never edit a migration that has shipped: add a new one. A store made by an older
embstore is upgraded in place when opened; a store whose applied migrations include
names this version does not know was made by a newer embstore and is refused.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

from embstore.errors import NewerStoreError
from embstore.paths import file_lock

migrations = Migrations("embstore")


@migrations()
def m001_initial(db: Database) -> None:
    db.execute(
        """
        CREATE TABLE roots (
            id INTEGER PRIMARY KEY,
            kind TEXT NOT NULL,              -- tree | kaldi | list
            path TEXT NOT NULL,              -- absolute; files' paths are relative to it
            layout TEXT,                     -- dataset | speaker (trees)
            dataset TEXT,                    -- fixed dataset name (speaker layout, kaldi, list)
            created_at TEXT NOT NULL,
            scanned_at TEXT,
            UNIQUE (kind, path)
        )
        """
    )
    db.execute(
        """
        CREATE TABLE files (
            id INTEGER PRIMARY KEY,
            root_id INTEGER NOT NULL REFERENCES roots(id),
            dir TEXT NOT NULL,               -- folder of path, for per-folder rescans
            path TEXT NOT NULL,              -- relative to the root (absolute for kaldi/list inputs)
            dataset TEXT,
            speaker TEXT,
            size INTEGER,
            mtime_ns INTEGER,
            sample_rate INTEGER,
            channels INTEGER,
            frames INTEGER,
            duration REAL,
            subtype TEXT,
            content_hash TEXT,               -- filled by extraction, which reads the bytes anyway
            status TEXT NOT NULL,            -- ok | scan_failed | removed
            error TEXT,
            scanned_at TEXT NOT NULL,
            UNIQUE (root_id, path)
        )
        """
    )
    db.execute("CREATE INDEX files_root_dir ON files (root_id, dir)")
    db.execute(
        """
        CREATE TABLE items (
            id INTEGER PRIMARY KEY,
            uid TEXT NOT NULL UNIQUE,        -- utterance id: kaldi id or path without extension
            file_id INTEGER NOT NULL REFERENCES files(id),
            dataset TEXT,
            speaker TEXT,
            start REAL,                      -- seconds; NULL = whole file
            end REAL,
            duration REAL,
            removed INTEGER NOT NULL DEFAULT 0
        )
        """
    )
    db.execute("CREATE INDEX items_file ON items (file_id)")
    db.execute("CREATE INDEX items_speaker ON items (speaker, dataset)")
    db.execute(
        """
        CREATE TABLE models (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL,
            spec TEXT NOT NULL,
            fingerprint TEXT NOT NULL UNIQUE,
            dim INTEGER NOT NULL,
            sample_rate INTEGER NOT NULL,
            batching TEXT NOT NULL,
            frontend TEXT NOT NULL,          -- JSON
            array_path TEXT NOT NULL,        -- group inside embeddings.zarr
            rows INTEGER NOT NULL DEFAULT 0, -- committed rows; anything past it is garbage
            created_at TEXT NOT NULL
        )
        """
    )
    db.execute(
        """
        CREATE TABLE tasks (
            id INTEGER PRIMARY KEY,
            item_id INTEGER NOT NULL REFERENCES items(id),
            model_id INTEGER NOT NULL REFERENCES models(id),
            status TEXT NOT NULL,            -- pending | claimed | done | failed | stale
            length INTEGER NOT NULL,         -- predicted feature frames, for exact batching
            owner TEXT,
            lease_until REAL,
            attempts INTEGER NOT NULL DEFAULT 0,
            error TEXT,
            row INTEGER,                     -- row in the model's zarr array once done
            run_id INTEGER,
            done_at REAL,
            UNIQUE (item_id, model_id)
        )
        """
    )
    db.execute("CREATE INDEX tasks_claim ON tasks (model_id, status, length, item_id)")
    db.execute("CREATE INDEX tasks_owner ON tasks (owner) WHERE owner IS NOT NULL")
    db.execute(
        """
        CREATE TABLE runs (
            id INTEGER PRIMARY KEY,
            model_id INTEGER REFERENCES models(id),
            host TEXT,
            pid INTEGER,
            options TEXT,                    -- JSON
            started_at TEXT NOT NULL,
            ended_at TEXT,
            status TEXT NOT NULL,            -- running | finished | interrupted | crashed
            items_done INTEGER NOT NULL DEFAULT 0,
            items_failed INTEGER NOT NULL DEFAULT 0,
            audio_seconds REAL NOT NULL DEFAULT 0,
            summary TEXT                     -- JSON
        )
        """
    )


@migrations()
def m002_failure_stage_and_dedup(db: Database) -> None:
    # where an item failed (read, decode, features, model, write), for `embstore errors`
    db.execute("ALTER TABLE tasks ADD COLUMN stage TEXT")
    # dedup looks up finished work by the audio's content hash
    db.execute("CREATE INDEX files_content_hash ON files (content_hash) WHERE content_hash IS NOT NULL")
    db.execute("CREATE INDEX items_uid_removed ON items (removed, id)")
    # claims in scan order (models that batch any lengths) keep a speaker's rows together
    db.execute("CREATE INDEX tasks_claim_item ON tasks (model_id, status, item_id)")


@migrations()
def m003_done_rows_index(db: Database) -> None:
    # nearest-neighbour queries map candidate zarr rows back to their (deduplicated) items
    db.execute("CREATE INDEX tasks_done_row ON tasks (model_id, row) WHERE status = 'done'")


@migrations()
def m004_windows_speech_diarization(db: Database) -> None:
    # window models: a done task owns `row_count` rows from `row` on (NULL: one row)
    db.execute("ALTER TABLE tasks ADD COLUMN row_count INTEGER")
    db.execute("ALTER TABLE models ADD COLUMN kind TEXT NOT NULL DEFAULT 'item'")  # item | windows
    # speech regions per item and VAD setting, so a rerun or a second model reuses them
    db.execute(
        """
        CREATE TABLE speech (
            item_id INTEGER NOT NULL REFERENCES items(id),
            vad TEXT NOT NULL,               -- the VAD's key (method and settings)
            regions TEXT NOT NULL,           -- JSON [[start, end], ...] seconds from the item's start
            created_at TEXT NOT NULL,
            PRIMARY KEY (item_id, vad)
        )
        """
    )
    # pseudo-speaker labels from corpus clustering, beside the real label
    db.execute("ALTER TABLE items ADD COLUMN cluster TEXT")
    db.execute("CREATE INDEX items_cluster ON items (cluster) WHERE cluster IS NOT NULL")
    db.execute(
        """
        CREATE TABLE diarization (
            item_id INTEGER NOT NULL REFERENCES items(id),
            model_id INTEGER NOT NULL REFERENCES models(id),
            params TEXT NOT NULL,            -- JSON: method, speaker count options
            speakers INTEGER NOT NULL,
            segments TEXT NOT NULL,          -- JSON [[start, end, label], ...]
            created_at TEXT NOT NULL,
            PRIMARY KEY (item_id, model_id, params)
        )
        """
    )


@migrations()
def m005_poison_items(db: Database) -> None:
    # a task whose worker died while holding it (in a claim of several): claimed alone
    # from then on, so the next death, if any, points at this item only
    db.execute("ALTER TABLE tasks ADD COLUMN suspect INTEGER NOT NULL DEFAULT 0")
    # the workers that died while holding this task alone (JSON list); two different
    # ones and the task fails with stage 'crash'
    db.execute("ALTER TABLE tasks ADD COLUMN crashed_workers TEXT")
    db.execute("CREATE INDEX tasks_suspect ON tasks (model_id, status, item_id) WHERE suspect = 1")


@migrations()
def m006_run_process_start(db: Database) -> None:
    # the start mark of a run's process (`embstore.processes`): a PID alone cannot tell a
    # dead run from a zombie or from an unrelated process that was given the same PID
    db.execute("ALTER TABLE runs ADD COLUMN pid_start TEXT")


LATEST = [m.name for m in migrations._migrations]


def migrate(conn: sqlite3.Connection, store_root: Path, lock_path: Path) -> None:
    """Bring the schema up to date; refuse a store written by a newer embstore.

    Migrations run under a file lock, so processes opening one fresh store together
    apply them once."""
    db = Database(conn)
    applied = [m.name for m in migrations.applied(db)]
    unknown = [name for name in applied if name not in LATEST]
    if unknown:
        raise NewerStoreError(
            f"{store_root} was written by a newer embstore (schema {unknown[-1]}); upgrade embstore to open it"
        )
    if len(applied) < len(LATEST):
        with file_lock(lock_path):
            # another process may have migrated while we waited for the lock
            migrations.apply(db)
