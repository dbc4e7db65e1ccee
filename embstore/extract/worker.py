"""An extraction worker: claims tasks, loads audio ahead of the model, embeds batches.

The loop is the same in a local process and in a cluster actor; it talks to the
manifest only through a `ManifestClient` and sends everything through an `Outbox`.
Inside one worker:
- a feeder thread claims tasks and loads each claim in a pool of loader threads
  (read, hash, dedup lookup, decode, resample, features); loaded claims wait in a
  bounded queue, so memory stays flat and the model never waits on disk;
- the calling thread groups loaded items into batches the encoder embeds exactly (see
  `batching`) and sends vectors and per-item failures to the writer;
- a lease thread renews the worker's claims while it works.
"""

from __future__ import annotations

import os
import queue
import signal
import threading
import time
import traceback
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from embstore.extract.batching import Loaded, default_batch_frames, plan_batches
from embstore.extract.client import ClaimBudget, ManifestClient, SqliteManifestClient
from embstore.segments.policy import cutting_of
from embstore.extract.faults import slow_compute
from embstore.extract.loading import load_claim
from embstore.extract.messages import ItemFailure, ItemOutcome, ItemResult, WorkerFailed, WorkerSetup, WorkerStats
from embstore.extract.outbox import Outbox, QueueOutbox
from embstore.manifest.tasks import new_owner
from embstore.processes import adopt_environment, die_with_parent
from embstore.errors import ExtractionError
from embstore.models.base import Encoder, untrimmed_fingerprint
from embstore.models.registry import load
from embstore.vectors import finite_nonzero
from embstore.segments.window_embed import DEFAULT_BATCH, WindowEmbedder


# vectors of recently computed audio kept per worker for dedup (~1 KB each at dim 256)
RECENT_VECTORS = 4096
# windows per forward on a GPU (on CPU the embedder's default: larger blocks do not pay there)
WINDOW_BATCH_GPU = 1024


def _is_oom(exc: BaseException) -> bool:
    return "out of memory" in str(exc).lower() or type(exc).__name__ == "OutOfMemoryError"


def one_line(exc: BaseException) -> str:
    return "".join(traceback.format_exception_only(exc)).strip()


def open_encoder(setup: WorkerSetup) -> Encoder:
    """The worker's model on its device, with its share of the CPU threads; an ONNX
    worker never imports torch (a second of start-up)."""
    if setup.model_spec.startswith(("onnx:", "openvino:")):
        encoder = load(setup.model_spec, device=setup.device, dtype=setup.dtype, threads=max(1, setup.threads))
    else:
        encoder = load(setup.model_spec, device=setup.device, dtype=setup.dtype)
    if encoder.capabilities.runtime == "torch" or setup.device_features:
        import torch

        torch.set_num_threads(max(1, setup.threads))
    if setup.fingerprint is not None and encoder.fingerprint != untrimmed_fingerprint(setup.fingerprint):
        raise ExtractionError(
            f"{setup.model_spec} loads with fingerprint {encoder.fingerprint[:12]} here, but the run's rows are"
            f" {setup.fingerprint[:12]}: the model changed during the run; run again"
        )
    return encoder


class Worker:
    def __init__(self, setup: WorkerSetup, encoder: Encoder, client: ManifestClient, outbox: Outbox, stop_event: Any):
        self.setup = setup
        self.encoder = encoder
        self.client = client
        self.outbox = outbox
        self.stop_event = stop_event
        self.owner = client.owner
        self.loaded: queue.Queue = queue.Queue(maxsize=2)
        self.feeder_done = threading.Event()
        self.handed_over = threading.Event()  # everything sent; the writer frees the rest
        self.outstanding = 0  # claims loaded and handed to the compute side, not yet sent
        self.outstanding_lock = threading.Lock()
        self.feeder_error: BaseException | None = None
        self.batch_frames = setup.batch_frames or default_batch_frames(setup.device, setup.batching,
                                                                     setup.workers_per_device)
        self.batches = self.batch_items = self.real_frames = self.padded_frames = 0
        self.recent: OrderedDict[tuple, Any] = OrderedDict()  # vector, or (rows, spans) of a window model
        self.cutting = cutting_of(setup.vad, setup.windows)
        if self.cutting is not None and self.cutting.windowed:
            # made once here, as the fingerprint says; the loader threads share it
            self.cutting.embedder(encoder, setup.window_mode,
                                  WINDOW_BATCH_GPU if setup.device.startswith("cuda") else DEFAULT_BATCH)

    def run(self) -> None:
        lease_thread = threading.Thread(target=self._renew_leases, daemon=True)
        lease_thread.start()
        feeder = threading.Thread(target=self._feed, daemon=True)
        feeder.start()
        try:
            self._compute()
        finally:
            if self.feeder_error:
                self.stop_event.set()
            # the writer frees what this worker still holds, after committing what it
            # sent: freed here, results still in the writer's buffer would be dropped
            self.outbox.finished(self.setup.index, self.owner)
            self.handed_over.set()
            self.outbox.report(WorkerStats(self.owner, self.batches, self.batch_items, self.real_frames, self.padded_frames))

    def _renew_leases(self) -> None:
        # until the worker has handed everything over: claims stay held while the last ones
        # compute after the feeder is done, and until the writer commits them
        interval = max(self.setup.lease_seconds / 4, 0.5)
        while not self.handed_over.wait(interval):
            try:
                self.client.renew()
            except Exception:
                pass  # a busy database: the next renewal comes well before the lease ends

    # -- feeder thread ------------------------------------------------------------

    def _feed(self) -> None:
        pool = ThreadPoolExecutor(max_workers=max(1, self.setup.loader_workers), thread_name_prefix="loader")
        refreshed = False
        try:
            # small first claims: the first rows come early, then claims grow to full size
            claim_items = min(4, self.setup.claim_items)
            while not self.stop_event.is_set():
                claimed = self.client.claim(claim_items, self.batch_frames * 2)
                claim_items = min(2 * claim_items, self.setup.claim_items)
                if not claimed:
                    if refreshed and self._compute_busy():
                        # items scanned while the last batches compute are still this
                        # run's work: look once more when the compute side is idle
                        while self._compute_busy() and not self.stop_event.is_set():
                            time.sleep(0.1)
                        refreshed = False
                    if refreshed:
                        self._feed_suspects(pool)
                        break
                    # new items may have been scanned meanwhile, or leases run out
                    self.client.refresh()
                    refreshed = True
                    continue
                refreshed = False
                self._hand_over(load_claim(pool, self.encoder, self.client, claimed, self.setup.device_features, self.cutting))
        except BaseException as exc:
            self.feeder_error = exc
            self.outbox.report(WorkerFailed(self.owner, one_line(exc)))
        finally:
            pool.shutdown(wait=True)
            self.feeder_done.set()

    def _feed_suspects(self, pool: ThreadPoolExecutor) -> None:
        """Suspects (held by a worker that died), one at a time and each alone in this
        worker: should one kill it, the death is that item's own."""
        while not self.stop_event.is_set():
            while self._compute_busy() and not self.stop_event.is_set():
                time.sleep(0.05)
            claimed = self.client.claim_suspect(self.batch_frames * 2)
            if not claimed:
                return
            self._hand_over(load_claim(pool, self.encoder, self.client, claimed, self.setup.device_features, self.cutting))

    def _hand_over(self, loaded: list[Loaded]) -> None:
        with self.outstanding_lock:
            self.outstanding += 1
        while not self.stop_event.is_set():
            try:
                self.loaded.put(loaded, timeout=0.5)
                return
            except queue.Full:
                continue
        with self.outstanding_lock:
            self.outstanding -= 1  # stopping: never queued

    # -- compute ------------------------------------------------------------------

    def _compute_busy(self) -> bool:
        """Loaded claims not yet embedded and sent (queued or being computed)."""
        with self.outstanding_lock:
            return self.outstanding > 0

    def _compute(self) -> None:
        while True:
            try:
                loaded = self.loaded.get(timeout=0.2)
            except queue.Empty:
                if self.feeder_done.is_set() and self.loaded.empty():
                    return
                continue
            slow_compute()
            try:
                outcomes: list[ItemOutcome] = []
                good = []
                for x in loaded:
                    if x.error is not None:
                        outcomes.append(ItemFailure(x.task.task_id, self.owner, x.error[0], x.error[1]))
                    elif x.dup_row is not None:
                        outcomes.append(self._result(x, None, *x.dup_row))
                    else:
                        good.append(x)
                if outcomes:
                    self.outbox.results(outcomes)
                if self.cutting is not None and self.cutting.windowed:
                    self._embed_windows(good)
                else:
                    self._embed_all(good)
            finally:
                with self.outstanding_lock:
                    self.outstanding -= 1

    def _result(self, x: Loaded, vector: np.ndarray | None, row: int | None = None, row_count: int | None = None,
                spans: np.ndarray | None = None) -> ItemResult:
        return ItemResult(x.task.task_id, x.task.item_id, self.owner, x.content_hash, x.task.duration, vector, row,
                          row_count, spans, x.speech)

    def _split_twins(self, good: list[Loaded]) -> tuple[list[Loaded], list[tuple[Loaded, Loaded]], list[tuple[Loaded, Any]]]:
        """Identical audio is computed once: inside one claim, and across this worker's
        recent claims whose rows may not be committed yet (no dedup row to point at).
        Returns (items to compute, (twin, its first) pairs, (item, recent result) pairs)."""
        first_of: dict[tuple, Loaded] = {}
        twins: list[tuple[Loaded, Loaded]] = []
        unique = []
        known: list[tuple[Loaded, Any]] = []
        for x in good:
            key = (x.content_hash, x.task.start, x.task.end)
            if x.content_hash and key in self.recent:
                known.append((x, self.recent[key]))
            elif x.content_hash and key in first_of:
                twins.append((x, first_of[key]))
            else:
                first_of[key] = x
                unique.append(x)
        return unique, twins, known

    def _embed_windows(self, good: list[Loaded]) -> None:
        """A window model's claim: every window of its items embedded in blocks of the
        embedder's batch (windows of several items share a forward: each window is
        computed from its own samples only, so its row does not depend on its block);
        an item's rows are sent once all its windows are done, without the windows that
        could not be embedded."""
        embedder = self.cutting.embedder(self.encoder)  # type: ignore[union-attr]
        unique, twins, known = self._split_twins(good)
        outcomes: list[ItemOutcome] = [self._result(x, rows, spans=spans) for x, (rows, spans) in known]
        results: dict[int, tuple[np.ndarray, np.ndarray] | None] = {}
        eager = [x for x in unique if x.feats is not None]
        long_items = [x for x in unique if x.feats is None]  # featurised here, block by block
        for x in eager:
            x.rows = np.full((len(x.plan), embedder.dim), np.nan, dtype=np.float32)
        pending = [(x, j) for x in eager for j in range(len(x.plan))]
        for first in range(0, len(pending), embedder.batch):
            block = pending[first : first + embedder.batch]
            try:
                out = embedder.embed_features([x.feats[j] for x, j in block])
            except Exception as exc:
                out = None
                if _is_oom(exc):
                    self._after_oom()
                for x in {id(x): x for x, _ in block}.values():
                    x.error = ("model", "out of memory" if _is_oom(exc) else f"{type(exc).__name__}: {exc}")
            if out is not None:
                for (x, j), row in zip(block, out):
                    x.rows[j] = row
            self.batches += 1
            self.batch_items += len(block)
            # items whose last window is in this block are complete
            outcomes += [self._window_outcome(x, results) for x, j in block if j == len(x.plan) - 1]
            self.outbox.results(outcomes)
            outcomes = []
        for x in long_items:
            x.rows = self._embed_long(embedder, x)
            self.outbox.results([self._window_outcome(x, results)])
        if outcomes:
            self.outbox.results(outcomes)
        self._send_twins(twins, results)

    def _embed_long(self, embedder: WindowEmbedder, x: Loaded) -> np.ndarray | None:
        rows = np.full((len(x.plan), embedder.dim), np.nan, dtype=np.float32)
        try:
            for first, block in embedder.iter_embed(x.wav, x.plan):
                rows[first : first + len(block)] = block
                self.batches += 1
                self.batch_items += len(block)
        except Exception as exc:
            x.error = ("model", "out of memory" if _is_oom(exc) else f"{type(exc).__name__}: {exc}")
        x.wav = None
        return rows

    def _window_outcome(self, x: Loaded, results: dict) -> ItemOutcome:
        """One window item's result (its usable windows) or failure."""
        rows, x.rows = x.rows, None
        x.feats = None
        if x.error is not None:
            results[x.task.task_id] = None
            return ItemFailure(x.task.task_id, self.owner, *x.error)
        keep = finite_nonzero(rows)
        if not keep.any():
            results[x.task.task_id] = None
            return ItemFailure(x.task.task_id, self.owner, "model", f"none of its {len(rows)} windows could be embedded")
        spans = np.stack([x.plan.starts, x.plan.ends], axis=1)[keep]
        rows = np.ascontiguousarray(rows[keep])
        results[x.task.task_id] = (rows, spans)
        if x.content_hash:
            self._remember(x, (rows, spans))
        return self._result(x, rows, spans=spans)

    def _embed_all(self, good: list[Loaded]) -> None:
        """Embed one claim's loaded items, sending each batch's outcomes as it is done
        (the writer commits while the rest computes; the first rows land early)."""
        unique, twins, recent = self._split_twins(good)
        if recent:
            self.outbox.results([self._result(x, vector) for x, vector in recent])
        if self.setup.device_features and unique:
            feats = self.encoder.device_features([x.wav for x in unique], self.batch_frames)
            for x, f in zip(unique, feats):
                x.feats, x.wav = f, None
        batches, real, padded = plan_batches(unique, self.setup.batching, self.batch_frames, self.setup.max_trim_frames)
        self.real_frames += real
        self.padded_frames += padded
        vectors: dict[int, np.ndarray] = {}
        todo = list(batches)
        while todo:
            batch = todo.pop(0)
            try:
                out = np.asarray(self.encoder.embed_batch([x.feats for x in batch]), dtype=np.float32)
            except Exception as exc:
                if _is_oom(exc) and len(batch) > 1:
                    self._after_oom()
                    half = len(batch) // 2
                    todo[:0] = [batch[:half], batch[half:]]
                    continue
                if len(batch) > 1 and not _is_oom(exc):
                    # one bad item must not fail its neighbours: retry them one by one
                    todo[:0] = [[x] for x in batch]
                    continue
                reason = "out of memory (even alone)" if _is_oom(exc) else f"{type(exc).__name__}: {exc}"
                self.outbox.results([ItemFailure(x.task.task_id, self.owner, "model", reason) for x in batch])
                continue
            self.batches += 1
            self.batch_items += len(batch)
            outcomes: list[ItemOutcome] = []
            for x, vec, fine in zip(batch, out, finite_nonzero(out)):
                if fine:
                    vectors[x.task.task_id] = vec
                    self._remember(x, vec)
                    outcomes.append(self._result(x, vec))
                else:
                    outcomes.append(ItemFailure(x.task.task_id, self.owner, "model", "non-finite or zero embedding"))
            self.outbox.results(outcomes)
        self._send_twins(twins, vectors)

    def _send_twins(self, twins: list[tuple[Loaded, Loaded]], computed: dict[int, Any]) -> None:
        """Each twin gets what its first computed: a vector, or a window item's (rows,
        spans); it fails where its first did."""
        outcomes: list[ItemOutcome] = []
        for x, first in twins:
            done = computed.get(first.task.task_id)
            if done is None:
                outcomes.append(ItemFailure(x.task.task_id, self.owner, "model", "identical audio failed to embed"))
            elif isinstance(done, tuple):
                outcomes.append(self._result(x, done[0], spans=done[1]))
            else:
                outcomes.append(self._result(x, done))
        if outcomes:
            self.outbox.results(outcomes)

    def _remember(self, x: Loaded, vector: Any) -> None:
        if x.content_hash:
            self.recent[(x.content_hash, x.task.start, x.task.end)] = vector
            if len(self.recent) > RECENT_VECTORS:
                self.recent.popitem(last=False)

    def _after_oom(self) -> None:
        self.batch_frames = max(1, self.batch_frames // 2)
        try:
            import torch

            torch.cuda.empty_cache()
        except Exception:
            pass


def worker_main(
    setup: WorkerSetup, store_path: str, inbox: Any, progress: Any, stop_event: Any, limit: int | None, claimed: Any,
    env: dict[str, str] | None = None,
) -> None:
    """A local worker process: SQLite client, queue outbox; `env`: the parent's environment."""
    die_with_parent()
    if env is not None:
        adopt_environment(env)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent coordinates a clean stop
    if setup.device.startswith("cuda") and "PYTORCH_CUDA_ALLOC_CONF" not in os.environ:
        # fewer, larger blocks: batches of changing shapes otherwise fragment the cache
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    outbox = QueueOutbox(inbox, progress)
    owner = new_owner()
    client = None
    try:
        encoder = open_encoder(setup)
        budget = ClaimBudget(limit, claimed) if limit is not None else None
        client = SqliteManifestClient(store_path, setup.model_id, owner, setup.lease_seconds, setup.claim_order,
                                      encoder.feature_length, encoder.sample_rate, budget)
        Worker(setup, encoder, client, outbox, stop_event).run()
    except BaseException as exc:
        outbox.report(WorkerFailed(owner, one_line(exc)))
        try:
            outbox.finished(setup.index, owner)
        except Exception:
            pass
        raise SystemExit(1)
    finally:
        if client is not None:
            client.close()
