"""`embstore cluster`: pseudo-speaker labels stored beside the real ones."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

import embstore
from embstore.cli import cli


# one worker for the module: its run is made once (tests/conftest.py reads this line)
pytestmark = pytest.mark.xdist_group("clustered-store")


@pytest.fixture(scope="module")
def store(speech_corpus, tmp_path_factory):
    """4 utterances of each of 3 speakers (real, or synthetic without ../shared/data), embedded."""
    root = speech_corpus.copy(tmp_path_factory.mktemp("clu") / "root", speakers=3, per_speaker=4)
    path = tmp_path_factory.mktemp("clus") / "s"
    st = embstore.open(path)
    st.scan([root])
    st.extract()
    st.close()
    return path


def test_cluster_labels_stored_and_replaced(store):
    runner = CliRunner()
    out = runner.invoke(cli, ["cluster", str(store), "--dataset", "ds", "--num-speakers", "3", "--json"])
    assert out.exit_code == 0, out.output
    report = json.loads(out.output)
    assert report["clusters"] == 3 and report["clustered"] == 12 and report["algorithm"] == "ahc"
    assert report["purity"] >= 0.9, report
    st = embstore.open(store)
    labels = st.manifest.query("SELECT cluster, count(*) FROM items GROUP BY cluster")
    assert sorted(r[1] for r in labels) == [4, 4, 4] and all(r[0].startswith("c") for r in labels)
    again = st.cluster("ds", num_speakers=2)
    assert again.clusters == 2
    assert len(st.manifest.query("SELECT DISTINCT cluster FROM items")) == 2
    st.close()


def test_by_cluster_in_speakers_and_centroids(store):
    st = embstore.open(store)
    st.cluster("ds", num_speakers=3)
    st.close()
    runner = CliRunner()
    out = runner.invoke(cli, ["speakers", str(store), "--by", "cluster", "--json"])
    assert out.exit_code == 0, out.output
    groups = json.loads(out.output)
    assert len(groups) == 3 and all(g["speaker"].startswith("ds/c") and g["items"] == 4 for g in groups), groups
    out = runner.invoke(cli, ["centroids", str(store), "--by", "cluster", "--json"])
    assert out.exit_code == 0, out.output
    assert sorted(c["speaker"] for c in json.loads(out.output)) == sorted(g["speaker"] for g in groups)


def test_exports_by_cluster(store, tmp_path):
    st = embstore.open(store)
    st.cluster("ds", num_speakers=3)
    st.close()
    runner = CliRunner()
    out = runner.invoke(cli, ["export-kaldi", str(store), str(tmp_path / "k"), "--by", "cluster", "--json"])
    assert out.exit_code == 0, out.output
    spk = {line.split()[1] for line in (tmp_path / "k" / "utt2spk").read_text().splitlines()}
    assert len(spk) == 3 and all(s.startswith("ds/c") for s in spk)
    out = runner.invoke(cli, ["export-npy", str(store), str(tmp_path / "n"), "--by", "cluster", "--json"])
    assert out.exit_code == 0, out.output
    assert set((tmp_path / "n" / "speakers.txt").read_text().split()) == spk


def test_export_pkl_by_cluster_moves_files_and_leaves_unclustered_out(store, tmp_path):
    import pickle

    st = embstore.open(store)
    st.cluster("ds", num_speakers=3)
    out = tmp_path / "p"
    first = st.export_pkl(out)
    assert first.written == 12 and first.left_out == 0
    speakers = {p.parent.name for p in out.rglob("*.pkl")}
    report = st.export_pkl(out, by="cluster")
    # the same folder regrouped: every file moves, the speaker folders are gone
    assert report.items == 12 and report.written == 12 and report.moved == 12, report
    files = sorted(out.rglob("*.pkl"))
    assert {p.parent.name for p in files} == {r[0] for r in st.manifest.query("SELECT DISTINCT cluster FROM items")}
    assert not speakers & {p.name for p in (out / "ds").iterdir()}
    for f in files:
        payload = pickle.loads(f.read_bytes())
        assert payload["cluster"] == f.parent.name and payload["speaker"] in speakers
    assert st.export_pkl(out, by="cluster").unchanged == 12
    with st.manifest.conn:
        uid = st.manifest.conn.execute("UPDATE items SET cluster = NULL WHERE id = (SELECT min(id) FROM items) RETURNING uid")\
            .fetchone()[0]
    report = st.export_pkl(out, by="cluster")
    assert report.left_out == 1 and report.removed == 1 and report.items == 11, report
    assert uid not in {pickle.loads(f.read_bytes())["id"] for f in out.rglob("*.pkl")}
    st.close()
    runner = CliRunner()
    res = runner.invoke(cli, ["export-pkl", str(store), str(out), "--by", "cluster"])
    # an item left out is work left (exit 5), and the line says what finishes it
    assert res.exit_code == 5 and "1 unclustered left out" in res.output, res.output
    assert "1 item left: 1 embedded but not clustered yet (run `embstore cluster`" in res.output, res.output
    res = runner.invoke(cli, ["export-pkl", str(store), str(out), "--by", "cluster", "--speaker", "x"])
    assert res.exit_code == 1 and res.output.startswith("Error:") and res.output.count("\n") == 1, res.output


def test_cluster_errors_are_one_line(store):
    runner = CliRunner()
    for args in (["--dataset", "nope"], ["--dataset", "ds", "--threshold", "0.7", "--num-speakers", "2"],
                 ["--dataset", "ds", "--num-speakers", "99"]):
        out = runner.invoke(cli, ["cluster", str(store), *args])
        assert out.exit_code == 1 and out.output.startswith("Error:") and out.output.count("\n") == 1, out.output
