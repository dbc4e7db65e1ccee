"""speakers / speaker / similar / centroids, checked against brute force over the store."""

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

from embstore import query
from embstore.cli import cli
from embstore.errors import StoreError
from embstore.extract import reference
from tests.audio_factory import write
from tests.store_factory import fill_embeddings, make_store


def unit(v):
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def brute_force(st, query_vector, k, exclude=()):
    ids, vectors = st.embeddings()
    scores = unit(vectors) @ unit(query_vector)
    ranked = sorted((i for i in range(len(ids)) if ids[i] not in exclude), key=lambda i: (-scores[i], ids[i]))
    return [(ids[i], scores[i]) for i in ranked[:k]]


@pytest.fixture()
def store(tmp_path):
    # 4 speakers x 5, plus 2 byte-identical copies of one file (rows shared by 3 items)
    st = make_store(tmp_path, speakers=4, per_speaker=5, copies=2)
    yield st
    st.close()


def test_speakers_with_counts_per_model(store):
    rows = {r["speaker"]: r for r in store.speakers()}
    assert set(rows) == {"dup", "spk0", "spk1", "spk2", "spk3"}
    assert rows["spk1"] == {"speaker": "spk1", "datasets": ["ds"], "items": 5, "done": 5}
    write(store.path.parent / "audio/ds/spk1/late.wav", 0.2, seed=31)  # scanned, not embedded
    store.scan([store.path.parent / "audio"])
    assert {r["speaker"]: r["done"] for r in store.speakers()}["spk1"] == 5
    fill_embeddings(store, name="second")
    result = CliRunner().invoke(cli, ["speakers", str(store.path), "--json"])
    assert result.exit_code == 0, result.output
    by_name = {r["speaker"]: r for r in json.loads(result.output)}
    assert by_name["spk1"]["items"] == 6 and by_name["spk1"]["done"] == {"fake": 5, "second": 6}
    result = CliRunner().invoke(cli, ["speakers", str(store.path), "--model", "fake"])
    assert result.exit_code == 0 and "spk1" in result.output


def test_speaker_items_and_vectors(store):
    runner = CliRunner()
    result = runner.invoke(cli, ["speaker", str(store.path), "spk2", "--json", "--vectors"])
    assert result.exit_code == 0, result.output
    items = json.loads(result.output)
    ids, vectors = store.embeddings(speaker="spk2")
    assert [i["id"] for i in items] == ids
    for item, vec in zip(items, vectors):
        assert item["dataset"] == "ds" and os.path.exists(item["path"]) and item["done"] is True
        assert np.allclose(item["embedding"], vec, rtol=0, atol=1e-6)
    result = runner.invoke(cli, ["speaker", str(store.path), "spk2"])
    assert result.exit_code == 0 and "ds/spk2/utt4" in result.output
    result = runner.invoke(cli, ["speaker", str(store.path), "spk7"])
    assert result.exit_code == 1 and "no speaker 'spk7'" in result.output and "Traceback" not in result.output


def test_one_speaker_is_read_through_the_speaker_index(store):
    # at 1 M items, walking every done task instead costs ~0.4 s; the index takes ~1 ms
    statements = []
    store.manifest.conn.set_trace_callback(statements.append)
    try:
        ids, _ = store.embeddings(speaker="spk1")
    finally:
        store.manifest.conn.set_trace_callback(None)
    assert len(ids) == 5
    select = next(s for s in statements if s.lstrip().upper().startswith("SELECT") and "i.speaker" in s)
    plan = " ".join(r[3] for r in store.manifest.query("EXPLAIN QUERY PLAN " + select))
    assert "USING INDEX items_speaker" in plan, plan
    assert plan.index("items_speaker") < plan.index("SEARCH t")


def test_similar_matches_brute_force_and_lists_shared_rows(store):
    ids, vectors = store.embeddings()
    vec = dict(zip(ids, vectors))
    for item in ("ds/spk1/utt3", "ds/spk0/utt0"):
        found = store.similar(item_id=item, k=6)
        expected = brute_force(store, vec[item], 6, exclude={item})
        assert [f["id"] for f in found] == [e[0] for e in expected]
        assert np.allclose([f["score"] for f in found], [e[1] for e in expected], atol=1e-5)
        assert all(f["id"] != item for f in found)
    # spk0/utt0 and the two copies share one row: its neighbours include both copies at 1.0
    top = store.similar(item_id="ds/spk0/utt0", k=2)
    assert {f["id"] for f in top} == {"ds/dup/copy0", "ds/dup/copy1"}
    assert all(abs(f["score"] - 1.0) < 1e-5 and f["speaker"] == "dup" for f in top)
    assert set(top[0]) >= {"id", "speaker", "dataset", "score", "path"}
    # a short id: the unique ending of an item id, with or without extension
    assert store.similar(item_id="spk1/utt3.wav", k=6) == store.similar(item_id="ds/spk1/utt3", k=6)
    # the streaming path (read-only store, no cache) gives the same answer
    assert query.similar(store.manifest, item_id="ds/spk1/utt3", k=6, use_cache=False) == store.similar(
        item_id="ds/spk1/utt3", k=6
    )
    assert len(store.similar(item_id="ds/spk1/utt3", k=100)) == len(ids) - 1


def test_similar_never_returns_removed_items_or_orphan_rows(store):
    root = store.path.parent / "audio"
    target = "ds/spk2/utt1"
    before = store.similar(item_id=target, k=30)
    assert "ds/spk2/utt2" in {f["id"] for f in before} and "ds/spk2/utt3" in {f["id"] for f in before}
    (root / "ds/spk2/utt2.wav").unlink()                     # removed item
    write(root / "ds/spk2/utt3.wav", 0.25, seed=4242)        # changed: its old row is orphaned
    store.scan([root])
    found = {f["id"] for f in store.similar(item_id=target, k=30)}
    assert "ds/spk2/utt2" not in found and "ds/spk2/utt3" not in found
    model = store.models()[0]
    old_rows = model.rows
    ids, vectors = store.embeddings()
    opposite = -dict(zip(ids, vectors))[target]
    # re-extract utt3 opposite to the target; its old row still holds the old one, never returned
    fill_embeddings(store, vector_of=lambda uid, spk: opposite)
    assert store.manifest.resolve_model().rows == old_rows + 1
    found = store.similar(item_id=target, k=30)
    assert [f["id"] for f in found].count("ds/spk2/utt3") == 1
    assert found[-1]["id"] == "ds/spk2/utt3"  # the new far-away vector ranks last
    ids, vectors = store.embeddings()
    expected = brute_force(store, dict(zip(ids, vectors))[target], 30, exclude={target})
    assert [f["id"] for f in found] == [e[0] for e in expected]


def test_similar_by_audio_uses_the_stored_model(store, monkeypatch):

    ids, vectors = store.embeddings()
    wanted = dict(zip(ids, vectors))["ds/spk3/utt2"]
    fingerprint = store.models()[0].fingerprint
    loaded = []

    class FakeEncoder:
        def __init__(self, fp):
            self.fingerprint = fp

        def embed_file(self, path, start=None, end=None):
            return wanted * 2.0

    def fake_load(spec, *args, **kwargs):
        loaded.append(spec)
        return FakeEncoder(fingerprint)

    monkeypatch.setattr(reference, "load", fake_load)
    audio = store.path.parent / "audio/ds/spk3/utt2.wav"
    result = CliRunner().invoke(cli, ["similar", str(store.path), "--audio", str(audio), "-k", "3", "--json"])
    assert result.exit_code == 0, result.output
    found = json.loads(result.output)
    assert loaded == ["fake:fake"]
    assert found[0]["id"] == "ds/spk3/utt2" and abs(found[0]["score"] - 1.0) < 1e-5
    assert [f["id"] for f in found] == [e[0] for e in brute_force(store, wanted, 3)]
    # weights changed since extraction: the vectors are not comparable, say so
    monkeypatch.setattr(reference, "load", lambda spec, *a, **k: FakeEncoder("0" * 24))
    result = CliRunner().invoke(cli, ["similar", str(store.path), "--audio", str(audio)])
    assert result.exit_code == 1 and "not comparable" in result.output


def test_similar_cli_errors_are_one_line(store):
    runner = CliRunner()
    result = runner.invoke(cli, ["similar", str(store.path)])
    assert result.exit_code == 2 and "ITEM_ID or --audio" in result.output
    result = runner.invoke(cli, ["similar", str(store.path), "nope"])
    assert result.exit_code == 1 and "no item 'nope'" in result.output
    result = runner.invoke(cli, ["similar", str(store.path), "utt1"])  # ends 4 ids
    assert result.exit_code == 1 and "ambiguous" in result.output and "'utt1'" in result.output
    result = runner.invoke(cli, ["similar", str(store.path), "ds/spk1/utt1", "-k", "2"])
    assert result.exit_code == 0 and "spk1" in result.output and "rank" in result.output


def test_cache_follows_new_rows_and_survives_deletion(store):
    first = store.similar(item_id="ds/spk0/utt1", k=5)
    cache = store.path / "cache"
    assert any(cache.rglob("unit.f32"))
    write(store.path.parent / "audio/ds/spk0/zz.wav", 0.2, seed=9090)
    store.scan([store.path.parent / "audio"])
    ids, vectors = store.embeddings()
    target = dict(zip(ids, vectors))["ds/spk0/utt1"]
    fill_embeddings(store, vector_of=lambda uid, spk: target * 3)  # the new item is the nearest
    found = store.similar(item_id="ds/spk0/utt1", k=5)
    assert found[0]["id"] == "ds/spk0/zz" and found[1:] == first[:4]
    import shutil

    shutil.rmtree(cache)
    assert store.similar(item_id="ds/spk0/utt1", k=5) == found


def test_centroids_are_means_of_unit_vectors(store, tmp_path):
    names, matrix = store.centroids()
    assert names == ["dup", "spk0", "spk1", "spk2", "spk3"] and matrix.dtype == np.float32
    for name, centroid in zip(names, matrix):
        _, vectors = store.embeddings(speaker=name)
        assert np.allclose(centroid, unit(vectors).mean(axis=0), atol=1e-6)
    assert np.allclose(query.centroid_table(store.manifest, use_cache=False)[1], matrix, atol=1e-6)
    out = tmp_path / "c.npz"
    runner = CliRunner()
    result = runner.invoke(cli, ["centroids", str(store.path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    saved = np.load(out)
    assert list(saved["speakers"]) == names and np.array_equal(saved["centroids"], matrix)
    assert list(saved["counts"]) == [2, 5, 5, 5, 5]
    result = runner.invoke(cli, ["centroids", str(store.path), "--json"])
    rows = json.loads(result.output)
    assert rows[1]["speaker"] == "spk0" and rows[1]["items"] == 5
    assert np.allclose(rows[1]["centroid"], matrix[1], atol=1e-6)
    result = runner.invoke(cli, ["centroids", str(store.path)])
    assert result.exit_code == 0 and "spk3" in result.output


def test_resolve_ids_rules(tmp_path):
    st = make_store(tmp_path, speakers=2, per_speaker=2, videos=2)
    got = query.resolve_ids(st.manifest, ["ds/spk0/vid1/00000", "spk0/vid1/00000.wav", "missing"])
    internal = st.manifest.query("SELECT id FROM items WHERE uid = 'ds/spk0/vid1/00000'")[0][0]
    assert got["ds/spk0/vid1/00000"] == internal and got["spk0/vid1/00000.wav"] == internal
    assert got["missing"] is None
    with pytest.raises(StoreError, match="'vid1/00000.flac' is ambiguous"):
        query.resolve_ids(st.manifest, ["vid1/00000.flac"])
    many = [f"spk{s}/vid{v}/{n:05d}" for s in range(2) for v in range(2) for n in range(1)] + [f"x{i}" for i in range(10)]
    resolved = query.resolve_ids(st.manifest, many)  # more than a few: the in-Python suffix index
    assert sum(v is not None for v in resolved.values()) == 4
