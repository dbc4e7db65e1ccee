"""Score normalisation against the recipe written out here, on a store of random vectors.

The expected numbers are computed item by item in float64 with plain Python sorting
(no call into embstore.eval), then compared with what `run_scoring` returns."""

import itertools
import math

import numpy as np
import pytest
from click.testing import CliRunner

import embstore
from embstore.cli import cli
from embstore.eval.norm import cohort_stats, to_unit
from embstore.eval.scoring import run_scoring
from embstore.errors import StoreError
from tests.store_factory import fill_embeddings, make_tree

DIM = 12


def random_vector(uid: str, speaker: str) -> np.ndarray:
    # a common offset (so mean subtraction matters), a speaker part and an item part
    seed = sum(ord(c) * (k + 1) for k, c in enumerate(uid)) % 2**32
    rng = np.random.default_rng(seed)
    centre = np.random.default_rng(int(speaker[3:]) + 1000).standard_normal(DIM)
    return (3.0 + centre + 0.8 * rng.standard_normal(DIM)).astype(np.float32)


@pytest.fixture(scope="module")
def norm_store(tmp_path_factory):
    """Two datasets of 5 speakers x 4 items: `eval` (trials) and `cohort`."""
    tmp = tmp_path_factory.mktemp("norm")
    root = tmp / "audio"
    make_tree(root, speakers=5, per_speaker=4, datasets=("eval", "cohort"))
    st = embstore.open(tmp / "store")
    st.scan([root])
    fill_embeddings(st, dim=DIM, vector_of=random_vector)
    ids, vectors = st.embeddings()
    eval_ids = [i for i in ids if i.startswith("eval/")]
    trials = tmp / "trials.txt"
    trials.write_text("".join(
        f"{a} {b} {'target' if a.split('/')[1] == b.split('/')[1] else 'nontarget'}\n"
        for a, b in itertools.combinations(eval_ids, 2)
    ))
    yield st, dict(zip(ids, vectors.astype(np.float64))), trials
    st.close()


def expected(vec: dict, trials_path, mean_ids, cohort_ids, top_n):
    """The recipe, one trial at a time."""
    dim = len(next(iter(vec.values())))
    m = [0.0] * dim
    if mean_ids:
        for i in mean_ids:
            m = [a + b / len(mean_ids) for a, b in zip(m, vec[i])]

    def unit(x):
        y = [a - b for a, b in zip(x, m)]
        n = math.sqrt(sum(a * a for a in y))
        return [a / n for a in y]

    def dot(x, y):
        return sum(a * b for a, b in zip(x, y))

    cohort = []
    if cohort_ids:
        by_speaker: dict[str, list] = {}
        for i in cohort_ids:
            by_speaker.setdefault(i.split("/")[1], []).append(vec[i])
        for items in by_speaker.values():
            cohort.append(unit([sum(col) / len(items) for col in zip(*items)]))

    def stats(x):
        s = sorted((dot(x, c) for c in cohort), reverse=True)[: top_n or len(cohort)]
        mu = sum(s) / len(s)
        return mu, math.sqrt(sum((v - mu) ** 2 for v in s) / len(s))

    raw, normed = [], []
    for line in trials_path.read_text().splitlines():
        a, b, _ = line.split()
        ua, ub = unit(vec[a]), unit(vec[b])
        s = dot(ua, ub)
        raw.append(s)
        if cohort:
            (mu_a, sd_a), (mu_b, sd_b) = stats(ua), stats(ub)
            normed.append(0.5 * ((s - mu_a) / sd_a + (s - mu_b) / sd_b))
    return np.array(raw), np.array(normed)


def by_norm(scoring):
    return {r.norm: r.scores for r in scoring.results}


def test_every_norm_matches_the_recipe(norm_store):
    st, vec, trials = norm_store
    mean_ids = [i for i in vec if i.startswith("cohort/")]
    cohort_ids = mean_ids
    plain, _ = expected(vec, trials, None, None, None)
    centred, _ = expected(vec, trials, mean_ids, None, None)
    _, snorm = expected(vec, trials, None, cohort_ids, None)
    _, mean_snorm = expected(vec, trials, mean_ids, cohort_ids, None)
    _, asnorm3 = expected(vec, trials, None, cohort_ids, 3)
    _, mean_asnorm3 = expected(vec, trials, mean_ids, cohort_ids, 3)
    # the offset is large: subtracting the mean changes every score
    assert np.abs(plain - centred).max() > 0.05 and np.abs(snorm - asnorm3).max() > 0.05

    got = by_norm(run_scoring(st.manifest, trials, norm="none,snorm,asnorm", cohort="dataset:cohort", top_n=3))
    assert set(got) == {"none", "snorm", "asnorm3"}
    np.testing.assert_allclose(got["none"], plain, atol=2e-6)
    np.testing.assert_allclose(got["snorm"], snorm, atol=2e-5)
    np.testing.assert_allclose(got["asnorm3"], asnorm3, atol=2e-5)

    got = by_norm(run_scoring(st.manifest, trials, norm=["mean", "snorm", "asnorm"], mean_from="dataset:cohort",
                              cohort="dataset:cohort", top_n=3))
    assert set(got) == {"mean", "mean+snorm", "mean+asnorm3"}
    np.testing.assert_allclose(got["mean"], centred, atol=2e-6)
    np.testing.assert_allclose(got["mean+snorm"], mean_snorm, atol=2e-5)
    np.testing.assert_allclose(got["mean+asnorm3"], mean_asnorm3, atol=2e-5)
    # --mean-from applies under --norm none too: it is then the mean norm
    got = by_norm(run_scoring(st.manifest, trials, norm="none", mean_from="dataset:cohort"))
    np.testing.assert_allclose(got["mean"], centred, atol=2e-6)


def test_cohort_and_mean_from_item_files_and_speaker_files(norm_store, tmp_path):
    st, vec, trials = norm_store
    # a file of ids, and a speakers file
    chosen = [i for i in vec if i.startswith("cohort/") and i.split("/")[1] in ("spk1", "spk3", "spk4")]
    ids_file = tmp_path / "cohort_ids.txt"
    ids_file.write_text("\n".join(chosen) + "\n")
    _, want = expected(vec, trials, chosen[:5], chosen, 2)
    # with 2 or 3 cohort speakers sigma can be small, and it magnifies the float32
    # cohort products' rounding (~1e-7): relative tolerances below
    mean_file = tmp_path / "mean_ids.txt"
    mean_file.write_text("\n".join(chosen[:5]) + "\n")
    got = by_norm(run_scoring(st.manifest, trials, norm="asnorm", cohort=str(ids_file), mean_from=str(mean_file), top_n=2))
    np.testing.assert_allclose(got["mean+asnorm2"], want, rtol=1e-3, atol=2e-5)
    # spk1/utt0 ends both datasets' ids: ambiguous, one line
    bad = tmp_path / "amb.txt"
    bad.write_text("spk1/utt0\n")
    with pytest.raises(StoreError, match="ambiguous"):
        run_scoring(st.manifest, trials, norm="snorm", cohort=str(bad))
    # speakers: from every dataset (here both), one mean per speaker name
    speakers = tmp_path / "spk.txt"
    speakers.write_text("spk1\nspk3\nnobody\n")
    both = [i for i in vec if i.split("/")[1] in ("spk1", "spk3")]
    _, want = expected(vec, trials, None, both, None)
    scoring = run_scoring(st.manifest, trials, norm="snorm", cohort=f"speakers:{speakers}")
    np.testing.assert_allclose(by_norm(scoring)["snorm"], want, rtol=1e-4, atol=2e-5)
    assert any("1 of 3 speakers are not in the store (nobody)" in w for w in scoring.warnings)


def test_top_n_larger_than_the_cohort_falls_back_to_all_of_it(norm_store):
    st, _, trials = norm_store
    scoring = run_scoring(st.manifest, trials, norm="asnorm,snorm", cohort="dataset:cohort", top_n=300)
    got = by_norm(scoring)
    assert any("--top-n 300 is more than the cohort's 5 speakers" in w for w in scoring.warnings)
    np.testing.assert_allclose(got["asnorm5"], got["snorm"])
    result = CliRunner().invoke(
        cli, ["score", str(st.path), str(trials), "--norm", "asnorm", "--cohort", "dataset:cohort", "--json"]
    )
    assert result.exit_code == 0, result.output
    assert "warning: --top-n 300 is more than the cohort's 5 speakers" in result.output


@pytest.mark.parametrize(
    "options, message",
    [
        (["--norm", "snorm"], "--norm snorm needs --cohort SEL"),
        (["--norm", "asnorm"], "--norm asnorm needs --cohort SEL"),
        (["--norm", "mean"], "--norm mean needs --mean-from SEL"),
        (["--norm", "znorm"], "unknown --norm 'znorm'"),
        (["--norm", "asnorm", "--cohort", "dataset:cohort", "--top-n", "1"], "--top-n must be at least 2"),
        (["--norm", "snorm", "--cohort", "dataset:nope"], "no dataset 'nope' in the store"),
        (["--norm", "snorm", "--cohort", "no-such-file.txt"], "no such file"),
        (["--mean-from", "speakers:no-such-file.txt"], "no such file"),
        (["--p-target", "0.01,x"], "--p-target '0.01,x'"),
    ],
)
def test_bad_norm_options_are_one_line_errors(norm_store, options, message):
    st, _, trials = norm_store
    result = CliRunner().invoke(cli, ["score", str(st.path), str(trials), *options])
    assert result.exit_code != 0
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_cohort_with_one_speaker_or_no_embedded_item(norm_store, tmp_path):
    st, _, trials = norm_store
    one = tmp_path / "one.txt"
    one.write_text("spk2\n")
    with pytest.raises(StoreError, match="holds 1 speaker .*at least 2"):
        run_scoring(st.manifest, trials, norm="snorm", cohort=f"speakers:{one}")
    nobody = tmp_path / "nobody.txt"
    nobody.write_text("nobody\n")
    with pytest.raises(StoreError, match="is empty"):
        run_scoring(st.manifest, trials, norm="snorm", cohort=f"speakers:{nobody}")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n# nothing\n")
    with pytest.raises(StoreError, match="no item ids in the file"):
        run_scoring(st.manifest, trials, norm="snorm", cohort=str(blank))


def test_cohort_stats_on_arrays_known_answer():
    # one side against three cohort vectors at cosines 1, 0, -1: top-2 = {1, 0}
    unit = np.array([[1.0, 0.0]], dtype=np.float32)
    cohort = to_unit(np.array([[2.0, 0.0], [0.0, 5.0], [-1.0, 0.0]]))
    stats = cohort_stats(unit, cohort, [None, 2])
    assert stats[None][0][0] == pytest.approx(0.0) and stats[None][1][0] == pytest.approx(math.sqrt(2 / 3))
    assert stats[2][0][0] == pytest.approx(0.5) and stats[2][1][0] == pytest.approx(0.5)
