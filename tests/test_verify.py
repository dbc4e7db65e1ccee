"""`embstore verify`: a clean store passes; each kind of corruption is caught and named.

The default model embeds a few items (module fixture); its arrays are then rewritten with
tiny chunks (2 rows) so a store of a few items spans several chunk files. Every test
corrupts its own copy.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import embstore
from embstore.cli import cli
from embstore.verify import verify_store
from tests.audio_factory import make_tree

VEC_CHUNK = 2
ID_CHUNK = 4


def _rechunk(store: Path) -> None:
    """Rewrite the model's arrays with small chunks (same shape, same contents)."""
    import zarr

    st = embstore.open(store)
    model = st.models()[0]
    rows = model.rows
    group = zarr.open_group(str(st.manifest.zarr_path), mode="a", zarr_format=3)[model.array_path]
    vec, ids = group["vectors"], group["item_ids"]
    shape, dim = vec.shape, vec.shape[1]
    data, item_ids = vec[:rows], ids[:rows]
    del group["vectors"], group["item_ids"]
    new_vec = group.create_array("vectors", shape=shape, chunks=(VEC_CHUNK, dim), dtype="float32", fill_value=np.nan)
    new_ids = group.create_array("item_ids", shape=(shape[0],), chunks=(ID_CHUNK,), dtype="int64", fill_value=-1)
    new_vec[:rows] = data
    new_ids[:rows] = item_ids
    st.close()


def _load_model():
    from embstore.models import load

    key = ("resemblyzer", "cpu", "fp32")
    if key not in _MODELS:
        _MODELS[key] = load("resemblyzer")
    return _MODELS[key]


@pytest.fixture(scope="module")
def base_store(tmp_path_factory) -> Path:
    """6 items embedded with the default model, written through the writer's own path
    (claims + ZarrWriter, as extraction does) without starting extraction processes."""
    from embstore.audio.io import content_hash
    from embstore.extract.client import SqliteManifestClient
    from embstore.extract.messages import ItemResult
    from embstore.extract.writer import ZarrWriter
    from embstore.manifest.tasks import new_owner

    root = tmp_path_factory.mktemp("verify-corpus")
    make_tree(root, speakers=3, per_speaker=2, seconds=1.0)
    store = root.parent / "verify-base"
    st = embstore.open(store)
    st.scan([root])
    encoder = _load_model()
    model = st.manifest.register_model(encoder.describe())
    owner = new_owner()
    client = SqliteManifestClient(store, model.id, owner, 600, "item", encoder.feature_length, encoder.sample_rate)
    client.refresh()
    writer = ZarrWriter(str(store), model.id, None)
    for task in client.claim(100, 10**9):
        vector = encoder.embed_file(task.path)
        writer.add(ItemResult(task.task_id, task.item_id, owner, content_hash(task.path), task.duration, vector))
    writer.flush()
    writer.close()
    client.close()
    assert st.manifest.query("SELECT count(*) FROM tasks WHERE status = 'done'")[0][0] == 6
    st.close()
    _rechunk(store)
    return store


@pytest.fixture
def store(base_store, tmp_path) -> Path:
    copy = tmp_path / "s"
    shutil.copytree(base_store, copy)
    return copy


def sql(store: Path, statement: str, params=()) -> None:
    conn = sqlite3.connect(str(store / "manifest.db"))
    conn.execute(statement, params)
    conn.commit()
    conn.close()


def one(store: Path, query: str, params=()):
    conn = sqlite3.connect(str(store / "manifest.db"))
    try:
        return conn.execute(query, params).fetchone()
    finally:
        conn.close()


def group_dir(store: Path) -> Path:
    return store / "embeddings.zarr" / one(store, "SELECT array_path FROM models")[0]


def checks(store: Path) -> dict[str, list[str]]:
    with embstore.open(store) as st:
        report = verify_store(st.manifest)
    out: dict[str, list[str]] = {}
    for p in report.problems:
        out.setdefault(p.check, []).append(p.message)
    return out


def run_cli(*args: str):
    return CliRunner().invoke(cli, ["verify", *args])


_MODELS: dict = {}


@pytest.fixture
def cached_models(monkeypatch):
    """--deep loads the model once per test module, not once per call."""
    import embstore.extract.reference as reference
    import embstore.models as models

    cache = _MODELS
    real = models.load

    def load(spec=None, device="cpu", dtype="fp32", **kw):
        key = (spec, device, dtype)
        if key not in cache:
            cache[key] = real(spec, device=device, dtype=dtype, **kw)
        return cache[key]

    monkeypatch.setattr(reference, "load", load)
    return cache


def test_clean_store_passes_shallow_and_deep(store, cached_models):
    result = run_cli(str(store))
    assert result.exit_code == 0, result.output
    assert "ok: the store is consistent" in result.output
    report = json.loads(run_cli(str(store), "--json").output)
    assert report["ok"] and report["problems"] == []
    info = report["models"]["resemblyzer-ge2e"]
    # 6 rows: 3 vector chunks + 2 id chunks, every one read
    assert info["done"] == 6 and info["rows"] == 6 and info["chunks_checked"] == 3 + 2
    deep = run_cli(str(store), "--deep", "3", "--json", "--seed", "1")
    assert deep.exit_code == 0, deep.output
    d = json.loads(deep.output)["models"]["resemblyzer-ge2e"]["deep"]
    assert d["checked"] == 3 and d["min_cosine"] >= 0.9999


def test_deep_catches_vectors_swapped_between_rows(store, cached_models):
    import zarr

    vec = zarr.open_array(str(group_dir(store) / "vectors"), mode="r+")
    a, b = vec[0].copy(), vec[1].copy()
    vec[0], vec[1] = b, a
    assert checks(store) == {}  # finite, in range, ids intact: only recomputing can tell
    result = run_cli(str(store), "--deep", "6", "--json")
    assert result.exit_code == 1
    report = json.loads(result.output)
    mismatch = [p for p in report["problems"] if p["check"] == "deep-mismatch"]
    assert mismatch and mismatch[0]["count"] == 2
    assert {e["row"] for e in mismatch[0]["examples"]} == {0, 1}


def test_truncated_chunk_is_named(store):
    chunk = group_dir(store) / "vectors" / "c" / "1" / "0"
    data = chunk.read_bytes()
    chunk.write_bytes(data[: len(data) // 2])
    found = checks(store)
    assert list(found) == ["chunk-unreadable"]
    assert "vectors/c/1/0" in found["chunk-unreadable"][0] and "rows 2-3" in found["chunk-unreadable"][0]
    result = run_cli(str(store))
    assert result.exit_code == 1 and "PROBLEM" in result.output and "vectors/c/1/0" in result.output


def test_deleted_chunks_are_named(store):
    (group_dir(store) / "vectors" / "c" / "2" / "0").unlink()
    (group_dir(store) / "item_ids" / "c" / "0").unlink()
    found = checks(store)
    assert "chunk-missing" in found
    message = found["chunk-missing"][0]
    assert "2 chunk files missing" in message
    report = json.loads(run_cli(str(store), "--json").output)
    missing = next(p for p in report["problems"] if p["check"] == "chunk-missing")
    assert any("vectors/c/2/0 (rows 4-5)" in e for e in missing["examples"])
    assert any("item_ids/c/0 (rows 0-3)" in e for e in missing["examples"])


def test_row_count_larger_than_the_array(store):
    sql(store, "UPDATE models SET rows = 70000")
    found = checks(store)
    assert any("commits 70000 rows but the vectors array has only 65536" in m for m in found["row-count"])
    # the rows between the real end and the array's end were never written
    assert "chunk-missing" in found


def test_row_count_smaller_than_the_rows_in_use(store):
    sql(store, "UPDATE models SET rows = 3")
    found = checks(store)
    assert found["row-past-count"] == ["3 done items point past the 3 committed rows"]


def test_task_pointing_past_the_array(store):
    sql(store, "UPDATE tasks SET row = 70000 WHERE item_id = (SELECT min(item_id) FROM tasks)")
    found = checks(store)
    assert found["row-past-count"] == ["1 done items point past the 6 committed rows"]
    result = run_cli(str(store))
    assert result.exit_code == 1 and "'row': 70000" in result.output


def test_task_pointing_to_an_unwritten_row(store):
    sql(store, "UPDATE models SET rows = 8")
    sql(store, "UPDATE tasks SET row = 7 WHERE item_id = (SELECT min(item_id) FROM tasks)")
    found = checks(store)
    # rows 6-7 were never written: no vector chunk (reported), item id -1 (reported)
    assert {"row-unwritten", "chunk-missing"} <= set(found)


def test_done_task_without_a_row(store):
    sql(store, "UPDATE tasks SET row = NULL WHERE item_id = (SELECT min(item_id) FROM tasks)")
    assert "done-without-row" in checks(store)


def test_nan_and_zero_rows_are_caught(store):
    import zarr

    vec = zarr.open_array(str(group_dir(store) / "vectors"), mode="r+")
    row_a, row_b = (r[0] for r in [one(store, "SELECT row FROM tasks ORDER BY row LIMIT 1 OFFSET 2"),
                                   one(store, "SELECT row FROM tasks ORDER BY row LIMIT 1 OFFSET 4")])
    bad = vec[row_a].copy()
    bad[7] = np.nan
    vec[row_a] = bad
    vec[row_b] = np.zeros(vec.shape[1], dtype=np.float32)
    with embstore.open(store) as st:
        report = verify_store(st.manifest)
    [finding] = [p for p in report.problems if p.check == "bad-vector"]
    assert finding.count == 2
    assert {(e["row"], e["why"]) for e in finding.examples} == {(row_a, "non-finite"), (row_b, "zero")}


def test_two_items_of_different_audio_on_one_row(store):
    (a, ra), (b, rb) = [tuple(r) for r in sqlite3.connect(str(store / "manifest.db")).execute(
        "SELECT item_id, row FROM tasks ORDER BY row LIMIT 2")]
    sql(store, "UPDATE tasks SET row = ? WHERE item_id = ?", (ra, b))
    found = checks(store)
    assert "row-shared" in found and "row-owner" in found


def test_dedup_shared_row_passes_and_a_changed_twin_only_warns(store):
    conn = sqlite3.connect(str(store / "manifest.db"))
    (a, ra), (b, rb) = [tuple(r) for r in conn.execute("SELECT item_id, row FROM tasks ORDER BY row LIMIT 2")]
    hash_a = conn.execute("SELECT f.content_hash FROM files f JOIN items i ON i.file_id = f.id WHERE i.id = ?",
                          (a,)).fetchone()[0]
    assert hash_a
    conn.close()
    # what dedup leaves: b's audio is a's, so b points at a's row
    sql(store, "UPDATE files SET content_hash = ? WHERE id = (SELECT file_id FROM items WHERE id = ?)", (hash_a, b))
    sql(store, "UPDATE tasks SET row = ? WHERE item_id = ?", (ra, b))
    with embstore.open(store) as st:
        report = verify_store(st.manifest)
    assert report.ok, report.as_dict()
    info = report.models["resemblyzer-ge2e"]
    assert info["shared_rows"] == 1 and info["dedup_rows_checked"] == 1
    # then a's file changes on disk (rescan marks it stale, new hash): b's row can no longer be confirmed
    sql(store, "UPDATE files SET content_hash = 'changed' WHERE id = (SELECT file_id FROM items WHERE id = ?)", (a,))
    sql(store, "UPDATE tasks SET status = 'stale' WHERE item_id = ?", (a,))
    with embstore.open(store) as st:
        report = verify_store(st.manifest)
    assert report.ok and [w.check for w in report.warnings] == ["row-owner-changed"]


def test_leftover_partial_file_is_a_warning(store):
    chunk = group_dir(store) / "vectors" / "c" / "0" / "0"
    (chunk.parent / "0.deadbeef.partial").write_bytes(b"half a chunk")
    result = run_cli(str(store))
    assert result.exit_code == 0 and "warning:" in result.output and ".partial" in result.output


def test_unknown_store_and_model_are_one_line_errors(tmp_path, store):
    result = run_cli(str(tmp_path / "nowhere"))
    assert result.exit_code != 0 and "Traceback" not in result.output
    result = run_cli(str(store), "--model", "nope")
    assert result.exit_code != 0 and "no model 'nope'" in result.output


def test_empty_store_passes(tmp_path):
    st = embstore.open(tmp_path / "empty")
    st.close()
    result = run_cli(str(tmp_path / "empty"))
    assert result.exit_code == 0, result.output


def test_real_dedup_rows_pass(tmp_path):
    """Byte-identical copies share their first copy's row through the writer's path."""
    from tests.store_factory import make_store

    st = make_store(tmp_path, speakers=2, per_speaker=2, copies=2)
    report = verify_store(st.manifest)
    assert report.ok, report.as_dict()
    info = report.models["fake"]
    assert info["shared_rows"] == 1 and info["dedup_rows_checked"] == 2 and info["done"] == 6
    st.close()
