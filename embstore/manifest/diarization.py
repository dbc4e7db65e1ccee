"""Diarization results per item, model and settings, so a finished store answers at once."""

from __future__ import annotations

import json
import sqlite3
from typing import Iterable, Sequence

from embstore.manifest.connection import immediate, select_in, utcnow

Segments = list[tuple[float, float, str]]


def save_results(conn: sqlite3.Connection, model_id: int, params: str,
                 results: Iterable[tuple[int, int, Segments]]) -> None:
    """(item id, speakers, segments) per item, in one transaction."""
    now = utcnow()
    with immediate(conn):
        conn.executemany(
            "INSERT OR REPLACE INTO diarization (item_id, model_id, params, speakers, segments, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            [(item_id, model_id, params, speakers, json.dumps([[round(a, 3), round(b, 3), s] for a, b, s in segs]), now)
             for item_id, speakers, segs in results],
        )


def results_of(conn: sqlite3.Connection, model_id: int, params: str, item_ids: Sequence[int]) -> dict[int, Segments]:
    """{item id: segments} of the items already diarized with these settings."""
    return {
        r[0]: [(float(a), float(b), str(s)) for a, b, s in json.loads(r[1])]
        for r in select_in(conn, "SELECT item_id, segments FROM diarization WHERE model_id = ? AND params = ?"
                           " AND item_id IN ({marks})", list(item_ids), params_before=(model_id, params))
    }


def diarized_count(conn: sqlite3.Connection, model_id: int) -> int:
    """Items with a diarization under this model (any settings)."""
    return int(conn.execute("SELECT count(DISTINCT item_id) FROM diarization WHERE model_id = ?", (model_id,)).fetchone()[0])
