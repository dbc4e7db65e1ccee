"""`Store.extract`: plan the run, start the writer and the workers, show progress,
record the run.

The parent process only coordinates: it plans (devices, runtime, the task list), starts
one writer process and one worker process per device (or N on CPU), watches them, and on
Ctrl-C asks them to stop after their current batch, then releases their claims.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.context
from multiprocessing import forkserver
import os
import queue
import signal
import sqlite3
import threading
import time
from typing import Any

from embstore.extract.messages import (
    ProgressReport, WorkerDied, WorkerFailed, WorkerFinished, WorkerSetup, WorkerStats, WriterFailed, WriterFinished,
    Written,
)
from embstore.extract.options import ExtractOptions
from embstore.extract.plan import ExtractionPlan, plan_extraction, worker_setups
from embstore.extract.summary import ExtractSummary
from embstore.extract.worker import worker_main
from embstore.extract.writer import writer_main
from embstore.manifest import runs, tasks
from embstore.manifest.database import Manifest
from embstore.manifest.reports import coverage
from embstore.outcome import Outcome
from embstore.progress import progress_bar


# times a run starts its workers: again only when claims of runs that died meanwhile came
# free after its workers had run dry (a bounded number: each start costs the model load)
MAX_ROUNDS = 3


def run_extraction(manifest: Manifest, options: ExtractOptions, runner: type | None = None) -> ExtractSummary:
    """Embed every pending item of the store; returns what was done and, in
    `summary.outcome`, what is left of the model's work (the exit status). `runner` runs
    the planned work (default `RunProcesses`, local processes; the cluster's is
    `embstore.extract.ray.driver.RayRun`)."""
    started = time.monotonic()
    plan = plan_extraction(manifest, options, warm_up=lambda: warm_process_context(options))
    if isinstance(plan, ExtractSummary):
        plan.seconds = time.monotonic() - started
        plan.outcome = settle(manifest, plan, options)
        return plan
    summary = plan.summary()
    if plan.left == 0:
        summary.nothing_to_do = True
        summary.failed = tasks.failed_count(manifest.conn, plan.model_id)
        summary.seconds = time.monotonic() - started
        summary.outcome = settle(manifest, summary, options)
        return summary
    record = options.record() | {"devices": plan.devices, "batching": plan.batching, "runtime": plan.runtime,
                                 "features": summary.features}
    summary.run_id = runs.start_run(manifest.conn, plan.model_id, record)
    try:
        while True:
            (runner or RunProcesses)(manifest, plan, options, summary).run()
            summary.rounds += 1
            if summary.error or summary.interrupted or options.limit or summary.rounds >= MAX_ROUNDS:
                break
            if not tasks.claimable_count(manifest.conn, plan.model_id):
                break
    except KeyboardInterrupt:  # Ctrl-C between rounds: the last round released its claims
        summary.interrupted = True
    finally:
        summary.seconds = time.monotonic() - started
        try:
            summary.left, _ = tasks.pending_summary(manifest.conn, plan.model_id)
        except sqlite3.OperationalError:
            pass
        summary.outcome = settle(manifest, summary, options)
        status = "interrupted" if summary.interrupted else ("crashed" if summary.error else "finished")
        try:
            runs.end_run(manifest.conn, summary.run_id, status, summary.as_dict())
        except sqlite3.OperationalError as exc:
            # a full disk must not hide the run's own error behind this bookkeeping one
            if not summary.error:
                summary.error = f"cannot record the run: {exc}"
                summary.outcome.error = summary.error
    return summary


def settle(manifest: Manifest, summary: ExtractSummary, options: ExtractOptions) -> Outcome:
    """The model's work after the run: done, failed and left over every live item (with
    --limit, what the limit left unclaimed is not missing: the run was asked for less)."""
    try:
        outcome = coverage(manifest.conn, summary.model_id, model_key=summary.model,
                           count_waiting=not options.limit or bool(summary.error))
    except sqlite3.OperationalError as exc:  # a full or failing disk: the run's error says more
        outcome = Outcome(error=f"cannot read the store: {exc}")
    outcome.error = summary.error or outcome.error
    outcome.interrupted = summary.interrupted
    return outcome


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


class RunProcesses:
    """One local run: a writer process, a worker process per device, and the parent
    watching them (progress, dead workers, Ctrl-C)."""

    def __init__(self, manifest: Manifest, plan: ExtractionPlan, options: ExtractOptions, summary: ExtractSummary):
        self.manifest = manifest
        self.plan = plan
        self.options = options
        self.summary = summary
        self.setups: list[WorkerSetup] = worker_setups(plan, options)
        self.bar: Any = None
        self.batches = self.items_in_batches = self.real_frames = self.padded_frames = 0
        self.worker_errors: list[str] = []
        self.interrupts = 0

    def handle(self, message: ProgressReport) -> None:
        """Fold one worker/writer report into the run's figures."""
        summary = self.summary
        if isinstance(message, Written):
            summary.done += message.done
            summary.failed += message.failed
            summary.audio_seconds += message.seconds
            if self.bar is not None:
                self.bar.update(message.seconds)
                elapsed = max(self.bar.format_dict["elapsed"], 1e-6)  # tqdm's own clock
                self.bar.set_postfix_str(
                    f"{summary.done} done, {summary.failed} failed, "
                    f"{summary.done / elapsed:.1f} items/s, {summary.audio_seconds / elapsed:.0f}x realtime"
                )
        elif isinstance(message, WorkerStats):
            self.batches += message.batches
            self.items_in_batches += message.items
            self.real_frames += message.real_frames
            self.padded_frames += message.padded_frames
        elif isinstance(message, WorkerFailed):
            self.worker_errors.append(message.error)
        elif isinstance(message, WriterFailed):
            summary.error = message.error
            self.stop_event.set()
        elif isinstance(message, WriterFinished):
            summary.dropped = message.dropped

    def open_bar(self) -> None:
        # counts seconds of audio, so the ETA comes from the audio left, not from item counts
        total = round(self.plan.left_seconds) if self.plan.left_seconds and not self.options.limit else None
        self.bar = progress_bar(
            self.options.progress, total=total, unit=" s audio", desc="extract", smoothing=0.05,
            bar_format="{l_bar}{bar}| {n:.0f}/{total_fmt} s of audio [{elapsed}<{remaining}{postfix}]",
        )

    def _on_sigint(self, signum: int, frame: Any) -> None:
        self.interrupts += 1
        self.summary.interrupted = True
        self.stop_event.set()
        if self.interrupts > 1:
            for p in self.procs + [self.writer]:
                if p.is_alive():
                    p.terminate()

    def run(self) -> None:
        ctx = process_context(self.plan.runtime)
        env = dict(os.environ)
        inbox = ctx.Queue(maxsize=64)
        progress = ctx.Queue()
        self.stop_event = ctx.Event()
        claimed = ctx.Value("q", 0)
        store_path = str(self.manifest.path)
        self.procs = [
            ctx.Process(target=worker_main, name=f"embstore-worker-{setup.index}", daemon=False,
                        args=(setup, store_path, inbox, progress, self.stop_event, self.options.limit, claimed, env))
            for setup in self.setups
        ]
        self.writer = ctx.Process(target=writer_main, name="embstore-writer", daemon=False,
                                  args=(store_path, self.plan.model_id, self.summary.run_id, inbox, progress,
                                        len(self.procs), env))
        self.writer.start()
        for p in self.procs:
            p.start()
        self.open_bar()
        reported_dead: set[int] = set()
        on_main = threading.current_thread() is threading.main_thread()
        original_sigint = signal.getsignal(signal.SIGINT)
        if on_main:
            signal.signal(signal.SIGINT, self._on_sigint)
        try:
            while True:
                try:
                    self.handle(progress.get(timeout=0.25))
                except queue.Empty:
                    pass
                for index, p in enumerate(self.procs):
                    if index not in reported_dead and not p.is_alive() and p.exitcode not in (0, None):
                        # a killed worker: the writer stops waiting for it, commits what it
                        # sent and counts the death against what it held (poison items)
                        reported_dead.add(index)
                        worker = f"{tasks.HOST}:{p.pid}"
                        if self.interrupts > 1:  # terminated by us (a second Ctrl-C): not the items' fault
                            inbox.put(WorkerFinished(index))
                        else:
                            inbox.put(WorkerDied(index, worker + ":", worker, exit_reason(p.exitcode), prefix=True))
                if not self.writer.is_alive():
                    break
                if self.summary.error and all(not p.is_alive() for p in self.procs):
                    break
            # everyone is gone or going: drain what is left of the progress queue
            self.writer.join(timeout=30)
            for p in self.procs:
                p.join(timeout=30 if not self.summary.error else 5)
                if p.is_alive():
                    p.terminate()
                    p.join(timeout=5)
            while True:
                try:
                    self.handle(progress.get_nowait())
                except queue.Empty:
                    break
        finally:
            if on_main:
                signal.signal(signal.SIGINT, original_sigint)
            if self.bar is not None:
                self.bar.close()
            for p in self.procs + [self.writer]:
                if p.is_alive():
                    p.terminate()
            try:
                release_lost_claims(self.manifest, self.plan.model_id)
            except sqlite3.OperationalError:
                pass  # a full disk: the next run releases the claims of dead processes itself
        self._conclude(reported_dead)

    def conclude_workers(self) -> None:
        """Batch figures and the first worker error into the summary."""
        summary = self.summary
        summary.mean_batch_items = round(self.items_in_batches / self.batches, 2) if self.batches else 0.0
        summary.padding_overhead = round(self.padded_frames / self.real_frames - 1, 4) if self.real_frames else 0.0
        errors = self.worker_errors
        if errors and not summary.error and summary.done == 0:
            summary.error = "workers failed: " + errors[0]
        elif errors and not summary.error:
            summary.error = f"{len(errors)} worker(s) failed: {errors[0]}"

    def _conclude(self, reported_dead: set[int]) -> None:
        summary = self.summary
        self.conclude_workers()
        if reported_dead and not summary.error and not summary.interrupted:
            # a worker killed before it could say why (OOM killer, kill -9, crash at start):
            # survivors may have finished its work; if not, the run did not do its job
            left, _ = tasks.pending_summary(self.manifest.conn, self.plan.model_id)
            if left:
                codes = ", ".join(f"worker {i}: exit code {self.procs[i].exitcode}" for i in sorted(reported_dead))
                summary.error = f"{len(reported_dead)} worker(s) died ({codes}) with {left} items left; run again"
