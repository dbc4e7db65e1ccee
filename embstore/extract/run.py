"""`Store.extract`: start the writer and the workers, show progress, record the run.

The parent process only coordinates: it prepares the task list, starts one writer
process and one worker process per device (or N on CPU), watches them, and on
Ctrl-C asks them to stop after their current batch, then releases their claims.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import queue
import signal
import socket
import sqlite3
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from embstore.extract.claims import pending_summary, refresh_tasks
from embstore.store import Store, StoreError, utcnow

DEFAULT_MODEL = "resemblyzer"


class ExtractionError(StoreError):
    pass


@dataclass
class ExtractSummary:
    model: str
    fingerprint: str
    batching: str
    done: int = 0
    failed: int = 0
    audio_seconds: float = 0.0
    seconds: float = 0.0
    workers: int = 0
    devices: list[str] = field(default_factory=list)
    mean_batch_items: float = 0.0
    padding_overhead: float = 0.0
    nothing_to_do: bool = False
    interrupted: bool = False
    error: str | None = None
    run_id: int | None = None
    features: str = "cpu"
    runtime: str = "torch"
    prepared: dict[str, int] = field(default_factory=dict)
    left: int = 0

    @property
    def items_per_second(self) -> float:
        return self.done / self.seconds if self.seconds else 0.0

    @property
    def x_realtime(self) -> float:
        return self.audio_seconds / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["items_per_second"] = round(self.items_per_second, 2)
        d["x_realtime"] = round(self.x_realtime, 1)
        return d


def _devices(device: str, gpus: str | None, workers: int | None) -> list[str]:
    if gpus:
        try:
            ids = [int(g) for g in gpus.split(",") if g.strip() != ""]
        except ValueError:
            raise ExtractionError(f"--gpus takes GPU numbers like 0,1 (got {gpus!r})") from None
        if not ids:
            raise ExtractionError("--gpus needs at least one GPU number")
        _check_cuda(max(ids))
        return [f"cuda:{i}" for i in ids] * max(1, workers or 1)
    if device.startswith("cuda"):
        _check_cuda(int(device.split(":")[1]) if ":" in device else 0)
        return [device if ":" in device else "cuda:0"] * max(1, workers or 1)
    if device != "cpu":
        raise ExtractionError(f"unknown device {device!r}: use cpu, cuda, cuda:N or --gpus")
    return ["cpu"] * max(1, workers or 1)


def _check_cuda(highest: int) -> None:
    import torch

    if not torch.cuda.is_available():
        raise ExtractionError("CUDA requested but no CUDA device is available (use --device cpu)")
    if highest >= torch.cuda.device_count():
        raise ExtractionError(f"GPU {highest} requested but only {torch.cuda.device_count()} visible")


def default_batch_frames(device: str, batching: str) -> int:
    if device.startswith("cuda"):
        try:
            import torch

            free, _ = torch.cuda.mem_get_info(int(device.split(":")[1]) if ":" in device else 0)
            # ~64 KB of activations per frame for ResNet34-sized models at fp32, with headroom;
            # an out-of-memory halves it at run time anyway
            return int(max(20_000, min(2_000_000, free * 0.5 / 65536)))
        except Exception:
            return 200_000
    # on CPU large batches do not pay (ResNet34: batch 8 is slower per item than batch 1),
    # and padding costs real compute: masked batches only pack short items together
    return {"any": 16_000, "masked": 1_000}.get(batching, 6_000)


def _quick_nothing_to_do(store: Store, spec: str, retry_failed: bool) -> tuple[Any, int] | None:
    """Answer "nothing to do" without loading the model when the store already knows it.

    Only for a spec seen before whose weight files are older than its models row:
    then the fingerprint cannot have changed.
    """
    rows = store.query("SELECT * FROM models WHERE spec = ? ORDER BY id DESC", (spec,))
    if len(rows) != 1:
        return None
    row = rows[0]
    _, _, target = spec.partition(":")
    if target and os.path.exists(target):
        created = time.mktime(time.strptime(row["created_at"][:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone
        newest = max(
            (os.path.getmtime(os.path.join(d, f)) for d, _, fs in os.walk(target) for f in fs),
            default=os.path.getmtime(target),
        ) if os.path.isdir(target) else os.path.getmtime(target)
        if newest >= created:
            return None
    conn = store.conn
    model_id = row["id"]
    if retry_failed and conn.execute(
        "SELECT 1 FROM tasks WHERE model_id = ? AND status = 'failed' LIMIT 1", (model_id,)
    ).fetchone():
        return None
    open_work = conn.execute(
        "SELECT 1 FROM tasks WHERE model_id = ? AND status IN ('pending', 'stale', 'claimed') LIMIT 1", (model_id,)
    ).fetchone()
    if open_work:
        return None
    last = conn.execute("SELECT coalesce(max(item_id), 0) FROM tasks WHERE model_id = ?", (model_id,)).fetchone()[0]
    newer = conn.execute("SELECT 1 FROM items WHERE id > ? AND removed = 0 LIMIT 1", (last,)).fetchone()
    if newer:
        return None
    failed = conn.execute(
        "SELECT count(*) FROM tasks WHERE model_id = ? AND status = 'failed'", (model_id,)
    ).fetchone()[0]
    return row, failed


def run_extraction(
    store: Store,
    model: str | None = None,
    device: str = "cpu",
    gpus: str | None = None,
    workers: int | None = None,
    batch_frames: int | None = None,
    loader_workers: int | None = None,
    dtype: str = "fp32",
    retry_failed: bool = False,
    limit: int | None = None,
    max_trim_frames: int = 0,
    lease_seconds: float = 120.0,
    progress: bool = False,
    threads: int | None = None,
    features: str = "auto",
    runtime: str = "auto",
    batching: str = "auto",
) -> ExtractSummary:
    """Embed every pending item of the store with `model`; returns what was done."""
    spec = model or DEFAULT_MODEL
    started = time.monotonic()
    devices = _devices(device, gpus, workers)
    if dtype not in ("fp32", "bf16", "fp16"):
        raise ExtractionError(f"unknown dtype {dtype!r}: use fp32, bf16 or fp16")
    if max_trim_frames < 0:
        raise ExtractionError("--max-trim-frames must be >= 0")
    if batching not in ("auto", "equal"):
        raise ExtractionError(f"unknown batching {batching!r}: use auto or equal")
    if runtime not in ("auto", "torch", "onnx"):
        raise ExtractionError(f"unknown runtime {runtime!r}: use auto, torch or onnx")
    if features not in ("auto", "cpu", "device"):
        raise ExtractionError(f"unknown features mode {features!r}: use auto, cpu or device")

    quick = _quick_nothing_to_do(store, spec, retry_failed)
    if quick is not None:
        row, failed = quick
        return ExtractSummary(
            model=store.model_key(row), fingerprint=row["fingerprint"], batching=row["batching"], failed=failed,
            nothing_to_do=True, seconds=time.monotonic() - started, devices=devices,
        )

    from embstore.models import load

    # the parent loads the model on CPU once: its fingerprint names the rows
    # (the dtype is part of its fingerprint: bf16 rows never mix with fp32 rows)
    encoder = load(spec, device="cpu", dtype=dtype)
    can_device_features = hasattr(encoder, "features_batch") and hasattr(encoder, "_torch_device")
    if features == "device" and not can_device_features:
        raise ExtractionError(f"{encoder.name} cannot compute its features on the device; use --features cpu")
    device_features = features == "device" or (features == "auto" and can_device_features and devices[0] != "cpu")
    use_onnx = _wants_onnx(encoder, runtime, devices, dtype, device_features)
    force_equal = batching == "equal"
    # ONNX graphs take equal lengths only
    batching = "equal" if use_onnx or (force_equal and encoder.batching == "masked") else encoder.batching
    description = encoder.describe()
    if max_trim_frames and batching == "equal":  # only equal-length batching trims
        description["frontend"] = dict(description["frontend"], max_trim_frames=max_trim_frames)
        description["fingerprint"] = description["fingerprint"] + f"-trim{max_trim_frames}"
    model_row = store.register_model(description)
    model_id = model_row["id"]
    prepared = refresh_tasks(store.conn, model_id, encoder.feature_length, encoder.sample_rate, retry_failed)
    left, left_seconds = pending_summary(store.conn, model_id)
    summary = ExtractSummary(
        model=store.model_key(model_row), fingerprint=model_row["fingerprint"], batching=batching,
        devices=devices, workers=len(devices), prepared=prepared,
        features="device" if device_features else "cpu",
    )
    if left == 0:
        summary.nothing_to_do = True
        summary.failed = store.conn.execute(
            "SELECT count(*) FROM tasks WHERE model_id = ? AND status = 'failed'", (model_id,)
        ).fetchone()[0]
        summary.seconds = time.monotonic() - started
        return summary
    worker_spec = spec
    if use_onnx:
        worker_spec = _onnx_spec(store, encoder, spec, explicit=(runtime == "onnx"))
    summary.runtime = "onnxruntime" if worker_spec.startswith("onnx:") else "torch"
    if worker_spec.startswith("onnx:"):
        summary.batching = "equal"
    del encoder

    options_json = json.dumps(
        {"model": spec, "devices": devices, "dtype": dtype, "batch_frames": batch_frames, "limit": limit,
         "max_trim_frames": max_trim_frames, "retry_failed": retry_failed, "batching": summary.batching,
         "features": summary.features, "runtime": summary.runtime},
        sort_keys=True,
    )
    with store.write() as conn:
        # runs of this host whose process is gone were killed (kill -9, power loss): say so
        from embstore.extract.claims import owner_is_dead

        host = socket.gethostname()
        for old_id, old_pid in conn.execute(
            "SELECT id, pid FROM runs WHERE status = 'running' AND host = ?", (host,)
        ).fetchall():
            if old_pid and owner_is_dead(f"{host}:{old_pid}"):
                conn.execute(
                    "UPDATE runs SET status = 'crashed', summary = ? WHERE id = ?",
                    (json.dumps({"error": "the process died without recording its end (kill -9, OOM, power loss)"}),
                     old_id),
                )
        run_id = conn.execute(
            "INSERT INTO runs (model_id, host, pid, options, started_at, status) VALUES (?, ?, ?, ?, ?, 'running')",
            (model_id, host, os.getpid(), options_json, utcnow()),
        ).lastrowid
    summary.run_id = run_id
    try:
        _run_processes(store, summary, worker_spec, model_id, run_id, devices, dtype, batch_frames, loader_workers,
                       limit, max_trim_frames, lease_seconds, progress, threads, left, left_seconds, device_features,
                       force_equal)
    finally:
        summary.seconds = time.monotonic() - started
        summary.left, _ = pending_summary(store.conn, model_id)
        status = "interrupted" if summary.interrupted else ("crashed" if summary.error else "finished")
        try:
            with store.write() as conn:
                conn.execute(
                    "UPDATE runs SET ended_at = ?, status = ?, items_done = ?, items_failed = ?, audio_seconds = ?,"
                    " summary = ? WHERE id = ?",
                    (utcnow(), status, summary.done, summary.failed, summary.audio_seconds,
                     json.dumps(summary.as_dict(), default=str), run_id),
                )
        except sqlite3.OperationalError as exc:
            # a full disk must not hide the run's own error behind this bookkeeping one
            if not summary.error:
                summary.error = f"cannot record the run: {exc}"
    return summary


def _wants_onnx(encoder, runtime: str, devices: list[str], dtype: str, device_features: bool) -> bool:
    """auto picks ONNX Runtime for torch WeSpeaker models on CPU at fp32: the same numbers
    (to 1e-7) ~1.7x faster there. Elsewhere torch (GPU, bf16/fp16, resemblyzer)."""
    from embstore.models.wespeaker import WeSpeakerEncoder

    suitable = isinstance(encoder, WeSpeakerEncoder) and dtype == "fp32"
    if runtime == "onnx":
        if not suitable:
            raise ExtractionError("--runtime onnx works for wespeaker:DIR models at fp32")
        return True
    if runtime == "torch" or not suitable or device_features or devices[0] != "cpu":
        return False
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def _onnx_spec(store: Store, encoder, spec: str, explicit: bool) -> str:
    """The ONNX export workers load (cached per fingerprint); torch if the export fails
    and ONNX was not asked for explicitly."""
    from embstore.models.onnx import export_onnx

    try:
        return "onnx:" + export_onnx(encoder, str(store.path / "cache" / "onnx" / encoder.fingerprint))
    except Exception as exc:
        if explicit:
            raise ExtractionError(f"cannot run {spec} with ONNX Runtime: {type(exc).__name__}: {exc}") from None
        return spec


def _run_processes(store, summary, spec, model_id, run_id, devices, dtype, batch_frames, loader_workers, limit,
                   max_trim_frames, lease_seconds, show_progress, threads, left, left_seconds,
                   device_features, force_equal) -> None:
    from embstore.extract.worker import WorkerOptions, worker_main
    from embstore.extract.writer import writer_main

    ctx = multiprocessing.get_context("spawn")  # fork + torch threads is unsafe
    inbox = ctx.Queue(maxsize=64)
    progress = ctx.Queue()
    stop_event = ctx.Event()
    claimed_total = ctx.Value("q", 0)
    cpu_count = os.cpu_count() or 1
    n = len(devices)
    per_worker_threads = threads or max(1, cpu_count // n if devices[0] == "cpu" else 2)
    procs = []
    for index, dev in enumerate(devices):
        opts = WorkerOptions(
            store_path=str(store.path), model_spec=spec, model_id=model_id, device=dev, dtype=dtype,
            batch_frames=batch_frames or default_batch_frames(dev, summary.batching),
            claim_items=512 if dev.startswith("cuda") else 64,
            loader_workers=loader_workers or (6 if dev.startswith("cuda") else 2),
            lease_seconds=lease_seconds, threads=per_worker_threads, max_trim_frames=max_trim_frames,
            max_items=limit, index=index, device_features=device_features, force_equal=force_equal,
        )
        procs.append(ctx.Process(target=worker_main, args=(opts, inbox, progress, stop_event, claimed_total),
                                 name=f"embstore-worker-{index}", daemon=False))
    writer = ctx.Process(target=writer_main, args=(str(store.path), model_id, run_id, inbox, progress, n),
                         name="embstore-writer", daemon=False)
    writer.start()
    for p in procs:
        p.start()
    bar = _bar(show_progress, left_seconds if not limit else None)
    reported_dead: set[int] = set()
    batches = items_in_batches = real_frames = padded_frames = 0
    worker_errors: list[str] = []
    interrupts = 0
    original_sigint = signal.getsignal(signal.SIGINT)

    def on_sigint(signum, frame):
        nonlocal interrupts
        interrupts += 1
        summary.interrupted = True
        stop_event.set()
        if interrupts > 1:
            for p in procs + [writer]:
                if p.is_alive():
                    p.terminate()

    def handle(message) -> None:
        """Fold one worker/writer report into the run's figures."""
        nonlocal batches, items_in_batches, real_frames, padded_frames
        kind = message[0]
        if kind == "written":
            _, done, failed, seconds = message
            summary.done += done
            summary.failed += failed
            summary.audio_seconds += seconds
            if bar is not None:
                bar.update(seconds)
                elapsed = max(bar.format_dict["elapsed"], 1e-6)  # tqdm's own clock
                bar.set_postfix_str(
                    f"{summary.done} done, {summary.failed} failed, "
                    f"{summary.done / elapsed:.1f} items/s, {summary.audio_seconds / elapsed:.0f}x realtime"
                )
        elif kind == "worker_stats":
            _, _owner, b, items, real, padded = message
            batches += b
            items_in_batches += items
            real_frames += real
            padded_frames += padded
        elif kind == "worker_error":
            worker_errors.append(message[2])
        elif kind == "writer_error":
            summary.error = message[1]
            stop_event.set()

    if threading_is_main():
        signal.signal(signal.SIGINT, on_sigint)
    try:
        while True:
            try:
                handle(progress.get(timeout=0.25))
            except queue.Empty:
                pass
            for index, p in enumerate(procs):
                if index not in reported_dead and not p.is_alive() and p.exitcode not in (0, None):
                    # a killed worker: tell the writer not to wait for it; its claims are freed below
                    reported_dead.add(index)
                    inbox.put(("worker_finished", index))
            if not writer.is_alive():
                break
            if summary.error and all(not p.is_alive() for p in procs):
                break
        # everyone is gone or going: drain what is left of the progress queue
        writer.join(timeout=30)
        for p in procs:
            p.join(timeout=30 if not summary.error else 5)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
        while True:
            try:
                handle(progress.get_nowait())
            except queue.Empty:
                break
    finally:
        if threading_is_main():
            signal.signal(signal.SIGINT, original_sigint)
        if bar is not None:
            bar.close()
        for p in procs + [writer]:
            if p.is_alive():
                p.terminate()
        # whatever a stopped or killed worker still held goes back to pending now
        try:
            refresh_owners_released(store, model_id)
        except sqlite3.OperationalError:
            pass  # a full disk: the next run releases the claims of dead processes itself
    summary.mean_batch_items = round(items_in_batches / batches, 2) if batches else 0.0
    summary.padding_overhead = round(padded_frames / real_frames - 1, 4) if real_frames else 0.0
    if worker_errors and not summary.error and summary.done == 0:
        summary.error = "workers failed: " + worker_errors[0]
    elif worker_errors and not summary.error:
        summary.error = f"{len(worker_errors)} worker(s) failed: {worker_errors[0]}"
    if reported_dead and not summary.error and not summary.interrupted:
        # a worker killed before it could say why (OOM killer, kill -9, crash at start):
        # survivors may have finished its work; if not, the run did not do its job
        left, _ = pending_summary(store.conn, model_id)
        if left:
            codes = ", ".join(f"worker {i}: exit code {procs[i].exitcode}" for i in sorted(reported_dead))
            summary.error = f"{len(reported_dead)} worker(s) died ({codes}) with {left} items left; run again"


def refresh_owners_released(store: Store, model_id: int) -> None:
    from embstore.extract.claims import release_lost

    with store.write() as conn:
        release_lost(conn, model_id, time.time())


def threading_is_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _bar(enabled: bool, total_seconds: float | None):
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    # counts seconds of audio, so the ETA comes from the audio left, not from item counts
    return tqdm(total=round(total_seconds) if total_seconds else None, unit=" s audio", desc="extract",
                file=sys.stderr, smoothing=0.05, dynamic_ncols=True,
                bar_format="{l_bar}{bar}| {n:.0f}/{total_fmt} s of audio [{elapsed}<{remaining}{postfix}]")
