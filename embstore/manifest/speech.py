"""Speech regions per item (what a VAD found), kept so a rerun or another model reuses them."""

from __future__ import annotations

import json
import sqlite3
from typing import Iterable, Sequence

from embstore.manifest.connection import select_in, utcnow

Regions = list[tuple[float, float]]


def save_regions(conn: sqlite3.Connection, found: Iterable[tuple[int, str, Regions]]) -> None:
    """(item id, VAD key, regions) per item, inside the caller's transaction."""
    now = utcnow()
    conn.executemany(
        "INSERT OR REPLACE INTO speech (item_id, vad, regions, created_at) VALUES (?, ?, ?, ?)",
        [(item_id, vad, json.dumps([[round(s, 4), round(e, 4)] for s, e in regions]), now)
         for item_id, vad, regions in found],
    )


def regions_of(conn: sqlite3.Connection, item_ids: Sequence[int], vad: str) -> dict[int, Regions]:
    """{item id: regions} for the items whose regions under this VAD are known."""
    return {
        r[0]: [(float(s), float(e)) for s, e in json.loads(r[1])]
        for r in select_in(conn, "SELECT item_id, regions FROM speech WHERE vad = ? AND item_id IN ({marks})",
                           list(item_ids), params_before=(vad,))
    }
