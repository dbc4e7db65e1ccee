"""Speaker outliers: planted wrong labels come out first, with their true speaker."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from embstore.cli import cli
from embstore.eval.outliers import leave_one_out_scores
from embstore.errors import StoreError
from tests.store_factory import make_store

PLANTED = {"ds/spk0/utt2": ("spk0", "spk3"), "ds/spk2/utt5": ("spk2", "spk1")}  # uid: (true, wrong label)


@pytest.fixture()
def noisy_store(tmp_path):
    st = make_store(tmp_path, speakers=5, per_speaker=6, dim=16)
    with st.manifest.write() as conn:
        for uid, (_, wrong) in PLANTED.items():
            conn.execute("UPDATE items SET speaker = ? WHERE uid = ?", (wrong, uid))
    yield st
    st.close()


def test_planted_label_errors_come_first(noisy_store):
    found = noisy_store.outliers(top=4).outliers
    assert {o.id for o in found[:2]} == set(PLANTED)
    for o in found[:2]:
        true, wrong = PLANTED[o.id]
        assert o.speaker == wrong and o.nearest_speaker == true
        assert o.margin < 0 < o.nearest_score
    # the rest are genuine items: close to their own speaker
    assert all(o.score > found[1].score + 0.3 for o in found[2:])
    assert [o.score for o in found] == sorted(o.score for o in found)
    # the wrong label's speaker now has 7 items
    assert {o.items for o in found[:2]} == {7}


def test_scores_are_leave_one_out_cosines(noisy_store):
    ids, vectors = noisy_store.embeddings()
    unit = {i: v / np.linalg.norm(v) for i, v in zip(ids, vectors.astype(np.float64))}
    speaker = {r["uid"]: r["speaker"] for r in noisy_store.manifest.query("SELECT uid, speaker FROM items")}
    everything = noisy_store.outliers(below=1.0).outliers
    assert len(everything) == 30
    for o in everything[:5]:
        others = [unit[i] for i in ids if speaker[i] == o.speaker and i != o.id]
        centre = np.mean(others, axis=0)
        assert o.score == pytest.approx(unit[o.id] @ centre / np.linalg.norm(centre), abs=1e-5)
    # the array function on a hand-made case: two items, each the other's centroid
    unit2 = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    sums = np.array([[1.0, 1.0], [1.0, 0.0]])
    got = leave_one_out_scores(unit2, sums, np.array([2, 1]), np.array([0, 0, 1]))
    assert got[0] == pytest.approx(0.0) and got[1] == pytest.approx(0.0) and np.isnan(got[2])


def test_cli_filters_and_json(noisy_store):
    runner = CliRunner()
    result = runner.invoke(cli, ["outliers", str(noisy_store.path), "--top", "3"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split()[:3] == ["item", "speaker", "cos"] and len(lines) == 5
    assert lines[2].split()[0] in PLANTED and lines[2].split()[-1].startswith("-")
    result = runner.invoke(cli, ["outliers", str(noisy_store.path), "--speaker", "spk3", "--json"])
    found = json.loads(result.output)
    assert len(found) == 7 and found[0]["id"] == "ds/spk0/utt2" and {o["speaker"] for o in found} == {"spk3"}
    ranked = noisy_store.outliers(top=3).outliers
    cut = (ranked[1].score + ranked[2].score) / 2
    below = json.loads(runner.invoke(cli, ["outliers", str(noisy_store.path), "--below", str(cut), "--json"]).output)
    assert {o["id"] for o in below} == set(PLANTED)
    assert runner.invoke(cli, ["outliers", str(noisy_store.path), "--dataset", "ds", "--json"]).exit_code == 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--top", "0"], "--top must be at least 1"),
        (["--below", "2"], "--below is a cosine"),
        (["--top", "3", "--below", "0.2"], "give --top or --below, not both"),
        (["--speaker", "nobody"], "no embedded items of speaker 'nobody'"),
        (["--dataset", "nope"], "no embedded items of dataset 'nope'"),
        (["--model", "nope"], "no model 'nope'"),
    ],
)
def test_bad_outlier_options(noisy_store, args, message):
    result = CliRunner().invoke(cli, ["outliers", str(noisy_store.path), *args])
    assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output


def test_speakers_with_one_item_have_no_score(tmp_path):
    st = make_store(tmp_path, speakers=3, per_speaker=1)
    with pytest.raises(StoreError, match="no speaker in the selection has two embedded items"):
        st.outliers()
    st.close()
