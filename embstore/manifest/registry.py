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


def resolve_model(conn: sqlite3.Connection, where: str, model: str | None = None) -> sqlite3.Row:
    """A model row by name, spec, `name@fp` or fingerprint prefix; None = the only one."""
    rows = model_rows(conn)
    if not rows:
        raise StoreError(f"{where} holds no embeddings yet; run `embstore extract` first")
    if model is None:
        if len(rows) == 1:
            return rows[0]
        names = ", ".join(model_key(conn, r) for r in rows)
        raise StoreError(f"the store holds several models ({names}); pick one with --model")
    matches = [
        r for r in rows
        if model in (r["name"], r["spec"], model_key(conn, r)) or r["fingerprint"].startswith(model)
    ]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        names = ", ".join(model_key(conn, r) for r in rows)
        raise StoreError(f"no model {model!r} in the store (it has: {names})")
    names = ", ".join(model_key(conn, r) for r in matches)
    raise StoreError(f"model {model!r} is ambiguous ({names}); use name@fingerprint")
