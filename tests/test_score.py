"""EER / minDCF known answers, trial lists, `embstore score` on synthetic and real stores."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

import embstore
from embstore.cli import cli
from embstore.eval.metrics import compute_eer, compute_min_dcf
from embstore.eval.trials import parse_trials
from embstore.errors import StoreError
from tests.store_factory import make_store


# -- the metrics, on hand-made score sets ----------------------------------------------------


def test_eer_known_answers():
    assert compute_eer([0.1, 0.2, 0.3, 0.4], [0, 0, 1, 1]) == 0.0           # separable
    assert compute_eer([0.4, 0.3, 0.2, 0.1], [0, 0, 1, 1]) == 1.0           # inverted
    assert compute_eer([0.1, 0.3, 0.2, 0.4], [0, 0, 1, 1]) == pytest.approx(0.5)
    assert compute_eer([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1]) == pytest.approx(0.5)  # ties decided together
    # nontargets 1,2,3,5; targets 4,6..10: at a threshold of 5.5 miss = 1/6, fa = 0;
    # at 4.5 miss = 1/6, fa = 1/4: the curves cross at 1/6
    scores = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    labels = [0, 0, 0, 1, 0, 1, 1, 1, 1, 1]
    assert compute_eer(scores, labels) == pytest.approx(1 / 6)
    # order of trials does not matter
    perm = np.random.default_rng(0).permutation(10)
    assert compute_eer(np.array(scores)[perm], np.array(labels)[perm]) == pytest.approx(1 / 6)


def test_min_dcf_known_answers():
    scores = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    labels = [0, 0, 0, 1, 0, 1, 1, 1, 1, 1]
    # p=0.01, costs 1: normalised cost = P_miss + 99 P_fa; best at 5.5: 1/6 + 0
    assert compute_min_dcf(scores, labels, p_target=0.01) == pytest.approx(1 / 6)
    # p=0.5: P_miss + P_fa; best 1/6 again (at 3.5 it is 0 + 1/4)
    assert compute_min_dcf(scores, labels, p_target=0.5) == pytest.approx(1 / 6)
    # c_miss=10, p=0.5: (10 P_miss + P_fa) / 1; at 3.5: 0 + 0.25 beats 10/6
    assert compute_min_dcf(scores, labels, p_target=0.5, c_miss=10) == pytest.approx(0.25)
    assert compute_min_dcf([0.1, 0.2, 0.3, 0.4], [0, 0, 1, 1]) == 0.0
    # never better than accepting or rejecting everything: cost 1 at worst
    assert compute_min_dcf([0.4, 0.3, 0.2, 0.1], [0, 0, 1, 1]) == pytest.approx(1.0)


# -- trial lists ------------------------------------------------------------------------------


def test_parse_trials_formats(tmp_path):
    kaldi = tmp_path / "kaldi.txt"
    kaldi.write_text("a b target\n# comment\n\na c nontarget\nb c 1\n")
    assert parse_trials(str(kaldi)) == [("a", "b", True), ("a", "c", False), ("b", "c", True)]
    vox = tmp_path / "vox.txt"
    vox.write_text("1 id1/v/00001.wav id1/w/00002.wav\n0 id1/v/00001.wav id2/x/00001.wav\n")
    assert parse_trials(str(vox)) == [
        ("id1/v/00001.wav", "id1/w/00002.wav", True), ("id1/v/00001.wav", "id2/x/00001.wav", False),
    ]
    for text, message in [
        ("a b maybe\n", "no target/nontarget"),
        ("a b target\na b c d\n", ":2: expected 3 fields"),
        ("a b target\na c perhaps\n", ":2: 'perhaps' is not a trial label"),
        ("\n# nothing\n", "no trials"),
    ]:
        bad = tmp_path / "bad.txt"
        bad.write_text(text)
        with pytest.raises(StoreError, match=message):
            parse_trials(str(bad))


# -- scoring a synthetic store ----------------------------------------------------------------


@pytest.fixture()
def vox_store(tmp_path):
    # VoxCeleb shape: spk<s>/vid<v>/<n>.wav; stems repeat across speakers and videos
    st = make_store(tmp_path, speakers=3, per_speaker=4, videos=2)
    yield st
    st.close()


def test_score_store_vox_style_ids_missing_and_scores_out(vox_store, tmp_path):
    trials = tmp_path / "trials.txt"
    lines = []
    ids = [f"spk{s}/vid{v}/{n:05d}.wav" for s in range(3) for v in range(2) for n in range(2)]
    for i, a in enumerate(ids):
        for b in ids[i + 1 :]:
            lines.append(f"{int(a[:4] == b[:4])} {a} {b}")
    lines.append("1 spk0/vid0/00000.wav spk9/vid0/00000.wav")   # not in the store
    trials.write_text("\n".join(lines) + "\n")
    scores = tmp_path / "scores.txt"
    result = CliRunner().invoke(
        cli, ["score", str(vox_store.path), str(trials), "--json", "--scores-out", str(scores)]
    )
    assert result.exit_code == 5 and "1 trial id left: 1 not in the store" in result.output, result.output
    out = json.loads(result.output[result.output.index("["): result.output.rindex("]") + 1])
    assert len(out) == 1
    out = out[0]
    assert {"eer", "min_dcf", "act_dcf", "trials", "missing", "missing_ids", "list", "norm", "model"} <= set(out)
    assert out["trials"] == len(lines) - 1 and out["missing"] == 1 and out["missing_ids"] == ["spk9/vid0/00000.wav"]
    assert out["eer"] == 0.0 and out["min_dcf"] == {"0.01": 0.0, "0.05": 0.0}  # synthetic speakers are well apart
    written = scores.read_text().splitlines()
    assert len(written) == out["trials"]
    a, b, score, label = written[0].split()
    assert (a, b, label) == ("spk0/vid0/00000.wav", "spk0/vid0/00001.wav", "target") and -1 <= float(score) <= 1
    # the same numbers through the API, and the text output
    api = vox_store.score(trials).results[0]
    assert api["eer"] == out["eer"] and api["targets"] + api["nontargets"] == out["trials"]
    result = CliRunner().invoke(cli, ["score", str(vox_store.path), str(trials), "--p-target", "0.05"])
    assert result.exit_code == 5, result.output
    row = next(line.split() for line in result.output.splitlines() if line.startswith("trials.txt"))
    assert row == ["trials.txt", "none", str(len(lines) - 1), "1", "0.000", "0.0000", "0.0000"]
    assert "1 of 67 trials skipped" in result.output


def test_score_cosine_values_are_exact(vox_store, tmp_path):
    ids, vectors = vox_store.embeddings()
    vec = dict(zip(ids, vectors))
    trials = tmp_path / "t.txt"
    trials.write_text("ds/spk0/vid0/00000 ds/spk1/vid1/00001 nontarget\nds/spk0/vid0/00000 ds/spk0/vid1/00001 target\n")
    scores = tmp_path / "s.txt"
    vox_store.score(trials, scores=str(scores))
    got = [float(line.split()[2]) for line in scores.read_text().splitlines()]
    a = vec["ds/spk0/vid0/00000"]
    for value, other in zip(got, ["ds/spk1/vid1/00001", "ds/spk0/vid1/00001"]):
        b = vec[other]
        assert value == pytest.approx(float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)), abs=1e-6)


def test_score_errors_are_one_line(vox_store, tmp_path):
    runner = CliRunner()
    ambiguous = tmp_path / "amb.txt"
    ambiguous.write_text("00000 spk0/vid0/00001 target\n")   # 00000 ends six item ids
    result = runner.invoke(cli, ["score", str(vox_store.path), str(ambiguous)])
    assert result.exit_code == 1 and "'00000' is ambiguous" in result.output and "Traceback" not in result.output
    none = tmp_path / "none.txt"
    none.write_text("x y target\n")
    result = runner.invoke(cli, ["score", str(vox_store.path), str(none)])
    assert result.exit_code == 1 and "none of the 1 trials" in result.output
    one_class = tmp_path / "one.txt"
    one_class.write_text("spk0/vid0/00000 spk0/vid0/00001 target\n")
    result = runner.invoke(cli, ["score", str(vox_store.path), str(one_class)])
    assert result.exit_code == 1 and "both target and non-target" in result.output
    result = runner.invoke(cli, ["score", str(vox_store.path), str(one_class), "--p-target", "2"])
    assert result.exit_code == 1 and "--p-target" in result.output


# -- the real corpus, the default model ------------------------------------------------------


@pytest.fixture(scope="module")
def real_store(shared_data, tmp_path_factory):
    """The 100 real utterances embedded once with the default model, on ONNX Runtime (a
    third faster than torch here; test_campplus checks the runtimes agree to 1e-5)."""
    st = embstore.open(tmp_path_factory.mktemp("real") / "store")
    st.scan([shared_data.parent])
    summary = st.extract(device="cpu", workers=1, runtime="onnx")
    assert summary.failed == 0 and summary.done == 100
    yield st
    st.close()


@pytest.mark.slow
def test_real_eer_and_audio_search_with_the_default_model(real_store, shared_data):
    # one test, so pytest-xdist never extracts the corpus twice (once per worker)
    result = CliRunner().invoke(cli, ["score", str(real_store.path), str(shared_data / "trials.txt"), "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)[0]
    assert out["trials"] == 4950 and out["missing"] == 0
    # CAM++, real weights: 0.25 % at most (measured 0.000 %, minDCF 0.0000; Resemblyzer 0.444 %)
    assert out["model"] == "campplus-zh-en-common" and out["eer"] <= 0.0025, out
    assert 0 <= out["min_dcf"]["0.01"] <= 0.05
    # --audio embeds with the store's model: the file itself comes back first, at ~1.0
    audio = sorted(shared_data.glob("*/*.flac"))[0]
    found = real_store.similar(audio=audio, k=5)
    assert found[0]["id"].endswith(audio.stem) and found[0]["score"] > 0.999
    assert sum(f["speaker"] == audio.parent.name for f in found) >= 4
