"""The real corpus with the default model: every norm, the report, planted label noise."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

import embstore
from embstore.cli import cli

pytestmark = pytest.mark.slow


@pytest.mark.exhaustive
def test_real_corpus_norms_report_and_label_noise(shared_data, tmp_path):
    # one test, so pytest-xdist never extracts the corpus twice
    st = embstore.open(tmp_path / "store")
    st.scan([shared_data.parent])
    summary = st.extract(device="cpu", workers=1)
    assert summary.done == 100 and summary.failed == 0
    trials = str(shared_data / "trials.txt")
    everything = f"dataset:{shared_data.name}"
    result = CliRunner().invoke(cli, [
        "score", str(st.path), trials, "--norm", "none,snorm,asnorm", "--mean-from", everything,
        "--cohort", everything, "--top-n", "5", "--json", "--plot", str(tmp_path / "plots")])
    assert result.exit_code == 0, result.output
    rows = {r["norm"]: r for r in json.loads(result.output[result.output.index("["):])}
    assert set(rows) == {"mean", "mean+snorm", "mean+asnorm5"}
    assert all(r["trials"] == 4950 and r["missing"] == 0 for r in rows.values())
    raw = st.score(trials).results[0]
    assert raw["eer"] <= 0.01
    # normalisation against the corpus's own speakers separates them at least as well
    assert rows["mean+asnorm5"]["eer"] <= raw["eer"] and rows["mean+snorm"]["eer"] <= raw["eer"]
    assert len(list((tmp_path / "plots").iterdir())) == 4

    # 5 % of the items relabelled to a wrong speaker: the top 5 outliers are exactly those
    items = st.manifest.query("SELECT uid, speaker FROM items ORDER BY uid")
    speakers = sorted({r["speaker"] for r in items})
    rng = np.random.default_rng(7)
    planted = {}
    for k in rng.choice(len(items), 5, replace=False):
        true = items[k]["speaker"]
        planted[items[k]["uid"]] = (true, str(rng.choice([s for s in speakers if s != true])))
    with st.manifest.write() as conn:
        conn.executemany("UPDATE items SET speaker = ? WHERE uid = ?", [(w, u) for u, (_, w) in planted.items()])
    found = st.outliers(top=5).outliers
    assert {o.id for o in found} == set(planted)
    assert all(o.nearest_speaker == planted[o.id][0] for o in found)

    out = tmp_path / "report.html"
    st.report(out, trials=[trials], norm="none,asnorm", cohort=everything, top_n=5)
    text = out.read_text()
    # durations, items per speaker, runs, one DET, one histogram figure (no failures to draw)
    assert text.count("<svg") == 5 and all(uid in text for uid in planted)
    st.close()
