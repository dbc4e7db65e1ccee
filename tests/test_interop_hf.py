"""`scan --hf`: Hugging Face audio datasets (Parquet shards with the audio bytes inside,
`save_to_disk` Arrow folders) scanned, extracted, exported back to Parquet; bad rows and
shards fail alone; rescans go by shard size and mtime; a killed extraction resumes once."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import embstore
from embstore.audio.io import content_hash, read_audio, row_address
from embstore.cli import cli
from embstore.extract.reference import ReferenceEmbedder
from embstore.vectors import cosine_rows

ROOT = Path(__file__).resolve().parent.parent


def shortest(shared_data: Path, n: int) -> list[Path]:
    """The n shortest shared files (bytes ~ seconds for FLAC), so extraction stays quick."""
    return sorted(shared_data.rglob("*.flac"), key=lambda p: p.stat().st_size)[:n]


def rows_of(files: list[Path]) -> list[dict]:
    """HF-style rows: the files' FLAC bytes in an audio struct, an id and a speaker."""
    return [{"id": f.stem, "speaker_id": f.parent.name, "audio": {"bytes": f.read_bytes(), "path": f.name}}
            for f in files]


def write_shards(folder: Path, rows: list[dict], split: int, row_group_size: int = 2) -> list[Path]:
    """Two Parquet shards in the Hub's naming, several row groups each."""
    folder.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows)
    out = []
    for k, part in enumerate((table.slice(0, split), table.slice(split))):
        path = folder / f"train-{k:05d}-of-00002.parquet"
        pq.write_table(part, path, row_group_size=row_group_size)
        out.append(path)
    return out


def items_of(st) -> dict[str, tuple]:
    return {r["uid"]: (r["speaker"], r["dataset"], r["path"])
            for r in st.manifest.query("SELECT i.uid, i.speaker, i.dataset, f.path FROM items i"
                                       " JOIN files f ON f.id = i.file_id WHERE i.removed = 0")}


def test_rows_read_like_their_files(tmp_path, shared_data):
    files = shortest(shared_data, 2)
    (shard,) = write_shards(tmp_path / "hf", rows_of(files), split=2, row_group_size=1)[:1]
    for row, f in enumerate(files):
        address = row_address(str(shard), row)
        wav, rate = read_audio(address, 0.5, 1.5)
        want, want_rate = read_audio(str(f), 0.5, 1.5)
        assert rate == want_rate and np.array_equal(wav, want)
        # the hash of a row is the hash of the bytes it holds: dedup joins a row and its file
        assert content_hash(address) == content_hash(str(f))


@pytest.mark.slow
@pytest.mark.long
def test_scan_extract_equal_plain_files_dedup_and_parquet_round_trip(tmp_path, shared_data, campplus_weights):
    """The issue's acceptance: rows embedded from their bytes equal their files embedded
    (CAM++, cosine >= 0.99999); a row and its file share one row (dedup); the Parquet
    export reads back through `datasets` with the same vectors; and a window model's
    exports, one cut and one row per window. Three extraction runs."""
    datasets = pytest.importorskip("datasets")
    files = shortest(shared_data, 4)
    write_shards(tmp_path / "hf", rows_of(files), split=2, row_group_size=1)
    st = embstore.open(tmp_path / "s")
    report = st.scan(hf=[tmp_path / "hf"])
    assert (report.added, report.items_added, report.failed) == (4, 4, 0)
    assert items_of(st) == {
        f.stem: (f.parent.name, "hf", row_address(str(tmp_path / "hf" / f"train-{k // 2:05d}-of-00002.parquet"), k % 2))
        for k, f in enumerate(files)}
    summary = st.extract(progress=False, workers=1)
    assert summary.outcome.done == 4 and summary.outcome.exit_status == 0
    ids, vectors = st.embeddings()
    record = st.models()[0]
    # the same files scanned as plain files, embedded as the store embeds them
    embedder = ReferenceEmbedder(record)  # one model load for every file
    reference = np.concatenate([embedder.embed(str(next(f for f in files if f.stem == i))) for i in ids])
    assert cosine_rows(vectors, reference).min() >= 0.99999

    # the plain files in the same store: dedup gives each the row of its row's bytes
    tree = tmp_path / "tree" / "plain"
    for f in files:
        (tree / f.parent.name).mkdir(parents=True, exist_ok=True)
        (tree / f.parent.name / f.name).symlink_to(f)
    st.scan([tmp_path / "tree"])
    again = st.extract(progress=False, workers=1)
    assert again.outcome.done == 8 and again.outcome.exit_status == 0
    rows = dict(st.manifest.query("SELECT i.uid, t.row FROM tasks t JOIN items i ON i.id = t.item_id"))
    assert all(rows[f"plain/{f.parent.name}/{f.stem}"] == rows[f.stem] for f in files)
    assert st.manifest.query("SELECT max(row) + 1 FROM tasks")[0][0] == 4  # no row computed twice

    out = tmp_path / "parquet"
    exported = st.export_parquet(out)
    assert exported.items == exported.rows == 8 and exported.written == 1
    dataset = datasets.Dataset.from_parquet(str(out / "*.parquet"))
    feature = dataset.features["embedding"]
    assert getattr(feature, "length", None) == record.dim and feature.feature.dtype == "float32"
    ids, vectors = st.embeddings()
    by_id = dict(zip(ids, vectors))
    assert sorted(dataset["id"]) == sorted(by_id)
    for row in dataset:
        assert np.array_equal(np.asarray(row["embedding"], dtype=np.float32), by_id[row["id"]])
    meta = json.loads(pq.read_schema(next(out.glob("*.parquet"))).metadata[b"embstore"])
    assert meta["fingerprint"] == record.fingerprint and meta["dim"] == record.dim
    assert st.export_parquet(out).written == 0  # nothing changed: nothing rewritten
    # verify recomputes rows from their bytes (and checks their hashes) as it does files
    checked = st.verify(deep=8, seed=0)
    (deep,) = [info["deep"] for info in checked.models.values()]
    assert checked.ok and deep["checked"] == 8 and not deep["skipped"]
    _window_exports(st, tmp_path)
    st.close()


def _window_exports(st, tmp_path: Path) -> None:
    """A window model of the same store exports one cut and one Parquet row per window:
    the same subsegment ids, the windows' spans in the source audio, the same vectors."""
    from lhotse import CutSet

    # windows over whole items (no VAD to load): the exports are what is checked here
    model = st.extract(windows="1.5:0.75", vad="none", progress=False, workers=1).model
    lh = st.export_lhotse(tmp_path / "lh", model=model)
    pqr = st.export_parquet(tmp_path / "pq", model=model)
    assert lh.windows == pqr.rows > 8 and lh.items == pqr.items == 8
    table = pq.read_table(tmp_path / "pq")
    cuts = {c.id: c for c in CutSet.from_file(tmp_path / "lh" / "cuts.jsonl.gz")}
    vectors = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    for k, row in enumerate(table.drop(["embedding"]).to_pylist()):
        cut = cuts[row["id"]]
        assert row["id"] == f"{row['item']}-{round(row['start'] * 1000):07d}-{round(row['end'] * 1000):07d}"
        assert cut.start == pytest.approx(row["start"]) and cut.start + cut.duration == pytest.approx(row["end"])
        assert np.array_equal(cut.load_embedding(), vectors[k])
        assert cut.custom["source"] == row["path"] if "#row=" in row["path"] else cut.recording is not None


def test_bad_rows_and_a_cut_shard_fail_alone_with_their_reasons(tmp_path, shared_data):
    files = shortest(shared_data, 3)
    rows = rows_of(files)
    rows[1]["audio"]["bytes"] = b"\x00not audio at all" * 64
    shards = write_shards(tmp_path / "hf", rows, split=2)
    cut = tmp_path / "hf" / "train-00002-of-00003.parquet"
    good = shards[1].read_bytes()
    cut.write_bytes(good[: len(good) // 2])  # a copy that stopped mid-file
    st = embstore.open(tmp_path / "s")
    report = st.scan(hf=[tmp_path / "hf"])
    assert report.items_added == 2 and report.failed == 2
    failures = {Path(f["path"]).name: f["error"] for f in report.failures}
    assert "unreadable header" in failures["train-00000-of-00002.parquet#row=1"]
    assert failures["train-00002-of-00003.parquet"].startswith("unreadable dataset shard:")
    assert set(items_of(st)) == {files[0].stem, files[2].stem}
    # the failures are recorded, and a rescan of the unchanged shards reads none of them
    assert st.manifest.query("SELECT count(*) FROM files WHERE status = 'scan_failed'")[0][0] == 2
    assert st.scan(hf=[tmp_path / "hf"]).no_changes
    st.close()


def test_rescans_go_by_shard_size_and_mtime(tmp_path, shared_data, monkeypatch):
    files = shortest(shared_data, 5)
    rows = rows_of(files)
    shards = write_shards(tmp_path / "hf", rows[:4], split=2)
    st = embstore.open(tmp_path / "s")
    assert st.scan(hf=[tmp_path / "hf"]).items_added == 4
    import embstore.scan.from_hf as from_hf

    def unread(*args, **kwargs):
        raise AssertionError("an unchanged shard was read")

    with monkeypatch.context() as m:
        m.setattr(from_hf, "iter_rows", unread)
        report = st.scan(hf=[tmp_path / "hf"])
    assert report.no_changes and report.unchanged == 4
    # shard 1 rewritten with one row more, shard 0 gone: rows follow, other shards untouched
    pq.write_table(pa.Table.from_pylist(rows[2:5]), shards[1])
    shards[0].unlink()
    report = st.scan(hf=[tmp_path / "hf"])
    assert (report.removed, report.changed, report.added) == (2, 2, 1)
    assert (report.items_removed, report.items_added) == (2, 1)
    assert set(items_of(st)) == {f.stem for f in files[2:5]}
    st.close()


def test_save_to_disk_folder_and_given_columns(tmp_path, shared_data):
    datasets = pytest.importorskip("datasets")
    files = shortest(shared_data, 3)
    data = datasets.Dataset.from_dict(
        {"utt": [f.stem for f in files], "reader": [f.parent.name for f in files],
         "audio": [{"bytes": f.read_bytes(), "path": f.name} for f in files]},
    ).cast_column("audio", datasets.Audio(decode=False))  # typed as audio without re-encoding
    data.save_to_disk(str(tmp_path / "saved"))
    result = CliRunner().invoke(cli, ["scan", str(tmp_path / "s"), "--hf", str(tmp_path / "saved"), "--id-column", "utt",
                                      "--speaker-column", "reader", "--dataset", "libri", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["items_added"] == 3
    st = embstore.open(tmp_path / "s")
    got = items_of(st)
    assert {u: v[:2] for u, v in got.items()} == {f.stem: (f.parent.name, "libri") for f in files}
    # an Arrow row reads as its file does
    uid = files[0].stem
    assert np.array_equal(read_audio(got[uid][2])[0], read_audio(str(files[0]))[0])
    st.close()
    typo = CliRunner().invoke(cli, ["scan", str(tmp_path / "s"), "--hf", str(tmp_path / "saved"), "--speaker-column", "spk"])
    assert typo.exit_code != 0 and "--speaker-column 'spk' is not a column" in typo.output


def test_splits_with_the_same_shard_names_and_no_id_column_keep_distinct_ids(tmp_path, shared_data):
    # save_to_disk's DatasetDict: train/ and test/ each hold data-00000-of-00001
    files = shortest(shared_data, 4)
    for split, part in (("train", files[:2]), ("test", files[2:])):
        (tmp_path / "hf" / split).mkdir(parents=True)
        rows = [{k: v for k, v in r.items() if k != "id"} for r in rows_of(part)]
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "hf" / split / "data-00000-of-00001.parquet")
    st = embstore.open(tmp_path / "s")
    report = st.scan(hf=[tmp_path / "hf"])
    assert (report.items_added, report.failed) == (4, 0)
    assert sorted(items_of(st)) == [f"{split}/data-00000-of-00001/{row}" for split in ("test", "train") for row in (0, 1)]
    st.close()


@pytest.mark.slow
def test_kill_9_mid_extract_of_an_hf_store_then_one_resume_every_item_once(tmp_path, shared_data):
    from tests.wespeaker_dirs import make_wespeaker_dir

    model = "wespeaker:" + str(make_wespeaker_dir(tmp_path / "ecapa", arch="ecapa"))
    files = sorted(shared_data.rglob("*.flac"))[:16]
    write_shards(tmp_path / "hf", rows_of(files), split=8, row_group_size=3)
    store = tmp_path / "s"
    st = embstore.open(store)
    assert st.scan(hf=[tmp_path / "hf"]).items_added == 16
    st.close()
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "embstore", "extract", str(store), "--model", model, "--workers", "2", "--json"]
    killed = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    conn = sqlite3.connect(str(store / "manifest.db"), timeout=30)

    def count(status: str) -> int:
        try:
            return conn.execute("SELECT count(*) FROM tasks WHERE status = ?", (status,)).fetchone()[0]
        except sqlite3.OperationalError:  # the tasks table is being made
            return 0

    deadline = time.monotonic() + 180
    while count("claimed") == 0 and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    held = count("claimed")
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    assert held > 0 and count("done") < 16  # killed mid-run, holding claims
    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    rows = conn.execute("SELECT i.uid, t.status, t.row FROM tasks t JOIN items i ON i.id = t.item_id").fetchall()
    conn.close()
    assert len(rows) == 16 and {r[1] for r in rows} == {"done"}
    assert sorted(r[0] for r in rows) == sorted(f.stem for f in files)
    assert len({r[2] for r in rows}) == 16  # each item its own row, none written twice over another
    st = embstore.open(store)
    assert st.verify().ok
    st.close()


def test_export_pkl_names_rows_by_their_ids(tmp_path, shared_data):
    from tests.store_factory import fill_embeddings

    files = shortest(shared_data, 3)
    write_shards(tmp_path / "hf", rows_of(files), split=2)
    st = embstore.open(tmp_path / "s")
    st.scan(hf=[tmp_path / "hf"])
    fill_embeddings(st)
    st.export_pkl(tmp_path / "pkl")
    written = sorted(str(p.relative_to(tmp_path / "pkl")) for p in (tmp_path / "pkl").rglob("*.pkl"))
    assert written == sorted(f"hf/{f.parent.name}/{f.stem}.pkl" for f in files)
    st.close()



def test_a_row_inserted_mid_shard_moves_the_ids_after_it_instead_of_clashing(tmp_path, shared_data):
    from tests.store_factory import fill_embeddings

    files = shortest(shared_data, 4)
    rows = rows_of(files)
    shard = tmp_path / "hf" / "train.parquet"
    shard.parent.mkdir()
    pq.write_table(pa.Table.from_pylist([rows[0], rows[2], rows[3]]), shard)
    st = embstore.open(tmp_path / "s")
    st.scan(hf=[shard])
    fill_embeddings(st)
    # the dataset regenerated with a row inserted: the ids after it sit one row further on
    pq.write_table(pa.Table.from_pylist(rows), shard)
    report = st.scan(hf=[shard])
    assert (report.failed, report.items_added, report.items_removed) == (0, 1, 0)
    got = items_of(st)
    assert {uid: int(v[2].rsplit("=", 1)[1]) for uid, v in got.items()} == {f.stem: k for k, f in enumerate(files)}
    assert report.items_stale == 0  # the rows the shard rewrote hold the same bytes: embeddings kept
    # a row whose audio changed as its id moved: that embedding goes stale, only that one
    other = shortest(shared_data, 5)[4]
    rows[2] = dict(rows[2], audio={"bytes": other.read_bytes(), "path": other.name})
    pq.write_table(pa.Table.from_pylist([rows[0], rows[2], rows[3]]), shard)
    report = st.scan(hf=[shard])
    assert (report.failed, report.items_removed, report.items_stale) == (0, 1, 1)
    assert dict(st.manifest.query("SELECT i.uid, t.status FROM items i JOIN tasks t ON t.item_id = i.id"
                                  " WHERE i.removed = 0")) == {files[0].stem: "done", files[2].stem: "stale",
                                                               files[3].stem: "done"}
    st.close()


def test_two_rows_with_one_id_the_second_fails_as_a_duplicate(tmp_path, shared_data):
    files = shortest(shared_data, 3)
    rows = rows_of(files)
    rows[2]["id"] = rows[0]["id"]
    shard = tmp_path / "hf" / "train.parquet"
    shard.parent.mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:2]), shard)
    st = embstore.open(tmp_path / "s")
    st.scan(hf=[shard])
    pq.write_table(pa.Table.from_pylist(rows), shard)  # rewritten: a third row reusing the first's id
    report = st.scan(hf=[shard])
    paths = {uid: v[2] for uid, v in items_of(st).items()}
    # the first row keeps its id; the third gets the usual suffix (or fails), never steals it
    assert paths[files[0].stem] == row_address(str(shard), 0) and report.failed + report.items_added == 1
    st.close()


def test_threads_read_row_groups_outside_the_cache_lock_each_group_once(tmp_path, shared_data, monkeypatch):
    import threading
    from collections import Counter
    from concurrent.futures import ThreadPoolExecutor

    from embstore.audio import io as audio_io

    files = shortest(shared_data, 4)
    (shard,) = write_shards(tmp_path / "hf", rows_of(files), split=4, row_group_size=1)[:1]
    class OwnedLock:
        """The cache's lock, knowing which thread holds it."""

        def __init__(self):
            self.lock, self.owner = threading.Lock(), None

        def __enter__(self):
            self.lock.acquire()
            self.owner = threading.get_ident()

        def __exit__(self, *exc):
            self.owner = None
            self.lock.release()

    cache = audio_io._Groups(keep=8)
    cache.lock = OwnedLock()
    reads: Counter = Counter()
    under_lock: list[bool] = []
    real_layout = audio_io._parquet_layout

    def watched_layout(path):
        read, starts = real_layout(path)

        def read_group(group):
            under_lock.append(cache.lock.owner == threading.get_ident())
            reads[group] += 1
            time.sleep(0.05)  # the other threads ask for this group meanwhile: they must wait, not reread
            return read(group)

        return read_group, starts

    monkeypatch.setattr(audio_io, "_parquet_layout", watched_layout)
    start = threading.Barrier(6)

    def work(k: int) -> list[bytes]:
        start.wait()
        order = [(k + j) % 4 for j in range(4)] if k % 2 else [k % 4] * 4
        return [(r, cache.row(str(shard), r)) for r in order]

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(work, range(6)))
    want = [f.read_bytes() for f in files]
    assert all(data == want[r] for got in results for r, data in got)
    assert under_lock and not any(under_lock)
    assert reads == Counter({0: 1, 1: 1, 2: 1, 3: 1})


def test_a_claim_in_length_order_reads_its_rows_by_shard_and_row(tmp_path, shared_data, monkeypatch):
    """Equal batching claims by length, which mixes shards: the loaders read (hash, then
    decode) by (shard, row), so each row group is read once per pass, and the claim
    comes back in its own order."""
    import soundfile as sf
    from concurrent.futures import ThreadPoolExecutor

    from embstore.audio import io as audio_io
    from embstore.extract import loading
    from embstore.extract.client import SqliteManifestClient
    from embstore.manifest.tasks import new_owner
    from embstore.models.null import NullEncoder
    from tests.store_factory import fake_model_description

    files = sorted(shortest(shared_data, 6), key=lambda f: sf.info(str(f)).frames)
    # shortest first in length order: shard 0 row 2, shard 1 row 2, shard 0 row 1...
    shards = tmp_path / "hf"
    shards.mkdir()
    for k in range(2):
        pq.write_table(pa.Table.from_pylist(rows_of(files[k::2][::-1])), shards / f"train-{k:05d}-of-00002.parquet",
                       row_group_size=1)
    st = embstore.open(tmp_path / "s")
    st.scan(hf=[shards])
    model = st.manifest.register_model(fake_model_description(16, "fake"))
    client = SqliteManifestClient(st.path, model.id, new_owner(), 600, "length", lambda n: max(1, n // 160), 16000)
    client.refresh()
    claimed = client.claim(6, 10**12)
    place = [audio_io.parse_address(t.path)[:2] for t in claimed]
    assert len(claimed) == 6 and place != sorted(place)  # the claim mixes shards
    reads: list[tuple[str, int]] = []
    real = audio_io.read_row_bytes
    monkeypatch.setattr(audio_io, "read_row_bytes", lambda shard, row: reads.append((shard, row)) or real(shard, row))
    with ThreadPoolExecutor(1) as pool:
        loaded = loading.load_claim(pool, NullEncoder(16), client, claimed, False)
    client.close()
    assert [x.task.task_id for x in loaded] == [t.task_id for t in claimed]
    assert all(x.error is None and x.feats is not None for x in loaded)
    assert reads == sorted(place) * 2  # hashes, then decodes, each pass in (shard, row) order
    st.close()


def _vectors(st) -> dict[str, np.ndarray]:
    ids, vectors = st.embeddings()
    return dict(zip(ids, vectors))


def _task_states(st) -> dict[str, int]:
    return dict(st.manifest.query("SELECT status, count(*) FROM tasks GROUP BY status"))


def test_a_resharded_dataset_keeps_its_ids_and_their_embeddings(tmp_path, shared_data):
    """The same rows with their ids, redistributed over the shards (other splits, then
    other shard files): each id follows its row to its new shard, keeps its item and
    its embedding, and nothing is to be extracted again."""
    from tests.store_factory import fill_embeddings

    files = shortest(shared_data, 6)
    rows = rows_of(files)
    folder = tmp_path / "hf"
    write_shards(folder, rows, split=3)
    st = embstore.open(tmp_path / "s")
    st.scan(hf=[folder])
    fill_embeddings(st)  # done tasks with the rows' hashes, through the claim and writer path
    before = _vectors(st)
    item_ids = dict(st.manifest.query("SELECT uid, id FROM items"))
    by_id = {r["id"]: k for k, r in enumerate(rows)}

    def check(report, where: dict[str, str]) -> None:
        assert (report.failed, report.items_added, report.items_removed, report.items_stale) == (0, 0, 0, 0)
        assert {uid: v[2] for uid, v in items_of(st).items()} == where
        assert dict(st.manifest.query("SELECT uid, id FROM items")) == item_ids
        assert _task_states(st) == {"done": 6}
        assert st.extract(model="fake:fake", progress=False, workers=1).nothing_to_do
        after = _vectors(st)
        assert after.keys() == before.keys() and all(np.array_equal(after[u], before[u]) for u in after)

    # the same shard files, other splits, rows in another order: rows move both ways
    shards = write_shards(folder, rows[::-1], split=2)
    check(st.scan(hf=[folder]), {r["id"]: row_address(str(shards[k >= 2]), k if k < 2 else k - 2)
                                 for k, r in enumerate(rows[::-1])})
    # three shards of new names instead of two
    for old in shards:
        old.unlink()
    table = pa.Table.from_pylist(rows)
    new = [folder / f"train-{k:05d}-of-00003.parquet" for k in range(3)]
    for k, path in enumerate(new):
        pq.write_table(table.slice(2 * k, 2), path)
    report = st.scan(hf=[folder])
    check(report, {r["id"]: row_address(str(new[by_id[r["id"]] // 2]), by_id[r["id"]] % 2) for r in rows})
    assert (report.removed, report.added) == (6, 6)
    st.close()


def test_a_rescan_with_other_columns_applies_them_to_unchanged_shards(tmp_path, shared_data, monkeypatch):
    from tests.store_factory import fill_embeddings

    files = shortest(shared_data, 3)
    rows = [dict(r, utt=f"u-{r['id']}", reader=f"r-{r['speaker_id']}") for r in rows_of(files)]
    shard = tmp_path / "hf" / "train.parquet"
    shard.parent.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), shard)
    st = embstore.open(tmp_path / "s")
    st.scan(hf=[shard])
    fill_embeddings(st)
    before = _vectors(st)
    # another speaker column and dataset name: the labels change, the embeddings stay
    report = st.scan(hf=[shard], speaker_column="reader", dataset="renamed")
    assert (report.failed, report.items_added, report.items_removed, report.items_stale) == (0, 0, 0, 0)
    want = {f.stem: (f"r-{f.parent.name}", "renamed") for f in files}
    assert {u: v[:2] for u, v in items_of(st).items()} == want
    assert _task_states(st) == {"done": 3}
    # the options are recorded for the dataset: a plain rescan keeps them, reading nothing
    import embstore.scan.from_hf as from_hf

    def unread(*args, **kwargs):
        raise AssertionError("an unchanged shard was read")

    with monkeypatch.context() as m:
        m.setattr(from_hf, "iter_rows", unread)
        assert st.scan(hf=[shard]).no_changes
    assert {u: v[:2] for u, v in items_of(st).items()} == want
    # another id column: the items are renamed, each keeping its embedding
    # (through the CLI: its summary counts the relabelled items)
    result = CliRunner().invoke(cli, ["scan", str(tmp_path / "s"), "--hf", str(shard), "--id-column", "utt"])
    assert result.exit_code == 0, result.output
    assert "0 new items, 0 stale, 0 removed, 3 relabelled" in result.output
    assert {u: v[:2] for u, v in items_of(st).items()} == {f"u-{k}": v for k, v in want.items()}
    after = _vectors(st)
    assert after.keys() == {f"u-{k}" for k in before} and all(np.array_equal(after[f"u-{k}"], v) for k, v in before.items())
    assert _task_states(st) == {"done": 3}
    assert st.extract(model="fake:fake", progress=False, workers=1).nothing_to_do
    st.close()


def test_a_reshard_rescan_cut_short_is_completed_by_the_next_scan(tmp_path, shared_data, monkeypatch):
    from embstore.scan.sync import _Syncer

    files = shortest(shared_data, 4)
    rows = rows_of(files)
    folder = tmp_path / "hf"
    write_shards(folder, rows, split=2)
    st = embstore.open(tmp_path / "s")
    st.scan(hf=[folder])
    for old in folder.iterdir():
        old.unlink()
    pq.write_table(pa.Table.from_pylist(rows), folder / "all.parquet")

    def cut_short(self):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(_Syncer, "settle_moves", cut_short)
        with pytest.raises(KeyboardInterrupt):
            st.scan(hf=[folder])
    report = st.scan(hf=[folder])  # the shard is unchanged, but rows without their items are read again
    assert report.failed == 0 and report.items_added == 0
    assert {uid: v[2] for uid, v in items_of(st).items()} == {
        r["id"]: row_address(str(folder / "all.parquet"), k) for k, r in enumerate(rows)}
    assert st.scan(hf=[folder]).no_changes
    st.close()


def test_two_datasets_in_one_scan_name_their_rows_each_by_its_own_root(tmp_path, shared_data):
    files = shortest(shared_data, 2)
    for name, f in zip(("a", "b"), files):
        (tmp_path / name).mkdir()
        row = {k: v for k, v in rows_of([f])[0].items() if k != "id"}
        pq.write_table(pa.Table.from_pylist([row]), tmp_path / name / "train.parquet")
    st = embstore.open(tmp_path / "s")
    st.scan(hf=[tmp_path / "a", tmp_path / "b"])
    assert {uid: v[1] for uid, v in items_of(st).items()} == {"train/0": "a", "train/0.parquet#row=0": "b"}
    st.close()


def test_a_failed_row_group_read_fails_the_threads_waiting_for_it_and_is_retried(tmp_path, shared_data, monkeypatch):
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from embstore.audio import io as audio_io
    from embstore.errors import AudioError

    files = shortest(shared_data, 1)
    (shard,) = write_shards(tmp_path / "hf", rows_of(files), split=1)[:1]
    cache = audio_io._Groups()
    go, waiting, reads = threading.Event(), [], []
    real_layout, real_wait = audio_io._parquet_layout, audio_io._Reading.wait

    def failing_layout(path):
        read, starts = real_layout(path)

        def read_group(group):
            reads.append(group)
            if len(reads) == 1:
                go.wait(10)
                raise OSError("injected: disk gone")
            return read(group)

        return read_group, starts

    def counted_wait(self):
        waiting.append(1)
        return real_wait(self)

    monkeypatch.setattr(audio_io, "_parquet_layout", failing_layout)
    monkeypatch.setattr(audio_io._Reading, "wait", counted_wait)

    def row() -> object:
        try:
            return cache.row(str(shard), 0)
        except AudioError as exc:
            return str(exc)

    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(row)
        while not reads:
            time.sleep(0.01)
        second = pool.submit(row)  # finds the group being read: waits for that read
        while not waiting:
            time.sleep(0.01)
        go.set()
        got = [first.result(10), second.result(10)]
    assert got == ["unreadable rows 0-0: injected: disk gone"] * 2 and reads == [0]
    assert cache.row(str(shard), 0) == files[0].read_bytes() and reads == [0, 0]  # not cached: read again


def test_a_row_failed_for_a_duplicate_id_gets_its_own_with_another_id_column(tmp_path, shared_data):
    files = shortest(shared_data, 3)
    rows = [dict(r, utt=f"u-{k}") for k, r in enumerate(rows_of(files))]
    # row 2 repeats row 0's id, and row 1 already holds the suffixed id a repeat would get
    rows[1]["id"] = rows[0]["id"] + ".parquet#row=2"
    rows[2]["id"] = rows[0]["id"]
    shard = tmp_path / "hf" / "train.parquet"
    shard.parent.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), shard)
    st = embstore.open(tmp_path / "s")
    first = st.scan(hf=[shard])
    assert first.failed == 1 and "duplicate item id" in first.failures[0]["error"]
    # the same shard, unchanged, with a column that tells the rows apart: the failed row too
    report = st.scan(hf=[shard], id_column="utt")
    assert report.failed == 0, report.failures
    assert sorted(items_of(st)) == ["u-0", "u-1", "u-2"]
    assert not st.manifest.query("SELECT 1 FROM files WHERE status = 'scan_failed'")
    st.close()
