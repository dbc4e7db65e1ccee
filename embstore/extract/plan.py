"""What a run will do, decided before any worker starts: devices, runtime, batching,
the model's fingerprint (its rows), the task list, or "nothing to do"."""

from __future__ import annotations

import importlib.util
import os
import time
from dataclasses import dataclass, field
from typing import Callable

from embstore.errors import ExtractionError, ModelError
from embstore.extract.batching import default_batch_frames
from embstore.segments.policy import Cutting, cutting_of
from embstore.extract.messages import WorkerSetup
from embstore.extract.options import ExtractOptions
from embstore.extract.summary import ExtractSummary
from embstore.manifest import tasks
from embstore.manifest.database import Manifest
from embstore.manifest.registry import ModelRecord, models_of_spec
from embstore.models import cards
from embstore.models.base import Capabilities, Encoder, trimmed_fingerprint
from embstore.models.onnx import cached_export, export_onnx
from embstore.models.openvino import cpu_bf16_support, openvino_spec
from embstore.models.registry import load
from embstore.segments.vad import check_available as check_vad_available


@dataclass
class ExtractionPlan:
    spec: str  # the model the user asked for
    worker_spec: str  # what workers load (an ONNX export of it, on CPU)
    model_id: int
    model_key: str
    fingerprint: str
    devices: list[str]
    batching: str  # any | masked | equal
    runtime: str  # torch | onnxruntime
    device_features: bool
    prepared: dict[str, int] = field(default_factory=dict)
    cutting: Cutting | None = None  # speech only or windows (None: whole items)
    # what the workers' model must fingerprint as (None: an export named by it)
    expected_fingerprint: str | None = None
    left: int = 0
    left_seconds: float = 0.0
    # how workers embed windows: the mode the model's fingerprint was made with
    window_mode: str = "auto"

    def summary(self) -> ExtractSummary:
        return ExtractSummary(
            model=self.model_key, fingerprint=self.fingerprint, batching=self.batching, devices=self.devices,
            workers=len(self.devices), prepared=self.prepared, features="device" if self.device_features else "cpu",
            runtime=self.runtime, model_id=self.model_id,
        )


def devices_of(options: ExtractOptions) -> list[str]:
    """One entry per worker process: cuda:N per listed GPU (times --workers), or cpu."""
    per_device = max(1, options.workers or 1)
    if options.gpus:
        try:
            ids = [int(g) for g in options.gpus.split(",") if g.strip() != ""]
        except ValueError:
            raise ExtractionError(f"--gpus takes GPU numbers like 0,1 (got {options.gpus!r})") from None
        if not ids:
            raise ExtractionError("--gpus needs at least one GPU number")
        _check_cuda(max(ids))
        return [f"cuda:{i}" for i in ids] * per_device
    device = options.device
    if device.startswith("cuda"):
        _check_cuda(int(device.split(":")[1]) if ":" in device else 0)
        return [device if ":" in device else "cuda:0"] * per_device
    if device != "cpu":
        raise ExtractionError(f"unknown device {device!r}: use cpu, cuda, cuda:N or --gpus")
    return ["cpu"] * per_device


def _check_cuda(highest: int) -> None:
    import torch

    if not torch.cuda.is_available():
        raise ExtractionError("CUDA requested but no CUDA device is available (use --device cpu)")
    if highest >= torch.cuda.device_count():
        raise ExtractionError(f"GPU {highest} requested but only {torch.cuda.device_count()} visible")


def worker_setup(
    plan: ExtractionPlan, options: ExtractOptions, *, device: str, batch_frames: int | None, claim_items: int,
    loader_workers: int, threads: int, index: int = 0, workers_per_device: int = 1, device_features: bool = False,
) -> WorkerSetup:
    """A worker's setup: what every worker of the run shares (model, dtype, batching,
    leases, cutting) from the plan and the options, and where and how large it runs (the
    keywords), which local processes and cluster actors each decide their own way."""
    return WorkerSetup(
        model_spec=plan.worker_spec, model_id=plan.model_id, device=device, dtype=options.dtype,
        batching=plan.batching, batch_frames=batch_frames, claim_items=claim_items, loader_workers=loader_workers,
        threads=threads, lease_seconds=options.lease_seconds, max_trim_frames=options.max_trim_frames, index=index,
        device_features=device_features, fingerprint=plan.expected_fingerprint, workers_per_device=workers_per_device,
        vad=plan.cutting.vad.method if plan.cutting else "none",
        windows=str(plan.cutting.spec) if plan.cutting and plan.cutting.spec else None,
        window_mode=plan.window_mode,
    )


def worker_setups(plan: ExtractionPlan, options: ExtractOptions) -> list[WorkerSetup]:
    """One setup per local worker process: one per device of the plan, on this machine's cores."""
    cpu_count = os.cpu_count() or 1
    n = len(plan.devices)
    on_gpu = plan.devices[0] != "cpu"
    threads = options.threads or max(1, cpu_count // n if not on_gpu else 2)
    # a GPU worker's loaders feed a fast model: the cores its compute thread leaves
    loaders = options.loader_workers or (max(6, (cpu_count - n) // n) if on_gpu else 2)
    return [
        worker_setup(
            plan, options, device=device,
            # None: the worker sizes it from its device (the parent never touches CUDA)
            batch_frames=options.batch_frames or (None if device.startswith("cuda") else default_batch_frames(device, plan.batching)),
            workers_per_device=plan.devices.count(device),
            claim_items=512 if device.startswith("cuda") else 64,
            loader_workers=loaders, threads=threads, index=index, device_features=plan.device_features,
        )
        for index, device in enumerate(plan.devices)
    ]


def quick_nothing_to_do(manifest: Manifest, options: ExtractOptions) -> ExtractSummary | None:
    """Answer "nothing to do" without loading the model when the store already knows it.

    Only for a spec seen before whose weight files are older than its models row:
    then the fingerprint cannot have changed.
    """
    spec = run_spec(options, devices_of(options))
    cutting = cutting_of(options.vad_method, options.windows)
    rows = [r for r in models_of_spec(manifest.conn, spec) if _same_cutting(r, cutting)]
    if len(rows) != 1:
        return None
    row = rows[0]
    _, _, target = spec.partition(":")
    if target and os.path.exists(target) and _newest_mtime(target) >= _created(row):
        return None
    if tasks.has_open_work(manifest.conn, row.id, options.retry_failed):
        return None
    return ExtractSummary(
        model=manifest.model_key(row), fingerprint=row.fingerprint, batching=row.batching,
        nothing_to_do=True, model_id=row.id,  # the model's failures: the caller's `outcome`
    )


def _same_cutting(row: ModelRecord, cutting: Cutting | None) -> bool:
    """Whether a model was cut the way this run cuts (VAD and windows settings)."""
    cut = row.cutting
    if cutting is None or cut is None:
        return cutting is None and cut is None
    return cut.get("vad") == cutting.vad.as_dict() and cut.get("windows") == (
        cutting.spec.as_dict() if cutting.spec else None)


def _created(row: ModelRecord) -> float:
    return time.mktime(time.strptime(row.created_at[:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone


def _newest_mtime(target: str) -> float:
    if not os.path.isdir(target):
        return os.path.getmtime(target)
    return max(
        (os.path.getmtime(os.path.join(d, f)) for d, _, fs in os.walk(target) for f in fs),
        default=os.path.getmtime(target),
    )


def wants_onnx(caps: Capabilities, options: ExtractOptions, devices: list[str], device_features: bool) -> bool:
    """auto picks ONNX Runtime for exportable torch models on CPU at fp32: the same
    numbers (to 1e-7) ~1.7x faster there. Elsewhere torch (GPU, bf16/fp16, resemblyzer)."""
    suitable = caps.onnx_export and caps.runtime == "torch" and options.dtype == "fp32"
    if options.runtime == "onnx":
        if not suitable:
            raise ExtractionError("--runtime onnx works for wespeaker:DIR models at fp32")
        return True
    # cluster workers load the user's spec on their nodes (the export stays in this store's cache)
    if options.runtime == "torch" or options.ray or not suitable or device_features or devices[0] != "cpu":
        return False
    return importlib.util.find_spec("onnxruntime") is not None


def wants_openvino(options: ExtractOptions, devices: list[str]) -> bool:
    """OpenVINO runs a CPU run when asked (`--runtime openvino`), and bf16 on CPU with
    `--runtime auto`: on AMX/AVX512-BF16 it keeps cosine >= 0.9999 to fp32 at 2.5-3x ONNX
    Runtime fp32, where torch's bf16 autocast does not reach 0.9999. fp32 stays on ONNX
    Runtime (OpenVINO f32 is no faster there, and ORT's rows keep the torch model's key)."""
    if options.runtime not in ("openvino", "auto") or (options.runtime == "auto" and options.dtype != "bf16"):
        return False
    if devices[0] != "cpu" or options.ray:
        if options.runtime == "openvino":
            raise ExtractionError("--runtime openvino runs on the local CPU only (use --device cpu)")
        return False  # bf16 on a GPU: torch autocast
    if options.dtype not in ("fp32", "bf16"):
        raise ExtractionError(f"--runtime openvino computes fp32 or bf16, not {options.dtype}")
    if options.dtype == "bf16":
        supported, why = cpu_bf16_support()
        if not supported:
            raise ExtractionError(f"bf16 is not offered on this CPU: {why}; use fp32, or --runtime torch for"
                                  " torch's slower and less exact bf16 autocast")
    return True


def run_spec(options: ExtractOptions, devices: list[str]) -> str:
    """The spec of the model whose rows this run makes: the user's, or its OpenVINO form
    (a model of its own: runtime and precision are in its fingerprint)."""
    try:
        return openvino_spec(options.spec) if wants_openvino(options, devices) else options.spec
    except ModelError as exc:
        raise ExtractionError(str(exc)) from None


class ModelAtHand:
    """The run's model as the plan needs it: its card (cached per user, see
    `models.cards`) and, only when something needs the network itself, the encoder."""

    def __init__(self, spec: str, options: ExtractOptions):
        self.spec = spec
        self.options = options
        self._encoder: Encoder | None = None
        card = cards.lookup(spec, options.dtype)
        self.card = card if card is not None else cards.remember(spec, options.dtype, self.encoder)

    @property
    def encoder(self) -> Encoder:
        if self._encoder is None:
            # on CPU, once, in the parent: the workers load their own on their devices
            self._encoder = load(self.spec, device="cpu", dtype=self.options.dtype)
        return self._encoder


def _onnx_spec(model: ModelAtHand) -> str:
    """The ONNX export workers load, from the user cache (made once per fingerprint);
    the model itself if the export fails and ONNX was not asked for explicitly."""
    path = cached_export(model.card.fingerprint)
    if os.path.isfile(path):
        return "onnx:" + path
    try:
        return "onnx:" + export_onnx(model.encoder, os.path.dirname(path))
    except Exception as exc:
        if model.options.runtime == "onnx":
            raise ExtractionError(f"cannot run {model.options.spec} with ONNX Runtime: {type(exc).__name__}: {exc}") from None
        return model.spec


def plan_extraction(
    manifest: Manifest, options: ExtractOptions, warm_up: Callable[[], None] | None = None
) -> ExtractionPlan | ExtractSummary:
    """The plan of a run, or the summary of a run with nothing to do. `warm_up` is called
    once the store may have work, before the model is looked at (the supervisor starts
    its fork server there, to import the children's code while this plans)."""
    devices = devices_of(options)
    if options.dtype == "tf32" and devices[0] == "cpu":
        raise ExtractionError("--dtype tf32 is a CUDA mode (TF32 matrix units); on CPU use fp32 or bf16")
    quick = quick_nothing_to_do(manifest, options)
    if quick is not None:
        quick.devices = devices
        return quick
    if warm_up is not None:
        warm_up()
    # what the machine lacks stops the run here, before any claim: never the items' failure
    check_vad_available(options.vad_method)
    spec = run_spec(options, devices)
    model = ModelAtHand(spec, options)
    caps = model.card.capabilities
    if options.features == "device" and not caps.device_features:
        raise ExtractionError(f"{model.card.description['name']} cannot compute its features on the device; use --features cpu")
    if options.features == "device" and options.windows:
        raise ExtractionError("--features device is for whole items: windows are featurised on the CPU loaders")
    device_features = options.features == "device" or (
        options.features == "auto" and caps.device_features and devices[0] != "cpu" and not options.windows
    )
    use_onnx = wants_onnx(caps, options, devices, device_features)
    # ONNX graphs take equal lengths only
    batching = "equal" if use_onnx or (options.batching == "equal" and caps.batching == "masked") else caps.batching
    # the dtype is part of the fingerprint: bf16 rows never mix with fp32 rows
    description = dict(model.card.description)
    if options.max_trim_frames and batching == "equal":  # only equal-length batching trims
        description["frontend"] = dict(description["frontend"], max_trim_frames=options.max_trim_frames)
        description["fingerprint"] = trimmed_fingerprint(description["fingerprint"], options.max_trim_frames)
    cutting = cutting_of(options.vad_method, options.windows)
    if cutting is not None:
        description = cutting.model_description(description, caps.runtime)
    row = manifest.register_model(description)
    environment = tasks.retry_legacy_environment_failures(manifest.conn, row.id)
    prepared = tasks.refresh_tasks(manifest.conn, row.id, model.card.length_rule, model.card.sample_rate,
                                   options.retry_failed)
    prepared["environment"] = environment
    left, left_seconds = tasks.pending_summary(manifest.conn, row.id)
    worker_spec = _onnx_spec(model) if left and use_onnx else spec
    on_onnx = worker_spec.startswith("onnx:")
    return ExtractionPlan(
        spec=spec, worker_spec=worker_spec, model_id=row.id, model_key=manifest.model_key(row),
        fingerprint=row.fingerprint, devices=devices, batching="equal" if on_onnx else batching,
        runtime="onnxruntime" if on_onnx else caps.runtime, device_features=device_features, prepared=prepared,
        left=left, left_seconds=left_seconds, expected_fingerprint=None if on_onnx else model.card.fingerprint,
        cutting=cutting,
        window_mode=row.window_mode,
    )
