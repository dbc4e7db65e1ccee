"""`openvino:FILE.onnx`, `openvino:DIR`, `openvino:campplus`, `openvino:resemblyzer`: models run with OpenVINO
on the CPU, fp32 or bf16 (`pip install embstore[openvino]`).

FILE.onnx is an ONNX export as `onnx:FILE` takes it (one [B, T, F] input, config.yaml
beside it for the frontend). DIR is a WeSpeaker model directory (or `DIR/x.pt`, or the
same with a `wespeaker:` prefix): exported once with `embstore.models.onnx.export_onnx`
into the user cache, and found there again by the checkpoint's bytes without importing
torch (`index/`). `resemblyzer` is the default model with its LSTM exported likewise;
its features and pooling are the torch encoder's.

Precision: `dtype="fp32"` runs with INFERENCE_PRECISION_HINT f32 (ONNX Runtime's numbers
to ~1e-6); `dtype="bf16"` only where the CPU computes bf16 natively (AMX or AVX512-BF16,
`cpu_bf16_support()`), elsewhere a one-line ModelError says why. For a graph with a
strided convolution (the ResNets) bf16 keeps the full-resolution stem, everything before
the first strided convolution, in f32 (`f32_stem`, see `_split_stem`): bf16 everywhere
left 8 of the 100 shared files of a random ResNet34 below cosine 0.9999 to fp32 (worst
0.99981, EER 0.13 points off); with the stem in f32 the worst is 0.99993 and the EER 0.02
points off, at ~0.85x the speed of bf16 everywhere. CAM++ runs bf16 everywhere
(`f32_stem_pays`): there the stem costs half the speed-up and buys no fidelity. Runtime,
precision and that policy are in `frontend`, hence in the fingerprint: bf16 rows are their
own model key. For DIR
and resemblyzer the fingerprint builds on the torch encoder's (weights, frontend,
long-item policy), not on the export's bytes, so another torch version keeps the key.

Shapes (benchmarks/openvino_shapes.py, random ResNet34, bf16, 1 thread, the shared
files' real fbank). The CPU plugin prepares kernels and buffers per input shape at its
first inference and keeps them in a per-model cache (CPU_RUNTIME_CACHE_CAPACITY):
  - a new length costs 10-40 ms, about one more forward: the 100 files (98 lengths, all
    new) run at 0.5-0.55 of the speed of a second pass over them;
  - a static model per length (reshape + compile) costs 110-180 ms per length, even
    importing OpenVINO's blobs, and loses 2-4x: one dynamic model it is;
  - batch size barely matters on the CPU (B=2 +0-5 %, B>=4 up to -10 %), so batches
    are cut into chunks of at most `max_batch` items (default 1; full chunks, then powers
    of two): at most log2(max_batch) + 1 shapes per length, exact, no padding;
  - the plugin's cache keeps ~10 KB per frame of every shape it holds (1.8 GB for 866
    lengths), so `shape_cache` bounds it (default 200); with lengths in ascending order
    (the extraction worker sorts a claim; ordered claims would do the rest) a small
    cache loses nothing, in random order it thrashes (see the benchmark);
  - `warm_up(lengths)` prepares shapes ahead of their items (the time moves, it does
    not go away: worth it only where the CPU would otherwise wait);
  - merging lengths is `--max-trim-frames` (extraction, user opt-in, not exact); never
    padding without a mask.
`shapes_seen` counts the (B, T) shapes an encoder has run.

Start-up (benchmarks/openvino_startup.py): process start to a ready model 0.30-0.35 s
with the user cache (no torch import), 3.4 s cold (torch, export, compile), 2.0 s for the
torch encoder. OpenVINO's blob cache (CACHE_DIR) lives in the user cache per fingerprint;
the first compile holds a lock so concurrent workers compile once, and every imported
blob is checked against a probe output stored by the process that compiled it
(`_compile`: OpenVINO 2026.4 imports the LSTM's blob wrongly for batches > 1).

Wiring note for extraction (`embstore/extract/plan.py`; not wired here):
  - `--runtime openvino` (CPU only; other devices: ExtractionError): the workers' spec is
    `openvino_spec(options.spec)` (resemblyzer, wespeaker:DIR, onnx:FILE; a hub model by
    its downloaded DIR). The run's model is that spec's: `cards.lookup(worker_spec,
    dtype)`, or on a miss load it once in the parent (0.3 s warm) and `cards.remember`;
    its description (runtime, precision in frontend) names the rows. Workers pass
    `threads=`. `cards._files_of` needs two cases for this prefix: `openvino:resemblyzer`
    (the resemblyzer files) and a `wespeaker:` prefix inside the argument.
  - `--dtype bf16` on CPU: `cpu_bf16_support()`; True -> OpenVINO bf16 (torch autocast
    bf16 misses the bar: cosine 0.99970 on ResNet34 and 0.99956 on Resemblyzer); False ->
    ExtractionError with its reason. `--runtime torch --dtype bf16` stays torch autocast.
  - `--runtime auto` on CPU: fp32 -> ONNX Runtime for WeSpeaker/ONNX models as today
    (OpenVINO f32 is no faster, 0.97-1.0x, and ORT's rows keep the torch fp32 key),
    torch for Resemblyzer (ORT 1.09x, OpenVINO f32 0.88x); bf16 -> OpenVINO (ResNet34
    2.5x ORT fp32 with the f32 stem, Resemblyzer 2.9x torch fp32). On CUDA: torch.
  - Order claims by feature length and give each worker its own lengths (e.g. by
    length modulo workers): each distinct length is then prepared by one process only,
    and a small `shape_cache` hits on every repeat.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import io
import json
import os
import sys
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from embstore.errors import ModelError
from embstore.models.base import Capabilities, fingerprint_of
from embstore.models.common import abspath, check_device, safe_name, short_error
from embstore.models.fbank_encoder import (
    DEFAULT_WINDOW_BATCH,
    FbankEncoder,
    long_item_windows,
    read_config,
)
from embstore.models.onnx import export_settings, file_digest
from embstore.models.pretrained import DEFAULT as DEFAULT_PRETRAINED
from embstore.models.pretrained import fetch as fetch_pretrained
from embstore.models.pretrained import find as find_pretrained
from embstore.models.resemblyzer import ResemblyzerEncoder

__all__ = [
    "DEFAULT_MAX_BATCH",
    "DEFAULT_SHAPE_CACHE",
    "OpenVINOEncoder",
    "cpu_bf16_support",
    "from_wespeaker",
    "load_openvino",
    "openvino_spec",
]

DEFAULT_MAX_BATCH = 1
# CPU_RUNTIME_CACHE_CAPACITY (OpenVINO's default 5000): bounds the per-shape memory
# (see the module doc); 200 already misses on the 98 lengths of the shared files
DEFAULT_SHAPE_CACHE = 1000
_PRECISION = {"fp32": "f32", "bf16": "bf16"}
_INSTALL = "pip install embstore[openvino]"


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_bf16_support() -> tuple[bool, str]:
    """(whether OpenVINO bf16 is offered on this CPU, why in a few words)."""
    flags = _cpu_flags()
    native = [f for f in ("amx_bf16", "avx512_bf16") if f in flags]
    if flags and not native:
        return False, "this CPU has neither AMX nor AVX512-BF16 (no amx_bf16/avx512_bf16 in /proc/cpuinfo)"
    try:
        import openvino as ov
    except ImportError:
        return False, f"OpenVINO is not installed ({_INSTALL})"
    try:
        with signal_stack_kept():
            capabilities = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except Exception as exc:  # OpenVINO raises plain RuntimeErrors for plugin problems
        return False, f"OpenVINO cannot query the CPU ({short_error(exc, 120)})"
    if "BF16" not in capabilities:
        return False, "OpenVINO reports no BF16 capability for this CPU"
    return True, f"{' and '.join(native) or 'BF16'} (OpenVINO capability BF16)"


class _SignalStack(ctypes.Structure):
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


@contextlib.contextmanager
def signal_stack_kept() -> Iterator[None]:
    """Puts the calling thread's alternate signal stack back as it was after an OpenVINO call.

    OpenVINO's CPU plugin (2025-2026) installs a stack of its own on the compiling thread
    and later frees stacks out of order, which can leave the thread's current stack freed
    memory: the next signal with a Python handler (Ctrl-C in the main process) then
    segfaults instead of raising KeyboardInterrupt. Restoring the caller's stack after
    each load keeps it the one Python (faulthandler) or nobody installed."""
    libc = _libc()
    if libc is None:
        yield
        return
    before = _SignalStack()
    if libc.sigaltstack(None, ctypes.byref(before)) != 0:
        yield
        return
    try:
        yield
    finally:
        after = _SignalStack()
        if libc.sigaltstack(None, ctypes.byref(after)) == 0 and (after.ss_sp, after.ss_flags) != (before.ss_sp, before.ss_flags):
            if before.ss_flags & _SS_DISABLE:
                before.ss_sp, before.ss_size = None, 0
            libc.sigaltstack(ctypes.byref(before), None)


_SS_DISABLE = 2  # <signal.h> on Linux


@functools.lru_cache(maxsize=1)
def _libc() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.sigaltstack.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        return libc
    except (OSError, AttributeError):
        return None


def _check_dtype(dtype: str, where: str) -> str:
    if dtype == "bf16":
        ok, reason = cpu_bf16_support()
        if not ok:
            raise ModelError(f"{where}: bf16 is not offered here: {reason}")
    elif dtype not in _PRECISION:
        raise ModelError(f"{where}: dtype {dtype} is not supported (fp32 or bf16 with OpenVINO)")
    return _PRECISION[dtype]


def _chunk_sizes(n: int, max_batch: int) -> list[int]:
    """Full chunks of max_batch, the rest in powers of two: few distinct sizes, exact."""
    sizes = [max_batch] * (n // max_batch)
    rest, power = n % max_batch, 1 << max(0, max_batch.bit_length() - 1)
    while rest:
        while power > rest:
            power >>= 1
        sizes.append(power)
        rest -= power
    return sizes


class Runner:
    """A compiled OpenVINO model (one or two stages) and its infer requests:
    `runner(batch)` -> the last output.

    Batches are cut into `_chunk_sizes` chunks (rows are independent, so this is exact),
    which keeps the set of input shapes small; `shapes_seen` counts them. With
    `f32_stem` at bf16, the layers before the first strided convolution run in f32 and
    the rest in bf16 (`_split_stem`); the stem's output tensor is handed to the second
    stage without a copy.
    """

    def __init__(self, path: str, dtype: str, threads: int, max_batch: int, shape_cache: int,
                 cache_key: str | None, where: str, f32_stem: bool = False) -> None:
        try:
            import openvino as ov
        except ImportError:
            raise ModelError(f"{where}: needs OpenVINO ({_INSTALL})") from None
        precision = _check_dtype(dtype, where)
        if int(max_batch) < 1:
            raise ModelError(f"{where}: max_batch must be >= 1")
        self.max_batch = int(max_batch)
        config: dict[str, Any] = {
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": 1,
            "CPU_RUNTIME_CACHE_CAPACITY": int(shape_cache),
            # several worker processes share the cores; pinned threads would pile onto the same ones
            "ENABLE_CPU_PINNING": False,
        }
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        with signal_stack_kept():
            core = ov.Core()
            stages: list[tuple[Any, str]] = [(path, precision)]
            if f32_stem and precision == "bf16":
                stages = _split_stem(core, path, cache_key, where)
            compiled = [_compile(core, model, {**config, "INFERENCE_PRECISION_HINT": p}, cache_key, where)
                        for model, p in stages]
            self._requests = [c.create_infer_request() for c in compiled]
        self.stages = [p for _, p in stages]
        self.inputs = [i.get_partial_shape() for i in compiled[0].inputs]
        self._output = compiled[-1].outputs[-1]
        self.output_dim = self._output.get_partial_shape()[-1]
        self._lock = threading.Lock()  # one set of infer requests: calls from several threads take turns
        self.shapes_seen: dict[tuple[int, ...], int] = {}

    def _infer(self, chunk: np.ndarray) -> np.ndarray:
        data: Any = chunk
        for request in self._requests[:-1]:
            request.infer({0: data})
            data = request.get_output_tensor(0)  # shared memory, no copy
        return np.array(self._requests[-1].infer({0: data})[self._output], dtype=np.float32)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        rows, start = [], 0
        with self._lock:
            for size in _chunk_sizes(len(batch), self.max_batch):
                chunk = batch[start : start + size]
                start += size
                shape = chunk.shape[:2]
                self.shapes_seen[shape] = self.shapes_seen.get(shape, 0) + 1
                rows.append(self._infer(chunk))
        return np.concatenate(rows).reshape(len(batch), -1)


def _split_stem(core: Any, path: str, cache_key: str | None, where: str) -> list[tuple[Any, str]]:
    """[(stem, "f32"), (rest, "bf16")]: the graph cut at the input of its first strided
    convolution, or [(whole, "bf16")] when it has none or the rest would need the input too.

    Why: on a random ResNet34, bf16 everywhere gives cosine 0.99981 to fp32 on the worst
    shared file (8 of 100 below 0.9999, EER 0.13 points off); the full-resolution stem
    in f32 gives 0.99993 (none below, EER 0.02 points off) at ~1.7x the bf16 time.
    With a cache key the two parts are saved as OpenVINO IR in the user cache, so later
    loads compile (or import) them from files without reading the ONNX graph again."""
    folder = None
    if cache_key:
        from embstore.models.cache import entry_dir

        folder = entry_dir("openvino-ir", cache_key)
        if (folder / "rest.xml").is_file():
            return [(str(folder / "stem.xml"), "f32"), (str(folder / "rest.xml"), "bf16")]
        if (folder / "whole").is_file():
            return [(path, "bf16")]
    try:
        parts = _cut_at_first_stride(core, path)
    except Exception as exc:  # OpenVINO's graph API raises RuntimeErrors of its own
        raise ModelError(f"{where}: cannot split the graph for an f32 stem ({short_error(exc)})") from None
    if folder is None:
        return [(parts[0], "f32"), (parts[1], "bf16")] if parts else [(path, "bf16")]
    import openvino as ov

    from embstore.models.cache import fill_once

    def build(tmp: Path) -> None:
        if parts:
            ov.save_model(parts[0], str(tmp / "stem.xml"), compress_to_fp16=False)
            ov.save_model(parts[1], str(tmp / "rest.xml"), compress_to_fp16=False)
        else:
            (tmp / "whole").write_text("no strided convolution: one bf16 stage\n")

    try:
        fill_once(folder, "rest.xml" if parts else "whole", build)
    except OSError:  # an unwritable cache: use the parts from memory
        return [(parts[0], "f32"), (parts[1], "bf16")] if parts else [(path, "bf16")]
    return _split_stem(core, path, cache_key, where)


def _cut_at_first_stride(core: Any, path: str) -> tuple[Any, Any] | None:
    import openvino as ov

    model = core.read_model(path)
    strided = next((op for op in model.get_ordered_ops() if op.get_type_name() == "Convolution"
                    and any(s > 1 for s in op.get_strides())), None)
    if strided is None:
        return None
    cut = strided.input_value(0)
    stem = ov.Model([cut], model.get_parameters(), "stem")
    # the rest from a second copy of the graph: rewiring the first would change the stem
    other = core.read_model(path)
    node = next(op for op in other.get_ordered_ops() if op.get_friendly_name() == cut.get_node().get_friendly_name())
    out = node.output(cut.get_index())
    feed = ov.opset13.parameter(out.get_partial_shape(), out.get_element_type(), name="stem_out")
    for consumer in list(out.get_target_inputs()):
        consumer.replace_source_output(feed.output(0))
    try:
        rest = ov.Model(other.get_results(), [feed], "rest")
    except RuntimeError:  # the rest reads the model input too (shape arithmetic): no split
        return None
    return stem, rest


def _check_cpu(device: str, where: str) -> None:
    check_device(device)
    if device != "cpu":
        raise ModelError(f"{where}: OpenVINO runs on the CPU here, not {device} (use --runtime torch or onnx)")


class OpenVINOEncoder(FbankEncoder):
    # a graph runs equal lengths only; on the CPU only, so no device fbank next to it
    capabilities = Capabilities(batching="equal", runtime="openvino", dtypes=tuple(_PRECISION))

    def __init__(
        self,
        target: str,
        device: str = "cpu",
        dtype: str = "fp32",
        max_frames: int | None = None,
        window_batch: int = DEFAULT_WINDOW_BATCH,
        threads: int = 0,
        max_batch: int = DEFAULT_MAX_BATCH,
        shape_cache: int = DEFAULT_SHAPE_CACHE,
        compiled_cache: bool = True,
        f32_stem: bool = True,
        source_fingerprint: str | None = None,
        name: str | None = None,
        spec: str | None = None,
    ) -> None:
        where = spec or f"openvino:{target}"
        _check_cpu(device, where)
        _check_dtype(dtype, where)
        path = abspath(target)
        if not os.path.isfile(path):
            raise ModelError(f"{where}: no such file")
        # frontend and fingerprint first: the fingerprint keys the compiled-model cache
        self.fbank_config, self.max_frames = export_settings(path, None, where, max_frames)
        self.window_batch = max(1, int(window_batch))
        self.device = device
        self.dtype = dtype
        self.sample_rate = self.fbank_config.sample_rate
        self.spec = spec or f"openvino:{path}"
        self.name = name or safe_name(f"openvino-{os.path.splitext(os.path.basename(path))[0]}-{dtype}")
        self.frontend = {**self.fbank_config.as_dict(), **self._policy(), **_runtime(dtype, source_fingerprint)}
        if dtype == "bf16":
            self.frontend["bf16_layers"] = "after the first strided convolution" if f32_stem else "all"
        self.fingerprint = fingerprint_of(
            None, self.frontend, extra=source_fingerprint.encode() if source_fingerprint else file_digest(path))
        self._run = Runner(path, dtype, threads, max_batch, shape_cache,
                           self.fingerprint if compiled_cache else None, where, f32_stem=f32_stem)
        inputs = self._run.inputs
        if len(inputs) != 1 or inputs[0].rank.get_length() != 3:
            raise ModelError(f"{where}: expected one [B, T, F] input, got {[str(i) for i in inputs]}")
        feat_dim = inputs[0][2]
        if feat_dim.is_static and feat_dim.get_length() != self.fbank_config.num_mel_bins:
            raise ModelError(
                f"{where}: the graph takes {feat_dim.get_length()} features, frontend gives {self.fbank_config.num_mel_bins}")
        if self._run.output_dim.is_static:
            self.dim = int(self._run.output_dim.get_length())
        else:  # symbolic: one short run tells
            self.dim = int(self._forward(np.zeros((1, 200, self.fbank_config.num_mel_bins), np.float32)).shape[-1])

    @property
    def shapes_seen(self) -> dict[tuple[int, ...], int]:
        return self._run.shapes_seen

    @property
    def _torch_device(self) -> Any:
        import torch

        return torch.device("cpu")

    def _forward(self, batch: Any) -> np.ndarray:
        if hasattr(batch, "detach"):  # a torch tensor from features_batch-style callers
            batch = batch.detach().cpu().numpy()
        return self._run(batch)

    def warm_up(self, lengths: Iterable[int]) -> int:
        """Prepare the shapes of batches of these feature lengths before their items come
        (one item per chunk, long items by their windows); returns how many were new."""
        new = 0
        for n in sorted({int(n) for n in lengths if int(n) > 0}):
            for a, b in long_item_windows(n, self.max_frames):
                if (1, b - a) not in self.shapes_seen:
                    self._forward(np.zeros((1, b - a, self.fbank_config.num_mel_bins), np.float32))
                    new += 1
        return new


def _runtime(dtype: str, source_fingerprint: str | None) -> dict[str, Any]:
    """What an OpenVINO encoder adds to its frontend (and so to its fingerprint)."""
    extra: dict[str, Any] = {"runtime": "openvino", "compute_dtype": dtype}
    if source_fingerprint:
        extra["source_fingerprint"] = source_fingerprint
    return extra


def _compile(core: Any, model: Any, config: dict[str, Any], cache_key: str | None, where: str) -> Any:
    """The compiled model (a file path or an ov.Model), through OpenVINO's blob cache in
    the user cache when it can be used. From a path, a cache hit skips reading the graph.

    An imported blob is checked before use: the process that compiled it from the graph
    stored one probe input and its output beside it (`NAME/probe.npz`); an import that
    does not reproduce it (OpenVINO 2026.4's import of Resemblyzer's LSTM blob is right
    at batch 1 and wrong for larger batches: cosine 0.4-0.6) removes the blob, marks the
    entry `NAME/no-blob` and compiles from the graph, as later loads of it do. Blobs
    without a probe (of unknown origin) are removed before compiling."""
    try:
        folder = _blob_folder(cache_key)
        if folder is None:
            return core.compile_model(model, "CPU", config)
        from embstore.models.cache import locked

        name = os.path.splitext(os.path.basename(model))[0] if isinstance(model, str) else model.get_friendly_name()
        stage = folder / name  # one folder per graph: a stage's blobs are removed alone
        probe, refused = stage / "probe.npz", stage / "no-blob"
        with locked(folder):  # one process compiles and writes the blob; the others import it
            if refused.exists():
                return core.compile_model(model, "CPU", config)
            stage.mkdir(exist_ok=True)
            trusted = probe.is_file()
            if not trusted:
                _remove_blobs(stage)  # so the compile below is from the graph
            compiled = core.compile_model(model, "CPU", {**config, "CACHE_DIR": str(stage)})
            if not trusted:
                _write_probe(compiled, probe)
                return compiled
            if _probe_matches(compiled, probe):
                return compiled
            _remove_blobs(stage)
            refused.write_text("an imported blob did not reproduce the probe: compile from the graph\n")
            return core.compile_model(model, "CPU", config)
    except ModelError:
        raise
    except Exception as exc:  # OpenVINO raises plain RuntimeErrors for every graph problem
        raise ModelError(f"{where}: OpenVINO cannot compile it ({short_error(exc)})") from None


def _remove_blobs(folder: Path) -> None:
    for blob in folder.glob("*.blob"):
        blob.unlink()


def _blob_folder(cache_key: str | None) -> Path | None:
    if not cache_key:
        return None
    from embstore.models.cache import entry_dir

    folder = entry_dir("openvino", cache_key)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None  # a read-only home: compile every time, still correct
    return folder


def _probe_input(compiled: Any) -> np.ndarray:
    """A fixed random input the compiled model takes: dynamic axes 3 items of 160 steps
    (more than one item: the broken LSTM import is right at batch 1, wrong above)."""
    shape = [d.get_length() if d.is_static else (3 if i == 0 else max(160, d.get_min_length()))
             for i, d in enumerate(compiled.inputs[0].get_partial_shape())]
    return np.random.default_rng(0).standard_normal(shape).astype(np.float32)


def _run_probe(compiled: Any, x: np.ndarray) -> np.ndarray:
    return np.array(compiled.create_infer_request().infer({0: x})[compiled.outputs[-1]], dtype=np.float32)


def _write_probe(compiled: Any, path: Path) -> None:
    x = _probe_input(compiled)
    buffer = io.BytesIO()
    np.savez(buffer, x=x, y=_run_probe(compiled, x))
    from embstore.paths import write_atomic

    write_atomic(path, buffer.getvalue())


def _probe_matches(compiled: Any, path: Path) -> bool:
    try:
        with np.load(path) as saved:
            x, want = saved["x"], saved["y"]
    except (OSError, ValueError, KeyError):
        return False
    got = _run_probe(compiled, x)
    return got.shape == want.shape and bool(np.allclose(got, want, rtol=1e-3, atol=1e-3 * float(np.abs(want).max())))


# -- specs: `openvino:FILE.onnx`, `openvino:DIR` ----------------------------------------------


def _is_onnx(target: str) -> bool:
    return target.lower().endswith(".onnx")


def _strip(target: str) -> str:
    return target.removeprefix("wespeaker:")


def load_openvino(target: str, device: str = "cpu", dtype: str = "fp32", **options: Any) -> Any:
    """The `openvino:` spec factory: an ONNX file, a WeSpeaker directory/checkpoint, or
    `resemblyzer`."""
    import inspect

    target = _strip(target.strip())
    if target == "resemblyzer":
        return _load_resemblyzer(device, dtype, options)
    name, _, weights = target.partition(":")
    known = find_pretrained(name)
    if known is not None:  # openvino:campplus[:FILE.pt]: the fetched weights' directory
        folder = fetch_pretrained(known, explicit=weights or None)
        return from_wespeaker(str(folder / known.filename), device=device, dtype=dtype, name=known.name,
                              spec=f"openvino:{known.spec}", **options)
    takes = {k: v for k, v in options.items() if _is_onnx(target) or k != "config_overrides"}
    try:  # an option neither form takes: one line, before any export
        inspect.signature(OpenVINOEncoder).bind(target, device=device, dtype=dtype, **takes)
    except TypeError as exc:
        raise ModelError(f"openvino:{target}: bad option ({exc})") from None
    if _is_onnx(target):
        return OpenVINOEncoder(target, device=device, dtype=dtype, **options)
    return from_wespeaker(target, device=device, dtype=dtype, **options)


def _load_resemblyzer(device: str, dtype: str, options: dict[str, Any]) -> Any:
    import inspect

    try:
        inspect.signature(ResemblyzerOpenVINO).bind(device=device, dtype=dtype, **options)
    except TypeError as exc:
        raise ModelError(f"openvino:resemblyzer: bad option ({exc})") from None
    return ResemblyzerOpenVINO(device=device, dtype=dtype, **options)


# the modules whose code decides a torch WeSpeaker encoder's fingerprint: a change to
# them is a different index key, so the index never names a stale fingerprint
_FINGERPRINT_CODE = [str(Path(__file__).resolve().parents[1] / name) for name in (
    "audio/fbank.py", "models/base.py", "models/fbank_encoder.py", "models/wespeaker.py")]


def _source_key(model_dir: str, checkpoint: str, max_frames: int | None, overrides: dict[str, Any] | None) -> str:
    """What the export and the torch fingerprint depend on, from files alone (no torch):
    config, checkpoint, options, and embstore's code that builds the fingerprint."""
    digest = hashlib.sha256()  # SHA-NI: twice blake2b's speed here, and this is on the start-up path
    digest.update(json.dumps({"max_frames": max_frames, "overrides": overrides or {}}, sort_keys=True).encode())
    for path in (os.path.join(model_dir, "config.yaml"), checkpoint, *_FINGERPRINT_CODE):
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()[:32]


def _export(target: str, max_frames: int | None, overrides: dict[str, Any] | None) -> dict[str, Any]:
    """The user cache's export of a WeSpeaker model: {"onnx", "fingerprint", "name"}.

    The index (checkpoint files -> export) lets a known model skip torch entirely; a miss
    loads the torch encoder once and exports it (`export_onnx`, safe when racing)."""
    from embstore.models.cache import entry_dir, read_json, write_json
    from embstore.models.wespeaker import _find_checkpoint

    model_dir, checkpoint = _find_checkpoint(target)
    index = entry_dir("index", _source_key(model_dir, checkpoint, max_frames, overrides)).with_suffix(".json")
    known = read_json(index)
    if isinstance(known, dict) and os.path.isfile(str(known.get("onnx"))):
        return known
    from embstore.models.onnx import export_onnx
    from embstore.models.wespeaker import WeSpeakerEncoder

    torch_encoder = WeSpeakerEncoder(target, max_frames=max_frames, config_overrides=overrides, masked=False)
    try:
        onnx = export_onnx(torch_encoder)
    except Exception as exc:  # the tracer's errors come in many classes; the reason is what matters
        raise ModelError(f"wespeaker:{target}: ONNX export failed ({type(exc).__name__}: {short_error(exc)})") from None
    known = {"onnx": onnx, "fingerprint": torch_encoder.fingerprint, "name": torch_encoder.name}
    write_json(index, known)
    return known


def from_wespeaker(
    target: str,
    device: str = "cpu",
    dtype: str = "fp32",
    max_frames: int | None = None,
    config_overrides: dict[str, Any] | None = None,
    name: str | None = None,
    spec: str | None = None,
    **options: Any,
) -> OpenVINOEncoder:
    """A WeSpeaker directory/checkpoint on OpenVINO, through the user cache's ONNX export."""
    where = spec or f"openvino:{target}"
    check_device(device)
    _check_dtype(dtype, where)  # before an export that would be wasted
    known = _export(target, max_frames, config_overrides)
    if dtype == "bf16" and "f32_stem" not in options:  # the architecture's measured choice
        options["f32_stem"] = f32_stem_pays(target)
    return OpenVINOEncoder(
        known["onnx"], device=device, dtype=dtype, max_frames=max_frames, source_fingerprint=known["fingerprint"],
        name=safe_name(f"{name or known['name']}-openvino-{dtype}"), spec=spec or f"openvino:{abspath(target)}",
        **options,
    )


# WeSpeaker model classes whose bf16 runs with the stem in bf16 too: measured on the real
# CAM++ (AMX, 1 thread): the f32 stem halves the bf16 speed-up (16 x 400 frames: 0.198 s vs
# 0.099 s a batch; fp32 0.321 s) and buys nothing (worst cosine to fp32 over the 100 shared
# files 0.99963 vs 0.99959; 3 s cuts 0.99908 vs 0.99916; EER on the shared trials and
# their 3 s / 1.5 s cuts within 0.03 points of fp32 either way). Its bf16 error comes from
# the whole densely connected body, not the stem: f32 up to the first transition layer
# still leaves 0.99989 (benchmarks/verification.py measures the EER).
_BF16_EVERYWHERE = frozenset({"CAMPPlus"})


def f32_stem_pays(target: str) -> bool:
    """Whether bf16 keeps the stem in f32 for this WeSpeaker model (the ResNets: yes)."""
    from embstore.models.wespeaker import _find_checkpoint

    model_dir, _ = _find_checkpoint(target)
    try:
        model_class = read_config(os.path.join(model_dir, "config.yaml")).get("model")
    except ModelError:  # _export read it already; a vanished file keeps the safe choice
        return True
    return model_class not in _BF16_EVERYWHERE


def openvino_spec(spec: str | None) -> str:
    """The worker spec that runs `wespeaker:DIR`, `onnx:FILE` or `resemblyzer` (also the
    default, None or "") with OpenVINO; ModelError for any other source."""
    spec = (spec or "").strip() or DEFAULT_PRETRAINED.spec
    kind, _, target = spec.partition(":")
    if spec == "resemblyzer" or kind == "openvino":
        return spec if kind == "openvino" else "openvino:resemblyzer"
    if find_pretrained(kind) is not None:
        return f"openvino:{spec}"
    if kind not in ("wespeaker", "onnx") or not target.strip():
        raise ModelError(
            f"{spec}: OpenVINO runs campplus, resemblyzer, wespeaker:DIR and onnx:FILE models "
            "(for a hub model, use wespeaker:DIR on its downloaded directory)")
    return f"openvino:{abspath(target.strip())}"


# -- the default model: Resemblyzer's LSTM on OpenVINO -------------------------------------

# partials per forward: the LSTM gains 4x from batch 1 to 16 and nothing past 64; chunks
# of 64, 32, ... 1 make at most 7 input shapes ever
RESEMBLYZER_MAX_BATCH = 64


class ResemblyzerOpenVINO(ResemblyzerEncoder):
    """`openvino:resemblyzer`: the default model, same features and pooling as
    `resemblyzer`, its LSTM exported once to ONNX (user cache) and run with OpenVINO.

    Why: torch's bf16 autocast of this LSTM gives cosine 0.9996 to fp32 on the shared
    files, below the 0.9999 bar; OpenVINO bf16 gives 0.99993 at ~3x fp32's speed."""

    capabilities = Capabilities(batching="any", runtime="openvino", dtypes=tuple(_PRECISION))

    def __init__(self, device: str = "cpu", dtype: str = "fp32", threads: int = 0, rate: float = 1.3,
                 min_coverage: float = 0.75, max_batch: int = RESEMBLYZER_MAX_BATCH, compiled_cache: bool = True) -> None:
        where = "openvino:resemblyzer"
        _check_cpu(device, where)
        _check_dtype(dtype, where)
        super().__init__(device="cpu", dtype="fp32", rate=rate, min_coverage=min_coverage)
        source = self.fingerprint  # the torch fp32 encoder's: weights and frontend
        onnx = _export_resemblyzer(self.model, source)
        self.dtype = dtype
        self.spec = where
        self.name = f"resemblyzer-ge2e-openvino-{dtype}"
        self.frontend = {**self.frontend, **_runtime(dtype, source)}
        self.fingerprint = fingerprint_of(None, self.frontend, extra=source.encode())
        self._run = Runner(onnx, dtype, threads, max_batch, DEFAULT_SHAPE_CACHE,
                           self.fingerprint if compiled_cache else None, where)

    @property
    def shapes_seen(self) -> dict[tuple[int, ...], int]:
        return self._run.shapes_seen

    def _partial_embeddings(self, mels: np.ndarray) -> np.ndarray:
        return self._run(mels)


def _export_resemblyzer(model: Any, fingerprint: str) -> str:
    from embstore.models.cache import entry_dir, fill_once
    from embstore.models.onnx import trace_to_onnx

    def build(folder: Path) -> None:
        import torch
        from resemblyzer import hparams

        example = torch.zeros(2, hparams.partials_n_frames, hparams.mel_n_channels)
        trace_to_onnx(model, example, str(folder / "model.onnx"), {"mels": {0: "N"}, "embs": {0: "N"}})

    folder = fill_once(entry_dir("onnx", fingerprint), "model.onnx", build)
    return str(folder / "model.onnx")
