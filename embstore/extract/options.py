"""`ExtractOptions`: every option of `embstore extract`, validated in one place."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from embstore.errors import ExtractionError, VadError, WindowSpecError
from embstore.models.common import DTYPES
from embstore.models.registry import DEFAULT_SPEC
from embstore.segments.vad import vad_config
from embstore.segments.windows import parse_window_spec

RUNTIME_CHOICES = ("auto", "torch", "onnx", "openvino")
FEATURE_CHOICES = ("auto", "cpu", "device")
BATCHING_CHOICES = ("auto", "equal")


@dataclass(frozen=True)
class ExtractOptions:
    """What the user asked of a run; `ExtractOptions(**kwargs)` raises ExtractionError
    (one line) for any bad value."""

    model: str | None = None  # spec; None = the default model
    device: str = "cpu"  # cpu, cuda, cuda:N (ignored with gpus)
    gpus: str | None = None  # "0,1": one worker per listed GPU
    workers: int | None = None  # processes (per GPU with gpus)
    batch_frames: int | None = None  # feature frames per batch; None = from the device
    loader_workers: int | None = None  # loader threads per worker
    dtype: str = "fp32"
    retry_failed: bool = False
    limit: int | None = None  # at most this many items in the run
    max_trim_frames: int = 0  # equal batching: group lengths within K frames by trimming
    lease_seconds: float = 120.0
    progress: bool = False  # a bar on stderr (when it is a terminal)
    threads: int | None = None  # compute threads per worker
    features: str = "auto"  # where fbank runs: auto, cpu, device
    runtime: str = "auto"  # auto, torch, onnx
    batching: str = "auto"  # auto (the model's exact mode) or equal
    ray: str | None = None  # a Ray cluster's address, or "auto": extract on the cluster
    path_map: tuple[str, ...] = ()  # "OLD=NEW": where nodes that lack a root OLD find it
    windows: str | None = None  # "WINDOW:SHIFT" seconds: one embedding per window (a window model)
    vad: str | None = None  # silero | webrtc | none; None: silero with windows, none without

    def __post_init__(self) -> None:
        self._choice("dtype", DTYPES)
        self._choice("features", FEATURE_CHOICES)
        self._choice("runtime", RUNTIME_CHOICES)
        self._choice("batching", BATCHING_CHOICES)
        for name in ("workers", "batch_frames", "loader_workers", "limit", "threads"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ExtractionError(f"--{name.replace('_', '-')} must be a whole number >= 1 (got {value!r})")
        if not isinstance(self.max_trim_frames, int) or self.max_trim_frames < 0:
            raise ExtractionError("--max-trim-frames must be >= 0")
        if not self.lease_seconds > 0:
            raise ExtractionError(f"the lease must be positive (got {self.lease_seconds})")
        self._check_cluster()
        self._check_windows()

    def _check_windows(self) -> None:
        try:
            if self.windows is not None:
                object.__setattr__(self, "windows", str(parse_window_spec(self.windows)))
            if self.vad is not None:
                object.__setattr__(self, "vad", vad_config(self.vad).method)
        except (WindowSpecError, VadError) as exc:
            raise ExtractionError(str(exc)) from None
        if self.windows is not None and (self.batching == "equal" or self.max_trim_frames):
            raise ExtractionError("--batching equal and --max-trim-frames are for whole items: full windows"
                                  " already have equal lengths")

    @property
    def vad_method(self) -> str:
        """The VAD this run uses: silero for windows unless told, none for whole items."""
        return self.vad or ("silero" if self.windows else "none")

    def _check_cluster(self) -> None:
        if self.ray is not None and not str(self.ray).strip():
            raise ExtractionError("--ray takes a cluster address (host:port, ray://host:port) or auto")
        object.__setattr__(self, "path_map", tuple(self.path_map or ()))
        for entry in self.path_map:
            old, sep, new = str(entry).partition("=")
            if not sep or not old.startswith("/") or not new.startswith("/"):
                raise ExtractionError(f"--path-map takes OLD=NEW with two absolute paths (got {entry!r})")
        if self.path_map and self.ray is None:
            raise ExtractionError("--path-map is for cluster runs (--ray): local workers see the store's roots")
        if self.ray is None:
            return
        if self.gpus or self.device != "cpu":
            raise ExtractionError("--gpus and --device are for local runs: with --ray there is one worker per GPU "
                                  "of the cluster (or --workers N CPU workers)")
        if self.runtime == "onnx":
            raise ExtractionError("--runtime onnx is for local runs: cluster workers run the model with torch")

    def path_pairs(self) -> list[tuple[str, str]]:
        """--path-map as (OLD, NEW) pairs, longest OLD first (the most specific wins)."""
        pairs = [tuple(e.partition("=")[::2]) for e in self.path_map]
        return sorted(((o.rstrip("/") or "/", n.rstrip("/") or "/") for o, n in pairs), key=lambda p: -len(p[0]))

    def _choice(self, name: str, allowed: tuple[str, ...]) -> None:
        value = getattr(self, name)
        if value not in allowed:
            raise ExtractionError(f"unknown {name} {value!r}: use {', '.join(allowed)}")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "ExtractOptions":
        """Options from keyword arguments (the Python API); an unknown name is a one-line error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ExtractionError(f"unknown extract option(s): {', '.join(unknown)}")
        return cls(**kwargs)

    @property
    def spec(self) -> str:
        return (self.model or "").strip() or DEFAULT_SPEC

    def record(self) -> dict[str, Any]:
        """What the `runs` table keeps of the options (the display switch aside)."""
        out = asdict(self)
        out.pop("progress")
        out["model"] = self.spec
        return out
