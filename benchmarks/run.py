"""The seed's two loops and embstore, same model, same files, same device, one run.

    python benchmarks/run.py --quick --out bench-out            # < 5 min on 2 CPU cores
    python benchmarks/run.py --files 400 --repeats 3 --out bench-out --write BENCHMARKS.md
    python benchmarks/run.py --device cuda --files 20000 --out bench-out

Systems (each run in its own process, repeats interleaved, medians reported; the seed's
loops and embstore are timed end to end, process start to last file written, as a user
waits for them; model_only counts forward passes only):
  seed_original   walk the tree; per file: load, features, model at batch 1, pickle.dump
                  to out/dataset/speaker/stem.pkl synchronously (the seed's first loop)
  seed_optimized  the seed's optimised loop: skip existing .pkl with os.path.exists,
                  batches of 16 in list order, features zero-padded to the batch's
                  longest item (what a plain padded batch does), 6 threads writing .pkl
  model_only      features precomputed in memory, model forward only, same runtime (ONNX
                  Runtime for WeSpeaker on CPU), batching and processes as embstore:
                  the pipeline's ceiling
  model_only_b1   eager fp32, batch 1, one process: runtime gains vs pipeline gains
  embstore        `embstore scan` + `embstore extract` (export-pkl timed separately), defaults
  embstore_torch_masked / embstore_torch_equal
                  WeSpeaker models on torch with masked padded batches vs equal-length
                  buckets: mean batch size, padding and throughput of each
  model_only_bf16 / embstore_bf16
                  the same at `--dtype bf16` (OpenVINO bf16 on an AMX/AVX512-BF16 CPU);
                  embstore_bf16's fraction is of model_only_bf16
  feeder / feeder_device
                  embstore with the null model (`null:256`: real decode, fbank, hash,
                  claims, writer; no network), fbank in the loaders / batched in the
                  compute thread: the pipeline's own ceiling
Fidelity: each system's embedding of each file vs `embed_file` (the per-item reference;
seed_original calls exactly that, so its outputs are the reference).
For Resemblyzer the seed loops compute features with `--seed-frontend`: `librosa` (default)
is embstore's frontend before the vectorised one (the package's VAD decisions and librosa's
mel, as a loop calling resemblyzer runs them; the baseline of earlier BENCHMARKS.md runs),
`embstore` the encoder's own `features`. Both give the same windows (cosine 1.0).
"""

from __future__ import annotations

import time

# the seed's loops are timed from process start, imports and model loading included,
# as embstore's commands are: a user waits for all of it
PROCESS_START = time.perf_counter()

import argparse  # noqa: E402
import json
import os
import pickle
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
# no network in benchmarks: pretrained weights from the user cache (`make setup`) or nowhere
os.environ.setdefault("EMBSTORE_MODEL_SOURCES", "cache,file")
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared" / "data" / "librispeech-test-other"
AUDIO_EXT = (".wav", ".flac")


# -- corpus ---------------------------------------------------------------------------------


def build_corpus(root: Path, files: int, seed: int = 0) -> dict:
    """Half real LibriSpeech utterances (cut from ../shared/data), half VoxCeleb-like
    lengths (4-20 s, mean ~8 s) made by joining one speaker's real utterances. Every
    file's bytes differ, so dedup cannot skip work."""
    import soundfile as sf

    marker = root / f".corpus-{files}-{seed}.json"
    if marker.exists():
        return json.loads(marker.read_text())
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(seed)
    sources: dict[str, list[np.ndarray]] = {}
    if SHARED.exists():
        for spk_dir in sorted(p for p in SHARED.iterdir() if p.is_dir()):
            sources[spk_dir.name] = [sf.read(str(f), dtype="float32")[0] for f in sorted(spk_dir.glob("*.flac"))]
    else:
        from embstore.synthetic import voice

        for s in range(10):
            sources[f"syn{s}"] = [voice(rng.uniform(3, 12), pitch=100 + 15 * s, seed=s * 100 + k) for k in range(10)]
    speakers = sorted(sources)
    n_real = files // 2
    total_seconds = 0.0
    for k in range(n_real):
        spk = speakers[k % len(speakers)]
        utts = sources[spk]
        wav = utts[(k // len(speakers)) % len(utts)]
        if k >= sum(len(u) for u in sources.values()):
            # beyond the 100 originals: a random cut of at least 2 s, never identical bytes
            n = len(wav)
            length = int(rng.integers(min(n, 32000), n + 1))
            start = int(rng.integers(0, n - length + 1))
            wav = wav[start : start + length]
        path = root / "libri" / spk / f"{spk}-{k:06d}.flac"
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(str(path), wav, 16000)
        total_seconds += len(wav) / 16000
    for k in range(files - n_real):
        spk = speakers[k % len(speakers)]
        seconds = float(np.clip(rng.lognormal(np.log(7.2), 0.45), 4.0, 20.0))
        need = int(seconds * 16000)
        parts, have = [], 0
        while have < need:
            utt = sources[spk][int(rng.integers(len(sources[spk])))]
            parts.append(utt)
            have += len(utt)
        joined = np.concatenate(parts)
        start = int(rng.integers(0, len(joined) - need + 1))
        wav = joined[start : start + need]
        path = root / "voxlike" / f"id{spk}" / f"video{k % 7:03d}" / f"{k:05d}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(str(path), wav, 16000, subtype="PCM_16")
        total_seconds += seconds
    info = {"files": files, "audio_seconds": round(total_seconds, 1), "real": n_real, "voxlike": files - n_real,
            "mean_seconds": round(total_seconds / max(files, 1), 2)}
    marker.write_text(json.dumps(info))
    return info


def corpus_files(root: Path) -> list[Path]:
    """The seed's walk: every audio file under root/<dataset>/<speaker>/..., sorted."""
    out = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            if name.endswith(AUDIO_EXT):
                out.append(Path(dirpath) / name)
    return sorted(out)


def rel_id(root: Path, path: Path) -> str:
    return os.path.splitext(str(path.relative_to(root)))[0]


def pkl_path(out_dir: Path, root: Path, path: Path) -> Path:
    parts = path.relative_to(root).parts
    return out_dir / parts[0] / parts[1] / (path.stem + ".pkl")


# -- systems (each runs inside its own process) ---------------------------------------------


def cpu_seconds(who: int = resource.RUSAGE_SELF) -> float:
    """User + system CPU seconds (RUSAGE_CHILDREN: of waited-for descendants). On a shared
    machine they vary far less than wall time; reported next to it."""
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def librosa_seed(encoder, args):
    """path -> Resemblyzer features with librosa's mel for the seed loops (--seed-frontend), else None."""
    if encoder.spec != "resemblyzer" or args.seed_frontend != "librosa":
        return None
    from benchmarks.resemblyzer_frontend import librosa_features

    return lambda path: librosa_features(encoder.load(path))


def system_seed_original(args) -> dict:
    import torch

    from embstore.models import load

    torch.set_num_threads(args.threads * args.workers)  # the whole machine, as the seed ran
    encoder = load(args.model, device=args.device)
    root, out = Path(args.corpus), Path(args.work) / "pkl"
    started = PROCESS_START
    files = corpus_files(root)
    librosa = librosa_seed(encoder, args)
    for path in files:
        emb = encoder.embed_batch([librosa(str(path))])[0] if librosa else encoder.embed_file(str(path))
        target = pkl_path(out, root, path)
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "wb") as f:
            pickle.dump({"embedding": emb, "path": str(path)}, f)
    return {"seconds": time.perf_counter() - started, "cpu_seconds": cpu_seconds(), "files": len(files),
            "embeddings": _collect_pkl(out, root, files)}


def system_seed_optimized(args) -> dict:
    import torch

    from embstore.models import load

    torch.set_num_threads(args.threads * args.workers)
    encoder = load(args.model, device=args.device)
    root, out = Path(args.corpus), Path(args.work) / "pkl"
    started = PROCESS_START
    todo = [p for p in corpus_files(root) if not os.path.exists(pkl_path(out, root, p))]
    saver = ThreadPoolExecutor(max_workers=6)
    librosa = librosa_seed(encoder, args)

    def save(embs: np.ndarray, paths: list[Path]) -> None:
        for emb, path in zip(embs, paths):
            target = pkl_path(out, root, path)
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "wb") as f:
                pickle.dump({"embedding": emb, "path": str(path)}, f)

    pending = []
    for i in range(0, len(todo), 16):
        paths = todo[i : i + 16]
        feats = [librosa(str(p)) if librosa else encoder.features(encoder.load(str(p))) for p in paths]
        embs = padded_batch(encoder, feats)
        pending.append(saver.submit(save, embs, paths))
    for fut in pending:
        fut.result()
    saver.shutdown()
    files = corpus_files(root)
    return {"seconds": time.perf_counter() - started, "cpu_seconds": cpu_seconds(), "files": len(todo),
            "embeddings": _collect_pkl(out, root, files)}


def padded_batch(encoder, feats: list[np.ndarray]) -> np.ndarray:
    """A plain padded batch: zero-pad to the longest and run the model as is."""
    if encoder.batching == "any":  # fixed windows inside: mixing lengths is exact already
        return encoder.embed_batch(feats)
    longest = max(len(f) for f in feats)
    batch = np.zeros((len(feats), longest, feats[0].shape[1]), dtype=np.float32)
    for i, f in enumerate(feats):
        batch[i, : len(f)] = f
    return encoder._forward(batch)


def _shard_forward(payload) -> tuple[float, list[tuple[str, np.ndarray]]]:
    """model_only inside one process: forward passes over precomputed features."""
    spec, device, threads, batch_frames, items, barrier, dtype = payload
    import torch

    from embstore.extract.batching import default_batch_frames
    from embstore.extract.batching import Loaded, plan_batches
    from embstore.models import load

    torch.set_num_threads(threads)
    extra = {"threads": threads} if spec.startswith(("onnx:", "openvino:")) else {}
    encoder = load(spec, device=device, dtype=dtype, **extra)
    batch_frames = batch_frames or default_batch_frames(device, encoder.batching)
    loaded = [Loaded(task=uid, feats=feats) for uid, feats in items]
    batches, _, _ = plan_batches(loaded, encoder.batching, batch_frames)
    if batches:  # warm-up outside the timing, as the pipeline's first batch would be
        encoder.embed_batch([x.feats for x in batches[0][:1]])
    barrier.wait()
    started = time.perf_counter()
    out = []
    for batch in batches:
        vecs = encoder.embed_batch([x.feats for x in batch])
        out.extend((x.task, v) for x, v in zip(batch, vecs))
    return time.perf_counter() - started, out


def system_model_only(args, dtype: str = "fp32") -> dict:
    import multiprocessing

    from embstore.models import load

    encoder = load(args.model, device="cpu")
    root = Path(args.corpus)
    files = corpus_files(root)
    items = [(rel_id(root, p), encoder.features(encoder.load(str(p)))) for p in files]
    workers = args.workers
    spec = runtime_spec(encoder, args, dtype)
    shards = [items[i::workers] for i in range(workers)]
    ctx = multiprocessing.get_context("spawn")
    manager = ctx.Manager()
    barrier = manager.Barrier(workers)
    with ctx.Pool(workers) as pool:
        results = pool.map(
            _shard_forward,
            [(spec, args.device, args.threads, args.batch_frames, shard, barrier, dtype) for shard in shards],
        )
    seconds = max(r[0] for r in results)
    embeddings = {uid: v for _, out in results for uid, v in out}
    return {"seconds": seconds, "files": len(files), "embeddings": embeddings}


def runtime_spec(encoder, args, dtype: str = "fp32") -> str:
    """What embstore's workers run for this model, device and dtype (`--runtime auto`):
    OpenVINO for bf16 on CPU, the ONNX export on CPU for WeSpeaker models at fp32, else
    the model itself."""
    from embstore.extract.options import ExtractOptions
    from embstore.extract.plan import run_spec, wants_onnx
    from embstore.models.onnx import export_onnx

    options = ExtractOptions(model=args.model, dtype=dtype, device=args.device)
    if dtype != "fp32":
        return run_spec(options, [args.device])
    if wants_onnx(encoder.capabilities, options, [args.device], device_features=False):
        return "onnx:" + export_onnx(encoder, str(Path(args.work) / "onnx"))
    return args.model


def system_model_only_b1(args) -> dict:
    import torch

    from embstore.models import load

    torch.set_num_threads(args.threads * args.workers)
    encoder = load(args.model, device=args.device)
    root = Path(args.corpus)
    files = corpus_files(root)
    items = [(rel_id(root, p), encoder.features(encoder.load(str(p)))) for p in files]
    encoder.embed_batch([items[0][1]])
    started = time.perf_counter()
    embeddings = {uid: encoder.embed_batch([f])[0] for uid, f in items}
    return {"seconds": time.perf_counter() - started, "files": len(files), "embeddings": embeddings}


def system_embstore(args, extra_flags: tuple[str, ...] = ()) -> dict:
    root, store = Path(args.corpus), Path(args.work) / "store"
    exe = [sys.executable, "-m", "embstore"]
    extract = exe + ["extract", str(store), "--model", args.model, "--json", *extra_flags]
    if args.device == "cpu":
        extract += ["--device", "cpu", "--workers", str(args.workers), "--threads", str(args.threads)]
    else:
        extract += ["--device", args.device]
    if args.batch_frames:
        extract += ["--batch-frames", str(args.batch_frames)]
    started, cpu_before = time.perf_counter(), cpu_seconds(resource.RUSAGE_CHILDREN)
    subprocess.run(exe + ["scan", str(store), str(root), "--json"], check=True, capture_output=True)
    run = subprocess.run(extract, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    cpu = cpu_seconds(resource.RUSAGE_CHILDREN) - cpu_before
    if run.returncode != 0:
        raise SystemExit(f"embstore extract failed: {run.stderr[-2000:]}")
    summary = json.loads(run.stdout)
    t0 = time.perf_counter()
    again = subprocess.run(extract, capture_output=True, text=True, check=True)
    resume_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    rescan = subprocess.run(exe + ["scan", str(store), str(root), "--json"], check=True, capture_output=True, text=True)
    rescan_s = time.perf_counter() - t0
    export_s = None
    export = subprocess.run(exe + ["export-pkl", str(store), str(Path(args.work) / "export")], capture_output=True)
    if export.returncode == 0:
        t0 = time.perf_counter()
        shutil.rmtree(Path(args.work) / "export")
        subprocess.run(exe + ["export-pkl", str(store), str(Path(args.work) / "export")], check=True,
                       capture_output=True)
        export_s = time.perf_counter() - t0
    import embstore

    with embstore.open(store) as st:
        ids, vectors = st.embeddings()
    return {
        "seconds": seconds, "cpu_seconds": cpu, "files": summary["done"], "embeddings": dict(zip(ids, vectors)),
        "extra": {
            "mean_batch_items": summary["mean_batch_items"], "padding_overhead": summary["padding_overhead"],
            "batching": summary["batching"], "runtime": summary.get("runtime"),
            "resume_nothing_to_do_s": round(resume_s, 3),
            "nothing_to_do": json.loads(again.stdout)["nothing_to_do"], "rescan_unchanged_s": round(rescan_s, 3),
            "rescan_no_changes": json.loads(rescan.stdout)["no_changes"],
            "export_pkl_s": round(export_s, 3) if export_s is not None else None,
            "export_pkl_files_per_s": round(summary["done"] / export_s, 1) if export_s else None,
        },
    }


def _collect_pkl(out: Path, root: Path, files: list[Path]) -> dict[str, np.ndarray]:
    got = {}
    for path in files:
        target = pkl_path(out, root, path)
        with open(target, "rb") as f:  # written by this very benchmark a moment ago
            got[rel_id(root, path)] = np.asarray(pickle.load(f)["embedding"], dtype=np.float32)
    return got


def system_embstore_torch_masked(args) -> dict:
    """embstore on torch with masked padded batches of mixed lengths (issue: exact batching)."""
    return system_embstore(args, ("--runtime", "torch", "--batching", "auto"))


def system_embstore_torch_equal(args) -> dict:
    """embstore on torch with equal-length buckets only: the batching masked replaces."""
    return system_embstore(args, ("--runtime", "torch", "--batching", "equal"))


def system_model_only_bf16(args) -> dict:
    """model_only at bf16 on what embstore runs bf16 with (OpenVINO on an AMX CPU)."""
    return system_model_only(args, dtype="bf16")


def system_embstore_bf16(args) -> dict:
    """embstore `--dtype bf16` (OpenVINO on CPU where the CPU computes bf16)."""
    return system_embstore(args, ("--dtype", "bf16"))


def system_feeder(args) -> dict:
    """The whole pipeline with the null model (real decode, fbank, hash, claims, writer,
    commits; no network): the ceiling the pipeline puts on any model."""
    return system_embstore(args, ("--features", "cpu"))


def system_feeder_device(args) -> dict:
    """The feeder with fbank batched in the compute thread (`--features device`; on this
    device's torch) instead of the loaders."""
    return system_embstore(args, ("--features", "device"))


# only for models with a masked adapter (WeSpeaker); skipped for the others
WESPEAKER_ONLY = {"embstore_torch_masked", "embstore_torch_equal"}
# the null model's systems: the pipeline without a network
FEEDER = {"feeder", "feeder_device"}

SYSTEMS = {
    "seed_original": system_seed_original,
    "seed_optimized": system_seed_optimized,
    "model_only": system_model_only,
    "model_only_b1": system_model_only_b1,
    "model_only_bf16": system_model_only_bf16,
    "embstore": system_embstore,
    "embstore_bf16": system_embstore_bf16,
    "embstore_torch_masked": system_embstore_torch_masked,
    "embstore_torch_equal": system_embstore_torch_equal,
    "feeder": system_feeder,
    "feeder_device": system_feeder_device,
}


# -- the parent: runs systems in subprocesses, measures, compares ---------------------------


class PeakRSS:
    """Peak of the summed RSS of a process tree, sampled every 50 ms."""

    def __init__(self, pid: int):
        self.pid = pid
        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _tree(self) -> list[int]:
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                    children.setdefault(ppid, []).append(int(entry))
                except (OSError, ValueError, IndexError):
                    pass
        out, stack = [], [self.pid]
        while stack:
            p = stack.pop()
            out.append(p)
            stack.extend(children.get(p, []))
        return out

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            total = 0
            for p in self._tree():
                try:
                    with open(f"/proc/{p}/status") as f:
                        for line in f:
                            if line.startswith("VmRSS:"):
                                total += int(line.split()[1])
                except OSError:
                    pass
            self.peak_kb = max(self.peak_kb, total)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak_kb


def run_system(name: str, model: str, args, work: Path) -> dict:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    result_file = work / "result.pkl"
    cmd = [sys.executable, __file__, "--system", name, "--model", model, "--corpus", str(args.corpus_dir),
           "--work", str(work), "--result", str(result_file), "--device", args.device,
           "--threads", str(args.threads), "--workers", str(args.workers)]
    if args.batch_frames:
        cmd += ["--batch-frames", str(args.batch_frames)]
    cmd += ["--seed-frontend", args.seed_frontend]
    whole_machine = name.startswith("seed") or name == "model_only_b1"
    threads = args.threads * args.workers if whole_machine else args.threads
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore", EMBSTORE_CACHE=str(args.user_cache))
    proc = subprocess.Popen(cmd, env=env)
    rss = PeakRSS(proc.pid)
    rc = proc.wait()
    peak = rss.stop()
    if rc != 0:
        raise SystemExit(f"system {name} failed with exit code {rc}")
    with open(result_file, "rb") as f:  # written by our own child process
        result = pickle.load(f)
    result["peak_rss_mb"] = round(peak / 1024, 1)
    return result


def fidelity(embeddings: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> tuple[float, float]:
    ids = sorted(reference)
    missing = [i for i in ids if i not in embeddings]
    if missing:
        raise SystemExit(f"{len(missing)} files missing from a system's output, e.g. {missing[0]}")
    a = np.stack([embeddings[i] for i in ids]).astype(np.float64)
    b = np.stack([reference[i] for i in ids]).astype(np.float64)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    return float(cos.min()), float(cos.mean())


def benchmark_model(label: str, model: str, args, corpus_info: dict) -> dict:
    if model.startswith("null:"):
        systems_here = [n for n in args.systems if n in FEEDER]
    else:
        systems_here = [n for n in args.systems if n not in FEEDER and (n not in WESPEAKER_ONLY or model.startswith("wespeaker:"))]
    runs: dict[str, list[dict]] = {name: [] for name in systems_here}
    for repeat in range(args.repeats):
        for name in systems_here:  # interleaved: drift in the machine hits every system alike
            print(f"[{label}] repeat {repeat + 1}/{args.repeats}: {name}", flush=True)
            runs[name].append(run_system(name, model, args, args.out / "work" / label / name))
    reference = runs["seed_original"][0]["embeddings"] if "seed_original" in runs else None
    systems = {}
    audio = corpus_info["audio_seconds"]
    for name, results in runs.items():
        seconds = statistics.median(r["seconds"] for r in results)
        files = results[0]["files"]
        entry = {
            "seconds": round(seconds, 3), "files": files, "files_per_s": round(files / seconds, 2),
            "x_realtime": round(audio / seconds, 1), "peak_rss_mb": max(r["peak_rss_mb"] for r in results),
            "repeats": len(results), "all_seconds": [round(r["seconds"], 3) for r in results],
            "all_cpu_seconds": [round(r["cpu_seconds"], 2) for r in results if "cpu_seconds" in r],
        }
        if reference is not None:
            entry["fidelity_min_cos"], entry["fidelity_mean_cos"] = (round(x, 7) for x in
                                                                    fidelity(results[0]["embeddings"], reference))
        entry.update(results[0].get("extra", {}))
        systems[name] = entry
    for name, entry in systems.items():
        if "seed_original" in systems:
            entry["speedup_vs_seed_original"] = round(systems["seed_original"]["seconds"] / entry["seconds"], 2)
        # each system against the ceiling of its own precision: bf16 against model_only_bf16
        ceiling = "model_only_bf16" if name.endswith("_bf16") and "model_only_bf16" in systems else "model_only"
        if ceiling in systems:
            entry["fraction_of_model_only"] = round(systems[ceiling]["seconds"] / entry["seconds"], 3)
    return {"model": model, "systems": systems}


def warm_user_cache(spec: str, args) -> None:
    """embstore runs with a model seen before, as a user's second run does: its card and
    ONNX export are in the user cache (first-use costs are `benchmarks/startup.py`'s)."""
    one = args.out / "warm-audio" / "ds" / "spk" / "one.flac"
    if not one.exists():
        one.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(corpus_files(Path(args.corpus_dir))[0], one)
    store = args.out / "warm-store"
    shutil.rmtree(store, ignore_errors=True)
    env = dict(os.environ, EMBSTORE_CACHE=str(args.user_cache))
    seed_pretrained(spec, env)
    exe = [sys.executable, "-m", "embstore"]
    subprocess.run(exe + ["scan", str(store), str(one.parents[2])], check=True, capture_output=True, env=env)
    extract = exe + ["extract", str(store), "--model", spec, "--device", args.device]
    if spec.startswith("null:"):
        extract += ["--features", "cpu"]
    subprocess.run(extract, check=True, capture_output=True, env=env)


def seed_pretrained(spec: str, env: dict[str, str]) -> None:
    """A named pretrained model's (campplus) weights into the benchmark's own user cache
    (`env`), copied from the user's, where `make setup` put them: its systems then never
    download them, and the first-use costs stay out of the timings as for the others."""
    from embstore.models.pretrained import fetch, find

    known = find(spec)
    if known is None:
        return
    weights = fetch(known) / known.filename  # the user's cache (fetched there if it is not yet)
    subprocess.run([sys.executable, "-m", "embstore", "models", "fetch", known.spec, "--from-file", str(weights)],
                   check=True, capture_output=True, env=dict(env, EMBSTORE_MODEL_SOURCES="cache,file"))


def describe_machine(device: str) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    text = f"{os.cpu_count()} CPU cores ({cpu})"
    if device.startswith("cuda"):
        import torch

        text = f"{torch.cuda.get_device_name(0)} + " + text
    import torch

    return text + f", torch {torch.__version__}"


def markdown(results: dict) -> str:
    settings = results["settings"]
    cores = max(1, settings["workers"] * settings["threads"])  # every system gets the same cores
    lines = [f"Device: {results['device']}", "",
             f"Corpus: {results['corpus']['files']} files, {results['corpus']['audio_seconds']} s of audio "
             f"(mean {results['corpus']['mean_seconds']} s; half LibriSpeech cuts, half VoxCeleb-like 4-20 s)", ""]
    for label, block in results["models"].items():
        lines += [f"### {label} (`{block['model']}`)", "",
                  "| system | files/s | x realtime | x realtime per core | speedup vs seed_original "
                  "| fraction of model_only | peak RSS MB | fidelity min cos | mean cos |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, e in block["systems"].items():
            lines.append(
                f"| {name} | {e['files_per_s']} | {e['x_realtime']} | {round(e['x_realtime'] / cores, 1)} "
                f"| {e.get('speedup_vs_seed_original', '')} "
                f"| {e.get('fraction_of_model_only', '')} | {e['peak_rss_mb']} | {e.get('fidelity_min_cos', '')} "
                f"| {e.get('fidelity_mean_cos', '')} |"
            )
        lines.append("")
        for name, emb in block["systems"].items():
            if "mean_batch_items" not in emb:
                continue
            lines.append(
                f"- {name}: {emb.get('batching')} batching on {emb.get('runtime')}, mean batch "
                f"{emb.get('mean_batch_items')} items, padding overhead {emb.get('padding_overhead')}; re-run on "
                f"the finished store {emb.get('resume_nothing_to_do_s')} s (nothing to do: "
                f"{emb.get('nothing_to_do')}); unchanged rescan {emb.get('rescan_unchanged_s')} s; export-pkl "
                f"{emb.get('export_pkl_files_per_s')} files/s."
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a small corpus, one repeat: < 5 min on 2 CPU cores")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--files", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--out", type=Path, default=Path("bench-out"))
    ap.add_argument("--models", default="resnet34,campplus,resemblyzer,feeder",
                    help="resnet34 (random WeSpeaker), campplus (the default model), resemblyzer, feeder (the null "
                         "model), or a spec")
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--workers", type=int, default=None, help="embstore/model_only processes (CPU default: cores)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--batch-frames", type=int, default=None)
    ap.add_argument("--seed-frontend", choices=("librosa", "embstore"), default="librosa",
                    help="Resemblyzer features in the seed loops: librosa's mel (as before) or the encoder's")
    ap.add_argument("--write", type=Path, default=None, help="also write this Markdown file (BENCHMARKS.md)")
    # internal: one system inside a child process
    ap.add_argument("--system", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--corpus", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--work", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.system:
        result = SYSTEMS[args.system](args)
        with open(args.result, "wb") as f:
            pickle.dump(result, f)
        return
    if args.workers is None:
        args.workers = (os.cpu_count() or 1) if args.device == "cpu" else 1
    args.files = args.files or (24 if args.quick else 200)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.systems = [s for s in args.systems.split(",") if s]
    if args.device == "cpu" and any(s.endswith("_bf16") for s in args.systems):
        from embstore.models.openvino import cpu_bf16_support

        supported, why = cpu_bf16_support()
        if not supported:  # embstore refuses bf16 here (one line): measure the rest
            print(f"skipping {', '.join(s for s in args.systems if s.endswith('_bf16'))}: {why}", flush=True)
            args.systems = [s for s in args.systems if not s.endswith("_bf16")]
    args.out.mkdir(parents=True, exist_ok=True)
    args.corpus_dir = args.out / "corpus"
    started = time.monotonic()
    corpus_info = build_corpus(args.corpus_dir, args.files)
    models = {}
    for label in args.models.split(","):
        if label == "resnet34":
            from tests.wespeaker_dirs import make_wespeaker_dir

            model_dir = args.out / "models"
            if not (model_dir / "resnet34-0" / "avg_model.pt").exists():
                make_wespeaker_dir(model_dir, arch="resnet34")
            models[label] = f"wespeaker:{(model_dir / 'resnet34-0').absolute()}"
        elif label == "resemblyzer":
            models[label] = "resemblyzer"
        elif label == "feeder":
            models[label] = "null:256"
        else:
            models[label] = label
    results = {"device": describe_machine(args.device), "corpus": corpus_info,
               "settings": {"workers": args.workers, "threads": args.threads, "repeats": args.repeats,
                            "batch_frames": args.batch_frames, "seed_frontend": args.seed_frontend, "command": " ".join(sys.argv)},
               "models": {}}
    args.user_cache = (args.out / "user-cache").absolute()
    for label, spec in models.items():
        warm_user_cache(spec, args)
        results["models"][label] = benchmark_model(label, spec, args, corpus_info)
    # the shape: the first model's systems at the top level
    first = next(iter(results["models"].values()))
    results["systems"] = first["systems"]
    results["total_seconds"] = round(time.monotonic() - started, 1)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    md = markdown(results)
    (args.out / "results.md").write_text(md)
    print(md)
    if args.write:
        args.write.write_text(md)


if __name__ == "__main__":
    main()
