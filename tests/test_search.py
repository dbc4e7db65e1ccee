"""The ANN index and what uses it: similar through the index (exact re-rank), range
queries, a stale or lagging index, incremental adds and the drift bound, overlap across
datasets, near-duplicates, the CLI. Each checked against brute force over the store."""

import json
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from embstore import query
from embstore.cli import cli
from embstore.errors import StoreError
from embstore.search import index as ann
from embstore.search import knn
from tests.audio_factory import write
from tests.store_factory import fill_embeddings, make_store, synthetic_vector

pytest.importorskip("faiss")


def unit(v):
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def brute(st, item, dataset=None):
    """{other item: cosine} for every embedded live item but `item`."""
    ids, vectors = st.embeddings()
    vec = dict(zip(ids, unit(vectors)))
    return {i: float(vec[i] @ vec[item]) for i in ids if i != item}


def top(scores, k):
    return sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))[:k]


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory):
    # datasets a and b with the same 8 speakers (same centres): 96 items, dim 16
    st = make_store(tmp_path_factory.mktemp("search"), speakers=8, per_speaker=6, datasets=("a", "b"))
    yield st
    st.close()


@pytest.fixture()
def small(tmp_path):
    st = make_store(tmp_path, speakers=4, per_speaker=5)
    yield st
    st.close()


@pytest.fixture()
def approximate(monkeypatch):
    """Let the index answer even on a store of 100 rows (few candidates, no fallback)."""
    monkeypatch.setattr(knn, "MIN_CANDIDATES", 8)
    monkeypatch.setattr(knn, "CANDIDATES_PER_ROW", 1)
    monkeypatch.setattr(knn, "EXACT_FRACTION", 0)


def test_reranked_results_are_exact_cosines_and_match_the_scan_when_every_list_is_probed(two_sets, approximate):
    report = two_sets.index(kind="ivf", lists=8, nprobe=8)
    assert report.action in ("built", "unchanged") and report.kind == "ivf8,sq8" and report.rows == 96
    for item in ("a/spk1/utt3", "b/spk6/utt0", "a/spk0/utt5"):
        found = two_sets.similar(item, k=7)
        expected = top(brute(two_sets, item), 7)
        assert [f["id"] for f in found] == [e[0] for e in expected]
        assert np.allclose([f["score"] for f in found], [e[1] for e in expected], atol=1e-5)
        assert all(f["index"] == "ivf8,sq8" and f["exact"] is False for f in found)
        scanned = two_sets.similar(item, k=7, exact=True)
        assert [f["id"] for f in scanned] == [f["id"] for f in found]
        assert all(f["index"] == "flat" and f["exact"] is True for f in scanned)
    # one list probed: maybe other neighbours, but every score is still the exact cosine, best first
    two_sets.index(nprobe=1)
    scores = brute(two_sets, "a/spk2/utt2")
    found = two_sets.similar("a/spk2/utt2", k=5)
    assert found and all(abs(f["score"] - scores[f["id"]]) < 1e-5 for f in found)
    assert [f["score"] for f in found] == sorted((f["score"] for f in found), reverse=True)
    two_sets.index(nprobe=8)


def test_range_query_returns_every_item_above_the_score_paged(two_sets, approximate, monkeypatch):
    two_sets.index(kind="ivf", lists=8, nprobe=8)
    item = "b/spk3/utt1"
    scores = brute(two_sets, item)
    threshold = 0.5
    expected = [i for i, s in top(scores, len(scores)) if s >= threshold]
    assert 10 < len(expected) < len(scores)
    for exact in (False, True):
        found = two_sets.similar(item, min_score=threshold, exact=exact)
        assert [f["id"] for f in found] == expected
        pages = [two_sets.similar(item, min_score=threshold, exact=exact, offset=o, limit=4) for o in range(0, 40, 4)]
        assert [f["id"] for page in pages for f in page] == expected
    monkeypatch.setattr(knn, "RANGE_CAP", 5)
    for exact in (False, True):
        with pytest.raises(StoreError, match="more than 5 rows score at least 0.5; raise"):
            two_sets.similar(item, min_score=threshold, exact=exact)


def test_range_queries_leave_the_shared_index_as_published_and_a_new_nprobe_is_seen(two_sets, approximate):
    import faiss

    two_sets.index(kind="ivf", lists=8, nprobe=2)
    two_sets.similar("a/spk1/utt3", min_score=0.5)  # probes 2x the lists, per call
    two_sets.near_duplicates(min_score=0.99)
    meta, index = ann.open_index(two_sets.manifest, two_sets.models()[0])
    assert faiss.extract_index_ivf(index).nprobe == meta.nprobe == 2
    two_sets.index(nprobe=8)  # the same file, republished: the loaded index follows
    meta, index = ann.open_index(two_sets.manifest, two_sets.models()[0])
    assert faiss.extract_index_ivf(index).nprobe == meta.nprobe == 8


def test_without_faiss_an_indexed_store_is_searched_exactly(two_sets, approximate, monkeypatch):
    two_sets.index(kind="ivf", lists=8, nprobe=8)
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` fails: the extra is missing
    found = two_sets.similar("b/spk6/utt0", k=5)
    assert [f["id"] for f in found] == [e[0] for e in top(brute(two_sets, "b/spk6/utt0"), 5)]
    assert all(f["index"] == "flat" and f["exact"] is True for f in found)


def test_a_stale_index_never_returns_removed_items_and_a_lagging_one_misses_no_new_row(small, approximate):
    small.index(kind="ivf", lists=4, nprobe=4)
    root = small.path.parent / "audio"
    target = "ds/spk2/utt1"
    assert "ds/spk2/utt2" in {f["id"] for f in small.similar(target, k=30)}
    (root / "ds/spk2/utt2.wav").unlink()                 # removed
    write(root / "ds/spk2/utt3.wav", 0.25, seed=4242)    # changed: its indexed row is stale
    small.scan([root])
    far = -synthetic_vector("x", "spk2", 16)
    fill_embeddings(small, vector_of=lambda uid, spk: far)  # utt3 again, as a new row past the index
    meta = ann.read_meta(ann.folder_of(small.manifest, small.models()[0]), small.models()[0])
    assert meta.rows < small.models()[0].rows             # the index lags the store
    for found in (small.similar(target, k=30), small.similar(target, min_score=-1.0)):
        ids = [f["id"] for f in found]
        assert "ds/spk2/utt2" not in ids and ids.count("ds/spk2/utt3") == 1
        assert ids[-1] == "ds/spk2/utt3"                  # its new (far) row, scanned past the index
        assert ids == [i for i, _ in top(brute(small, target), 30)]
    pairs = small.near_duplicates(min_score=0.01, limit=10**6).pairs
    assert pairs and all("ds/spk2/utt2" not in (p.a, p.b) for p in pairs)


def test_incremental_add_then_retrain_past_the_drift_bound(small):
    first = small.index(kind="ivf", lists=4)
    assert first.action == "built" and first.rows == 20
    assert small.index().action == "unchanged"
    root = small.path.parent / "audio"

    def add(name, speaker, n, seed):
        for i in range(n):
            write(root / f"ds/{speaker}/{name}{i}.wav", 0.2, seed=seed + i)
        small.scan([root])
        fill_embeddings(small)

    add("new", "spk1", 4, 900)  # more of a known speaker: near the centroids
    added = small.index()
    assert added.action == "extended" and added.rows == 24 and added.committed == 24
    meta = ann.read_meta(ann.folder_of(small.manifest, small.models()[0]), small.models()[0])
    assert meta.added_rows == 4 and meta.trained_rows == 20
    add("more", "spk2", 20, 950)  # more rows than the index was trained on: past the bound
    again = small.index()
    assert again.action == "built" and again.reason.startswith("drifted: 24 rows added") and again.rows == 44
    folder = ann.folder_of(small.manifest, small.models()[0])
    assert sorted(p.name for p in folder.glob("ivf-*")) == [again_file(folder)]  # older files deleted
    add("far", "spk9", 6, 990)  # a new speaker, far from every centroid: past the residual bound
    drifted = small.index()
    assert drifted.action == "built" and "as far from their centroids" in drifted.reason, drifted.reason
    assert small.index(kind="flat").action == "flat" and not (folder / ann.META_NAME).exists()
    assert small.similar("ds/spk1/utt1", k=3)[0]["index"] == "flat"


def again_file(folder):
    return json.loads((folder / ann.META_NAME).read_text())["file"]


KILLED_BUILD = """
import os, signal, sys
import faiss
import embstore
from embstore.search import index as ann

def torn_write(index, path):
    with open(path, "wb") as f:
        f.write(b"half an index")
        f.flush()
    if sys.argv[2] == "after-file":
        real_write(index, path)
        ann._publish_meta = lambda folder, meta: os.kill(os.getpid(), signal.SIGKILL)
        return
    os.kill(os.getpid(), signal.SIGKILL)

real_write = faiss.write_index
faiss.write_index = torn_write
st = embstore.open(sys.argv[1])
st.index(kind="ivf", lists=4, rebuild=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize("when", ["mid-file", "after-file"])
def test_kill_9_during_a_build_leaves_the_old_index_whole(small, when):
    small.index(kind="ivf", lists=4, nprobe=4)
    model = small.models()[0]
    folder = ann.folder_of(small.manifest, model)
    before = json.loads((folder / ann.META_NAME).read_text())
    expected = small.similar("ds/spk1/utt2", k=5)
    done = subprocess.run([sys.executable, "-c", KILLED_BUILD, str(small.path), when], capture_output=True)
    assert done.returncode == -9, done.stderr.decode()[-2000:]
    assert json.loads((folder / ann.META_NAME).read_text()) == before  # still the old index
    ann._LOADED.clear()
    assert small.similar("ds/spk1/utt2", k=5) == expected
    # a fresh process reads the old index whole; the next build cleans the leftovers up
    out = subprocess.run([sys.executable, "-m", "embstore", "similar", str(small.path), "ds/spk1/utt2", "-k", "5",
                          "--json"], capture_output=True, text=True)
    assert out.returncode == 0 and json.loads(out.stdout) == expected
    assert small.index(rebuild=True).action == "built"
    assert [p.name for p in folder.glob("ivf-*")] == [again_file(folder)]


def test_overlap_finds_the_shared_speakers_exactly(two_sets):
    report = two_sets.overlap(source="a", target="b", threshold=0.7)
    ids, vectors = two_sets.embeddings()
    speakers = sorted({i.split("/")[1] for i in ids})
    cent = {}
    for ds in ("a", "b"):
        for s in speakers:
            rows = [unit(v) for i, v in zip(ids, vectors) if i.startswith(f"{ds}/{s}/")]
            cent[ds, s] = unit(np.mean(rows, axis=0))
    expected = {(s, t): float(cent["a", s] @ cent["b", t]) for s in speakers for t in speakers}
    assert {(p.speaker, p.other) for p in report.pairs} == {k for k, v in expected.items() if v >= 0.7}
    assert {(s, s) for s in speakers} <= {(p.speaker, p.other) for p in report.pairs}
    assert all(abs(p.score - expected[p.speaker, p.other]) < 1e-5 and p.items == 6 for p in report.pairs)
    assert report.as_dict()["by"] == "centroid" and report.speakers == 8 and report.target_speakers == 8
    by_items = two_sets.overlap(source="a", target="b", threshold=0.9, items=True)
    item_scores = {}
    for i, v in zip(ids, vectors):
        if i.startswith("a/"):
            for t in speakers:
                key = (i.split("/")[1], t)
                item_scores.setdefault(key, []).append(float(unit(v) @ cent["b", t]))
    want = {k: (max(v), sum(x >= 0.9 for x in v)) for k, v in item_scores.items() if max(v) >= 0.9}
    assert {(p.speaker, p.other): (pytest.approx(p.score, abs=1e-5), p.matches) for p in by_items.pairs} == {
        k: (pytest.approx(s, abs=1e-5), n) for k, (s, n) in want.items()}


def test_near_duplicates_find_planted_copies_but_not_shared_rows(tmp_path):
    st = make_store(tmp_path, speakers=3, per_speaker=4, copies=1)   # dup/copy0 shares spk0/utt0's row
    root = tmp_path / "audio"
    write(root / "ds/spk1/reencoded.wav", 0.3, seed=777)
    st.scan([root])
    original = dict(zip(*st.embeddings()))["ds/spk1/utt2"]
    rng = np.random.default_rng(0)
    fill_embeddings(st, vector_of=lambda uid, spk: unit(original + 0.01 * rng.standard_normal(16)).astype(np.float32))
    report = st.near_duplicates(min_score=0.98)
    ids, vectors = st.embeddings()
    u = unit(vectors)
    rows = dict(st.manifest.query("SELECT i.uid, t.row FROM items i JOIN tasks t ON t.item_id = i.id"))
    expected = {(a, b) for x, a in enumerate(ids) for y, b in enumerate(ids)
                if x < y and rows[a] != rows[b] and u[x] @ u[y] >= 0.98}
    assert ("ds/spk1/reencoded", "ds/spk1/utt2") in expected or ("ds/spk1/utt2", "ds/spk1/reencoded") in expected
    assert {tuple(sorted((p.a, p.b))) for p in report.pairs} == {tuple(sorted(e)) for e in expected}
    assert report.index == "flat" and report.total == len(report.pairs)
    st.index(kind="ivf", lists=2)
    through_lists = st.near_duplicates(min_score=0.98)
    assert through_lists.index == "ivf2,sq8"
    assert {(p.a, p.b) for p in through_lists.pairs} == {(p.a, p.b) for p in report.pairs}
    st.close()


def test_cli_commands_and_one_line_errors(two_sets):
    runner = CliRunner()
    path = str(two_sets.path)
    result = runner.invoke(cli, ["index", path, "--kind", "ivf", "--lists", "8", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["kind"] == "ivf8,sq8"
    result = runner.invoke(cli, ["similar", path, "a/spk1/utt1", "--min-score", "0.5", "--limit", "3", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert len(rows) == 3 and "--offset 3 for the next page" in result.stderr
    result = runner.invoke(cli, ["similar", path, "a/spk1/utt1", "--exact", "--json"])
    assert {r["exact"] for r in json.loads(result.stdout)} == {True}
    result = runner.invoke(cli, ["overlap", path, "--from", "dataset:a", "--to", "dataset:b", "--json"])
    assert result.exit_code == 0 and len(json.loads(result.stdout)["pairs"]) >= 8
    result = runner.invoke(cli, ["overlap", path, "--from", "a", "--to", "b"])
    assert result.exit_code == 0 and "spk3" in result.stdout and "8 of 8 speakers of a" in result.stderr
    result = runner.invoke(cli, ["duplicates", path, "--min-score", "0.999", "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["pairs"] == []
    for args, message in (
        (["similar", path, "a/spk1/utt1", "--min-score", "2"], "--min-score"),
        (["similar", path, "a/spk1/utt1", "--limit", "5"], "give --min-score T"),
        (["overlap", path, "--from", "a", "--to", "nope"], "no embedded items in dataset 'nope'"),
        (["overlap", path, "--from", "dataset:", "--to", "b"], "give a dataset name"),
        (["duplicates", path, "--min-score", "0"], "--min-score"),
        (["index", path, "--lists", "0"], "--lists"),
    ):
        result = runner.invoke(cli, args)
        assert result.exit_code != 0 and message in result.output, (args, result.output)
        assert "Traceback" not in result.output
    for call, message in (
        (lambda: two_sets.similar("a/spk1/utt1", min_score=0.5, limit=0), "limit must be between"),
        (lambda: two_sets.similar("a/spk1/utt1", offset=3), "give min_score too"),
        (lambda: two_sets.index(kind="hnsw"), "index kind must be one of"),
        (lambda: two_sets.overlap(source="a", target="b", threshold=1.5), "threshold is a cosine"),
        (lambda: two_sets.near_duplicates(min_score=0), "min_score must be in"),
    ):
        with pytest.raises(StoreError, match=message):
            call()


@pytest.mark.slow
def test_index_command_in_a_real_process(small, approximate):
    done = subprocess.run([sys.executable, "-m", "embstore", "index", str(small.path), "--kind", "ivf", "--json"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["action"] == "built" and report["rows"] == 20 and report["bytes"] > 0
    assert query.similar(small.manifest, item_id="ds/spk0/utt0", k=3)[0]["index"] == report["kind"]


REBUILDER = """
import sys
import embstore
st = embstore.open(sys.argv[1])
for _ in range(int(sys.argv[2])):
    st.index(kind="ivf", lists=4, rebuild=True)
print("done")
"""


@pytest.mark.slow
def test_queries_during_rebuilds_in_another_process_always_see_a_whole_index(small, approximate):
    small.index(kind="ivf", lists=4, nprobe=4)
    expected = [f["id"] for f in small.similar("ds/spk3/utt4", k=5, exact=True)]
    writer = subprocess.Popen([sys.executable, "-c", REBUILDER, str(small.path), "15"], stdout=subprocess.PIPE)
    seen = 0
    while writer.poll() is None:
        ann._LOADED.clear()  # open the published index afresh every time, as a new process would
        found = small.similar("ds/spk3/utt4", k=5)
        assert [f["id"] for f in found] == expected and found[0]["index"] == "ivf4,sq8"
        seen += 1
    assert writer.returncode == 0 and writer.stdout.read().strip() == b"done"
    assert seen > 1


# -- review findings (issue 25) -------------------------------------------------------------


def _count_rows_read(monkeypatch):
    """Rows re-ranked (UnitRows.take) and rows scanned (knn's exact blocks), counted."""
    from embstore.arrays.unit_cache import UnitRows

    seen = {"take": 0, "scan": 0}
    take, blocks = UnitRows.take, knn.blocks_from

    def counted_take(self, rows):
        seen["take"] += len(rows)
        return take(self, rows)

    def counted_blocks(source, start, block_rows=None):
        for first, block in blocks(source, start, block_rows):
            seen["scan"] += len(block)
            yield first, block

    monkeypatch.setattr(UnitRows, "take", counted_take)
    monkeypatch.setattr(knn, "blocks_from", counted_blocks)
    return seen


def test_a_too_low_range_threshold_fails_after_reading_about_the_cap(two_sets, approximate, monkeypatch):
    two_sets.index(kind="ivf", lists=8, nprobe=8)
    model = two_sets.models()[0]
    source = query.unit_rows(two_sets.manifest, model)
    vector = source.take(np.array([3]))[0]
    seen = _count_rows_read(monkeypatch)
    monkeypatch.setattr(knn, "RERANK_BLOCK", 8)
    monkeypatch.setattr(knn, "SCAN_BLOCK", 8)
    indexed = knn.searcher(two_sets.manifest, model, source)
    assert indexed.meta is not None and indexed.meta.rows == 96
    for searcher, counter in ((indexed, "take"), (knn.Searcher(source), "scan")):
        with pytest.raises(StoreError, match="more than 5 rows score at least -1.0; raise the minimum score"):
            searcher.at_least(vector, -1.0, cap=5)
        assert seen[counter] <= 5 + 8, seen  # the cap and one block, not all 96 rows
        seen.update(take=0, scan=0)
    # under the cap the blocks add up to every row above the threshold, exactly
    rows, scores = indexed.at_least(vector, 0.5, cap=96)
    exact_rows, exact_scores = knn.Searcher(source).at_least(vector, 0.5, cap=96)
    assert rows.tolist() == exact_rows.tolist() and np.allclose(scores, exact_scores)


def test_similar_reports_the_exact_scan_when_it_answered_instead_of_the_index(two_sets):
    two_sets.index(kind="ivf", lists=8, nprobe=8)
    # 96 rows: k=5 wants 38 candidate rows, 38 x EXACT_FRACTION >= 96, so the scan answers
    found = two_sets.similar("a/spk1/utt3", k=5)
    assert found and all(f["index"] == "flat" and f["exact"] is True for f in found)
    result = CliRunner().invoke(cli, ["similar", str(two_sets.path), "a/spk1/utt3", "-k", "5", "--json"])
    assert result.exit_code == 0, result.output
    assert {(r["index"], r["exact"]) for r in json.loads(result.stdout)} == {("flat", True)}
    # a range query goes through the index: it says so
    ranged = two_sets.similar("a/spk1/utt3", min_score=0.5)
    assert ranged and {(f["index"], f["exact"]) for f in ranged} == {("ivf8,sq8", False)}


def test_overlap_of_a_dataset_with_itself_is_refused_in_one_line(two_sets):
    with pytest.raises(StoreError, match="'a' is both the source and the target"):
        two_sets.overlap(source="a", target="a")
    result = CliRunner().invoke(cli, ["overlap", str(two_sets.path), "--from", "dataset:a", "--to", "a"])
    assert result.exit_code != 0 and result.output.count("\n") == 1, result.output
    assert "'a' is both the source and the target" in result.output and "Traceback" not in result.output


def test_an_index_ahead_of_the_store_is_rebuilt_not_reported_up_to_date(small, approximate):
    small.index(kind="ivf", lists=4, nprobe=4)
    model = small.models()[0]
    folder = ann.folder_of(small.manifest, model)
    meta = json.loads((folder / ann.META_NAME).read_text())
    # as after a rollback or a rebuilt store: the published index covers rows the store lacks
    (folder / ann.META_NAME).write_text(json.dumps(dict(meta, rows=meta["rows"] + 10)))
    assert ann.open_index(small.manifest, model) is None  # never used meanwhile
    report = small.index()
    assert report.action == "built" and report.rows == report.committed == 20, report
    assert report.reason == "the index covers 30 rows, the store commits 20"
    assert ann.read_meta(folder, model).rows == 20
    assert small.similar("ds/spk1/utt2", k=3)[0]["index"] == report.kind


def test_rows_committed_and_indexed_while_waiting_for_the_lock_are_seen_not_rebuilt(small, monkeypatch):
    import embstore

    small.index(kind="ivf", lists=4)
    model = small.models()[0]
    root = small.path.parent / "audio"
    real_locked = ann._locked
    calls = []

    def another_process_goes_first(path, wait):
        # this build read 20 committed rows; before it gets the lock, 4 more are committed
        # and another process extends the index over them
        if not calls:
            calls.append(path)
            for i in range(4):
                write(root / f"ds/spk1/late{i}.wav", 0.2, seed=700 + i)
            small.scan([root])
            fill_embeddings(small)
            other = embstore.open(small.path)
            assert other.index().rows == 24  # published over the new rows
            other.close()
        return real_locked(path, wait)

    monkeypatch.setattr(ann, "_locked", another_process_goes_first)
    report = ann.ensure(small.manifest, model, kind="ivf", retrain=False)
    assert calls and report.action == "unchanged" and report.meta.rows == 24, report


def test_the_index_lock_and_publish_use_the_store_helpers_with_wait_and_no_wait(small, monkeypatch):
    import threading
    import time

    from embstore.paths import file_lock

    model = small.models()[0]
    folder = ann.folder_of(small.manifest, model)
    folder.mkdir(parents=True, exist_ok=True)
    published = []
    real_write = ann.write_atomic_text
    monkeypatch.setattr(ann, "write_atomic_text",
                        lambda path, text, **kw: (published.append(path), real_write(path, text, **kw)))
    held, release = threading.Event(), threading.Event()

    def holder():  # another holder of the same lock (flock: one per open file, so a thread will do)
        with file_lock(folder / ann.LOCK_NAME):
            held.set()
            release.wait(10)

    thread = threading.Thread(target=holder)
    thread.start()
    held.wait(10)
    try:
        busy = ann.ensure(small.manifest, model, kind="ivf", lists=4, wait=False)
        assert busy.action == "busy" and busy.meta is None
        threading.Timer(0.3, release.set).start()
        started = time.perf_counter()
        built = ann.ensure(small.manifest, model, kind="ivf", lists=4)  # waits for the holder
        assert built.action == "built" and time.perf_counter() - started >= 0.25
    finally:
        release.set()
        thread.join()
    assert published == [folder / ann.META_NAME]
    assert ann.read_meta(folder, model) == built.meta
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith((".index", "ivf-"))) == [
        ann.LOCK_NAME, built.meta.file]  # no temporary file left


def _brute_pairs(st, min_score):
    """Item pairs on different rows scoring at least min_score, by brute force."""
    ids, vectors = st.embeddings()
    u = unit(vectors)
    rows = dict(st.manifest.query("SELECT i.uid, t.row FROM items i JOIN tasks t ON t.item_id = i.id"))
    return {tuple(sorted((a, b))) for x, a in enumerate(ids) for y, b in enumerate(ids)
            if x < y and rows[a] != rows[b] and u[x] @ u[y] >= min_score}


@pytest.mark.parametrize("writable", [True, False])
def test_near_duplicates_in_rows_past_the_index_are_found_without_comparing_every_pair(tmp_path, monkeypatch,
                                                                                          writable):
    from embstore.search import duplicates

    st = make_store(tmp_path, speakers=3, per_speaker=4)
    st.index(kind="ivf", lists=2)
    model = st.models()[0]
    root = tmp_path / "audio"
    for i in range(8):
        write(root / f"ds/spk{i % 3}/late{i}.wav", 0.2, seed=500 + i)
    st.scan([root])
    head = dict(zip(*st.embeddings()))["ds/spk1/utt2"]
    rng = np.random.default_rng(1)
    twin = synthetic_vector("twin", "spk2", 16)  # new rows near the data the lists were trained on
    planted = {"late0": head, "late1": twin, "late2": twin, "late3": twin}  # a copy of an indexed row; 3 new copies
    fill_embeddings(st, vector_of=lambda uid, spk: unit(
        planted.get(uid.rsplit("/", 1)[-1], synthetic_vector(uid, spk, 16)) + 0.005 * rng.standard_normal(16)
    ).astype(np.float32))
    assert ann.read_meta(ann.folder_of(st.manifest, model), model).rows == 12 < st.models()[0].rows == 20

    def every_pair(*args):
        raise AssertionError("the rows past the index were compared pair by pair")

    monkeypatch.setattr(duplicates, "_pairs_within", every_pair)
    if not writable:  # no cache, no index written: as on a read-only store
        real = duplicates.unit_rows
        monkeypatch.setattr(duplicates, "unit_rows", lambda *a, **k: real(*a, **k, use_cache=False))
    report = st.near_duplicates(min_score=0.98)
    expected = _brute_pairs(st, 0.98)
    assert {("ds/spk0/late0", "ds/spk1/utt2"), ("ds/spk1/late1", "ds/spk2/late2"),
            ("ds/spk0/late3", "ds/spk1/late1"), ("ds/spk0/late3", "ds/spk2/late2")} <= expected
    assert sorted(tuple(sorted((p.a, p.b))) for p in report.pairs) == sorted(expected)  # each pair once
    assert report.index == "ivf2,sq8" and report.rows == 20 and report.total == len(expected)
    # a writable store's index was brought up to date first; a read-only one's left as it was
    assert ann.read_meta(ann.folder_of(st.manifest, model), model).rows == (20 if writable else 12)
    st.close()


def _window_model(st, windows_of):
    """A fake window model over every item of `st`: `windows_of(uid, speaker)` gives an
    item's [n, 16] vectors, stored with spans 0.75 s apart through the claim and writer
    path; byte-identical items share their first copy's rows, as extraction does."""
    from embstore.audio.io import content_hash
    from embstore.extract.client import SqliteManifestClient
    from embstore.extract.messages import ItemResult
    from embstore.extract.writer import ZarrWriter
    from embstore.manifest.tasks import new_owner
    from tests.store_factory import fake_model_description

    description = dict(fake_model_description(16, "fakewin"), kind="windows",
                       frontend={"fake": True, "cutting": {"windows": {"window": 1.5, "shift": 0.75, "last": "fit"}}})
    model = st.manifest.register_model(description)
    owner = new_owner()
    client = SqliteManifestClient(st.path, model.id, owner, 600, "item", lambda n: max(1, n // 160), 16000)
    client.refresh()
    speaker_of = {r["id"]: r["speaker"] for r in st.manifest.query("SELECT id, speaker FROM items")}
    writer = ZarrWriter(str(st.path), model.id, None)
    first: dict[str, tuple] = {}
    try:
        while claimed := client.claim(512, 10**12):
            for task in claimed:
                digest = content_hash(task.path)
                if digest in first:
                    row, n = first[digest]
                    writer.add(ItemResult(task.task_id, task.item_id, owner, digest, task.duration, None, row, n))
                    continue
                vectors = windows_of(task.uid, speaker_of[task.item_id])
                spans = np.stack([0.75 * np.arange(len(vectors)), 0.75 * np.arange(len(vectors)) + 1.5], axis=1)
                writer.add(ItemResult(task.task_id, task.item_id, owner, digest, task.duration, vectors,
                                      spans=spans.astype(np.float32)))
                writer.flush()
                row = st.manifest.query("SELECT row FROM tasks WHERE id = ?", (task.task_id,))[0][0]
                first[digest] = (row, len(vectors))
        writer.flush()
    finally:
        writer.close()
        client.close()
    return st.manifest.resolve_model("fakewin", kind=None)


def _windows_one_row_at_a_time(st, model, rows, scores):
    """The reference: every row's owners and span read on its own (the former query path)."""
    from embstore.manifest import reads

    arrays = st.manifest.model_arrays(model)
    out = []
    for row, score in zip(rows.tolist(), scores.tolist()):
        start, end = (float(x) for x in arrays.read_spans(row, row + 1)[0])
        out += [{"id": o["uid"], "speaker": o["speaker"], "dataset": o["dataset"], "path": f"{o['root']}/{o['path']}",
                 "start": round(start, 3), "end": round(end, 3), "window": row - o["row"], "score": score}
                for o in reads.window_owners(st.manifest.conn, model.id, row)]
    return sorted(out, key=lambda d: (-d["score"], d["id"], d["start"]))


def test_window_range_queries_resolve_every_row_at_once_as_row_by_row_did(tmp_path, monkeypatch):
    from embstore.arrays.zarr_arrays import ModelArrays
    from embstore.manifest import reads

    st = make_store(tmp_path, speakers=3, per_speaker=3, copies=1)  # dup/copy0: spk0/utt0's audio
    (tmp_path / "audio/ds/spk2/utt1.wav").unlink()
    st.scan([tmp_path / "audio"])  # a removed item: its windows are never listed
    model = _window_model(st, lambda uid, spk: np.stack(
        [synthetic_vector(f"{uid}#{w}", spk.replace("dup", "spk0"), 16) for w in range(3 + int(uid[-1]))]))
    source = query.unit_rows(st.manifest, model)
    vector = source.take(np.array([1]))[0]  # a window of spk0/utt0, whose rows dup/copy0 shares
    rows, scores = knn.Searcher(source).at_least(vector, 0.3)
    expected = _windows_one_row_at_a_time(st, model, rows, scores)
    assert len({(e["id"], e["window"]) for e in expected}) == len(expected) > 10
    assert {"ds/spk0/utt0", "ds/dup/copy0"} <= {e["id"] for e in expected}  # shared rows: both items
    calls = {"spans": 0}
    spans = ModelArrays.read_spans

    def counted(self, start, stop):
        calls["spans"] += 1
        return spans(self, start, stop)

    monkeypatch.setattr(ModelArrays, "read_spans", counted)
    monkeypatch.setattr(reads, "window_owners", lambda *a: pytest.fail("owners looked up one row at a time"))
    found = st.similar(vector=vector, model="fakewin", min_score=0.3, limit=10_000)
    assert found == [dict(e, index="flat", exact=True) for e in expected]
    assert "ds/spk2/utt1" not in {f["id"] for f in found}
    assert calls["spans"] == 1  # the rows' spans in one read
    top = st.similar(vector=vector, model="fakewin", k=5)
    assert [(f["id"], f["window"]) for f in top] == [(e["id"], e["window"]) for e in expected[:5]]
    st.close()
