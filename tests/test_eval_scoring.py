"""Several trial lists in one call, score files, actual DCF, bad trial lists, plots."""

import itertools
import json
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from click.testing import CliRunner

from embstore.cli import cli
from embstore.eval.metrics import compute_act_dcf, error_curve, evaluate
from embstore.eval.trials import read_trials
from embstore.errors import StoreError
from tests.store_factory import make_store


@pytest.fixture(scope="module")
def store_and_lists(tmp_path_factory):
    """6 speakers x 5 items with overlapping synthetic speakers (noise 1.2: EER > 0),
    and two lists: all pairs of the first three speakers, all pairs of the others."""
    tmp = tmp_path_factory.mktemp("lists")
    st = make_store(tmp, speakers=6, per_speaker=5, dim=8)
    from tests.store_factory import fill_embeddings, synthetic_vector

    # a second model whose speakers overlap, so the metrics are not all zero
    fill_embeddings(st, dim=8, name="noisy", vector_of=lambda uid, spk: synthetic_vector(uid, spk, 8, noise=1.2))
    ids = [r["uid"] for r in st.manifest.query("SELECT uid FROM items ORDER BY uid")]
    lists = []
    for name, speakers in (("vox_O.txt", {"spk0", "spk1", "spk2"}), ("vox_E.txt", {"spk3", "spk4", "spk5"})):
        mine = [i for i in ids if i.split("/")[1] in speakers]
        path = tmp / name
        path.write_text("".join(
            f"{a} {b} {'target' if a.split('/')[1] == b.split('/')[1] else 'nontarget'}\n"
            for a, b in itertools.combinations(mine, 2)
        ))
        lists.append(path)
    yield st, lists
    st.close()


def test_several_lists_one_table_and_a_json_list(store_and_lists):
    st, lists = store_and_lists
    runner = CliRunner()
    args = ["score", str(st.path), *map(str, lists), "--model", "noisy", "--p-target", "0.01,0.05,0.5"]
    result = runner.invoke(cli, args + ["--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert [r["list"] for r in rows] == ["vox_O.txt", "vox_E.txt"] and {r["norm"] for r in rows} == {"none"}
    for row, path in zip(rows, lists):
        # the numbers of each list are those of its scores alone
        trials = read_trials(path)
        assert row["trials"] == len(trials) == 105 and row["missing"] == 0 and row["model"] == "noisy"
        assert row["targets"] == int(trials.labels.sum()) == 30
        assert set(row["min_dcf"]) == set(row["act_dcf"]) == {"0.01", "0.05", "0.5"}
        assert 0 < row["eer"] < 0.5
        for p in ("0.01", "0.05", "0.5"):
            assert row["min_dcf"][p] <= row["act_dcf"][p] + 1e-12
    assert rows[0]["eer"] != rows[1]["eer"]
    text = runner.invoke(cli, args)
    assert text.exit_code == 0, text.output
    lines = text.output.splitlines()
    header = next(line for line in lines if line.startswith("list"))
    assert "minDCF 0.5" in header and "actDCF 0.01" in header
    body = [line.split() for line in lines if line.startswith("vox_")]
    assert [b[0] for b in body] == ["vox_O.txt", "vox_E.txt"]
    assert body[0][4] == f"{100 * rows[0]['eer']:.3f}"
    # two norms x two lists: four rows, list-major
    out = st.score(lists, model="noisy", norm="none,snorm", cohort="dataset:ds")
    assert [(r["list"], r["norm"]) for r in out.results] == [
        ("vox_O.txt", "none"), ("vox_O.txt", "snorm"), ("vox_E.txt", "none"), ("vox_E.txt", "snorm")]


def test_score_files_read_back(store_and_lists, tmp_path):
    st, lists = store_and_lists
    # one list, one norm: --scores is a file
    single = tmp_path / "one.score"
    out = st.score(lists[0], model="noisy", scores=single)
    assert out.score_files == [str(single)]
    ids, vectors = st.embeddings(model="noisy")
    vec = dict(zip(ids, vectors.astype(np.float64)))
    written = [line.split() for line in single.read_text().splitlines()]
    source = [line.split() for line in lists[0].read_text().splitlines()]
    assert [(w[0], w[1], w[3]) for w in written] == [(s[0], s[1], s[2]) for s in source]
    for a, b, value, _ in written:
        cos = vec[a] @ vec[b] / np.linalg.norm(vec[a]) / np.linalg.norm(vec[b])
        assert float(value) == pytest.approx(cos, abs=1e-6)
    # the scores give back the reported EER
    scores = np.array([float(w[2]) for w in written])
    labels = np.array([w[3] == "target" for w in written])
    assert evaluate(scores, labels).eer == pytest.approx(out.results[0]["eer"], abs=1e-5)

    # several lists and norms: one file each in a folder
    folder = tmp_path / "scores"
    result = CliRunner().invoke(cli, [
        "score", str(st.path), *map(str, lists), "--model", "noisy", "--norm", "none", "--norm", "asnorm",
        "--cohort", "dataset:ds", "--top-n", "3", "--scores", str(folder)])
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["vox_E.txt.asnorm3.score", "vox_E.txt.none.score", "vox_O.txt.asnorm3.score",
                     "vox_O.txt.none.score"]
    raw = [line.split() for line in (folder / "vox_O.txt.none.score").read_text().splitlines()]
    normed = [line.split() for line in (folder / "vox_O.txt.asnorm3.score").read_text().splitlines()]
    assert [r[:2] for r in raw] == [n[:2] for n in normed] == [s[:2] for s in source]
    assert any(abs(float(r[2]) - float(n[2])) > 0.01 for r, n in zip(raw, normed))
    # a folder is needed for several files
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(StoreError, match="into a folder"):
        st.score(lists, model="noisy", scores=blocker)
    # the old option name still works
    old = tmp_path / "old.score"
    result = CliRunner().invoke(cli, ["score", str(st.path), str(lists[0]), "--model", "noisy",
                                      "--scores-out", str(old)])
    assert result.exit_code == 0 and old.read_text() == single.read_text()


def test_missing_ids_are_counted_and_listed(store_and_lists, tmp_path):
    st, lists = store_and_lists
    trials = tmp_path / "t.txt"
    trials.write_text(lists[0].read_text() + "ds/spk0/utt0 ds/spk9/utt1 target\nnobody ds/spk1/utt0 nontarget\n")
    out = st.score(trials, model="noisy")
    row = out.results[0]
    assert row["missing"] == 2 and row["trials"] == 105
    assert row["missing_ids"] == ["nobody", "ds/spk9/utt1"] and row["missing_ids_total"] == 2
    result = CliRunner().invoke(cli, ["score", str(st.path), str(trials), "--model", "noisy"])
    # ids the store does not hold leave the job undone: exit 5 and one line saying so
    assert result.exit_code == 5, result.output
    assert "2 trial ids left: 2 not in the store (scan their audio first)" in result.output
    assert "warning: t.txt: 2 of 107 trials skipped; 2 ids have no embedding in the store (nobody, ds/spk9/utt1)" \
        in result.output


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "no trials in the file"),
        ("\n# only a comment\n\n", "no trials in the file"),
        ("a b target\nc d\n", r"t.txt:2: expected 3 fields \(id id label\), got 2: 'c d'"),
        ("a b target\n\n# x\na b c d\n", "t.txt:4: expected 3 fields"),
        ("a b target\na c perhaps\n", "t.txt:2: 'perhaps' is not a trial label"),
        ("a b maybe\n", "t.txt:1: no target/nontarget"),
        ("1 a b\n0 a c\nx a d\n", "t.txt:3: 'x' is not a trial label"),
    ],
)
def test_bad_trial_lists_name_the_line(store_and_lists, tmp_path, text, message):
    st, _ = store_and_lists
    bad = tmp_path / "t.txt"
    bad.write_text(text)
    with pytest.raises(StoreError, match=message):
        read_trials(bad)
    result = CliRunner().invoke(cli, ["score", str(st.path), str(bad)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_missing_and_unreadable_trial_files(store_and_lists, tmp_path):
    st, _ = store_and_lists
    result = CliRunner().invoke(cli, ["score", str(st.path), str(tmp_path / "absent.txt")])
    assert result.exit_code == 2 and "does not exist" in result.output
    with pytest.raises(StoreError, match="absent.txt: cannot read the trial list"):
        st.score(tmp_path / "absent.txt", model="noisy")
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00 a b")
    with pytest.raises(StoreError, match="not a text trial list"):
        read_trials(binary)
    with pytest.raises(StoreError, match="at least one trial list"):
        st.score([], model="noisy")


def test_both_readers_agree(tmp_path):
    # the column fast path and the line-by-line reader give the same lists
    clean = tmp_path / "clean.txt"
    clean.write_text("1 a b\n0 a c\n1 b c\n")
    commented = tmp_path / "commented.txt"
    commented.write_text("# header\n1 a b\n\n0 a c\n1 b c\n")
    for path in (clean, commented):
        t = read_trials(path)
        assert (t.enroll, t.test, t.labels.tolist()) == (["a", "a", "b"], ["b", "c", "c"], [True, False, True])


def test_actual_dcf_and_thresholds_known_answers():
    scores = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    labels = [0, 0, 0, 1, 0, 1, 1, 1, 1, 1]
    ev = evaluate(scores, labels, p_targets=(0.01, 0.5))
    assert ev.eer == pytest.approx(1 / 6)
    # the sweep point nearest the crossing rejects 1..4: miss 1/6, fa 1/4
    assert ev.eer_threshold == pytest.approx(4.5)
    assert ev.act_dcf[0.5] == pytest.approx(1 / 6 + 1 / 4)
    assert ev.act_dcf[0.01] == pytest.approx(1 / 6 + 99 * 0.25)
    assert ev.act_dcf[0.01] == pytest.approx(compute_act_dcf(scores, labels, 4.5, p_target=0.01))
    assert ev.min_dcf[0.01] == pytest.approx(1 / 6) and ev.min_dcf_threshold[0.01] == pytest.approx(5.5)
    assert ev.min_dcf_point[0.01] == pytest.approx((0.0, 1 / 6))
    curve = error_curve([0.5, 0.5, 0.7], [0, 1, 1])
    # thresholds: accept all, between the tie and 0.7, reject all
    assert curve.thresholds.tolist() == pytest.approx([0.5, 0.6, np.nextafter(0.7, 1)])
    assert curve.miss.tolist() == pytest.approx([0, 0.5, 1]) and curve.fa.tolist() == pytest.approx([1, 0, 0])


def test_plots_are_valid_images_with_shared_axes(store_and_lists, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from PIL import Image

    import embstore.eval.plots as plots

    st, lists = store_and_lists
    folder = tmp_path / "plots"
    seen = {}
    real_save = plots.save

    def recording_save(fig, stem, formats=("png", "svg")):
        seen[stem.rsplit("/", 1)[-1]] = [(ax.get_xlim(), ax.get_ylim()) for ax in fig.axes if ax.get_visible()]
        return real_save(fig, stem, formats)

    monkeypatch.setattr(plots, "save", recording_save)
    result = CliRunner().invoke(cli, ["score", str(st.path), *map(str, lists), "--model", "noisy",
                                      "--norm", "none,snorm", "--cohort", "dataset:ds", "--plot", str(folder)])
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted(f"{stem}.{ext}" for stem in ("vox_O.txt_det", "vox_O.txt_hist", "vox_E.txt_det",
                                                         "vox_E.txt_hist", "all_det") for ext in ("png", "svg"))
    for png in folder.glob("*.png"):
        with Image.open(png) as image:
            image.verify()
        with Image.open(png) as image:
            assert image.size[0] > 300 and image.size[1] > 200
    for svg in folder.glob("*.svg"):
        assert ET.parse(svg).getroot().tag == "{http://www.w3.org/2000/svg}svg"
    # every DET shares one range; each norm's histograms share one score axis across lists
    assert len({tuple(seen[s][0]) for s in ("vox_O.txt_det", "vox_E.txt_det", "all_det")}) == 1
    o_hist, e_hist = seen["vox_O.txt_hist"], seen["vox_E.txt_hist"]
    assert len(o_hist) == len(e_hist) == 2
    assert [x for x, _ in o_hist] == [x for x, _ in e_hist]
    assert o_hist[0][0] != o_hist[1][0]  # raw cosine and S-norm scores live on different scales
    # each norm's curve is drawn and labelled with its EER
    det = (folder / "all_det.svg").read_text()
    assert det.count("<path") > 20
