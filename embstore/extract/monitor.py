"""The run monitor: what every extraction does around its workers, wherever they run.

A run plans (`extract/plan.py`), records itself in `runs`, then starts its workers
through a `Launcher` and watches them: one progress bar, Ctrl-C (the first asks the
workers to stop after their current batch, the second stops them now), the reports
folded into the run's `ExtractSummary`, and at the end the `Outcome` counted from the
store, never from the reports (`settle`), before `end_run` keeps it.

Two launchers plug into it, each on its own: local processes (`extract/supervisor.py`:
a writer and one worker process per device) and a Ray cluster
(`extract/ray/driver.py`: the coordinator actor and worker actors).
"""

from __future__ import annotations

import contextlib
import signal
import sqlite3
import threading
import time
from typing import Any, Callable, Iterator, Protocol

from embstore.extract.messages import ProgressReport, WorkerFailed, WorkerStats, WriterFailed, WriterFinished, Written
from embstore.extract.options import ExtractOptions
from embstore.extract.plan import ExtractionPlan, plan_extraction
from embstore.extract.summary import ExtractSummary
from embstore.manifest import runs, tasks
from embstore.manifest.database import Manifest
from embstore.manifest.reports import coverage
from embstore.outcome import Outcome
from embstore.progress import progress_bar

# times a run starts its workers: again only when claims of runs that died meanwhile came
# free after its workers had run dry (a bounded number: each start costs the model load)
MAX_ROUNDS = 3

Report = Callable[[ProgressReport], None]


class Launcher(Protocol):
    """The workers of one round of a run, as the monitor drives them. `stop` and `kill`
    may be called from the SIGINT handler, at any time (before `start` too): they must
    return at once and never wait on a worker."""

    def start(self, report: Report) -> str | None:
        """Start the workers; they report through `report`. A line when none can start."""

    def step(self) -> bool:
        """Watch for a moment (a fraction of a second): reports, dead workers,
        replacements. False once the round is over."""

    def stop(self, failing: bool) -> None:
        """Workers stop after their current batch (`failing`: the run cannot go on, do
        not wait for the writer once the workers are gone)."""

    def kill(self) -> None:
        """Workers stop now (a second Ctrl-C); what they held is no item's fault."""

    def close(self) -> None:
        """The round is over or failed: last reports in, nothing left running, every
        claim of this round back to pending."""

    def losses(self) -> str | None:
        """Workers that died without saying why, in words ("2 worker(s) died (...)"), or None."""

    def conclude(self, summary: ExtractSummary) -> None:
        """What only the launcher knows into the summary (workers per node...)."""


LauncherFactory = Callable[[Manifest, ExtractionPlan, ExtractOptions, int], Launcher]


def monitored_extraction(manifest: Manifest, options: ExtractOptions, launcher: LauncherFactory,
                         warm_up: Callable[[], None] | None = None) -> ExtractSummary:
    """Plan, then run the plan's work with workers from `launcher` (one per round);
    returns what was done and, in `summary.outcome`, what is left of the model's work
    (the exit status). `warm_up`: see `plan_extraction`."""
    started = time.monotonic()
    plan = plan_extraction(manifest, options, warm_up=warm_up)
    if isinstance(plan, ExtractSummary):
        plan.seconds = time.monotonic() - started
        plan.outcome = settle(manifest, plan, options)
        return plan
    summary = plan.summary()
    if plan.left == 0:
        summary.nothing_to_do = True  # this run failed nothing; the model's failures are in the outcome
        summary.seconds = time.monotonic() - started
        summary.outcome = settle(manifest, summary, options)
        return summary
    record = options.record() | {"devices": plan.devices, "batching": plan.batching, "runtime": plan.runtime,
                                 "features": summary.features}
    summary.run_id = runs.start_run(manifest.conn, plan.model_id, record)
    run_rounds(manifest, plan, options, summary, launcher, started)
    return summary


def run_rounds(manifest: Manifest, plan: ExtractionPlan, options: ExtractOptions, summary: ExtractSummary,
               launcher: LauncherFactory, started: float) -> None:
    """The recorded run (`summary.run_id`): rounds of workers until the work is done or
    stops, then the outcome settled from the store and the run's row closed."""
    assert summary.run_id is not None
    try:
        while True:
            RunMonitor(manifest, plan, options, summary, launcher(manifest, plan, options, summary.run_id)).run()
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


class RunMonitor:
    """One round: the launcher's workers watched until they are done, reports folded
    into the summary, Ctrl-C turned into a clean stop."""

    def __init__(self, manifest: Manifest, plan: ExtractionPlan, options: ExtractOptions, summary: ExtractSummary,
                 launcher: Launcher):
        self.manifest = manifest
        self.plan = plan
        self.options = options
        self.summary = summary
        self.launcher = launcher
        self.bar: Any = None
        self.batches = self.items_in_batches = self.real_frames = self.padded_frames = 0
        self.worker_errors: list[str] = []
        self.interrupts = 0

    def run(self) -> None:
        with self._sigint_handled():
            try:
                error = self.launcher.start(self.handle)
                if error is not None:
                    self.summary.error = error
                else:
                    self._open_bar()
                    while self.launcher.step():
                        pass
            finally:
                try:
                    self.launcher.close()
                finally:
                    if self.bar is not None:
                        self.bar.close()
        self._conclude()

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
        elif isinstance(message, WriterFailed):  # the first says why (a failing coordinator's close comes after)
            summary.error = summary.error or message.error
            self.launcher.stop(failing=True)
        elif isinstance(message, WriterFinished):
            summary.dropped = message.dropped

    def _open_bar(self) -> None:
        # counts seconds of audio, so the ETA comes from the audio left, not from item counts
        total = round(self.plan.left_seconds) if self.plan.left_seconds and not self.options.limit else None
        self.bar = progress_bar(
            self.options.progress, total=total, unit=" s audio", desc="extract", smoothing=0.05,
            bar_format="{l_bar}{bar}| {n:.0f}/{total_fmt} s of audio [{elapsed}<{remaining}{postfix}]",
        )

    @contextlib.contextmanager
    def _sigint_handled(self) -> Iterator[None]:
        """Ctrl-C stops the round cleanly while it runs; the handler before is back after.
        Only the main thread may set handlers (a run in a notebook's or a test's thread
        keeps Python's: Ctrl-C raises there, between rounds or out of the run)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.signal(signal.SIGINT, self._on_sigint)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def _on_sigint(self, signum: int, frame: Any) -> None:
        self.interrupts += 1
        self.summary.interrupted = True
        self.launcher.stop(failing=False)
        if self.interrupts > 1:
            self.launcher.kill()

    def _conclude(self) -> None:
        """Batch figures, the first worker error, and workers lost with work left."""
        summary = self.summary
        summary.mean_batch_items = round(self.items_in_batches / self.batches, 2) if self.batches else 0.0
        summary.padding_overhead = round(self.padded_frames / self.real_frames - 1, 4) if self.real_frames else 0.0
        errors = self.worker_errors
        if errors and not summary.error and summary.done == 0:
            summary.error = "workers failed: " + errors[0]
        elif errors and not summary.error:
            summary.error = f"{len(errors)} worker(s) failed: {errors[0]}"
        self.launcher.conclude(summary)
        losses = self.launcher.losses()
        if losses and not summary.error and not summary.interrupted:
            # workers gone before they could say why (OOM killer, kill -9, a lost node):
            # others may have finished their work; if not, the run did not do its job
            left, _ = tasks.pending_summary(self.manifest.conn, self.plan.model_id)
            if left:
                summary.error = f"{losses} with {left} items left; run again"
