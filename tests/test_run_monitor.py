"""The run monitor (`embstore.extract.monitor`) over a launcher of the tests' own: a real
one, working on a real store (claims through `SqliteManifestClient`, rows and done marks
through `ZarrWriter`), in this process. What is checked is the monitor's: Ctrl-C, the
handler it puts back, rounds, the outcome counted from the store, the runs row. And the
shape: the local and the Ray launchers are two, neither made of the other."""

from __future__ import annotations

import inspect
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

import embstore
from embstore.extract.client import SqliteManifestClient
from embstore.extract.messages import ItemResult, ProgressReport, WorkerFailed, WriterFailed, Written
from embstore.extract.monitor import MAX_ROUNDS, Launcher, Report, run_rounds
from embstore.extract.options import ExtractOptions
from embstore.extract.plan import ExtractionPlan, worker_setups
from embstore.extract.summary import ExtractSummary
from embstore.extract.writer import ZarrWriter
from embstore.manifest import runs, tasks
from embstore.manifest.database import Manifest
from embstore.manifest.tasks import new_owner
from tests.audio_factory import make_tree
from tests.store_factory import fake_model_description

ITEMS = 4


def length_rule(samples: int) -> int:
    return max(1, samples // 160)


class StoreLauncher:
    """A launcher whose one worker runs inside `step`: one item claimed and committed per
    step. `sigint_after`: Ctrl-C (`interrupts` times) once that many items are done;
    `dies_after`: the worker vanishes then, unexplained; `extra`: reports appended to
    every step's (what the monitor must not take for the store's word)."""

    def __init__(self, manifest: Manifest, plan: ExtractionPlan, options: ExtractOptions, run_id: int, *,
                 sigint_after: int | None = None, interrupts: int = 1, dies_after: int | None = None,
                 extra: tuple[ProgressReport, ...] = ()):
        self.manifest, self.plan, self.run_id = manifest, plan, run_id
        self.sigint_after, self.interrupts, self.dies_after, self.extra = sigint_after, interrupts, dies_after, extra
        self.calls: list[str] = []
        self.committed = 0
        self.stopped = self.died = False
        self.report: Report = lambda message: None
        self.owner = new_owner()

    def start(self, report: Report) -> str | None:
        self.calls.append("start")
        self.report = report
        self.client = SqliteManifestClient(self.manifest.path, self.plan.model_id, self.owner, 600, "item",
                                           length_rule, 16000)
        self.writer = ZarrWriter(str(self.manifest.path), self.plan.model_id, self.run_id)
        return None

    def step(self) -> bool:
        if self.stopped or self.died:
            return False
        claimed = self.client.claim(1, 10**12)
        if not claimed:
            return False
        task = claimed[0]
        vector = np.full(16, 1.0 + task.item_id, dtype=np.float32)
        self.writer.add(ItemResult(task.task_id, task.item_id, self.owner, f"h{task.item_id}", task.duration, vector))
        written = self.writer.flush()
        self.committed += written.done
        self.report(written)
        for message in self.extra:
            self.report(message)
        if self.committed == self.sigint_after:
            for _ in range(self.interrupts):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.01)  # the handler runs on the main thread between two bytecodes
        if self.committed == self.dies_after:
            self.died = True
        return True

    def stop(self, failing: bool) -> None:
        self.calls.append(f"stop(failing={failing})")
        self.stopped = True

    def kill(self) -> None:
        self.calls.append("kill")

    def close(self) -> None:
        self.calls.append("close")
        self.client.release()
        self.writer.close()
        self.client.close()

    def losses(self) -> str | None:
        return "1 worker(s) died (worker 0: exit code -9)" if self.died else None

    def conclude(self, summary: ExtractSummary) -> None:
        self.calls.append("conclude")


class Rig:
    """A scanned store with a fake model's tasks and its plan; `run` records a run and
    runs its rounds with `StoreLauncher`s (kept in `made`) or another launcher class."""

    def __init__(self, tmp_path: Path):
        make_tree(tmp_path / "root", speakers=1, per_speaker=ITEMS, seconds=0.3)
        self.opened = embstore.open(tmp_path / "store")
        self.opened.scan([tmp_path / "root"])
        self.store = self.opened.manifest  # the plumbing the monitor works on
        model = self.store.register_model(fake_model_description())
        tasks.refresh_tasks(self.store.conn, model.id, length_rule, 16000)
        left, left_seconds = tasks.pending_summary(self.store.conn, model.id)
        self.plan = ExtractionPlan(
            spec="fake:fake", worker_spec="fake:fake", model_id=model.id, model_key=self.store.model_key(model),
            fingerprint=model.fingerprint, devices=["cpu"], batching="any", runtime="torch",
            device_features=False, left=left, left_seconds=left_seconds,
        )
        self.made: list[StoreLauncher] = []

    def run(self, kind: type[StoreLauncher] = StoreLauncher, **launcher_options) -> ExtractSummary:
        summary = self.plan.summary()
        summary.run_id = runs.start_run(self.store.conn, self.plan.model_id, {})

        def launcher(manifest: Manifest, plan: ExtractionPlan, options: ExtractOptions, run_id: int) -> Launcher:
            self.made.append(kind(manifest, plan, options, run_id, **launcher_options))
            return self.made[-1]

        run_rounds(self.store, self.plan, ExtractOptions(), summary, launcher, time.monotonic())
        return summary

    def status(self, summary: ExtractSummary) -> str:
        return self.store.conn.execute("SELECT status FROM runs WHERE id = ?", (summary.run_id,)).fetchone()[0]

    def claimed(self) -> int:
        return self.store.conn.execute("SELECT count(*) FROM tasks WHERE status = 'claimed'").fetchone()[0]


@pytest.fixture
def rig(tmp_path: Path):
    made = Rig(tmp_path)
    yield made
    made.store.close()


@pytest.mark.parametrize("interrupts", [1, 2])
def test_ctrl_c_stops_the_round_cleanly_and_puts_the_handler_back(rig, interrupts):
    seen: list[int] = []

    def before(signum, frame):  # whoever called the run had its own handler
        seen.append(signum)

    previous = signal.signal(signal.SIGINT, before)
    try:
        summary = rig.run(sigint_after=1, interrupts=interrupts)
        assert signal.getsignal(signal.SIGINT) is before
    finally:
        signal.signal(signal.SIGINT, previous)
    assert seen == []  # the run's own handler took the Ctrl-C, not the caller's
    launcher, = rig.made  # an interrupted run starts no second round
    second = ["stop(failing=False)", "kill"] if interrupts == 2 else []  # the second Ctrl-C: now
    assert launcher.calls == ["start", "stop(failing=False)", *second, "close", "conclude"]
    assert summary.interrupted and summary.outcome.exit_status == 130
    assert (summary.outcome.done, summary.outcome.left) == (1, ITEMS - 1)
    assert rig.claimed() == 0
    assert rig.status(summary) == "interrupted"


def test_the_outcome_is_counted_from_the_store_not_from_the_reports(rig):
    # every step also reports a commit that never happened: the summary says what was
    # reported, the outcome (the exit status) what the store holds
    summary = rig.run(extra=(Written(100, 0, 1.0),))
    assert summary.done == ITEMS + 100 * ITEMS
    assert (summary.outcome.done, summary.outcome.left, summary.outcome.failed) == (ITEMS, 0, 0)
    assert summary.outcome.exit_status == 0 and summary.left == 0
    assert rig.status(summary) == "finished"


def test_workers_gone_unexplained_with_work_left_stop_the_run(rig):
    summary = rig.run(dies_after=2)
    assert summary.error == f"1 worker(s) died (worker 0: exit code -9) with {ITEMS - 2} items left; run again"
    assert summary.outcome.exit_status == 4 and summary.outcome.done == 2
    assert len(rig.made) == 1  # a run with an error is not started again
    assert rig.status(summary) == "crashed"


def test_a_writer_failure_stops_the_workers_as_failing(rig):
    summary = rig.run(extra=(WriterFailed("disk full: test"), WriterFailed("a later one")))
    launcher, = rig.made
    assert "stop(failing=True)" in launcher.calls
    assert summary.error == "disk full: test" and summary.outcome.exit_status == 4


def test_a_worker_error_is_the_run_error(rig):
    summary = rig.run(extra=(WorkerFailed("w", "boom"),))
    assert summary.error == f"{ITEMS} worker(s) failed: boom"


class Idle(StoreLauncher):
    """Starts, does nothing: its round ends at once with every task still claimable."""

    def step(self) -> bool:
        return False


def test_a_round_that_leaves_claimable_work_runs_again_up_to_max_rounds(rig):
    summary = rig.run(Idle)
    assert len(rig.made) == summary.rounds == MAX_ROUNDS
    assert summary.outcome.exit_status == 5 and summary.outcome.left == ITEMS
    assert rig.status(summary) == "finished"


def test_the_local_and_the_ray_launchers_are_two_not_one_made_of_the_other():
    from embstore.extract.ray import driver
    from embstore.extract.supervisor import LocalProcesses
    from tests.test_architecture import import_graph

    assert not issubclass(driver.RayLauncher, LocalProcesses)
    assert not issubclass(LocalProcesses, driver.RayLauncher)
    protocol = {name for name, _ in inspect.getmembers(Launcher, inspect.isfunction) if not name.startswith("_")}
    assert protocol == {"start", "step", "stop", "kill", "close", "losses", "conclude"}
    for launcher in (LocalProcesses, driver.RayLauncher):
        assert protocol <= set(dir(launcher)), launcher
    # the Ray side reaches the local launcher by no import, direct or not
    graph = import_graph()
    reached, todo = set(), ["embstore.extract.ray.driver"]
    while todo:
        for dep in graph[todo.pop()] - reached:
            reached.add(dep)
            todo.append(dep)
    assert "embstore.extract.supervisor" not in reached and "embstore.extract.monitor" in reached


def test_cluster_setups_are_built_for_the_cluster_and_share_the_run_fields(rig):
    from embstore.extract.ray.driver import CLAIM_ITEMS, cluster_setup

    plan = rig.plan
    options = ExtractOptions(ray="auto", lease_seconds=33.0, max_trim_frames=4)
    local = worker_setups(plan, options)[0]
    gpu = cluster_setup(plan, options, "gpu", workers=1, index=2, threads=3)
    assert (gpu.device, gpu.index, gpu.threads, gpu.workers_per_device) == ("cuda", 2, 3, 1)
    assert gpu.batch_frames is None and not gpu.device_features  # its node decides both
    assert gpu.claim_items == min(CLAIM_ITEMS["gpu"], -(-ITEMS // 4))
    assert cluster_setup(plan, options, "cpu", workers=1, index=0, threads=1).loader_workers == 2
    shared = ("model_spec", "model_id", "dtype", "batching", "lease_seconds", "max_trim_frames", "fingerprint",
              "vad", "windows", "window_mode")
    assert [getattr(gpu, f) for f in shared] == [getattr(local, f) for f in shared]
    assert gpu.lease_seconds == 33.0 and gpu.max_trim_frames == 4
