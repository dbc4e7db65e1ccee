"""An extraction worker: claims tasks, loads audio ahead of the model, embeds batches.

The loop is the same in a local process and in a cluster actor; it talks to the
manifest only through a `ManifestClient` and sends everything through an `Outbox`.
Inside one worker:
- a feeder thread claims tasks and loads each claim in a pool of loader threads
  (read, hash, dedup lookup, decode, resample, features); loaded claims wait in a
  bounded queue, so memory stays flat and the model never waits on disk;
- the calling thread embeds each loaded claim with one `ItemEmbedder` (whole items in
  batches the encoder embeds exactly, see `batching`; or windows in blocks) and sends
  vectors and per-item failures to the writer as blocks finish: an out-of-memory halves
  a block, any other error fails only the item whose input raises;
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
from typing import Any, Iterator

import numpy as np

from embstore.extract.batching import Loaded, default_batch_frames, plan_batches
from embstore.extract.client import ClaimBudget, ManifestClient, SqliteManifestClient
from embstore.segments.policy import cutting_of
from embstore.extract.faults import embed_step, slow_compute
from embstore.extract.loading import load_claim
from embstore.extract.messages import ItemFailure, ItemOutcome, ItemResult, WorkerFailed, WorkerSetup, WorkerStats
from embstore.extract.outbox import Outbox, QueueOutbox
from embstore.manifest.tasks import new_owner
from embstore.processes import adopt_environment, die_with_parent
from embstore.models.base import Encoder
from embstore.vectors import finite_nonzero
from embstore.segments.oom import is_out_of_memory, release_cached_memory
from embstore.segments.window_embed import DEFAULT_BATCH, WindowEmbedder


# vectors of recently computed audio kept per worker for dedup (~1 KB each at dim 256)
RECENT_VECTORS = 4096
# windows per forward on a GPU (on CPU the embedder's default: larger blocks do not pay there)
WINDOW_BATCH_GPU = 1024


def one_line(exc: BaseException) -> str:
    return "".join(traceback.format_exception_only(exc)).strip()


def open_encoder(setup: WorkerSetup) -> Encoder:
    """The worker's model on its device, with its share of the CPU threads, refused when
    it no longer fingerprints as the run's rows (`reference.load_checked`); an ONNX
    worker never imports torch (a second of start-up)."""
    from embstore.extract.reference import load_checked

    # ONNX Runtime and OpenVINO take their thread count when loaded; torch below
    threads = max(1, setup.threads) if setup.model_spec.startswith(("onnx:", "openvino:")) else None
    encoder = load_checked(setup.model_spec, setup.fingerprint, device=setup.device, dtype=setup.dtype,
                           threads=threads)
    if encoder.capabilities.runtime == "torch" or setup.device_features:
        import torch

        torch.set_num_threads(max(1, setup.threads))
    return encoder


def _failure_reason(exc: BaseException) -> str:
    return "out of memory (even alone)" if is_out_of_memory(exc) else f"{type(exc).__name__}: {exc}"


class _Strategy:
    """How one kind of item is embedded, unit by unit: a unit is a whole item, or one
    window of an item. `ItemEmbedder` runs the blocks and deals with their failures."""

    def blocks(self, unique: list[Loaded]) -> Iterator[list[Any]]:
        """The units of these items in blocks of one forward each (formed lazily)."""
        raise NotImplementedError

    def item_of(self, unit: Any) -> Loaded:
        raise NotImplementedError

    def step(self, block: list[Any]) -> np.ndarray:
        """One forward: [len(block), dim] vectors."""
        raise NotImplementedError

    def done(self, block: list[Any], out: np.ndarray, computed: dict[int, Any]) -> list[ItemOutcome]:
        """The outcomes of the items this block completes, each recorded in `computed`
        (by task id: a vector, or a window item's (vectors, spans); None if it failed)."""
        raise NotImplementedError

    def fail(self, x: Loaded, reason: str, computed: dict[int, Any]) -> list[ItemOutcome]:
        """The outcome of an item the model failed on (none if it was already settled)."""
        raise NotImplementedError


class ItemEmbedder:
    """A worker's loaded claims into outcomes, sent as each block finishes (the writer
    commits while the rest computes; the first rows land early). Two strategies, whole
    items (`_WholeItems`) and windows (`_Windows`), share everything else:

    - dedup: identical audio is computed once, inside a claim and across this worker's
      recent claims, whose rows may not be committed yet (no dedup row to point at);
    - a block that runs out of memory is halved (and later blocks are planned smaller),
      down to a single unit, which then fails its item ("out of memory (even alone)");
    - a block that raises anything else is retried item by item, so only the item whose
      input raises fails, with its reason, and its block neighbours are done.
    """

    def __init__(self, encoder: Encoder, owner: str, outbox: Outbox, setup: WorkerSetup, batch_frames: int,
                 windows: WindowEmbedder | None = None) -> None:
        self.encoder = encoder
        self.owner = owner
        self.outbox = outbox
        self.setup = setup
        self.batch_frames = batch_frames
        self.window_batch = windows.batch if windows is not None else DEFAULT_BATCH
        self.batches = self.batch_items = self.real_frames = self.padded_frames = 0
        self.recent: OrderedDict[tuple, Any] = OrderedDict()  # vector, or (vectors, spans) of a window model
        self.strategy: _Strategy = _Windows(self, windows) if windows is not None else _WholeItems(self)

    def embed(self, loaded: list[Loaded]) -> None:
        """Every outcome of one loaded claim: its loading failures, its dedup rows, then
        the rest computed."""
        outcomes: list[ItemOutcome] = []
        good = []
        for x in loaded:
            if x.error is not None:
                outcomes.append(ItemFailure(x.task.task_id, self.owner, x.error[0], x.error[1]))
            elif x.dup_row is not None:
                outcomes.append(self.result(x, None, *x.dup_row))
            else:
                good.append(x)
        unique, twins, known = self._split_twins(good)
        outcomes += [self._reuse(x, done) for x, done in known]
        if outcomes:
            self.outbox.results(outcomes)
        computed: dict[int, Any] = {}
        self._run(self.strategy.blocks(unique), computed)
        self._send_twins(twins, computed)

    def _run(self, blocks: Iterator[list[Any]], computed: dict[int, Any]) -> None:
        retry: list[list[Any]] = []  # the parts of a failed block, the next one last
        while True:
            block = retry.pop() if retry else next(blocks, None)
            if block is None:
                return
            try:
                embed_step((self.strategy.item_of(u).task.path for u in block), len(block))
                out = self.strategy.step(block)
            except Exception as exc:
                parts = self._split(block, exc)
                if parts:
                    retry += reversed(parts)
                    continue
                reason = _failure_reason(exc)
                outcomes = [o for part in self._by_item(block)
                            for o in self.strategy.fail(self.strategy.item_of(part[0]), reason, computed)]
            else:
                self.batches += 1
                self.batch_items += len(block)
                outcomes = self.strategy.done(block, out, computed)
            if outcomes:
                self.outbox.results(outcomes)

    def _split(self, block: list[Any], exc: BaseException) -> list[list[Any]]:
        """The parts to retry a failed block as; none when its items fail as they are."""
        if is_out_of_memory(exc):
            if len(block) == 1:
                return []
            self._after_oom()
            half = len(block) // 2
            return [block[:half], block[half:]]
        # one bad input must not fail its neighbours: each item's units alone
        parts = self._by_item(block)
        return parts if len(parts) > 1 else []

    def _by_item(self, block: list[Any]) -> list[list[Any]]:
        """The block's units grouped by item, in order."""
        groups: dict[int, list[Any]] = {}
        for unit in block:
            groups.setdefault(self.strategy.item_of(unit).task.task_id, []).append(unit)
        return list(groups.values())

    def result(self, x: Loaded, vector: np.ndarray | None, row: int | None = None, row_count: int | None = None,
               spans: np.ndarray | None = None) -> ItemResult:
        return ItemResult(x.task.task_id, x.task.item_id, self.owner, x.content_hash, x.task.duration, vector, row,
                          row_count, spans, x.speech)

    def _reuse(self, x: Loaded, done: Any) -> ItemResult:
        """An item given what identical audio computed: a vector, or a window item's (vectors, spans)."""
        if isinstance(done, tuple):
            return self.result(x, done[0], spans=done[1])
        return self.result(x, done)

    def _split_twins(self, good: list[Loaded]) -> tuple[list[Loaded], list[tuple[Loaded, Loaded]], list[tuple[Loaded, Any]]]:
        """Identical audio is computed once: inside one claim, and across this worker's
        recent claims. Returns (items to compute, (twin, its first) pairs, (item, recent
        result) pairs)."""
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

    def _send_twins(self, twins: list[tuple[Loaded, Loaded]], computed: dict[int, Any]) -> None:
        """Each twin gets what its first computed; it fails where its first did."""
        outcomes: list[ItemOutcome] = []
        for x, first in twins:
            done = computed.get(first.task.task_id)
            if done is None:
                outcomes.append(ItemFailure(x.task.task_id, self.owner, "model", "identical audio failed to embed"))
            else:
                outcomes.append(self._reuse(x, done))
        if outcomes:
            self.outbox.results(outcomes)

    def remember(self, x: Loaded, done: Any) -> None:
        if x.content_hash:
            self.recent[(x.content_hash, x.task.start, x.task.end)] = done
            if len(self.recent) > RECENT_VECTORS:
                self.recent.popitem(last=False)

    def _after_oom(self) -> None:
        # later blocks are planned smaller too: each would otherwise fail once more first
        self.batch_frames = max(1, self.batch_frames // 2)
        self.window_batch = max(1, self.window_batch // 2)
        release_cached_memory()


class _WholeItems(_Strategy):
    """One vector per item, in batches the encoder embeds exactly (`plan_batches`)."""

    def __init__(self, host: ItemEmbedder) -> None:
        self.host = host

    def blocks(self, unique: list[Loaded]) -> Iterator[list[Any]]:
        host = self.host
        if host.setup.device_features and unique:
            feats = host.encoder.device_features([x.wav for x in unique], host.batch_frames)
            for x, f in zip(unique, feats):
                x.feats, x.wav = f, None
        batches, real, padded = plan_batches(unique, host.setup.batching, host.batch_frames,
                                             host.setup.max_trim_frames)
        host.real_frames += real
        host.padded_frames += padded
        return iter(batches)

    def item_of(self, unit: Any) -> Loaded:
        return unit

    def step(self, block: list[Any]) -> np.ndarray:
        return np.asarray(self.host.encoder.embed_batch([x.feats for x in block]), dtype=np.float32)

    def done(self, block: list[Any], out: np.ndarray, computed: dict[int, Any]) -> list[ItemOutcome]:
        outcomes: list[ItemOutcome] = []
        for x, vec, fine in zip(block, out, finite_nonzero(out)):
            if fine:
                computed[x.task.task_id] = vec
                self.host.remember(x, vec)
                outcomes.append(self.host.result(x, vec))
            else:
                outcomes.append(ItemFailure(x.task.task_id, self.host.owner, "model", "non-finite or zero embedding"))
        return outcomes

    def fail(self, x: Loaded, reason: str, computed: dict[int, Any]) -> list[ItemOutcome]:
        return [ItemFailure(x.task.task_id, self.host.owner, "model", reason)]


class _Windows(_Strategy):
    """A window model's items: every window of a claim's items embedded in blocks of
    `window_batch` windows (windows of several items share a forward: each window is
    computed from its own samples only, so its row does not depend on its block). A long
    item (no `feats`: too many windows to hold) is featurised here, block by block, so
    memory stays flat. An item's vectors are sent once all its windows are done, without
    the windows that could not be embedded."""

    def __init__(self, host: ItemEmbedder, embedder: WindowEmbedder) -> None:
        self.host = host
        self.embedder = embedder
        self.left: dict[int, int] = {}  # windows still to embed, by task id
        self.ranges: dict[int, np.ndarray] = {}  # a long item's window sample ranges

    def blocks(self, unique: list[Loaded]) -> Iterator[list[Any]]:
        units: list[tuple[Loaded, int]] = []
        for x in unique:
            x.window_vectors = np.full((len(x.plan), self.embedder.dim), np.nan, dtype=np.float32)
            self.left[x.task.task_id] = len(x.plan)
            if x.feats is None:
                self.ranges[x.task.task_id] = self.embedder.sample_ranges(x.plan, len(x.wav))
            units += [(x, j) for j in range(len(x.plan))]
        return self._slices(units)

    def _slices(self, units: list[tuple[Loaded, int]]) -> Iterator[list[Any]]:
        """Blocks of the current `window_batch` (smaller after an out-of-memory), without
        the windows of items that failed meanwhile."""
        first = 0
        while first < len(units):
            block = []
            while first < len(units) and len(block) < self.host.window_batch:
                if units[first][0].error is None:
                    block.append(units[first])
                first += 1
            if block:
                yield block

    def item_of(self, unit: Any) -> Loaded:
        return unit[0]

    def step(self, block: list[Any]) -> np.ndarray:
        feats = [x.feats[j] if x.feats is not None else None for x, j in block]
        late = [k for k, (x, _) in enumerate(block) if x.feats is None]
        if late:  # a long item's windows: their features now
            pieces = []
            for k in late:
                x, j = block[k]
                a, b = self.ranges[x.task.task_id][j]
                pieces.append(x.wav[a:b])
            for k, f in zip(late, self.embedder.window_features(pieces)):
                feats[k] = f
        return self.embedder.embed_features(feats)

    def done(self, block: list[Any], out: np.ndarray, computed: dict[int, Any]) -> list[ItemOutcome]:
        outcomes: list[ItemOutcome] = []
        for (x, j), vector in zip(block, out):
            if x.error is not None:
                continue  # its item failed in another block: its outcome is sent
            x.window_vectors[j] = vector
            self.left[x.task.task_id] -= 1
            if self.left[x.task.task_id] == 0:
                outcomes.append(self._outcome(x, computed))
        return outcomes

    def fail(self, x: Loaded, reason: str, computed: dict[int, Any]) -> list[ItemOutcome]:
        if x.error is not None:
            return []
        x.error = ("model", reason)
        return [self._outcome(x, computed)]

    def _outcome(self, x: Loaded, computed: dict[int, Any]) -> ItemOutcome:
        """One window item's result (its usable windows) or failure; its memory freed."""
        task_id = x.task.task_id
        vectors, x.window_vectors = x.window_vectors, None
        x.feats = x.wav = None
        self.left.pop(task_id, None)
        self.ranges.pop(task_id, None)
        if x.error is not None:
            computed[task_id] = None
            return ItemFailure(task_id, self.host.owner, *x.error)
        keep = finite_nonzero(vectors)
        if not keep.any():
            computed[task_id] = None
            return ItemFailure(task_id, self.host.owner, "model", f"none of its {len(vectors)} windows could be embedded")
        spans = np.stack([x.plan.starts, x.plan.ends], axis=1)[keep]
        vectors = np.ascontiguousarray(vectors[keep])
        computed[task_id] = (vectors, spans)
        self.host.remember(x, (vectors, spans))
        return self.host.result(x, vectors, spans=spans)


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
        batch_frames = setup.batch_frames or default_batch_frames(setup.device, setup.batching, setup.workers_per_device)
        self.cutting = cutting_of(setup.vad, setup.windows)
        windows = None
        if self.cutting is not None and self.cutting.windowed:
            # made once here, as the fingerprint says; the loader threads share it
            windows = self.cutting.embedder(encoder, setup.window_mode,
                                            WINDOW_BATCH_GPU if setup.device.startswith("cuda") else DEFAULT_BATCH)
        self.items = ItemEmbedder(encoder, self.owner, outbox, setup, batch_frames, windows)

    @property
    def batch_frames(self) -> int:
        """The frame budget of a batch (claims are sized by it); halved after an out-of-memory."""
        return self.items.batch_frames

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
            items = self.items
            self.outbox.report(WorkerStats(self.owner, items.batches, items.batch_items, items.real_frames,
                                           items.padded_frames))

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
                self.items.embed(loaded)
            finally:
                with self.outstanding_lock:
                    self.outstanding -= 1


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
