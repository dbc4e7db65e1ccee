"""The cluster path's parts that need no cluster: options, path maps, the wire format,
and freeing the claims of a driver that died (tests/test_ray.py runs the rest)."""

from __future__ import annotations

import os

import numpy as np
import pytest

import embstore
from embstore.errors import ExtractionError
from embstore.extract.ray.nodes import local_spec, mapped, missing_roots_line, resolve_roots
from embstore.extract.ray.wire import pack, unpack
from embstore.extract.messages import ItemFailure, ItemResult
from embstore.extract.options import ExtractOptions
from embstore.manifest import runs, tasks
from tests.audio_factory import make_tree
from tests.store_factory import fake_model_description


def test_cluster_options_are_checked_in_one_line():
    assert ExtractOptions(ray="auto", path_map=["/a=/b"]).path_map == ("/a=/b",)
    for bad, needle in [
        (dict(ray="auto", path_map=("a=/b",)), "two absolute paths"),
        (dict(ray="auto", path_map=("/a",)), "OLD=NEW"),
        (dict(path_map=("/a=/b",)), "for cluster runs"),
        (dict(ray="auto", gpus="0"), "--gpus and --device are for local runs"),
        (dict(ray="auto", device="cuda"), "--gpus and --device"),
        (dict(ray="auto", runtime="onnx"), "--runtime onnx is for local runs"),
        (dict(ray=" "), "--ray takes"),
    ]:
        with pytest.raises(ExtractionError, match=needle):
            ExtractOptions(**bad)
    pairs = ExtractOptions(ray="auto", path_map=("/data=/mnt/a", "/data/x/=/mnt/b")).path_pairs()
    assert pairs == [("/data/x", "/mnt/b"), ("/data", "/mnt/a")]  # the most specific first


def test_path_map_applies_only_where_the_root_is_missing(tmp_path):
    here, moved = tmp_path / "here", tmp_path / "moved" / "corpus"
    here.mkdir()
    moved.mkdir(parents=True)
    gone = str(tmp_path / "corpus")
    pairs = [(str(tmp_path / "nowhere"), "/x"), (gone, str(moved))]
    rewrites, missing = resolve_roots([str(here), gone, "/no/such/root"], pairs)
    assert rewrites == [(gone, str(moved))] and missing == ["/no/such/root"]
    assert mapped(gone + "/a/b.wav", pairs) == str(moved) + "/a/b.wav"
    assert mapped(gone + "x/b.wav", pairs) is None  # a prefix of a name is not a folder
    line = missing_roots_line("node 127.0.0.1 (abcd1234)", ["/r1", "/r2", "/r3", "/r4"])
    assert line.startswith("node 127.0.0.1 (abcd1234): scan root(s) missing there: /r1, /r2, /r3 and 1 more")
    assert "--path-map /r1=PATH" in line and "\n" not in line
    assert local_spec(f"wespeaker:{gone}/model", [(gone, str(moved))]) == f"wespeaker:{gone}/model"  # not there
    (moved / "model").mkdir()
    assert local_spec(f"wespeaker:{gone}/model", [(gone, str(moved))]) == f"wespeaker:{moved}/model"
    assert local_spec("resemblyzer", [(gone, str(moved))]) == "resemblyzer"


def test_packed_results_unpack_to_the_same_outcomes():
    rng = np.random.default_rng(0)
    fresh = [ItemResult(k, 100 + k, "ray:n:a:1", f"h{k}", 0.5 * k, rng.standard_normal(8).astype(np.float32))
             for k in range(7)]
    others = [ItemResult(20, 120, "ray:n:a:1", "h", 1.0, None, 3), ItemFailure(21, "ray:n:a:1", "decode", "bad")]
    parts = pack("ray:n:a:1", fresh + others, max_bytes=3 * (8 * 4 + 64))
    assert [len(p.task_ids) for p in parts] == [3, 3, 1]
    back = sorted((o for p in parts for o in unpack(p)), key=lambda o: o.task_id)

    def plain(o):  # dataclass equality cannot compare arrays
        return (type(o), *(v.tolist() if isinstance(v, np.ndarray) else v for v in vars(o).values()))

    assert [plain(o) for o in back] == [plain(o) for o in sorted(fresh + others, key=lambda o: o.task_id)]
    assert len(pack("o", [], 100)) == 1 and unpack(pack("o", [])[0]) == []


def test_claims_of_a_dead_drivers_actors_are_freed_at_the_next_refresh(tmp_path):
    make_tree(tmp_path / "root", speakers=1, per_speaker=3, seconds=0.3)
    st = embstore.open(tmp_path / "store")
    st.scan([tmp_path / "root"])
    model = st.manifest.register_model(fake_model_description())
    length = lambda n: n // 160  # noqa: E731
    tasks.refresh_tasks(st.manifest.conn, model.id, length, 16000)
    run_id = runs.start_run(st.manifest.conn, model.id, {})
    owner = tasks.ray_owner("node1234", "actor567", run_id)
    assert len(tasks.claim_batch(st.manifest.conn, model.id, owner, 3600, 2, 10**9)) == 2
    # the driver is alive (this process): its actors keep their claims
    assert tasks.refresh_tasks(st.manifest.conn, model.id, length, 16000)["released"] == 0
    # the driver died (a pid that no longer runs): freed at once, leases or not
    st.manifest.conn.execute("UPDATE runs SET pid = ? WHERE id = ?", (2**22 + 12345, run_id))
    assert not os.path.exists(f"/proc/{2**22 + 12345}")
    assert tasks.refresh_tasks(st.manifest.conn, model.id, length, 16000)["released"] == 2
    # a run that ended leaves no claim behind either
    tasks.claim_batch(st.manifest.conn, model.id, owner, 3600, 1, 10**9)
    runs.end_run(st.manifest.conn, run_id, "finished", {})
    assert tasks.refresh_tasks(st.manifest.conn, model.id, length, 16000)["released"] == 1
    st.close()
