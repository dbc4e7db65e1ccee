"""Runtimes side by side on the same features: torch, ONNX Runtime, OpenVINO; fp32 and bf16.

    python benchmarks/runtimes.py --out rt-out                  # ~10 min on 2 busy cores
    python benchmarks/runtimes.py --out rt-out --quick          # 20 files, 1 thread
    python benchmarks/runtimes.py --out rt-out --models resemblyzer --threads 1

Models: a random WeSpeaker ResNet34 (same FLOPs as the real one) on the Kaldi fbank of
the shared LibriSpeech files, and the default model (Resemblyzer) on its partial mel
windows. Systems, each in its own process, with 1 and 2 threads:
  torch_fp32       eager torch fp32 (the reference runtime)
  torch_bf16       torch CPU autocast bf16 (what `--dtype bf16` does with torch)
  ort_fp32         ONNX Runtime on embstore's ONNX export
  openvino_f32     OpenVINO, INFERENCE_PRECISION_HINT f32
  openvino_bf16    OpenVINO, bf16 (only where the CPU has AMX/AVX512-BF16), the layers
                   before the first strided convolution in f32 (embstore's default)
  openvino_bf16all OpenVINO, bf16 in every layer (`f32_stem=False`)
Each embeds every item alone (as equal-length batching does for distinct lengths), in
`--passes` passes: pass 1 sees every length for the first time, pass 2 has seen them all.
x realtime counts model time only (features are precomputed). Fidelity: cosine of each
item's embedding to fp32 `embed_file` (torch), and EER on the shared trials next to the
reference's EER. Writes results.json and results.md to --out.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import pickle
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared" / "data" / "librispeech-test-other"
SYSTEMS = ("torch_fp32", "torch_bf16", "ort_fp32", "openvino_f32", "openvino_bf16", "openvino_bf16all")


def describe_cpu() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    from embstore.models.openvino import cpu_bf16_support

    ok, why = cpu_bf16_support()
    return f"{os.cpu_count()} CPU cores ({cpu}); bf16: {why if ok else 'not offered: ' + why}"


def versions() -> dict[str, str]:
    out = {}
    for name in ("torch", "onnxruntime", "openvino"):
        try:
            module = __import__(name)
            out[name] = str(getattr(module, "__version__", "?")).split("-")[0]
        except ImportError:
            out[name] = "missing"
    return out


# -- preparation (parent process) -----------------------------------------------------------


def prepare(work: Path, models: list[str], files: int) -> dict[str, dict]:
    """Per model: its spec, the items' features and the fp32 `embed_file` reference."""
    from embstore.models import load
    from tests.wespeaker_dirs import make_wespeaker_dir

    work.mkdir(parents=True, exist_ok=True)
    paths = sorted(SHARED.glob("*/*.flac"))[:files]
    if not paths:
        raise SystemExit(f"no shared data at {SHARED}")
    out = {}
    for label in models:
        if label == "resnet34":
            model_dir = work / "models" / "resnet34-0"
            if not (model_dir / "avg_model.pt").exists():
                make_wespeaker_dir(work / "models", arch="resnet34")
            spec = f"wespeaker:{model_dir}"
        elif label == "resemblyzer":
            spec = "resemblyzer"
        else:
            raise SystemExit(f"unknown model {label!r}: resnet34 or resemblyzer")
        cached = work / f"{label}-{files}.pkl"
        if not cached.exists():
            encoder = load(spec)
            data = {"features": {p.stem: encoder.features(encoder.load(str(p))) for p in paths},
                    "reference": {p.stem: encoder.embed_file(str(p)) for p in paths},
                    "audio_seconds": sum(len(encoder.load(str(p))) / encoder.sample_rate for p in paths)}
            with open(cached, "wb") as f:
                pickle.dump(data, f)
        out[label] = {"spec": spec, "data": str(cached)}
    return out


# -- one system (child process) -------------------------------------------------------------


def _encoder(label: str, spec: str, system: str, threads: int):
    """embed(one item's features) -> its vector, for a system."""
    import torch

    from embstore.models import load

    torch.set_num_threads(threads)
    runtime, _, dtype = system.partition("_")
    options = {"f32_stem": False} if dtype == "bf16all" else {}
    dtype = "bf16" if dtype.startswith("bf16") else "fp32"
    if runtime == "torch":
        encoder = load(spec, dtype=dtype)
    elif runtime == "openvino":
        if label == "resnet34":
            encoder = load("openvino:" + spec.partition(":")[2], dtype=dtype, threads=threads, **options)
        else:
            encoder = load("openvino:resemblyzer", dtype=dtype, threads=threads)
    elif label == "resnet34":
        from embstore.models.openvino import _export

        encoder = load("onnx:" + _export(spec.partition(":")[2], None, None)["onnx"], threads=threads)
    else:
        return _resemblyzer_ort(threads)
    return lambda feats: encoder.embed_batch([feats])[0]


def _resemblyzer_ort(threads: int):
    """Resemblyzer's LSTM export on ONNX Runtime, pooled as the encoder pools."""
    import onnxruntime as ort

    from embstore.models.openvino import _export_resemblyzer
    from embstore.models.resemblyzer import ResemblyzerEncoder

    encoder = ResemblyzerEncoder()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(_export_resemblyzer(encoder.model, encoder.fingerprint), options,
                                   providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda mels: encoder._pool(session.run(None, {name: mels})[0])


def run_system(label: str, spec: str, data_path: str, system: str, threads: int, passes: int) -> dict:
    with open(data_path, "rb") as f:
        data = pickle.load(f)
    started = time.perf_counter()
    embed = _encoder(label, spec, system, threads)
    load_s = time.perf_counter() - started
    ids = sorted(data["features"])
    seconds, embeddings = [], {}
    for _ in range(passes):
        started = time.perf_counter()
        embeddings = {i: embed(data["features"][i]) for i in ids}
        seconds.append(time.perf_counter() - started)
    return {"load_s": round(load_s, 2), "seconds": seconds, "embeddings": embeddings}


def _child(args: tuple, queue) -> None:
    try:
        queue.put(run_system(*args))
    except Exception as exc:  # reported in the table instead of stopping the whole run
        queue.put({"error": f"{type(exc).__name__}: {exc}"})


def in_process(*args) -> dict:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


# -- report -----------------------------------------------------------------------------------


def evaluate(result: dict, data: dict, trials: str | None) -> dict:
    from embstore.eval.fidelity import summary

    audio = data["audio_seconds"]
    entry = {"load_s": result["load_s"], "x_realtime": [round(audio / s, 1) for s in result["seconds"]]}
    entry.update({k: round(v, 7 if "cos" in k else 3) for k, v in
                  summary(result["embeddings"], data["reference"], trials).items()})
    return entry


def markdown(results: dict) -> str:
    lines = [f"Machine: {results['machine']}; {results['versions']}; shared with other jobs while measured.", "",
             (f"{results['files']} files; x realtime = audio seconds / model seconds, one item per forward; "
              "`vs torch` = pass-2 speed over torch_fp32's at the same thread count."), "",
             ("| model | system | threads | x realtime pass 1 | pass 2 | vs torch fp32 | min cos | mean cos | EER % | "
              "ref EER % |"), "|---|---|---|---|---|---|---|---|---|---|"]
    for label, by_threads in results["models"].items():
        for threads, systems in by_threads.items():
            base = systems.get("torch_fp32", {}).get("x_realtime", [None])[-1]
            for system, e in systems.items():
                if "error" in e:
                    lines.append(f"| {label} | {system} | {threads} | {e['error']} ||||||| ")
                    continue
                ratio = f"{e['x_realtime'][-1] / base:.2f}x" if base else "-"
                first, last = e["x_realtime"][0], e["x_realtime"][-1]
                lines.append(f"| {label} | {system} | {threads} | {first} | {last} | {ratio} | {e['min_cos']:.6f} | "
                             f"{e['mean_cos']:.7f} | {e.get('eer_pct', '-')} | {e.get('reference_eer_pct', '-')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--models", default="resnet34,resemblyzer")
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--files", type=int, default=100)
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="20 files, 1 thread")
    args = ap.parse_args()
    if args.quick:
        args.files, args.threads = 20, "1"
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("EMBSTORE_CACHE", str((args.out / "user-cache").absolute()))
    from embstore.models.openvino import cpu_bf16_support

    systems = [s for s in args.systems.split(",") if "bf16" not in s or not s.startswith("openvino") or cpu_bf16_support()[0]]
    prepared = prepare(args.out / "work", args.models.split(","), args.files)
    trials = str(SHARED / "trials.txt") if args.files >= 100 else None  # every trial needs every file
    results: dict = {"machine": describe_cpu(), "versions": versions(), "files": args.files, "models": {}}
    for label, info in prepared.items():
        with open(info["data"], "rb") as f:
            data = pickle.load(f)
        for threads in (int(t) for t in args.threads.split(",")):
            for system in systems:  # interleaved: load drift on a shared machine hits every system alike
                if label == "resemblyzer" and system == "openvino_bf16all":
                    continue  # an LSTM has no convolution stem: openvino_bf16 is bf16 everywhere already
                print(f"{label} {system} threads={threads}", flush=True)
                result = in_process(label, info["spec"], info["data"], system, threads, args.passes)
                entry = result if "error" in result else evaluate(result, data, trials)
                results["models"].setdefault(label, {}).setdefault(str(threads), {})[system] = entry
                print("   ", entry, flush=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    (args.out / "results.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
