"""Which items a query or an export reads: one WHERE builder for all of them."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Any, Sequence

from embstore.manifest.connection import LIVE_ITEM, select_in

# every selected row has these columns
COLUMNS = (
    "i.id AS item_id, i.uid, i.speaker, i.dataset, i.start, i.end, i.duration, f.path, r.path AS root,"
    " r.kind AS root_kind, t.status, t.row, t.row_count, i.cluster"
)


@dataclass(frozen=True)
class Selection:
    """Live items, optionally of one speaker, one dataset, or a list of item ids."""

    speaker: str | None = None
    dataset: str | None = None
    ids: Sequence[str] | None = None

    @property
    def narrow(self) -> bool:
        """Few items: start from the items' own indexes rather than every task."""
        return self.speaker is not None or self.ids is not None

    def where(self) -> tuple[list[str], list[Any]]:
        """(conditions on `items i`, their parameters): live items of the speaker and
        dataset asked for (the ids are matched by the caller, in chunks)."""
        # unary + keeps SQLite off the items_uid_removed index when a narrower one applies
        where = ["+" + LIVE_ITEM if self.narrow else LIVE_ITEM]
        params: list[Any] = []
        if self.speaker is not None:
            where.append("i.speaker = ?")
            params.append(self.speaker)
        if self.dataset is not None:
            where.append("i.dataset = ?")
            params.append(self.dataset)
        return where, params


def select_items(
    conn: sqlite3.Connection, model_id: int, selection: Selection = Selection(), done_only: bool = True
) -> list[sqlite3.Row]:
    """Rows of COLUMNS in item order. `done_only`: items whose task for the model is
    done; else every live item in the selection, with its task's status (or NULL)."""
    narrow = selection.narrow
    where, params = selection.where()
    places = " JOIN files f ON f.id = i.file_id JOIN roots r ON r.id = f.root_id"
    if done_only:
        # CROSS JOIN fixes the join order: from a speaker's (or the ids') items, else
        # SQLite walks every done task of the model (~0.4 s at 1 M rows)
        source = (
            "FROM items i CROSS JOIN tasks t ON t.item_id = i.id" if narrow else "FROM tasks t JOIN items i ON i.id = t.item_id"
        ) + places
        where[:0] = ["t.model_id = ?", "t.status = 'done'"]
    else:
        first = "FROM items i CROSS JOIN files f ON f.id = i.file_id" if narrow else "FROM items i JOIN files f ON f.id = i.file_id"
        source = first + " JOIN roots r ON r.id = f.root_id LEFT JOIN tasks t ON t.item_id = i.id AND t.model_id = ?"
    params.insert(0, model_id)
    sql = f"SELECT {COLUMNS} {source} WHERE {' AND '.join(where)}"
    if selection.ids is None:
        return conn.execute(sql + " ORDER BY i.id", params).fetchall()
    # look the ids up by their unique index instead of reading every row
    rows = select_in(conn, sql + " AND i.uid IN ({marks})", list(dict.fromkeys(selection.ids)), params_before=params)
    rows.sort(key=lambda r: r["item_id"])
    return rows
