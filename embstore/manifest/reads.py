"""Read-only questions of `tasks` for the layers above: which rows answer a query, what
an evaluation selection holds, and what `verify` checks. The statements that change
tasks (claims, leases, the commit, dedup) are in `tasks`.

Every function takes a model id; only done tasks of live items answer, unless a
function says otherwise."""

from __future__ import annotations

import json
import sqlite3
from typing import Iterator, Sequence

from embstore.manifest.clusters import group_name
from embstore.manifest.connection import LIVE_ITEM, select_in

# an item, where its audio is, and the task's first row: what a query answers with
_ITEM_AT_ROW = "i.id, i.uid, i.speaker, i.dataset, r.path AS root, f.path, t.row"
_PLACES = " JOIN items i ON i.id = t.item_id JOIN files f ON f.id = i.file_id JOIN roots r ON r.id = f.root_id"
# the item columns an evaluation selection may name its items by
_SELECTABLE = ("id", "dataset", "speaker")


def _grouped(by: str) -> tuple[str, str]:
    """(SQL naming an item's speaker or pseudo-speaker, the condition leaving out
    unlabelled items: empty by speaker)."""
    name_sql = group_name(by)
    return name_sql, "" if by == "speaker" else f" AND {name_sql} IS NOT NULL"


# -- queries ------------------------------------------------------------------------------


def done_per_group(conn: sqlite3.Connection, model_id: int, by: str = "speaker") -> list[tuple[str | None, int]]:
    """(speaker or pseudo-speaker, done live items) per group of the model."""
    name_sql, labelled = _grouped(by)
    return [tuple(r) for r in conn.execute(  # type: ignore[misc]
        f"SELECT {name_sql}, count(*) FROM tasks t JOIN items i ON i.id = t.item_id"
        f" WHERE t.model_id = ? AND t.status = 'done' AND {LIVE_ITEM}{labelled} GROUP BY 1",
        (model_id,),
    )]


def done_rows_per_group(conn: sqlite3.Connection, model_id: int, by: str = "speaker") -> Iterator[tuple[str | None, str]]:
    """(speaker or pseudo-speaker, its done live items' rows as "r1,r2,..."), by name;
    one text per group, so a million items never become a million Python rows."""
    name_sql, labelled = _grouped(by)
    yield from conn.execute(
        f"SELECT {name_sql}, group_concat(t.row) FROM tasks t JOIN items i ON i.id = t.item_id"
        f" WHERE t.model_id = ? AND t.status = 'done' AND {LIVE_ITEM}{labelled} GROUP BY 1 ORDER BY 1",
        (model_id,),
    )


def speaker_items(conn: sqlite3.Connection, speaker: str, model_id: int | None) -> list[sqlite3.Row]:
    """A speaker's live items in item order: id, uid, dataset, start, end, duration,
    root, path, and the status and row of its task for the model (NULL without one;
    model None: always NULL)."""
    return conn.execute(
        "SELECT i.id, i.uid, i.dataset, i.start, i.end, i.duration, r.path AS root, f.path,"
        " t.status, t.row FROM items i CROSS JOIN files f ON f.id = i.file_id JOIN roots r ON r.id = f.root_id"
        " LEFT JOIN tasks t ON t.item_id = i.id AND t.model_id = ?"
        f" WHERE i.speaker = ? AND +{LIVE_ITEM} ORDER BY i.id",
        (model_id if model_id is not None else -1, speaker),
    ).fetchall()


def done_row(conn: sqlite3.Connection, item_id: int, model_id: int) -> int | None:
    """The first row of an item's done task (None: not done)."""
    row = conn.execute(
        "SELECT row FROM tasks WHERE item_id = ? AND model_id = ? AND status = 'done'", (item_id, model_id)
    ).fetchone()
    return None if row is None else row[0]


def task_of(conn: sqlite3.Connection, item_id: int, model_id: int) -> sqlite3.Row | None:
    """An item's task for the model, any status: row, row_count (1 when NULL), status, error."""
    return conn.execute(
        "SELECT row, coalesce(row_count, 1) AS row_count, status, error FROM tasks WHERE item_id = ? AND model_id = ?",
        (item_id, model_id),
    ).fetchone()


def items_at_rows(conn: sqlite3.Connection, model_id: int, rows: Sequence[int]) -> list[sqlite3.Row]:
    """Live items whose done task points at one of the rows (several per shared row)."""
    return select_in(
        conn,
        f"SELECT {_ITEM_AT_ROW} FROM tasks t{_PLACES}"
        f" WHERE t.model_id = ? AND t.status = 'done' AND {LIVE_ITEM} AND t.row IN ({{marks}})",
        list(rows), params_before=(model_id,),
    )


def window_owners(conn: sqlite3.Connection, model_id: int, row: int) -> list[sqlite3.Row]:
    """Live items whose done task of a window model owns the row (its `row_count` rows
    from `row` on; several items when dedup shares them)."""
    return conn.execute(
        f"SELECT {_ITEM_AT_ROW} FROM tasks t{_PLACES}"
        " WHERE t.model_id = ? AND t.status = 'done' AND t.row = (SELECT max(row) FROM tasks"
        "  WHERE model_id = ? AND status = 'done' AND row <= ?)"
        f" AND t.row + coalesce(t.row_count, 1) > ? AND {LIVE_ITEM}",
        (model_id, model_id, row, row),
    ).fetchall()


WINDOW_OWNERS_CHUNK = 50_000
# `window_owners` for many rows at once (the rows as one JSON parameter): for each, the
# done task starting at or before it that still covers it, of a live item; CROSS JOIN
# keeps the rows outer: each one then two index lookups on tasks_done_row
_WINDOW_OWNERS_OF = (
    "SELECT h.value AS hit, i.id, i.uid, i.speaker, i.dataset, r.path AS root, f.path, t.row"
    " FROM json_each(?) h CROSS JOIN tasks t ON t.model_id = ? AND t.status = 'done' AND t.row = ("
    "  SELECT max(row) FROM tasks WHERE model_id = ? AND status = 'done' AND row <= h.value)"
    " JOIN items i ON i.id = t.item_id JOIN files f ON f.id = i.file_id JOIN roots r ON r.id = f.root_id"
    f" WHERE t.row + coalesce(t.row_count, 1) > h.value AND {LIVE_ITEM}"
)


def window_owners_of(conn: sqlite3.Connection, model_id: int, rows: Sequence[int]) -> dict[int, list[sqlite3.Row]]:
    """{row: `window_owners(row)`} for many rows in one statement per WINDOW_OWNERS_CHUNK
    rows; rows no live item owns are left out."""
    wanted = sorted({int(r) for r in rows})
    owners: dict[int, list[sqlite3.Row]] = {}
    for lo in range(0, len(wanted), WINDOW_OWNERS_CHUNK):
        chunk = json.dumps(wanted[lo : lo + WINDOW_OWNERS_CHUNK])
        for o in conn.execute(_WINDOW_OWNERS_OF, (chunk, model_id, model_id)):
            owners.setdefault(int(o["hit"]), []).append(o)
    return owners


# -- evaluation ---------------------------------------------------------------------------


def items_with_task(conn: sqlite3.Connection, model_id: int, column: str, values: Sequence) -> list[sqlite3.Row]:
    """(id, speaker, row, done) of the live items whose `column` (id, dataset or speaker)
    is one of `values`, with their task for the model (`done` 0 or NULL when not done)."""
    if column not in _SELECTABLE:
        raise ValueError(f"items are selected by {', '.join(_SELECTABLE)}, not {column!r}")
    return select_in(
        conn,
        "SELECT i.id, i.speaker, t.row, t.status = 'done' AS done FROM items i"
        f" LEFT JOIN tasks t ON t.item_id = i.id AND t.model_id = ? WHERE i.{column} IN ({{marks}})"
        " AND i.removed = 0",
        list(values), params_before=(model_id,),
    )


def done_rows_of(conn: sqlite3.Connection, model_id: int, item_ids: Sequence[int]) -> dict[int, int]:
    """{item id: first row} of the given items whose task for the model is done."""
    rows = select_in(
        conn, "SELECT item_id, row FROM tasks WHERE model_id = ? AND status = 'done' AND item_id IN ({marks})",
        item_ids, params_before=(model_id,),
    )
    return {r[0]: r[1] for r in rows}


def failed_items(conn: sqlite3.Connection, model_id: int, item_ids: Sequence[int]) -> set[int]:
    """The given items whose task for the model failed."""
    rows = select_in(
        conn, "SELECT item_id FROM tasks WHERE model_id = ? AND status = 'failed' AND item_id IN ({marks})",
        item_ids, params_before=(model_id,),
    )
    return {r[0] for r in rows}


# -- verify -------------------------------------------------------------------------------


def done_without_row(conn: sqlite3.Connection, model_id: int) -> list[int]:
    """Live items whose task is done but points at no row (a broken commit)."""
    return [r[0] for r in conn.execute(
        "SELECT t.item_id FROM tasks t JOIN items i ON i.id = t.item_id"
        f" WHERE t.model_id = ? AND t.status = 'done' AND {LIVE_ITEM} AND t.row IS NULL",
        (model_id,),
    )]


def done_row_ranges(conn: sqlite3.Connection, model_id: int, batch: int = 100_000) -> Iterator[list[tuple[int, int, int]]]:
    """(item id, first row, row count) of every done live task with a row, by row then
    item, in batches of `batch` (10 M tasks never sit in one Python list)."""
    cur = conn.execute(
        "SELECT t.item_id, t.row, coalesce(t.row_count, 1) FROM tasks t JOIN items i ON i.id = t.item_id"
        f" WHERE t.model_id = ? AND t.status = 'done' AND {LIVE_ITEM} AND t.row IS NOT NULL"
        " ORDER BY t.row, t.item_id",
        (model_id,),
    )
    while rows := cur.fetchmany(batch):
        yield rows


def items_with_several_tasks(conn: sqlite3.Connection, model_id: int) -> list[tuple[int, int]]:
    """(item id, its task count) of items with more than one task for the model: never
    allowed (one task per item and model)."""
    return [tuple(r) for r in conn.execute(  # type: ignore[misc]
        "SELECT item_id, count(*) FROM tasks WHERE model_id = ? GROUP BY item_id HAVING count(*) > 1",
        (model_id,),
    )]


def item_facts(conn: sqlite3.Connection, model_id: int, item_ids: Sequence[int]) -> dict[int, sqlite3.Row]:
    """{item id: id, uid, start, end, removed, content_hash, and the status and row of
    its task for the model} of the given items, removed ones included."""
    rows = select_in(
        conn,
        "SELECT i.id, i.uid, i.start, i.end, i.removed, f.content_hash, t.status, t.row FROM items i"
        " JOIN files f ON f.id = i.file_id LEFT JOIN tasks t ON t.item_id = i.id AND t.model_id = ?"
        " WHERE i.id IN ({marks})",
        item_ids, params_before=(model_id,),
    )
    return {r["id"]: r for r in rows}


def done_items_below(conn: sqlite3.Connection, model_id: int, committed: int) -> list[sqlite3.Row]:
    """Done live items whose first row is under the committed count, with where their
    audio is: item_id, row, row_count, uid, start, end, content_hash, root, path."""
    return conn.execute(
        "SELECT t.item_id, t.row, coalesce(t.row_count, 1) AS row_count, i.uid, i.start, i.end, f.content_hash,"
        f" r.path AS root, f.path FROM tasks t{_PLACES}"
        f" WHERE t.model_id = ? AND t.status = 'done' AND {LIVE_ITEM} AND t.row < ?",
        (model_id, committed),
    ).fetchall()
