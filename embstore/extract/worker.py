"""An extraction worker: claims tasks, loads audio ahead of the model, embeds batches.

Inside one worker process:
- a feeder thread claims tasks and hands each item to a pool of loader threads
  (read, decode, resample, features, content hash); loaded claims wait in a bounded
  queue, so memory stays flat and the model never waits on disk;
- the main thread groups loaded items into batches the encoder can embed exactly
  (see Encoder.batching) and sends vectors and per-item failures to the writer;
- a lease thread renews the worker's claims while it works.
"""

from __future__ import annotations

import os
import queue
import signal
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from embstore.extract.claims import ClaimedTask, claim_batch, new_owner, refresh_tasks, renew_lease
from embstore.extract.writer import ItemFailure, ItemResult


@dataclass
class WorkerOptions:
    store_path: str
    model_spec: str
    model_id: int
    device: str
    dtype: str
    batch_frames: int
    claim_items: int
    loader_workers: int
    lease_seconds: float
    threads: int
    max_trim_frames: int = 0
    max_items: int | None = None  # --limit, shared through `claimed_total`
    index: int = 0  # which worker of the run: the writer counts finished workers by it
    device_features: bool = False  # fbank on the model's device, batched (GPU); loaders only decode
    force_equal: bool = False  # --batching equal: no masked padded batches


@dataclass
class Loaded:
    task: ClaimedTask
    feats: np.ndarray | None = None
    content_hash: str | None = None
    dup_row: int | None = None
    error: tuple[str, str] | None = None  # (stage, message)
    wav: np.ndarray | None = None  # kept only when features are computed on the device


def _load_item(encoder, task: ClaimedTask, dedup_lookup, device_features: bool = False) -> Loaded:
    from embstore.audio import AudioError, content_hash

    try:
        digest = content_hash(task.path)
    except FileNotFoundError:
        return Loaded(task, error=("read", "file not found (removed since scan?)"))
    except IsADirectoryError:
        return Loaded(task, error=("read", "is a directory, not an audio file"))
    except OSError as exc:
        return Loaded(task, error=("read", f"cannot read: {exc.strerror or exc}"))
    row = dedup_lookup(digest, task)
    if row is not None:
        return Loaded(task, content_hash=digest, dup_row=row)
    try:
        wav = encoder.load(task.path, task.start, task.end)
    except AudioError as exc:
        return Loaded(task, content_hash=digest, error=("decode", str(exc)))
    except Exception as exc:
        return Loaded(task, content_hash=digest, error=("decode", f"{type(exc).__name__}: {exc}"))
    if wav.size == 0:
        return Loaded(task, content_hash=digest, error=("decode", "no audio samples"))
    if not wav.any():
        # no speaker to embed: any model would return NaN or a meaningless constant vector
        return Loaded(task, content_hash=digest, error=("decode", "silent audio (all samples are zero)"))
    if device_features:
        if encoder.feature_length(len(wav)) <= 0:
            return Loaded(task, content_hash=digest, error=("features", "too short for this model (no feature frames)"))
        return Loaded(task, content_hash=digest, wav=wav)
    try:
        feats = encoder.features(wav)
    except Exception as exc:
        return Loaded(task, content_hash=digest, error=("features", f"{type(exc).__name__}: {exc}"))
    if feats is None or len(feats) == 0:
        return Loaded(task, content_hash=digest, error=("features", "too short for this model (no feature frames)"))
    if not np.isfinite(feats).all():
        return Loaded(task, content_hash=digest, error=("features", "non-finite features"))
    return Loaded(task, feats=feats, content_hash=digest)


def plan_batches(items: list[Loaded], batching: str, batch_frames: int, max_trim: int = 0) -> tuple[list[list[Loaded]], int, int]:
    """Group loaded items into batches the encoder embeds exactly.

    Returns (batches, real frames, padded frames); padded - real is the padding
    overhead of masked batching (zero for the other modes).
    """
    def frames(x: Loaded) -> int:
        f = x.feats
        return int(f.shape[0] * (f.shape[1] if batching == "any" and f.ndim == 3 else 1))

    batches: list[list[Loaded]] = []
    real = padded = 0
    if batching == "any":
        batch, size = [], 0
        for x in items:
            n = frames(x)
            if batch and size + n > batch_frames:
                batches.append(batch)
                batch, size = [], 0
            batch.append(x)
            size += n
            real += n
        if batch:
            batches.append(batch)
        return batches, real, real
    ordered = sorted(items, key=lambda x: x.feats.shape[0])
    if batching == "masked":
        batch: list[Loaded] = []
        for x in ordered:
            n = x.feats.shape[0]
            # sorted ascending: this item is the batch's longest, so the batch costs (len+1) * n
            if batch and (len(batch) + 1) * n > batch_frames:
                batches.append(batch)
                batch = []
            batch.append(x)
        if batch:
            batches.append(batch)
        for b in batches:
            real += sum(x.feats.shape[0] for x in b)
            padded += len(b) * b[-1].feats.shape[0]
        return batches, real, padded
    # equal lengths only (optionally trimming up to max_trim frames off longer items)
    groups: list[list[Loaded]] = []
    for x in ordered:
        if groups and x.feats.shape[0] - groups[-1][0].feats.shape[0] <= max_trim:
            groups[-1].append(x)
        else:
            groups.append([x])
    for group in groups:
        n = group[0].feats.shape[0]
        if max_trim:
            for x in group:
                x.feats = x.feats[:n]
        per_batch = max(1, batch_frames // max(n, 1))
        for start in range(0, len(group), per_batch):
            batches.append(group[start : start + per_batch])
        real += n * len(group)
    return batches, real, real


def _is_oom(exc: BaseException) -> bool:
    return "out of memory" in str(exc).lower() or type(exc).__name__ == "OutOfMemoryError"


class Worker:
    def __init__(self, options: WorkerOptions, outbox, progress, stop_event, claimed_total=None):
        self.o = options
        self.outbox = outbox
        self.progress = progress
        self.stop_event = stop_event
        self.claimed_total = claimed_total
        self.owner = new_owner()
        self.loaded: queue.Queue = queue.Queue(maxsize=2)
        self.feeder_done = threading.Event()
        self.outstanding = 0  # claims loaded and handed to the compute side, not yet sent
        self.outstanding_lock = threading.Lock()
        self.feeder_error: BaseException | None = None
        self.batch_frames = options.batch_frames
        self.batches = 0
        self.batch_items = 0
        self.real_frames = 0
        self.padded_frames = 0

    # -- setup --------------------------------------------------------------------

    def _connect(self):
        from embstore.store import connect

        return connect(os.path.join(self.o.store_path, "manifest.db"))

    def run(self) -> None:
        import torch

        from embstore.models import load

        torch.set_num_threads(max(1, self.o.threads))
        extra = {"threads": max(1, self.o.threads)} if self.o.model_spec.startswith("onnx:") else {}
        self.encoder = load(self.o.model_spec, device=self.o.device, dtype=self.o.dtype, **extra)
        # scan order keeps a speaker's rows together in the store; only equal-length
        # batching needs the global length order (mixed-length claims are sorted by
        # length inside the claim, which keeps masked padding low)
        if self.o.force_equal and self.encoder.batching == "masked":
            self.encoder.batching = "equal"  # --batching equal: buckets of equal length only
        self.order = "length" if self.encoder.batching == "equal" else "item"
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
            self.outbox.put(("worker_finished", self.o.index, self.owner))
            self.progress.put(
                ("worker_stats", self.owner, self.batches, self.batch_items, self.real_frames, self.padded_frames)
            )

    def _renew_leases(self) -> None:
        conn = self._connect()
        interval = max(self.o.lease_seconds / 4, 0.5)
        while not self.feeder_done.wait(interval) or not self.loaded.empty():
            try:
                renew_lease(conn, self.owner, self.o.lease_seconds)
            except Exception:
                pass  # a busy database: the next renewal comes well before the lease ends

    # -- feeder thread ------------------------------------------------------------

    def _feed(self) -> None:
        conn = self._connect()
        lookup_conn = self._connect()
        lookup_lock = threading.Lock()

        def dedup_lookup(digest: str, task: ClaimedTask) -> int | None:
            with lookup_lock:
                row = lookup_conn.execute(
                    "SELECT t.row FROM files f JOIN items i ON i.file_id = f.id JOIN tasks t ON t.item_id = i.id"
                    " WHERE f.content_hash = ? AND i.start IS ? AND i.end IS ? AND t.model_id = ?"
                    " AND t.status = 'done' AND t.row IS NOT NULL LIMIT 1",
                    (digest, task.start, task.end, self.o.model_id),
                ).fetchone()
            return None if row is None else int(row[0])

        pool = ThreadPoolExecutor(max_workers=max(1, self.o.loader_workers), thread_name_prefix="loader")
        refreshed = False
        try:
            while not self.stop_event.is_set():
                max_items = self.o.claim_items
                if self.claimed_total is not None and self.o.max_items is not None:
                    with self.claimed_total.get_lock():
                        left = self.o.max_items - self.claimed_total.value
                        max_items = min(max_items, left)
                        if max_items <= 0:
                            break
                        claimed = claim_batch(
                            conn, self.o.model_id, self.owner, self.o.lease_seconds, max_items,
                            self.batch_frames * 2, self.order,
                        )
                        self.claimed_total.value += len(claimed)
                else:
                    claimed = claim_batch(
                        conn, self.o.model_id, self.owner, self.o.lease_seconds, max_items,
                        self.batch_frames * 2, self.order,
                    )
                if not claimed:
                    if refreshed and self._compute_busy():
                        # items scanned while the last batches compute are still this
                        # run's work: look once more when the compute side is idle
                        while self._compute_busy() and not self.stop_event.is_set():
                            time.sleep(0.1)
                        refreshed = False
                    if refreshed:
                        break
                    # new items may have been scanned meanwhile, or leases run out
                    refresh_tasks(conn, self.o.model_id, self.encoder.feature_length, self.encoder.sample_rate)
                    refreshed = True
                    continue
                refreshed = False
                loaded = list(pool.map(
                    lambda t: _load_item(self.encoder, t, dedup_lookup, self.o.device_features), claimed
                ))
                with self.outstanding_lock:
                    self.outstanding += 1
                while not self.stop_event.is_set():
                    try:
                        self.loaded.put(loaded, timeout=0.5)
                        break
                    except queue.Full:
                        continue
                else:
                    with self.outstanding_lock:
                        self.outstanding -= 1  # stopping: never queued
        except BaseException as exc:
            self.feeder_error = exc
            self.progress.put(("worker_error", self.owner, "".join(traceback.format_exception_only(exc)).strip()))
        finally:
            pool.shutdown(wait=True)
            conn.close()
            lookup_conn.close()
            self.feeder_done.set()

    # -- compute (main thread) ----------------------------------------------------

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
            try:
                messages: list[Any] = []
                good = []
                for x in loaded:
                    if x.error is not None:
                        messages.append(ItemFailure(x.task.task_id, self.owner, x.error[0], x.error[1]))
                    elif x.dup_row is not None:
                        messages.append(ItemResult(x.task.task_id, x.task.item_id, self.owner, x.content_hash,
                                                   x.task.duration, None, x.dup_row))
                    else:
                        good.append(x)
                messages.extend(self._embed_all(good))
                self.outbox.put(("items", messages))
            finally:
                with self.outstanding_lock:
                    self.outstanding -= 1

    def _embed_all(self, good: list[Loaded]) -> list[Any]:
        from embstore.models.base import check_finite

        messages: list[Any] = []
        # identical audio inside one claim is computed once
        first_of: dict[tuple, Loaded] = {}
        twins: list[tuple[Loaded, Loaded]] = []
        unique = []
        for x in good:
            key = (x.content_hash, x.task.start, x.task.end)
            if x.content_hash and key in first_of:
                twins.append((x, first_of[key]))
            else:
                first_of[key] = x
                unique.append(x)
        if self.o.device_features and unique:
            self._device_features(unique)
        batches, real, padded = plan_batches(unique, self.encoder.batching, self.batch_frames, self.o.max_trim_frames)
        self.real_frames += real
        self.padded_frames += padded
        vectors: dict[int, np.ndarray] = {}
        queue_ = list(batches)
        while queue_:
            batch = queue_.pop(0)
            try:
                out = np.asarray(self.encoder.embed_batch([x.feats for x in batch]), dtype=np.float32)
            except Exception as exc:
                if _is_oom(exc) and len(batch) > 1:
                    self._after_oom()
                    half = len(batch) // 2
                    queue_[:0] = [batch[:half], batch[half:]]
                    continue
                stage_error = "out of memory (even alone)" if _is_oom(exc) else f"{type(exc).__name__}: {exc}"
                if len(batch) > 1 and not _is_oom(exc):
                    # one bad item must not fail its neighbours: retry them one by one
                    queue_[:0] = [[x] for x in batch]
                    continue
                for x in batch:
                    messages.append(ItemFailure(x.task.task_id, self.owner, "model", stage_error))
                continue
            self.batches += 1
            self.batch_items += len(batch)
            ok = check_finite(out)
            for x, vec, fine in zip(batch, out, ok):
                if fine:
                    vectors[x.task.task_id] = vec
                    messages.append(
                        ItemResult(x.task.task_id, x.task.item_id, self.owner, x.content_hash, x.task.duration, vec)
                    )
                else:
                    messages.append(ItemFailure(x.task.task_id, self.owner, "model", "non-finite or zero embedding"))
        for x, first in twins:
            vec = vectors.get(first.task.task_id)
            if vec is None:
                messages.append(ItemFailure(x.task.task_id, self.owner, "model", "identical audio failed to embed"))
            else:
                messages.append(
                    ItemResult(x.task.task_id, x.task.item_id, self.owner, x.content_hash, x.task.duration, vec)
                )
        return messages

    def _device_features(self, items: list[Loaded]) -> None:
        """Kaldi fbank of many waveforms in one padded pass on the model's device."""
        import torch

        from embstore.features import fbank_batch, num_frames

        config = self.encoder.fbank_config
        device = self.encoder._torch_device
        ordered = sorted(items, key=lambda x: len(x.wav))
        budget = max(self.batch_frames * config.window_shift, 1)
        start = 0
        while start < len(ordered):
            # padded samples per pass stay within the frame budget
            stop = start + 1
            while stop < len(ordered) and (stop - start + 1) * len(ordered[stop].wav) <= budget:
                stop += 1
            chunk = ordered[start:stop]
            longest = len(chunk[-1].wav)
            batch = torch.zeros(len(chunk), longest, dtype=torch.float32, device=device)
            for i, x in enumerate(chunk):
                batch[i, : len(x.wav)] = torch.from_numpy(x.wav).to(device)
            lengths = torch.tensor([len(x.wav) for x in chunk], device=device)
            feats = fbank_batch(batch, config, lengths)
            for i, x in enumerate(chunk):
                x.feats = feats[i, : num_frames(len(x.wav), config)]
                x.wav = None
            start = stop

    def _after_oom(self) -> None:
        self.batch_frames = max(1, self.batch_frames // 2)
        try:
            import torch

            torch.cuda.empty_cache()
        except Exception:
            pass


def worker_main(options: WorkerOptions, outbox, progress, stop_event, claimed_total=None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent coordinates a clean stop
    if options.device.startswith("cuda") and "PYTORCH_CUDA_ALLOC_CONF" not in os.environ:
        # fewer, larger blocks: batches of changing shapes otherwise fragment the cache
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    worker = Worker(options, outbox, progress, stop_event, claimed_total)
    try:
        worker.run()
    except BaseException as exc:
        progress.put(("worker_error", worker.owner, "".join(traceback.format_exception_only(exc)).strip()))
        try:
            outbox.put(("worker_finished", options.index, worker.owner))
        except Exception:
            pass
        raise SystemExit(1)
