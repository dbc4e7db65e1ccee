"""What new input shapes cost OpenVINO, and which strategy keeps it low without losing exactness.

    python benchmarks/openvino_shapes.py --out shapes-out            # ~4 min on 2 cores
    python benchmarks/openvino_shapes.py --out shapes-out --precisions bf16,f32

Model: embstore's ONNX export of a random WeSpeaker ResNet34 (tests/wespeaker_dirs.py),
bf16 in every layer (`f32_stem=False`, the graph the static cases compile) except in
`dynamic_f32_stem` (embstore's default bf16); features: the real fbank of the 100 shared
LibriSpeech files (98 distinct lengths).
Every case runs in its own process (fresh OpenVINO caches, its own peak RSS), one thread.

Cases:
  dynamic        one dynamic-shape model, items one by one: pass 1 (every length new)
                 and pass 2 (every length seen), at several runtime cache sizes
  static         a model reshaped and compiled per length (LRU of compiled models), with
                 and without OpenVINO's CACHE_DIR, pass 1 and 2
  batch          batch size B of equal-length items, a seen shape: x realtime per B
  stream         1,500 items, lengths drawn around the shared files' (866 distinct,
                 as a large corpus has them: repeats), arriving in random vs ascending
                 order, with the runtime cache at embstore's default, 200, or OpenVINO's
                 default 5000; peak RSS growth
  trim           `--max-trim-frames`-style rounding of lengths down to a multiple of q
                 (user opt-in, not exact): speed and cosine to untrimmed
  warm_up        `warm_up(all lengths)` before the pass vs none: where the time goes
Writes results.json and results.md into --out.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared" / "data" / "librispeech-test-other"
OV_DEFAULT_SHAPE_CACHE = 5000  # CPU_RUNTIME_CACHE_CAPACITY when nobody sets it
from embstore.models.openvino import DEFAULT_SHAPE_CACHE  # noqa: E402


def prepare(work: Path) -> tuple[str, str]:
    """(WeSpeaker dir, features .npz): a random ResNet34 and the shared files' fbank."""
    from embstore.models import load
    from tests.wespeaker_dirs import make_wespeaker_dir

    model_dir = work / "models" / "resnet34-0"
    if not (model_dir / "avg_model.pt").exists():
        make_wespeaker_dir(work / "models", arch="resnet34")
    feats_path = work / "fbank.npz"
    if not feats_path.exists():
        encoder = load(f"wespeaker:{model_dir}")
        files = sorted(SHARED.glob("*/*.flac"))
        if not files:
            raise SystemExit(f"no shared data at {SHARED}")
        np.savez(feats_path, **{p.stem: encoder.features(encoder.load(str(p))) for p in files})
    return str(model_dir), str(feats_path)


def _items(feats_path: str) -> list[np.ndarray]:
    data = np.load(feats_path)
    return [data[k] for k in sorted(data.files)]


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _encoder(model_dir: str, precision: str, **options):
    """bf16 in every layer unless asked (`f32_stem`): the static cases compile that graph."""
    from embstore.models import load

    if precision == "bf16":
        options.setdefault("f32_stem", False)
    return load(f"openvino:{model_dir}", dtype="bf16" if precision == "bf16" else "fp32", threads=1, **options)


def _xrt(frames: int, seconds: float) -> float:
    return round(frames / 100 / seconds, 1)


def case_dynamic(model_dir: str, feats_path: str, precision: str, f32_stem: bool = False,
                 shape_cache: int | None = None) -> dict:
    items = _items(feats_path)
    options: dict = {"f32_stem": True} if f32_stem else {}
    if shape_cache is not None:
        options["shape_cache"] = shape_cache
    encoder = _encoder(model_dir, precision, **options)
    frames = sum(len(x) for x in items)
    out = {}
    for name in ("pass1_new_lengths", "pass2_seen_lengths"):
        started = time.perf_counter()
        for x in items:
            encoder.embed_batch([x])
        out[name] = _xrt(frames, time.perf_counter() - started)
    out["distinct_shapes"] = len(encoder.shapes_seen)
    return out


def case_static(model_dir: str, feats_path: str, precision: str, blob_cache: str | None, lru: int = 64) -> dict:
    """Per-length static models: reshape + compile each new length, keep `lru` compiled."""
    import openvino as ov

    from embstore.models.openvino import _export

    onnx = _export(model_dir, None, None)["onnx"]
    items = _items(feats_path)
    frames = sum(len(x) for x in items)
    core = ov.Core()
    if blob_cache:
        core.set_property({"CACHE_DIR": blob_cache})
    config = {"INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": 1, "NUM_STREAMS": 1,
              "PERFORMANCE_HINT": "LATENCY", "ENABLE_CPU_PINNING": False}
    compiled: OrderedDict = OrderedDict()
    out = {}
    for name in ("pass1_new_lengths", "pass2_seen_lengths"):
        compile_s = 0.0
        started = time.perf_counter()
        for x in items:
            key = x.shape[0]
            if key not in compiled:
                t = time.perf_counter()
                model = core.read_model(onnx)
                model.reshape({0: [1, key, x.shape[1]]})
                compiled[key] = core.compile_model(model, "CPU", config).create_infer_request()
                compile_s += time.perf_counter() - t
                if len(compiled) > lru:
                    compiled.popitem(last=False)
            compiled.move_to_end(key)
            compiled[key].infer({0: x[None]})
        out[name] = _xrt(frames, time.perf_counter() - started)
        out[name + "_compile_ms_per_length"] = round(1000 * compile_s / len({len(x) for x in items}), 1)
    return out


def case_batch(model_dir: str, feats_path: str, precision: str) -> dict:
    source = np.concatenate(_items(feats_path)[:10])
    encoder = _encoder(model_dir, precision, max_batch=16)
    out = {}
    for frames in (300, 800, 1500):
        for batch in (1, 2, 4, 8):
            x = np.ascontiguousarray(np.broadcast_to(source[:frames], (batch, frames, source.shape[1])))
            encoder.embed_batch(x)  # the shape once, so only compute is timed
            repeats = max(2, 8 // batch)
            started = time.perf_counter()
            for _ in range(repeats):
                encoder.embed_batch(x)
            out[f"T{frames}_B{batch}"] = _xrt(frames * batch * repeats, time.perf_counter() - started)
    return out


def case_stream(model_dir: str, feats_path: str, precision: str, order: str, shape_cache: int | None) -> dict:
    items = _items(feats_path)
    source = np.concatenate(items[:20])
    rng = np.random.default_rng(0)
    lengths = rng.choice([len(x) for x in items], size=1500) + rng.integers(-300, 300, size=1500)
    lengths = np.clip(lengths, 150, 2000)
    if order == "ascending":
        lengths = np.sort(lengths)
    # None: OpenVINO's own default capacity
    encoder = _encoder(model_dir, precision, shape_cache=OV_DEFAULT_SHAPE_CACHE if shape_cache is None else shape_cache)
    encoder.embed_batch([source[:100]])
    base = _rss_mb()
    peak = 0.0
    started = time.perf_counter()
    for n in lengths:
        encoder.embed_batch([source[:n]])
        peak = max(peak, _rss_mb() - base)
    return {"x_realtime": _xrt(int(lengths.sum()), time.perf_counter() - started), "items": len(lengths),
            "distinct_lengths": len(set(lengths.tolist())), "peak_rss_growth_mb": round(peak)}


def case_trim(model_dir: str, feats_path: str, precision: str, quantum: int) -> dict:
    items = _items(feats_path)
    encoder = _encoder(model_dir, precision)
    exact = [encoder.embed_batch([x])[0] for x in items]
    encoder = _encoder(model_dir, precision)  # fresh shape cache
    trimmed = [x[: len(x) - len(x) % quantum] for x in items]
    started = time.perf_counter()
    rows = [encoder.embed_batch([x])[0] for x in trimmed]
    seconds = time.perf_counter() - started
    cos = [float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) for a, b in zip(rows, exact)]
    return {"x_realtime_pass1": _xrt(sum(len(x) for x in items), seconds),
            "distinct_lengths": len({len(x) for x in trimmed}), "min_cos_to_exact": round(min(cos), 6)}


def case_warm_up(model_dir: str, feats_path: str, precision: str) -> dict:
    items = _items(feats_path)
    encoder = _encoder(model_dir, precision)
    started = time.perf_counter()
    encoder.warm_up(len(x) for x in items)
    warm = time.perf_counter() - started
    started = time.perf_counter()
    for x in items:
        encoder.embed_batch([x])
    run = time.perf_counter() - started
    frames = sum(len(x) for x in items)
    return {"warm_up_s": round(warm, 2), "pass_s": round(run, 2), "x_realtime_pass": _xrt(frames, run),
            "x_realtime_including_warm_up": _xrt(frames, warm + run)}


def _child(fn_name: str, args: tuple, queue) -> None:
    queue.put(globals()[fn_name](*args))


def run_case(fn_name: str, *args) -> dict:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn_name, args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def markdown(results: dict) -> str:
    lines = [f"Machine: {results['machine']} (shared with other jobs while measured)", "",
             "| case | precision | result |", "|---|---|---|"]
    for key, value in results["cases"].items():
        case, precision = key.rsplit("@", 1)
        lines.append(f"| {case} | {precision} | {', '.join(f'{k}={v}' for k, v in value.items())} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--precisions", default="bf16")
    ap.add_argument("--cases", default="dynamic,static,batch,stream,trim,warm_up")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("EMBSTORE_CACHE", str((args.out / "user-cache").absolute()))
    model_dir, feats_path = prepare(args.out / "work")
    from benchmarks.runtimes import describe_cpu

    results: dict = {"machine": describe_cpu(), "cases": {}}
    wanted = args.cases.split(",")
    for precision in args.precisions.split(","):
        plan: list[tuple[str, str, tuple]] = []
        if "dynamic" in wanted:
            plan.append(("dynamic", "case_dynamic", ()))
            for size in (200, OV_DEFAULT_SHAPE_CACHE):
                plan.append((f"dynamic_shape_cache_{size}", "case_dynamic", (False, size)))
            if precision == "bf16":
                plan.append(("dynamic_f32_stem", "case_dynamic", (True,)))
        if "static" in wanted:
            plan.append(("static_no_blob_cache", "case_static", (None,)))
            blobs = str((args.out / "static-blobs").absolute())
            plan.append(("static_blob_cache_cold", "case_static", (blobs,)))
            plan.append(("static_blob_cache_warm", "case_static", (blobs,)))
        if "batch" in wanted:
            plan.append(("batch", "case_batch", ()))
        if "stream" in wanted:
            for order in ("random", "ascending"):
                for cache_size, label in ((None, "ov_default_5000"), (DEFAULT_SHAPE_CACHE, "embstore_default"),
                                          (200, "bounded_200")):
                    plan.append((f"stream_{order}_{label}", "case_stream", (order, cache_size)))
        if "trim" in wanted:
            for q in (8, 32):
                plan.append((f"trim_q{q}", "case_trim", (q,)))
        if "warm_up" in wanted:
            plan.append(("warm_up", "case_warm_up", ()))
        for label, fn, extra in plan:
            print(f"{label} @ {precision}", flush=True)
            results["cases"][f"{label}@{precision}"] = run_case(fn, model_dir, feats_path, precision, *extra)
            print("   ", results["cases"][f"{label}@{precision}"], flush=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    (args.out / "results.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
