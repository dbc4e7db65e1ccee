"""Poison items: a file that kills its worker every time is failed with stage `crash`
after two solo deaths on different workers, and nothing else is blamed.

The crash is injected (EMBSTORE_FAULT_CRASH_PATHS: SIGKILL on decoding a matching
path), as a decoder segfault or the OOM killer would do it. The other half, that
killing the whole run never quarantines anything, is checked by the crash loop
(tests/test_crash_loop.py: no suspects, no `crash` failures after the kills).
"""

from __future__ import annotations

import json

import pytest

import embstore
from embstore.extract.faults import CRASH_PATHS
from embstore.manifest import tasks
from tests.audio_factory import make_tree, write


@pytest.fixture()
def poisoned_store(tmp_path, monkeypatch):
    make_tree(tmp_path / "root", speakers=2, per_speaker=3, seconds=0.5)
    write(tmp_path / "root" / "ds" / "spk0" / "kills-its-worker.wav", 0.5, seed=9)
    monkeypatch.setenv(CRASH_PATHS, "kills-its-worker")  # the spawned workers inherit it
    st = embstore.open(tmp_path / "store")
    st.scan([tmp_path / "root"])
    yield st
    st.close()


def task_states(st) -> dict[str, tuple]:
    return {r["uid"].rsplit("/", 1)[1]: (r["status"], r["suspect"], r["crashed_workers"], r["stage"])
            for r in st.manifest.query("SELECT i.uid, t.status, t.suspect, t.crashed_workers, t.stage FROM tasks t"
                              " JOIN items i ON i.id = t.item_id")}


@pytest.mark.slow
def test_a_poison_item_fails_after_two_solo_deaths_and_nothing_else_does(poisoned_store):
    st = poisoned_store
    # run 1: the batch holding the poison dies; its items become suspects, claimed alone
    first = st.extract(model="null:8", workers=1)
    assert first.error and "died" in first.error
    states = task_states(st)
    assert states["kills-its-worker"][0] == "pending" and states["kills-its-worker"][1] == 1
    # the others were done before the death, held with the poison (suspects), or not claimed yet
    assert all(s[0] in ("pending", "done") and s[3] is None for s in states.values()), states
    # then: suspects one at a time, alone; innocent ones pass, the poison kills its
    # worker alone (once per run: a local run does not replace dead workers)
    runs = []
    while len(runs) < 4:
        summary = st.extract(model="null:8", workers=1)
        runs.append(summary)
        if not summary.error:
            break
    assert [bool(r.error) for r in runs] == [True, False], [r.error for r in runs]
    assert first.done + sum(r.done for r in runs) == 6 and runs[-1].failed == 1
    states = task_states(st)
    assert all(s[0] == "done" for name, s in states.items() if name != "kills-its-worker"), states
    assert states["kills-its-worker"][0] == "failed" and states["kills-its-worker"][3] == "crash"
    assert len(set(json.loads(states["kills-its-worker"][2]))) == tasks.CRASHES_TO_FAIL
    (error,) = st.errors().failures
    assert error.stage == "crash" and "killed 2 different workers" in error.error
    assert "SIGKILL" in error.error and error.id.endswith("kills-its-worker")
    # and it is not retried by every run for ever
    assert st.extract(model="null:8", workers=1).nothing_to_do
    assert st.verify().ok


def test_a_death_held_with_others_makes_suspects_and_blames_no_one(tmp_path):
    from tests.store_factory import fake_model_description

    make_tree(tmp_path / "root", speakers=1, per_speaker=3, seconds=0.3)
    st = embstore.open(tmp_path / "store")
    st.scan([tmp_path / "root"])
    model = st.manifest.register_model(fake_model_description())
    tasks.refresh_tasks(st.manifest.conn, model.id, lambda n: n // 160, 16000)
    tasks.claim_batch(st.manifest.conn, model.id, "h:1:a", 60, 10, 10**9)
    assert tasks.record_death(st.manifest.conn, "h:1:", "h:1", "killed", None, prefix=True) == (3, 0)
    # suspects are never batched: one at a time, alone
    assert tasks.claim_batch(st.manifest.conn, model.id, "h:2:b", 60, 10, 10**9) == []
    one = tasks.claim_suspect(st.manifest.conn, model.id, "h:2:b", 60)
    assert len(one) == 1
    assert tasks.record_death(st.manifest.conn, "h:2:b", "h:2", "killed", None) == (1, 0)
    # the same worker dying twice is not two workers
    tasks.claim_suspect(st.manifest.conn, model.id, "h:2:c", 60)
    assert tasks.record_death(st.manifest.conn, "h:2:c", "h:2", "killed", None) == (1, 0)
    st.close()
