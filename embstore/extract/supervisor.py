"""Local runs: `Store.extract` on this machine's processes.

`LocalProcesses` is the run monitor's launcher here (`extract/monitor.py`): one writer
process and one worker process per device (or N on CPU), forked from a fork server. The
parent only coordinates: it passes the workers' deaths on to the writer, asks them to
stop after their current batch when the monitor says so, then releases their claims.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.context
from multiprocessing import forkserver
import os
import queue
import signal
import sqlite3
import time
from typing import Any

from embstore.extract.messages import WorkerDied, WorkerFinished, WorkerSetup
from embstore.extract.monitor import Report, monitored_extraction
from embstore.extract.options import ExtractOptions
from embstore.extract.plan import ExtractionPlan, worker_setups
from embstore.extract.summary import ExtractSummary
from embstore.extract.worker import worker_main
from embstore.extract.writer import writer_main
from embstore.manifest import tasks
from embstore.manifest.database import Manifest

POLL_SECONDS = 0.25


def run_extraction(manifest: Manifest, options: ExtractOptions) -> ExtractSummary:
    """Embed every pending item of the store with local processes; returns what was done
    and, in `summary.outcome`, what is left of the model's work (the exit status)."""
    return monitored_extraction(manifest, options, LocalProcesses, warm_up=lambda: warm_process_context(options))


# what every child of a run imports: loaded once by the fork server, not by each child
FORKSERVER_PRELOAD = ["embstore.extract.worker", "embstore.extract.writer", "zarr"]


def process_context(runtime: str) -> multiprocessing.context.BaseContext:
    """How a run starts its writer and workers: forked from a fork server that imported
    their code (and torch, for a torch model) once, where the platform has one (Linux,
    macOS), so a child starts in milliseconds instead of a second of imports; spawned
    elsewhere. Never a plain fork of this process, which may hold torch's threads. A fork
    server outlives one run in a long-lived process (a notebook, a test session): its
    children take the environment the parent has now (`processes.adopt_environment`)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(FORKSERVER_PRELOAD + (["torch"] if runtime == "torch" else []))
    return ctx


def warm_process_context(options: ExtractOptions) -> None:
    """Start the fork server now, so that it imports the children's code while the parent
    plans (on another core) rather than after: the first claim comes sooner. torch is
    preloaded only where the spec says it runs there (Resemblyzer, a GPU, --runtime torch)."""
    if options.ray is not None or "forkserver" not in multiprocessing.get_all_start_methods():
        return
    torch_run = options.spec.startswith("resemblyzer") or options.device != "cpu" or bool(options.gpus) or (
        options.runtime == "torch")
    process_context("torch" if torch_run else "onnxruntime")
    forkserver.ensure_running()


def exit_reason(exitcode: int | None) -> str:
    """How a worker process ended, in words."""
    if exitcode is not None and exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


def release_lost_claims(manifest: Manifest, model_id: int) -> None:
    """Whatever stopped or killed workers still hold goes back to pending now."""
    with manifest.write() as conn:
        tasks.release_lost(conn, model_id, time.time())


class LocalProcesses:
    """The launcher of a local round (a `monitor.Launcher`): a writer process, a worker
    process per device, and the parent passing their deaths on to the writer."""

    def __init__(self, manifest: Manifest, plan: ExtractionPlan, options: ExtractOptions, run_id: int):
        self.manifest = manifest
        self.plan = plan
        self.options = options
        self.run_id = run_id
        self.setups: list[WorkerSetup] = worker_setups(plan, options)
        self.ctx = process_context(plan.runtime)
        # made before any process starts: a Ctrl-C while they start must find them
        self.inbox = self.ctx.Queue(maxsize=64)
        self.progress = self.ctx.Queue()
        self.stop_event = self.ctx.Event()
        # items claimed by all workers (--limit); held here for the whole round: a child
        # unpickles its semaphore after start() returns, and a freed one is unlinked
        self.claimed = self.ctx.Value("q", 0)
        self.procs: list[Any] = []
        self.writer: Any = None
        self.report: Report = lambda message: None
        self.reported_dead: set[int] = set()
        self.failing = self.killed = self.over = False

    def start(self, report: Report) -> str | None:
        self.report = report
        env = dict(os.environ)
        store_path = str(self.manifest.path)
        procs = [
            self.ctx.Process(target=worker_main, name=f"embstore-worker-{setup.index}", daemon=False,
                             args=(setup, store_path, self.inbox, self.progress, self.stop_event, self.options.limit,
                                   self.claimed, env))
            for setup in self.setups
        ]
        self.writer = self.ctx.Process(target=writer_main, name="embstore-writer", daemon=False,
                                       args=(store_path, self.plan.model_id, self.run_id, self.inbox, self.progress,
                                             len(procs), env))
        self.writer.start()
        for p in procs:
            p.start()
            self.procs.append(p)  # one by one: close() terminates whatever started
        return None

    def step(self) -> bool:
        try:
            self.report(self.progress.get(timeout=POLL_SECONDS))
        except queue.Empty:
            pass
        self._pass_on_deaths()
        self.over = not self.writer.is_alive() or (self.failing and all(not p.is_alive() for p in self.procs))
        return not self.over

    def _pass_on_deaths(self) -> None:
        for index, p in enumerate(self.procs):
            if index not in self.reported_dead and not p.is_alive() and p.exitcode not in (0, None):
                # a killed worker: the writer stops waiting for it, commits what it
                # sent and counts the death against what it held (poison items)
                self.reported_dead.add(index)
                worker = f"{tasks.HOST}:{p.pid}"
                if self.killed:  # terminated by us (a second Ctrl-C): not the items' fault
                    self.inbox.put(WorkerFinished(index))
                else:
                    self.inbox.put(WorkerDied(index, worker + ":", worker, exit_reason(p.exitcode), prefix=True))

    def stop(self, failing: bool) -> None:
        self.failing = self.failing or failing
        self.stop_event.set()

    def kill(self) -> None:
        self.killed = True
        for p in self._alive():
            p.terminate()

    def _alive(self) -> list[Any]:
        return [p for p in self.procs + [self.writer] if p is not None and p.is_alive()]

    def close(self) -> None:
        try:
            if self.over:  # else an error on the way: nothing to wait for, they go now
                self._drain()
        finally:
            for p in self._alive():
                p.terminate()
            try:
                release_lost_claims(self.manifest, self.plan.model_id)
            except sqlite3.OperationalError:
                pass  # a full disk: the next run releases the claims of dead processes itself

    def _drain(self) -> None:
        """Everyone is gone or going: wait for them, then the rest of the progress queue."""
        self.writer.join(timeout=30)
        for p in self.procs:
            p.join(timeout=30 if not self.failing else 5)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
        while True:
            try:
                self.report(self.progress.get_nowait())
            except queue.Empty:
                break

    def losses(self) -> str | None:
        if not self.reported_dead:
            return None
        codes = ", ".join(f"worker {i}: exit code {self.procs[i].exitcode}" for i in sorted(self.reported_dead))
        return f"{len(self.reported_dead)} worker(s) died ({codes})"

    def conclude(self, summary: ExtractSummary) -> None:
        """Nothing to add: the plan's devices are the run's workers."""
