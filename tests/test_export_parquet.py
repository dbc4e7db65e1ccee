"""export-parquet (shards, schema, incremental rewrites) and export-kaldi --matrix, on
stores with known (synthetic) embeddings."""

from __future__ import annotations

import json

import kaldiio
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from click.testing import CliRunner

from embstore.cli import cli
from embstore.export import parquet
from tests.store_factory import fill_embeddings, make_store


def read_all(out) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in sorted(out.glob("part-*.parquet"))])


def test_columns_types_metadata_and_vectors(tmp_path):
    st = make_store(tmp_path, speakers=2, per_speaker=3)
    result = CliRunner().invoke(cli, ["export-parquet", str(st.path), str(tmp_path / "out"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert (report["items"], report["written"], report["files"]) == (6, 1, ["part-00000.parquet"])
    table = read_all(tmp_path / "out")
    assert table.column_names == ["id", "speaker", "dataset", "path", "start", "end", "embedding"]
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 16)
    meta = table.schema.metadata
    model = st.models()[0]
    assert json.loads(meta[b"embstore"])["fingerprint"] == model.fingerprint
    features = json.loads(meta[b"huggingface"])["info"]["features"]
    assert features["embedding"] == {"feature": {"dtype": "float32", "_type": "Value"}, "length": 16, "_type": "Sequence"}
    ids, vectors = st.embeddings()
    got = dict(zip(table.column("id").to_pylist(), np.stack(table.column("embedding").to_numpy(zero_copy_only=False))))
    assert set(got) == set(ids)
    for uid, vector in zip(ids, vectors):
        assert np.array_equal(got[uid], vector)
    row = table.slice(0, 1).to_pylist()[0]
    assert row["path"] == str(tmp_path / "audio" / "ds" / f"{row['speaker']}" / (row["id"].rsplit("/", 1)[1] + ".wav"))
    assert row["start"] is None and row["end"] is None and row["dataset"] == "ds"
    st.close()


def test_second_export_rewrites_only_changed_shards(tmp_path, monkeypatch):
    monkeypatch.setattr(parquet, "SHARD_ITEMS", 4)  # item numbers 1-3, 4-7, 8-11, 12
    st = make_store(tmp_path, speakers=3, per_speaker=4)
    out = tmp_path / "out"
    first = st.export_parquet(out)
    assert first.written == 4 and first.items == 12 and len(first.files) == 4
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*")}
    again = st.export_parquet(out)
    assert (again.written, again.unchanged, again.removed) == (0, 4, 0)
    # a relabelled item rewrites its shard only; a cluster label (a new column) rewrites all
    with st.manifest.write() as conn:
        conn.execute("UPDATE items SET speaker = 'renamed' WHERE id = 5")
    third = st.export_parquet(out)
    assert (third.written, third.unchanged) == (1, 3)
    assert {p.name for p in out.glob("part-*") if p.stat().st_mtime_ns != mtimes[p.name]} == {"part-00001.parquet"}
    assert "renamed" in pq.read_table(out / "part-00001.parquet").column("speaker").to_pylist()
    with st.manifest.write() as conn:
        conn.execute("UPDATE items SET cluster = 'c1' WHERE id IN (1, 2)")
    clustered = st.export_parquet(out)
    assert clustered.written == 4
    table = read_all(out)
    assert table.column_names[-2:] == ["cluster", "embedding"] and table.column("cluster").null_count == 10
    # items gone from the store: their emptied shard is deleted
    with st.manifest.write() as conn:
        conn.execute("UPDATE items SET removed = 1 WHERE id >= 8")
    shrunk = st.export_parquet(out)
    assert shrunk.removed == 2 and shrunk.items == 7
    assert sorted(p.name for p in out.glob("part-*")) == ["part-00000.parquet", "part-00001.parquet"]
    assert read_all(out).num_rows == 7
    st.close()


def test_a_new_model_rewrites_every_shard(tmp_path):
    st = make_store(tmp_path, speakers=2, per_speaker=2)
    out = tmp_path / "out"
    st.export_parquet(out)
    fill_embeddings(st, dim=8, name="other")
    again = st.export_parquet(out, model="other")
    assert again.written == 1 and again.dim == 8
    assert read_all(out).schema.field("embedding").type == pa.list_(pa.float32(), 8)
    st.close()


def test_kaldi_matrix_output(tmp_path):
    st = make_store(tmp_path, speakers=2, per_speaker=2)
    result = CliRunner().invoke(cli, ["export-kaldi", str(st.path), str(tmp_path / "k"), "--matrix"])
    assert result.exit_code == 0, result.output
    ids, vectors = st.embeddings()
    table = kaldiio.load_scp(str(tmp_path / "k" / "xvector.scp"))
    for uid, vector in zip(ids, vectors):
        assert table[uid].shape == (1, 16) and np.array_equal(table[uid][0], vector)
    plain = st.export_kaldi(tmp_path / "v")
    assert plain.items == 4 and kaldiio.load_scp(str(tmp_path / "v" / "xvector.scp"))[ids[0]].shape == (16,)
    st.close()


def test_a_missing_optional_package_is_one_line_naming_its_extra(tmp_path, monkeypatch):
    import importlib.util

    st = make_store(tmp_path, speakers=1, per_speaker=1)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("pyarrow", "lhotse") else real(name, *a))
    for args in (["export-parquet", str(st.path), str(tmp_path / "p")], ["export-lhotse", str(st.path), str(tmp_path / "l")],
                 ["scan", str(st.path), "--hf", str(tmp_path)]):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
        assert "is not installed: pip install 'embstore[" in result.output
    assert not (tmp_path / "p").exists() and not (tmp_path / "l").exists()
    st.close()


def test_a_failed_shard_write_leaves_no_temporary_file_and_the_old_shard(tmp_path, monkeypatch):
    st = make_store(tmp_path, speakers=2, per_speaker=2)
    out = tmp_path / "out"
    st.export_parquet(out)
    shard = out / "part-00000.parquet"
    before = shard.read_bytes()
    with st.manifest.write() as conn:
        conn.execute("UPDATE items SET speaker = 'renamed' WHERE id = 1")  # its shard is rewritten

    def boom(*args, **kwargs):
        raise RuntimeError("injected mid-write")  # not an OSError

    with monkeypatch.context() as m:
        m.setattr(parquet, "embedding_table", boom)
        try:
            st.export_parquet(out)
        except RuntimeError:
            pass
        else:
            raise AssertionError("the injected failure did not happen")
    assert sorted(p.name for p in out.iterdir()) == [".embstore-export.json", "part-00000.parquet"]
    assert shard.read_bytes() == before
    assert st.export_parquet(out).written == 1
    assert "renamed" in pq.read_table(shard).column("speaker").to_pylist()
    st.close()
