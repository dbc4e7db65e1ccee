"""Questions asked of a store: speakers, one speaker's items, nearest neighbours, centroids.

Every answer comes from the manifest (what is done, for which live item) plus the
model's Zarr rows. Only rows a done task of a live item points at are ever returned:
rows left behind by re-extracted (stale) items or by a crash stay invisible, and a row
shared by deduplicated items is returned once per item. Nearest neighbours and centroids
read the rows through the normalised-row cache (`embstore.arrays.unit_cache`).
"""

from __future__ import annotations

import difflib
import os
from typing import Any, Iterable, Sequence

import numpy as np

from embstore.arrays.unit_cache import UnitRows
from embstore.arrays.unit_cache import unit_rows as cached_unit_rows
from embstore.arrays.zarr_arrays import ID_CHUNK_ROWS, ModelArrays
from embstore.errors import ItemCutFailed, StoreError
from embstore.extract.reference import embed_as_stored
from embstore.manifest import reads
from embstore.manifest.clusters import check_by, group_name
from embstore.manifest.connection import LIVE_ITEM, select_in
from embstore.manifest.database import Manifest
from embstore.manifest.registry import ModelRecord
from embstore.manifest.tasks import committed_rows
from embstore.vectors import l2_normalise


# -- resolving ids ------------------------------------------------------------------------


def _id_forms(text: str) -> list[str]:
    """The id as given, then without a file extension (`id10001/x/00001.wav`)."""
    forms = [text]
    stem, ext = os.path.splitext(text)
    if stem and 1 < len(ext) <= 6 and ext[1:].isalnum() and "/" not in ext:
        forms.append(stem)
    return forms


def resolve_ids(store: Manifest, ids: Iterable[str]) -> dict[str, int | None]:
    """Map each id to a live item's `items.id`, or None when the store has no such item.

    An id is an item id, or the trailing path components of exactly one item id
    (`1688-142285-0000` for `librispeech-test-other/1688/1688-142285-0000`), with or
    without a file extension. An id that names several items is an error.
    """
    wanted = list(dict.fromkeys(ids))
    found: dict[str, int | None] = {}
    exact: dict[str, int] = {}
    forms = {i: _id_forms(i) for i in wanted}
    lookups = list(dict.fromkeys(f for fs in forms.values() for f in fs))
    for row in select_in(store.conn, "SELECT i.id, i.uid FROM items i WHERE i.uid IN ({marks}) AND +" + LIVE_ITEM, lookups):
        exact[row[1]] = row[0]
    rest = []
    for i in wanted:
        hit = next((exact[f] for f in forms[i] if f in exact), None)
        if hit is not None:
            found[i] = hit
        else:
            rest.append(i)
    if not rest:
        return found
    suffixes = _suffix_index(store, {f for i in rest for f in forms[i]})
    for i in rest:
        found[i] = None
        for form in forms[i]:
            hit = suffixes.get(form)
            if isinstance(hit, list):
                shown = ", ".join(hit[:3]) + (", ..." if len(hit) > 3 else "")
                count = f"{len(hit)}{'+' if len(hit) > 10 else ''}"
                raise StoreError(f"id {i!r} is ambiguous: it ends {count} item ids ({shown}); use a longer id")
            if hit is not None:
                found[i] = hit
                break
    return found


def _suffix_index(store: Manifest, forms: set[str]) -> dict[str, Any]:
    """{form: item id, or [uids] when several items end with it} for the given forms."""
    if not forms:
        return {}
    out: dict[str, Any] = {}
    if len(forms) <= 8:
        # a few ids: let SQLite scan the uids rather than pulling them all into Python
        for form in forms:
            rows = store.query(
                f"SELECT i.id, i.uid FROM items i WHERE {LIVE_ITEM} AND length(i.uid) > length(?)"
                " AND substr(i.uid, -length(?) - 1) = '/' || ? LIMIT 11",
                (form, form, form),
            )
            if len(rows) == 1:
                out[form] = rows[0]["id"]
            elif rows:
                out[form] = [r["uid"] for r in rows]
        return out
    depths = {form.count("/") + 1 for form in forms}
    for item_id, uid in store.conn.execute(f"SELECT i.id, i.uid FROM items i WHERE {LIVE_ITEM}"):
        parts = uid.split("/")
        for depth in depths:
            if len(parts) <= depth:
                continue
            suffix = "/".join(parts[-depth:])
            if suffix not in forms:
                continue
            seen = out.get(suffix)
            if seen is None:
                out[suffix] = (item_id, uid)
            elif isinstance(seen, tuple):
                out[suffix] = [seen[1], uid]
            else:
                seen.append(uid)
    return {k: (v[0] if isinstance(v, tuple) else v) for k, v in out.items()}


# -- unit vectors: cache or stream -------------------------------------------------------


def unit_rows(store: Manifest, model: ModelRecord, use_cache: bool = True) -> UnitRows:
    """The model's committed rows normalised, from STORE/cache when it can be kept."""
    committed = committed_rows(store.conn, model.id)
    return cached_unit_rows(store.model_arrays(model), committed, model.fingerprint, store.paths.cache, use_cache)


# -- speakers -----------------------------------------------------------------------------


def speakers(store: Manifest, model: str | None = None, by: str = "speaker") -> list[dict[str, Any]]:
    """One dict per speaker: speaker, datasets, items (live), done (finished for the
    chosen or only model; a {model: n} dict when the store holds several and none is chosen).

    by="cluster": one dict per pseudo-speaker of `embstore cluster` instead, named
    `<dataset>/<label>`; items without a cluster label are left out."""
    name_sql = group_name(by)
    labelled = "" if by == "speaker" else f" AND {name_sql} IS NOT NULL"
    # speaker groups come straight off the items_speaker index, in order
    groups = "i.speaker, i.dataset" if by == "speaker" else f"{name_sql}, i.dataset ORDER BY 1"
    out: dict[str, dict[str, Any]] = {}
    for speaker, dataset, n in store.conn.execute(
        f"SELECT {name_sql}, i.dataset, count(*) FROM items i WHERE {LIVE_ITEM}{labelled} GROUP BY {groups}"
    ):
        name = speaker if speaker is not None else ""
        entry = out.setdefault(name, {"speaker": name, "datasets": [], "items": 0})
        entry["datasets"].append(dataset)
        entry["items"] += n
    models = store.models()
    if not models:
        return list(out.values())
    chosen = [store.resolve_model(model, kind=None)] if (model or len(models) == 1) else models
    for m in chosen:
        counts = dict.fromkeys(out, 0)
        for speaker, n in reads.done_per_group(store.conn, m.id, by):
            counts[speaker if speaker is not None else ""] = n
        for name, entry in out.items():
            if len(chosen) == 1:
                entry["done"] = counts.get(name, 0)
            else:
                entry.setdefault("done", {})[store.model_key(m)] = counts.get(name, 0)
    return list(out.values())


def speaker_items(
    store: Manifest, speaker: str, model: str | None = None, vectors: bool = False
) -> list[dict[str, Any]]:
    """A speaker's live items: id, dataset, path (+ start/end), done; with `vectors`, the
    embedding as a float32 array (None for items not done)."""
    models = store.models()
    m = store.resolve_model(model, kind="item" if vectors else None) if (vectors or model or len(models) == 1) else None
    rows = reads.speaker_items(store.conn, speaker, m.id if m is not None else None)
    if not rows:
        raise StoreError(f"no speaker {speaker!r} in the store{_close_speakers(store, speaker)}")
    out = []
    for r in rows:
        entry: dict[str, Any] = {
            "id": r["uid"], "dataset": r["dataset"], "path": os.path.join(r["root"], r["path"]),
            "start": r["start"], "end": r["end"], "duration": r["duration"],
        }
        if m is not None:
            entry["done"] = r["status"] == "done"
        out.append(entry)
    if vectors and m is not None:
        done = [(k, r["row"]) for k, r in enumerate(rows) if r["status"] == "done"]
        found = store.model_arrays(m).read_rows(np.array([row for _, row in done], dtype=np.int64)) if done else []
        for entry in out:
            entry["embedding"] = None
        for (k, _), vec in zip(done, found):
            out[k]["embedding"] = vec
    return out


def _close_speakers(store: Manifest, speaker: str) -> str:
    names = [r[0] for r in store.conn.execute(f"SELECT DISTINCT i.speaker FROM items i WHERE {LIVE_ITEM} LIMIT 200000")]
    close = difflib.get_close_matches(speaker, [n for n in names if n is not None], n=3)
    return f" (did you mean {', '.join(close)}?)" if close else ""


# -- nearest neighbours --------------------------------------------------------------------


def similar(
    store: Manifest,
    item_id: str | None = None,
    audio: str | os.PathLike | None = None,
    k: int = 10,
    model: str | None = None,
    vector: np.ndarray | None = None,
    use_cache: bool = True,
    exact: bool = False,
    min_score: float | None = None,
    offset: int = 0,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """The k items closest (cosine) to an item of the store, to an audio file embedded with
    the store's model, or to a given vector; best first: id, speaker, dataset, path, score,
    and how they were found: `index` ("flat": every row scored; else the ANN index's kind,
    e.g. "ivf2048,sq8", whose candidates are re-ranked exactly) and `exact` (True when every
    row was scored). An item never lists itself; items sharing its audio (dedup) do appear.

    `min_score`: every item at or above that cosine instead of the k best, best first, one
    page of `limit` (default 1000, at most 10,000) from `offset`; more than
    `search.knn.RANGE_CAP` matching rows is an error. `exact`: the full scan, never the index."""
    from embstore.search import knn

    if sum(x is not None for x in (item_id, audio, vector)) != 1:
        raise StoreError("give exactly one of an item id, an audio file or a vector")
    if k < 1:
        raise StoreError(f"k must be at least 1 (got {k})")
    _check_range(min_score, offset, limit)
    # by audio or vector, a window model answers with windows ("where else does this voice speak?")
    m = store.resolve_model(model, kind="item" if model is None or item_id is not None else None)
    source = unit_rows(store, m, use_cache)
    query, exclude = _query_vector(store, m, source, item_id, audio, vector)
    searcher = knn.searcher(store, m, source, exact=exact)
    at_rows = _windows_at_rows if m.windowed else _items_at_rows
    if min_score is not None:
        rows, scores = searcher.at_least(query, min_score)
        page = limit or 1000
        found = at_rows(store, m, rows, scores, exclude)[offset : offset + page]
    else:
        wanted = k + len(exclude)
        fetch = max(4 * wanted, wanted + 32)
        while True:
            rows, scores = searcher.top(query, fetch)
            found = at_rows(store, m, rows, scores, exclude)
            if len(found) >= k or fetch >= source.rows:
                found = found[:k]
                break
            # many candidate rows belonged to no live item (stale or removed): look further
            fetch *= 8
    for entry in found:
        entry.update(index=searcher.name, exact=searcher.exact)
    return found


def _check_range(min_score: float | None, offset: int, limit: int | None) -> None:
    if min_score is not None and not -1.0 <= min_score <= 1.0:
        raise StoreError(f"min_score is a cosine in [-1, 1] (got {min_score})")
    if offset < 0:
        raise StoreError(f"offset must be 0 or more (got {offset})")
    if limit is not None and not 1 <= limit <= 10_000:
        raise StoreError(f"limit must be between 1 and 10000 (got {limit})")
    if min_score is None and (offset or limit is not None):
        raise StoreError("offset and limit page a range query: give min_score too")


def _query_vector(
    store: Manifest, m: ModelRecord, source: UnitRows, item_id: str | None, audio: str | os.PathLike | None,
    vector: np.ndarray | None,
) -> tuple[np.ndarray, set[int]]:
    """(unit query vector, internal ids of items to leave out) for an item, audio or vector."""
    exclude: set[int] = set()
    if item_id is not None:
        internal = resolve_ids(store, [item_id])[item_id]
        if internal is None:
            raise StoreError(f"no item {item_id!r} in the store")
        row = reads.done_row(store.conn, internal, m.id)
        if row is None:
            raise StoreError(f"item {item_id!r} has no {store.model_key(m)} embedding yet; run `embstore extract`")
        query = source.take(np.array([row]))[0]
        exclude.add(internal)
    elif audio is not None:
        query = embed_audio(store, m, audio)
    else:
        query = np.asarray(vector, dtype=np.float32).ravel()
        if query.shape != (source.dim,):
            raise StoreError(f"the query vector has {query.size} values; the model's dimension is {source.dim}")
    query = l2_normalise(query[None, :])[0]
    if not np.any(query):
        raise StoreError("the query embedding is zero or not finite")
    return query, exclude


def embed_audio(store: Manifest, model: ModelRecord, path: str | os.PathLike) -> np.ndarray:
    """Embed one file with the model the store recorded (same spec, same fingerprint, cut
    the same way: `extract.reference`). For a cut model (speech only, windows): the mean
    of its vectors made unit."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such audio file")
    try:
        vectors = embed_as_stored(model, path)
    except ItemCutFailed as exc:
        raise StoreError(f"{path}: {exc.reason}") from None
    if model.cutting is None:
        return vectors[0]
    if not len(vectors):
        raise StoreError(f"{path}: none of its windows could be embedded")
    return l2_normalise(vectors).mean(axis=0)


def _items_at_rows(
    store: Manifest, model: ModelRecord, rows: np.ndarray, scores: np.ndarray, exclude: set[int]
) -> list[dict[str, Any]]:
    """Live items whose done task points at the given rows (several per shared row)."""
    score_of = {int(r): float(s) for r, s in zip(rows, scores)}
    found = reads.items_at_rows(store.conn, model.id, list(score_of))
    out = [
        {
            "id": r["uid"], "speaker": r["speaker"], "dataset": r["dataset"],
            "path": os.path.join(r["root"], r["path"]), "score": score_of[r["row"]], "_item": r["id"],
        }
        for r in found
        if r["id"] not in exclude
    ]
    out.sort(key=lambda d: (-d["score"], d["id"]))
    for d in out:
        del d["_item"]
    return out


def _windows_at_rows(
    store: Manifest, model: ModelRecord, rows: np.ndarray, scores: np.ndarray, exclude: set[int]
) -> list[dict[str, Any]]:
    """Windows of live items at the given rows of a window model: id, speaker, dataset,
    path, start, end, score (one entry per item sharing the row through dedup). The
    owners of every row come from one statement (per reads.WINDOW_OWNERS_CHUNK rows) and the
    spans of the owned rows from few reads, not one of each per row (a range query can
    return 100,000 rows)."""
    owners = reads.window_owners_of(store.conn, model.id, rows.tolist())
    owned = np.array(sorted(owners), dtype=np.int64)
    score_of = {int(r): float(s) for r, s in zip(rows, scores)}
    out = []
    for row, (start, end) in zip(owned.tolist(), _spans_at(store.model_arrays(model), owned).tolist()):
        out += [
            {"id": o["uid"], "speaker": o["speaker"], "dataset": o["dataset"], "path": os.path.join(o["root"], o["path"]),
             "start": round(start, 3), "end": round(end, 3), "window": row - o["row"], "score": score_of[row]}
            for o in owners[row] if o["id"] not in exclude
        ]
    out.sort(key=lambda d: (-d["score"], d["id"], d["start"]))
    return out


def _spans_at(arrays: ModelArrays, rows: np.ndarray) -> np.ndarray:
    """[len(rows), 2] window spans of the sorted `rows`: one read per run of rows in
    adjacent chunks of the spans array (one read when they are close), never row by row."""
    out = np.empty((len(rows), 2), dtype=np.float32)
    if not len(rows):
        return out
    breaks = np.flatnonzero(np.diff(rows // ID_CHUNK_ROWS) > 1) + 1
    for part in np.split(np.arange(len(rows)), breaks):
        lo, hi = int(rows[part[0]]), int(rows[part[-1]]) + 1
        out[part] = arrays.read_spans(lo, hi)[rows[part] - lo]
    return out


# -- windows ------------------------------------------------------------------------------


def windows(store: Manifest, item_id: str, model: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(starts, ends, matrix) of one item's windows under a window model, in time order:
    seconds from the item's start (float64) and the [n, dim] float32 rows."""
    m = store.resolve_model(model, kind="windows")
    internal = resolve_ids(store, [item_id])[item_id]
    if internal is None:
        raise StoreError(f"no item {item_id!r} in the store")
    task = reads.task_of(store.conn, internal, m.id)
    if task is None or task["status"] != "done":
        failed = task is not None and task["status"] == "failed"
        why = f" (it failed: {task['error']})" if failed else "; run `embstore extract`"
        raise StoreError(f"item {item_id!r} has no {store.model_key(m)} windows yet{why}")
    row, count = int(task["row"]), int(task["row_count"])
    arrays = store.model_arrays(m)
    spans = arrays.read_spans(row, row + count).astype(np.float64).round(3)
    return spans[:, 0], spans[:, 1], arrays.read_rows(np.arange(row, row + count, dtype=np.int64))


# -- centroids ----------------------------------------------------------------------------


def speaker_rows(
    store: Manifest, model: ModelRecord, by: str = "speaker"
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(speakers sorted, speaker index per done live item, its row), one entry per item;
    by="cluster": pseudo-speakers (`<dataset>/<label>`), unlabelled items left out."""
    names: list[str] = []
    index_parts: list[np.ndarray] = []
    row_parts: list[np.ndarray] = []
    for speaker, rows in reads.done_rows_per_group(store.conn, model.id, by):
        parsed = np.array(rows.split(","), dtype=np.int64)
        index_parts.append(np.full(len(parsed), len(names), dtype=np.int64))
        row_parts.append(parsed)
        names.append(speaker if speaker is not None else "")
    if not names:
        return [], np.zeros(0, np.int64), np.zeros(0, np.int64)
    return names, np.concatenate(index_parts), np.concatenate(row_parts)


def centroid_table(
    store: Manifest, model: str | None = None, use_cache: bool = True, by: str = "speaker"
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(speakers, float32 [n, dim] means of L2-normalised embeddings, items per speaker);
    by="cluster": per pseudo-speaker of `embstore cluster` (unlabelled items left out)."""
    from scipy.sparse import csr_matrix  # 0.3 s of import: loaded where centroids are summed only
    check_by(by)
    m = store.resolve_model(model)
    names, speaker_index, rows = speaker_rows(store, m, by)
    dim = m.dim
    sums = np.zeros((len(names), dim), dtype=np.float64)
    counts = np.bincount(speaker_index, minlength=len(names)).astype(np.int64)
    if len(rows):
        order = np.argsort(rows, kind="stable")
        rows, speaker_index = rows[order], speaker_index[order]
        source = unit_rows(store, m, use_cache)
        if rows[-1] >= source.rows:
            raise StoreError("the manifest points past the committed embeddings; run `embstore extract` to repair")
        for start, block in source.blocks():
            lo, hi = np.searchsorted(rows, [start, start + len(block)])
            if lo == hi:
                continue
            # per-speaker sums as one sparse (speaker x block row) product: no gather, ~10x
            # faster than np.add.reduceat; a row shared by n items of a speaker counts n times
            present, local = np.unique(speaker_index[lo:hi], return_inverse=True)
            onehot = csr_matrix(
                (np.ones(hi - lo, dtype=np.float32), (local, rows[lo:hi] - start)), shape=(len(present), len(block))
            )
            sums[present] += onehot @ np.asarray(block, dtype=np.float32)
    means = (sums / np.maximum(counts, 1)[:, None]).astype(np.float32)
    return names, means, counts


def centroids(store: Manifest, model: str | None = None, by: str = "speaker") -> tuple[list[str], np.ndarray]:
    """(speakers, float32 [n_speakers, dim]): each speaker's mean L2-normalised embedding
    (not re-normalised: its norm says how tight the speaker's embeddings are); by="cluster":
    each pseudo-speaker's."""
    names, means, _ = centroid_table(store, model, by=by)
    return names, means


__all__: Sequence[str] = [
    "resolve_ids", "speakers", "speaker_items", "similar", "embed_audio", "centroids", "centroid_table",
    "unit_rows", "UnitRows",
]
