"""The `models` table: one row per model fingerprint, and how users name models."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from embstore.errors import StoreError
from embstore.manifest.connection import immediate, utcnow


def model_row(conn: sqlite3.Connection, model_id: int) -> sqlite3.Row:
    row = conn.execute("SELECT * FROM models WHERE id = ?", (model_id,)).fetchone()
    if row is None:
        raise StoreError(f"no model with id {model_id} in the store")
    return row


def register_model(conn: sqlite3.Connection, description: dict[str, Any]) -> sqlite3.Row:
    """The `models` row for an encoder's description, created on first use."""
    fp = description["fingerprint"]
    row = conn.execute("SELECT * FROM models WHERE fingerprint = ?", (fp,)).fetchone()
    if row is not None:
        return row
    with immediate(conn):
        row = conn.execute("SELECT * FROM models WHERE fingerprint = ?", (fp,)).fetchone()
        if row is None:
            cur = conn.execute(
                "INSERT INTO models (name, spec, fingerprint, dim, sample_rate, batching, frontend,"
                " array_path, rows, created_at, kind) VALUES (?, ?, ?, ?, ?, ?, ?, '', 0, ?, ?)",
                (
                    description["name"], description["spec"], fp, int(description["dim"]),
                    int(description["sample_rate"]), description["batching"],
                    json.dumps(description.get("frontend", {}), sort_keys=True, default=str), utcnow(),
                    description.get("kind", "item"),
                ),
            )
            model_id = cur.lastrowid
            conn.execute("UPDATE models SET array_path = ? WHERE id = ?", (f"m{model_id}-{fp[:12]}", model_id))
            row = conn.execute("SELECT * FROM models WHERE id = ?", (model_id,)).fetchone()
    return row


def model_rows(conn: sqlite3.Connection) -> list[sqlite3.Row]:
    return conn.execute("SELECT * FROM models ORDER BY id").fetchall()


def model_key(conn: sqlite3.Connection, row: sqlite3.Row) -> str:
    """How a model is named to users: its name, plus the fingerprint when names repeat."""
    same = conn.execute("SELECT count(*) FROM models WHERE name = ?", (row["name"],)).fetchone()[0]
    return row["name"] if same == 1 else f"{row['name']}@{row['fingerprint'][:8]}"


def resolve_model(conn: sqlite3.Connection, where: str, model: str | None = None, kind: str | None = "item") -> sqlite3.Row:
    """A model row by name, spec, `name@fp` or fingerprint prefix; None = the only one
    (of `kind`: "item" for whole-item questions, "windows" for window ones, None: any)."""
    rows = model_rows(conn)
    if not rows:
        raise StoreError(f"{where} holds no embeddings yet; run `embstore extract` first")
    if model is None:
        of_kind = [r for r in rows if kind is None or r["kind"] == kind]
        if len(of_kind) == 1:
            return of_kind[0]
        if not of_kind:
            other = ", ".join(model_key(conn, r) for r in rows)
            if kind == "windows":
                raise StoreError(f"{where} holds no window embeddings (it has: {other}); run `embstore extract"
                                 " --windows 1.5:0.75` first")
            raise StoreError(f"{where} holds only window embeddings ({other}); this needs whole-item embeddings:"
                             " run `embstore extract` first")
        names = ", ".join(model_key(conn, r) for r in of_kind)
        raise StoreError(f"the store holds several models ({names}); pick one with --model")
    matches = [
        r for r in rows
        if model in (r["name"], r["spec"], model_key(conn, r)) or r["fingerprint"].startswith(model)
    ]
    if len(matches) > 1 and kind is not None:
        # a spec names whole-item and window models of one network alike
        matches = [r for r in matches if r["kind"] == kind] or matches
    if len(matches) == 1:
        found = matches[0]
        if kind is not None and found["kind"] != kind:
            key = model_key(conn, found)
            if found["kind"] == "windows":
                raise StoreError(f"{key} holds window embeddings; this needs a whole-item model (see `embstore"
                                 " windows` and `embstore diarize` for windows)")
            raise StoreError(f"{key} holds whole-item embeddings; this needs a window model (`embstore extract"
                             " --windows`)")
        return found
    if not matches:
        names = ", ".join(model_key(conn, r) for r in rows)
        raise StoreError(f"no model {model!r} in the store (it has: {names})")
    names = ", ".join(model_key(conn, r) for r in matches)
    raise StoreError(f"model {model!r} is ambiguous ({names}); use name@fingerprint")
