"""`Manifest`: one store's open `manifest.db`, with its model registry.

Every layer above works through a `Manifest` (the front door's `Store` is one): its
connection for reads, `write()` for a transaction, the models it knows and the arrays
of each."""

from __future__ import annotations

import contextlib
import os
import sqlite3
from pathlib import Path
from typing import Any, Iterator, Sequence

from embstore.arrays.zarr_arrays import ModelArrays
from embstore.errors import StoreError
from embstore.manifest import registry
from embstore.manifest.connection import connect, immediate
from embstore.manifest.registry import ModelRecord
from embstore.manifest.schema import migrate
from embstore.manifest.selection import Selection, select_items
from embstore.paths import StorePaths


class Manifest:
    """The store at `path`, created (`create`) or upgraded as needed."""

    def __init__(self, path: str | os.PathLike, create: bool = True):
        self.paths = StorePaths.of(path)
        self.path: Path = self.paths.root
        self.db_path: Path = self.paths.manifest
        if not self.db_path.exists():
            if not create:
                raise StoreError(f"no store at {self.path} (manifest.db missing)")
            if self.path.exists() and not self.path.is_dir():
                raise StoreError(f"{self.path} exists and is not a directory")
            self.path.mkdir(parents=True, exist_ok=True)
        self.conn = connect(self.db_path)
        migrate(self.conn, self.path, self.paths.lock("migrate"))

    # -- SQL ----------------------------------------------------------------------------

    @property
    def db(self) -> Any:
        """The manifest as a `sqlite_utils.Database`, for ad-hoc inspection."""
        from sqlite_utils import Database

        return Database(self.conn)

    @contextlib.contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken at once (BEGIN IMMEDIATE) so it never deadlocks."""
        with immediate(self.conn) as conn:
            yield conn

    def query(self, sql: str, params: Sequence[Any] | dict = ()) -> list[sqlite3.Row]:
        return self.conn.execute(sql, params).fetchall()

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "Manifest":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- models -------------------------------------------------------------------------

    def register_model(self, description: dict[str, Any]) -> ModelRecord:
        return registry.register_model(self.conn, description)

    def models(self) -> list[ModelRecord]:
        return registry.model_rows(self.conn)

    def model_key(self, row: ModelRecord) -> str:
        return registry.model_key(self.conn, row)

    def resolve_model(self, model: str | None = None, kind: str | None = "item") -> ModelRecord:
        """A model by name (see `registry.resolve_model`); `kind` "item", "windows" or None (any)."""
        return registry.resolve_model(self.conn, str(self.path), model, kind)

    @property
    def zarr_path(self) -> Path:
        return self.paths.arrays

    def model_arrays(self, row: ModelRecord) -> ModelArrays:
        return ModelArrays(self.paths.arrays, row.array_path, row.dim, spans=row.windowed)

    # -- reading ------------------------------------------------------------------------

    def done_rows(
        self,
        model: str | None = None,
        speaker: str | None = None,
        dataset: str | None = None,
        ids: Sequence[str] | None = None,
        kind: str | None = "item",
    ) -> tuple[ModelRecord, list[sqlite3.Row]]:
        """(model record, rows of `selection.COLUMNS`) of finished, live items, in item order."""
        m = self.resolve_model(model, kind)
        return m, select_items(self.conn, m.id, Selection(speaker, dataset, ids))
