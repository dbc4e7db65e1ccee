"""The one-call GPU check: CUDA tests, then a timed GPU benchmark, into `--out`.

    python benchmarks/device/gpu_check.py --out OUT                    # on the GPU machine
    python benchmarks/device/gpu_check.py --out OUT --device cpu --quick   # anywhere, seconds

`benchmarks/device/run.sh` installs the carried wheels and calls this; README.md beside
it gives the device tool's command. Phases, each with its own time limit, each recorded in
`results.json` (and `results.md`, a section to paste into BENCHMARKS.md) as soon as it
ends, so one that fails or overruns leaves the others' numbers:

  env           torch/CUDA/cuDNN, the GPU's name (torch and nvidia-smi), every package
                embstore imports, matrix-product ceilings (fp32, tf32, bf16)
  pytest_cuda   tests/test_cuda.py
  corpus        N files of 4-20 s (VoxCeleb-like lengths), half FLAC half WAV, cut from
                real LibriSpeech speech (.gpu-data/ or ../shared/data; synthetic voices
                when neither is there), made in parallel on every core; each file's bytes
                differ, so dedup skips nothing
  models        random-weight WeSpeaker ResNet34 and ECAPA-TDNN (c512) directories
  model:LABEL   per model, in one child process: fp32 `embed_file` per item (the
                reference), fp32 on CPU against it, then per dtype (fp32, tf32, bf16):
                fidelity of masked mixed-length batches against the fp32 reference and
                against the dtype's own `embed_file`, and model-only speed (forward passes
                alone on the batches the pipeline forms: claims of 512 items in scan order,
                masked batches within the default frame budget; and the same items in
                length order)
  e2e:...       `embstore scan` + `embstore extract --device D --dtype X --workers W` from
                the scan's process start to the last row committed, with nvidia-smi
                sampling GPU busy % every 200 ms; x realtime from the start and in steady
                state (first to last commit), fractions of model-only, start-up, batches,
                padding, and the stored rows against the reference
  report        the issue's GPU targets, met or not

A total budget (`--budget`, default 360 s for everything after pytest_cuda) sizes the
corpus and each end-to-end run from the time left and the speed measured so far; runs
that no longer fit are recorded as skipped.
"""

from __future__ import annotations

import time

PROCESS_START = time.time()

import argparse  # noqa: E402
import datetime
import json
import os
import platform
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SPEECH_CANDIDATES = (REPO / ".gpu-data" / "librispeech-test-other", REPO.parent / "shared" / "data" / "librispeech-test-other")
RATE = 16000
# arch name in tests/wespeaker_dirs.ARCHS per label
# (tiny: a 64-channel ECAPA, for the CPU smoke run)
ARCH_OF = {"resnet34": "resnet34", "ecapa": "ecapa_c512", "tiny": "ecapa"}
# the GPU targets
TARGET_X_REALTIME = 10_000.0
TARGET_FRACTION = 0.9
TARGET_BUSY = 90.0
TARGET_MASKED_COS = 0.99999
PACKAGES = ("numpy", "scipy", "torch", "zarr", "numcodecs", "soundfile", "sqlite-utils", "kaldi-native-fbank",
            "soxr", "resemblyzer", "webrtcvad-wheels", "webrtcvad", "librosa", "kaldiio", "wespeaker-unofficial",
            "onnxruntime", "click", "pyyaml")
MODULES = ("zarr", "numcodecs", "soundfile", "sqlite_utils", "kaldi_native_fbank", "soxr", "webrtcvad", "librosa",
           "kaldiio", "resemblyzer", "yaml", "scipy")


def log(message: str) -> None:
    stamp = time.strftime("%H:%M:%S")
    print(f"[{stamp} +{time.time() - PROCESS_START:6.1f}s] {message}", flush=True)


def short(text: str, limit: int = 1500) -> str:
    text = text.strip()
    return text if len(text) <= limit else "..." + text[-limit:]


# -- the record: results.json and results.md after every phase ------------------------------


class Record:
    """Every phase's status and numbers; written out whenever a phase ends."""

    def __init__(self, out: Path, args: argparse.Namespace, planned: list[str]):
        self.out = out
        self.data: dict[str, Any] = {
            "check": "embstore GPU check",
            "started_at": datetime.datetime.now().isoformat(timespec="seconds"),
            "argv": sys.argv[1:],
            "device": args.device,
            "quick": args.quick,
            "budget_s": args.budget,
            "machine": {},
            "phases": {name: {"status": "pending"} for name in planned},
            "targets": [],
        }

    @property
    def phases(self) -> dict[str, dict[str, Any]]:
        return self.data["phases"]

    def plan(self, name: str) -> None:
        self.phases.setdefault(name, {"status": "pending"})

    def run(self, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Run one phase: its dict becomes the record; an exception is a failed phase."""
        self.plan(name)
        log(f"phase {name}: start")
        started = time.time()
        entry: dict[str, Any] = {"status": "running"}
        self.phases[name] = entry
        try:
            result = fn() or {}
            entry.update(result)
            if entry.get("status") == "running":
                entry["status"] = "ok"
        except Exception as exc:  # one phase's failure must leave the others' results
            entry["status"] = "failed"
            entry["error"] = f"{type(exc).__name__}: {exc}"
            entry["traceback"] = short(traceback.format_exc(), 3000)
        entry["seconds"] = round(time.time() - started, 2)
        log(f"phase {name}: {entry['status']} in {entry['seconds']} s"
            + (f" ({entry.get('error') or entry.get('reason')})" if entry["status"] != "ok" else ""))
        self.write()
        return entry

    def skip(self, name: str, reason: str) -> None:
        self.phases[name] = {"status": "skipped", "reason": reason}
        log(f"phase {name}: skipped ({reason})")
        self.write()

    def write(self) -> None:
        self.data["written_at"] = datetime.datetime.now().isoformat(timespec="seconds")
        try:
            self.data["targets"] = targets(self.data)
        except Exception as exc:
            self.data["targets"] = [{"target": "targets could not be computed", "value": str(exc), "met": None}]
        self.data["elapsed_s"] = round(time.time() - PROCESS_START, 1)
        tmp = self.out / "results.json.tmp"
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        os.replace(tmp, self.out / "results.json")
        try:
            text = markdown(self.data)
        except Exception as exc:  # the JSON is the record; the Markdown must not lose it
            text = f"(results.md could not be rendered: {type(exc).__name__}: {exc})\n"
        (self.out / "results.md").write_text(text)


class Budget:
    """The benchmark's time: deadlines for phases, shares of what is left."""

    def __init__(self, seconds: float):
        self.end = time.time() + seconds

    def left(self) -> float:
        return max(0.0, self.end - time.time())

    def share(self, fraction: float, floor: float, cap: float | None = None) -> float:
        value = max(floor, self.left() * fraction)
        return min(value, cap) if cap else value


# -- child processes: a phase that can hang or poison CUDA runs in its own ------------------


def run_child(cmd: list[str], timeout: float, log_file: Path | None = None, env: dict | None = None) -> dict[str, Any]:
    """Run cmd in a new process group; on timeout the whole group is killed (spawned
    workers included). Returns rc, output tail, seconds, timed_out."""
    started = time.time()
    with tempfile.TemporaryFile(mode="w+") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, cwd=REPO, env=env or child_env(),
                                start_new_session=True, text=True)
        timed_out = False
        try:
            proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            timed_out = True
            kill_group(proc)
        sink.seek(0)
        output = sink.read()
    if log_file is not None:
        with open(log_file, "a") as f:
            f.write(f"\n===== {' '.join(cmd)} (rc {proc.returncode}, {time.time() - started:.1f} s)\n{output}")
    return {"rc": proc.returncode, "output": output, "seconds": round(time.time() - started, 2), "timed_out": timed_out}


def kill_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def child_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore")
    paths = [str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


def child_json(args: argparse.Namespace, kind: str, job: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run `--child KIND` with a job file; its result file, however far it got."""
    work = Path(args.work)
    job_file, result_file = work / f"job-{kind}-{job.get('label', '')}.json", work / f"result-{kind}-{job.get('label', '')}.json"
    result_file.unlink(missing_ok=True)
    job_file.write_text(json.dumps(job))
    run = run_child([sys.executable, __file__, "--child", kind, "--job", str(job_file), "--result", str(result_file)],
                    timeout, Path(args.out) / "children.log")
    result = json.loads(result_file.read_text()) if result_file.exists() else {}
    if run["timed_out"]:
        result.update(status="timeout", reason=f"killed after {timeout:.0f} s")
    elif run["rc"] != 0:
        result.update(status="failed", error=f"exit code {run['rc']}: {short(run['output'], 1200)}")
    return result


class ChildResult:
    """A child's result file, rewritten after every step so a kill loses only the last."""

    def __init__(self, path: str):
        self.path = Path(path)
        self.data: dict[str, Any] = {}

    def mark(self, step: str) -> None:
        """When each step ended, in seconds since the child started: where its time went."""
        self.data.setdefault("timeline", {})[step] = round(time.time() - PROCESS_START, 2)
        self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, default=str))
        os.replace(tmp, self.path)


# -- env --------------------------------------------------------------------------------------


def nvidia_smi() -> dict[str, Any]:
    """The GPUs as nvidia-smi names them; the extra fields in a query of their own, so
    one the driver does not know cannot cost the name."""
    if shutil.which("nvidia-smi") is None:
        return {"available": False}
    out: dict[str, Any] = {"available": True, "gpus": []}
    for query in ("name,driver_version,memory.total", "pstate,clocks.sm,clocks.max.sm,power.limit,temperature.gpu"):
        try:
            run = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as exc:
            out.setdefault("errors", []).append(str(exc))
            continue
        if run.returncode != 0:
            out.setdefault("errors", []).append(short(run.stdout + run.stderr, 300))
            continue
        for k, line in enumerate(l for l in run.stdout.splitlines() if l.strip()):
            if k >= len(out["gpus"]):
                out["gpus"].append({})
            out["gpus"][k].update(zip(query.split(","), (v.strip() for v in line.split(","))))
    out["available"] = bool(out["gpus"])
    return out


def phase_env(args: argparse.Namespace, record: Record) -> dict[str, Any]:
    smi = nvidia_smi()
    child = child_json(args, "env", {"device": args.device, "quick": args.quick}, timeout=120)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    machine = {"cpu": cpu, "cpu_count": os.cpu_count(), "python": platform.python_version(), "nvidia_smi": smi,
               **{k: v for k, v in child.items() if k not in ("status", "error", "reason")}}
    gpu = child.get("device_name") or (smi.get("gpus") or [{}])[0].get("name")
    machine["described"] = (f"{gpu} ({child.get('memory_gib', '?')} GiB, driver "
                            f"{(smi.get('gpus') or [{}])[0].get('driver_version', '?')}) + " if gpu else "") + \
        f"{os.cpu_count()} CPU cores ({cpu}), torch {child.get('torch', '?')}, CUDA {child.get('torch_cuda')}, " \
        f"cuDNN {child.get('cudnn')}, Python {platform.python_version()}"
    record.data["machine"] = machine
    failed_imports = {m: e for m, e in (child.get("imports") or {}).items() if e != "ok"}
    status = child.get("status") or ("failed" if failed_imports else "ok")
    if args.device.startswith("cuda") and not child.get("cuda_available"):
        status, child["error"] = "failed", child.get("error") or "torch sees no CUDA device"
    return {"status": status, "failed_imports": failed_imports, "error": child.get("error"),
            "described": machine["described"]}


def child_env_info(job: dict[str, Any], result: ChildResult) -> None:
    from importlib import metadata

    out = result.data
    out["versions"] = {}
    for name in PACKAGES:
        try:
            out["versions"][name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    out["imports"] = {}
    for module in MODULES:
        try:
            __import__(module)
            out["imports"][module] = "ok"
        except Exception as exc:
            out["imports"][module] = f"{type(exc).__name__}: {exc}"
    try:
        from embstore.models._wespeaker_import import import_wespeaker_models

        import_wespeaker_models()
        out["imports"]["wespeaker.models"] = "ok"
    except Exception as exc:
        out["imports"]["wespeaker.models"] = f"{type(exc).__name__}: {exc}"
    result.save()
    import torch

    out.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available(),
               cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
               cudnn_allow_tf32_default=torch.backends.cudnn.allow_tf32)
    result.save()
    if not (job["device"].startswith("cuda") and torch.cuda.is_available()):
        return
    props = torch.cuda.get_device_properties(0)
    out.update(device_name=torch.cuda.get_device_name(0), capability=f"{props.major}.{props.minor}",
               sm_count=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1),
               device_count=torch.cuda.device_count())
    result.save()
    out["matmul_tflops"] = matmul_ceilings(torch, 4096 if job.get("quick") else 8192)
    result.save()


def matmul_ceilings(torch: Any, n: int) -> dict[str, float]:
    """TFLOP/s of an n^3 matrix product on random data (median of 10 after 3 warm-ups)."""
    from embstore.models.common import autocast

    rates = {}
    a = torch.randn(n, n, device="cuda")
    b = torch.randn(n, n, device="cuda")
    for dtype in ("fp32", "tf32", "bf16"):
        x, y = (a.bfloat16(), b.bfloat16()) if dtype == "bf16" else (a, b)
        times = []
        with autocast("cuda", "fp32" if dtype == "bf16" else dtype):
            for k in range(13):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                torch.matmul(x, y)
                end.record()
                torch.cuda.synchronize()
                if k >= 3:
                    times.append(start.elapsed_time(end) / 1000)
        rates[dtype] = round(2 * n**3 / float(np.median(times)) / 1e12, 1)
    return rates


# -- pytest -----------------------------------------------------------------------------------


def phase_pytest(args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", "tests/test_cuda.py"]
    run = run_child(cmd, args.pytest_timeout)
    (Path(args.out) / "pytest_cuda.txt").write_text(run["output"])
    last = next((line for line in reversed(run["output"].splitlines()) if " in " in line and ("passed" in line or
                 "skipped" in line or "failed" in line or "error" in line)), "")
    entry = {"rc": run["rc"], "summary": last.strip("= "), "tail": short(run["output"], 1500)}
    if run["timed_out"]:
        return {**entry, "status": "timeout", "reason": f"killed after {args.pytest_timeout:.0f} s"}
    if run["rc"] != 0:
        return {**entry, "status": "failed", "error": last.strip("= ") or f"exit code {run['rc']}"}
    return {**entry, "status": "ok"}


# -- corpus -----------------------------------------------------------------------------------

_SOURCES: dict[str, list[np.ndarray]] | None = None


def speech_sources(speech_dir: str | None) -> dict[str, list[np.ndarray]]:
    """Real utterances per speaker from a LibriSpeech folder, or synthetic voices."""
    global _SOURCES
    if _SOURCES is not None:
        return _SOURCES
    import soundfile as sf

    sources: dict[str, list[np.ndarray]] = {}
    if speech_dir:
        for spk in sorted(p for p in Path(speech_dir).iterdir() if p.is_dir()):
            utts = [sf.read(str(f), dtype="float32")[0] for f in sorted(spk.rglob("*.flac"))]
            if utts:
                sources[f"s{spk.name}"] = utts
    if not sources:
        from embstore.synthetic import voice

        for s in range(10):
            sources[f"syn{s}"] = [voice(float(3 + (s + k) % 9), pitch=100 + 15 * s, seed=s * 100 + k) for k in range(10)]
    _SOURCES = sources
    return sources


def make_shard(job: dict[str, Any]) -> dict[str, Any]:
    """One shard of the corpus: ROOT/shardNN/dsNN/<speaker>/<file>.flac|wav."""
    import soundfile as sf

    sources = speech_sources(job["speech"])
    speakers = sorted(sources)
    shard, lo, hi = job["shard"], job["min_s"], job["max_s"]
    rng = np.random.default_rng(job["seed"] * 1000 + shard)
    base = Path(job["root"]) / f"shard{shard:02d}" / f"ds{shard:02d}"
    total = 0.0
    for k in range(job["files"]):
        spk = speakers[(k + shard) % len(speakers)]
        if shard == 0 and k < job["fidelity"]:
            seconds = float(rng.uniform(max(1.0, lo / 4), hi))  # the fidelity set: widely mixed lengths
        else:
            seconds = float(np.clip(rng.lognormal(np.log(job["mean_s"]), 0.45), lo, hi))
        need = int(seconds * RATE)
        # the speaker's utterances in a random order, cut at a random start with a random
        # gain: no two files share bytes, so dedup skips nothing
        joined = np.concatenate([sources[spk][i] for i in rng.permutation(len(sources[spk]))])
        if len(joined) < need:
            joined = np.tile(joined, need // len(joined) + 1)
        start = int(rng.integers(0, len(joined) - need + 1))
        wav = joined[start : start + need] * float(rng.uniform(0.5, 1.0))
        path = base / spk / f"{spk}-{shard:02d}-{k:05d}.{'flac' if k % 2 == 0 else 'wav'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(str(path), wav, RATE, subtype="PCM_16")
        total += need / RATE
    return {"shard": shard, "files": job["files"], "audio_s": total}


def corpus_plan(args: argparse.Namespace) -> dict[str, Any]:
    if args.quick:
        return {"files": args.files or 12, "shards": 2, "min_s": 1.5, "max_s": 4.0, "mean_s": 2.5, "fidelity": 6}
    files = args.files or 20_000
    return {"files": files, "shards": max(1, min(32, files // 200)), "min_s": 4.0, "max_s": 20.0, "mean_s": 7.2,
            "fidelity": 48}


def phase_corpus(args: argparse.Namespace, budget: Budget, state: dict[str, Any]) -> dict[str, Any]:
    import multiprocessing

    plan = corpus_plan(args)
    root = Path(args.work) / "corpus"
    speech = args.speech or next((str(p) for p in SPEECH_CANDIDATES if p.is_dir()), None)
    key = json.dumps({**plan, "speech": speech, "seed": 0}, sort_keys=True)
    marker = root / "corpus.json"
    if marker.exists() and json.loads(marker.read_text()).get("key") == key:
        info = json.loads(marker.read_text())
        state["corpus"] = info
        return {**summary_of_corpus(info), "reused": True}
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    per_shard = max(1, plan["files"] // plan["shards"])
    jobs = [{"shard": s, "files": per_shard, "root": str(root), "speech": speech, "seed": 0, **{k: plan[k] for k in (
        "min_s", "max_s", "mean_s", "fidelity")}} for s in range(plan["shards"])]
    deadline = time.time() + (args.corpus_timeout or budget.share(0.15, 20, 60))
    done: list[dict[str, Any]] = []
    method = "fork" if "torch" not in sys.modules else "spawn"
    pool = multiprocessing.get_context(method).Pool(min(os.cpu_count() or 1, len(jobs)))
    try:
        pending = pool.imap_unordered(make_shard, jobs)
        for _ in jobs:
            try:
                done.append(pending.next(timeout=max(0.1, deadline - time.time())))
            except multiprocessing.TimeoutError:
                break
    finally:
        pool.terminate()
        pool.join()
    finished = {d["shard"] for d in done}
    for job in jobs:  # a shard cut off mid-way would be a partial, odd-sized unit
        if job["shard"] not in finished:
            shutil.rmtree(root / f"shard{job['shard']:02d}", ignore_errors=True)
    if 0 not in finished:
        raise RuntimeError("not even the first shard was generated in time")
    shards = sorted(done, key=lambda d: d["shard"])
    info = {"key": key, "root": str(root), "speech": speech or "synthetic voices (embstore.synthetic.voice)",
            "shards": [{"path": str(root / f"shard{d['shard']:02d}"), "files": d["files"], "audio_s": round(d["audio_s"], 1)}
                       for d in shards], "plan": plan}
    fid_dir = root / "shard00"
    fid = sorted(p for p in fid_dir.rglob("*") if p.suffix in (".flac", ".wav"))
    by_index = sorted(fid, key=lambda p: p.stem.rsplit("-", 1)[1])[: plan["fidelity"]]
    info["fidelity"] = [{"path": str(p), "uid": str(p.relative_to(fid_dir).with_suffix(""))} for p in by_index]
    marker.write_text(json.dumps(info))
    state["corpus"] = info
    status = "ok" if len(shards) == len(jobs) else "partial"
    return {**summary_of_corpus(info), "status": "ok", "complete": status == "ok",
            "shards_planned": len(jobs)}


def summary_of_corpus(info: dict[str, Any]) -> dict[str, Any]:
    files = sum(s["files"] for s in info["shards"])
    audio = sum(s["audio_s"] for s in info["shards"])
    return {"files": files, "audio_s": round(audio, 1), "audio_h": round(audio / 3600, 2), "shards": len(info["shards"]),
            "mean_s": round(audio / max(files, 1), 2), "speech": info["speech"], "root": info["root"]}


# -- models -----------------------------------------------------------------------------------


def model_labels(args: argparse.Namespace) -> list[str]:
    if args.models:
        labels = [m for m in args.models.split(",") if m]
    elif args.quick:
        labels = ["tiny" if args.device == "cpu" else "resnet34"]
    else:
        labels = ["resnet34", "ecapa"]
    unknown = [m for m in labels if m not in ARCH_OF]
    if unknown:
        raise SystemExit(f"unknown model label(s) {unknown}: use {', '.join(ARCH_OF)}")
    return labels


def phase_models(args: argparse.Namespace, state: dict[str, Any]) -> dict[str, Any]:
    job = {"labels": model_labels(args), "dir": str(Path(args.work) / "models"), "mel_bins": args.mel_bins}
    result = child_json(args, "models", job, timeout=180)
    state["specs"] = result.get("specs", {})
    return result


def child_models(job: dict[str, Any], result: ChildResult) -> None:
    from tests.wespeaker_dirs import make_wespeaker_dir

    result.data["specs"] = {}
    for label in job["labels"]:
        path = Path(job["dir"]) / label
        if not (path / "avg_model.pt").exists():
            make_wespeaker_dir(Path(job["dir"]), arch=ARCH_OF[label], name=label, num_mel_bins=job["mel_bins"])
        result.data["specs"][label] = f"wespeaker:{path}"
        result.save()


# -- model phase (child): fidelity per dtype, model-only speed --------------------------------


def dtypes_for(device: str) -> list[str]:
    return ["fp32", "tf32", "bf16"] if device.startswith("cuda") else ["fp32", "bf16"]


def claim_groups(items: list[Any], claim_items: int, claim_frames: int) -> list[list[Any]]:
    """The claims a worker takes in scan order: up to `claim_items` items and about
    `claim_frames` frames each (manifest.tasks.claim_batch's rule)."""
    groups: list[list[Any]] = []
    current: list[Any] = []
    frames = 0
    for x in items:
        n = max(int(x.feats.shape[0]), 1)
        if current and (len(current) >= claim_items or frames + n > claim_frames):
            groups.append(current)
            current, frames = [], 0
        current.append(x)
        frames += n
    if current:
        groups.append(current)
    return groups


def child_model(job: dict[str, Any], result: ChildResult) -> None:
    import torch

    from embstore.extract.batching import Loaded, plan_batches
    from embstore.extract.batching import default_batch_frames
    from embstore.models import load
    from embstore.vectors import cosine_rows

    device, spec, out = job["device"], job["spec"], result.data
    cuda = device.startswith("cuda")
    # the allocator setting a pipeline worker runs with (extract/worker.py)
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    deadline = time.time() + job["seconds"]
    # on a CPU one thread: the smoke run's machine is small and often shared, and
    # oversubscribed threads there cost more than they give
    torch.set_num_threads(min(16, os.cpu_count() or 1) if cuda else 1)
    out.update(label=job["label"], spec=spec, device=device, steps={}, dtypes={})
    # the frame budget a pipeline worker gets, computed as the run's parent computes it
    # (there, too, a CUDA context and little else is on the GPU)
    ref = load(spec, device=device, dtype="fp32")
    batch_frames = default_batch_frames(device, ref.batching)
    claim_items = 512 if cuda else 64
    out.update(batching=ref.batching, batch_frames=batch_frames, claim_items=claim_items)
    result.mark("loaded")

    fid = job["fidelity"]
    fid_feats = [ref.features(ref.load(f["path"])) for f in fid]
    reference = np.stack([ref.embed_file(f["path"]) for f in fid])
    np.save(job["reference_file"], reference)
    out["steps"]["reference"] = {"items": len(fid), "frames": [int(min(len(f) for f in fid_feats)),
                                                               int(max(len(f) for f in fid_feats))]}
    result.mark("reference")
    if cuda:
        cpu = load(spec, device="cpu")
        k = min(8, len(fid))
        on_cpu = np.stack([cpu.embed_file(f["path"]) for f in fid[:k]])
        out["steps"]["device_vs_cpu_fp32"] = cos_stats(cosine_rows(reference[:k], on_cpu))
        del cpu
        result.mark("cpu_reference")
    # (torch's flop counter costs seconds to import: not in a smoke run)
    out["gflop_per_audio_s"] = None if job["quick"] else flop_rate(ref, device)
    result.mark("flops")

    # the model-only sample: decoded once, features as the pipeline computes them
    sample = job["sample"]
    wavs = decode_all([s["path"] for s in sample])
    audio_s = sum(len(w) for w in wavs) / ref.sample_rate
    if ref.capabilities.device_features and cuda:
        feats = ref.device_features(wavs, batch_frames)
    else:
        feats = [ref.features(w) for w in wavs]
    del wavs
    items = [Loaded(task=s["uid"], feats=f) for s, f in zip(sample, feats)]
    out["sample"] = {"items": len(items), "audio_s": round(audio_s, 1)}
    result.mark("sample_features")
    for k, dtype in enumerate(job["dtypes"]):
        entry: dict[str, Any] = {}
        out["dtypes"][dtype] = entry
        if time.time() > deadline:
            entry["status"] = "skipped: the phase's time ran out"
            result.save()
            continue
        try:
            enc = ref if dtype == "fp32" else load(spec, device=device, dtype=dtype)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            batched = np.asarray(enc.embed_batch(fid_feats))  # one masked batch of mixed lengths
            entry["fidelity_vs_fp32_embed_file"] = cos_stats(cosine_rows(batched, reference))
            own = reference if dtype == "fp32" else np.stack([enc.embed_file(f["path"]) for f in fid])
            entry["masked_vs_own_embed_file"] = cos_stats(cosine_rows(batched, own))
            result.mark(f"{dtype}_fidelity")
            # this dtype's share of the phase's time, half of it for each order
            share = (deadline - time.time()) / (len(job["dtypes"]) - k)
            entry["model_only"] = time_forward(enc, claim_groups(items, claim_items, 2 * batch_frames), batching=enc.batching,
                                               batch_frames=batch_frames, audio_s=audio_s, plan_batches=plan_batches,
                                               time_left=share / 2, gflop=out.get("gflop_per_audio_s"),
                                               passes=job["passes"])
            result.save()
            ordered = sorted(items, key=lambda x: x.feats.shape[0])
            if time.time() > deadline:  # the claim-order number is the one the runs need
                entry["model_only_length_order"] = {"skipped": "no time left in the phase"}
            else:
                entry["model_only_length_order"] = time_forward(
                    enc, claim_groups(ordered, claim_items, 2 * batch_frames), batching=enc.batching,
                    batch_frames=batch_frames, audio_s=audio_s, plan_batches=plan_batches,
                    time_left=share / 2, gflop=out.get("gflop_per_audio_s"), passes=job["passes"])
            result.mark(f"{dtype}_model_only")
            if cuda:
                entry["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            entry["status"] = "ok"
        except Exception as exc:
            entry["status"] = f"failed: {type(exc).__name__}: {short(str(exc), 400)}"
            entry["traceback"] = short(traceback.format_exc(), 2000)
        finally:
            if dtype != "fp32":
                enc = None  # noqa: F841 - frees the GPU copy before the next dtype
            if cuda:
                torch.cuda.empty_cache()
        result.save()


def time_forward(enc: Any, claims: list[list[Any]], *, batching: str, batch_frames: int, audio_s: float,
                 plan_batches: Callable, time_left: float, gflop: float | None, passes: int) -> dict[str, Any]:
    """Forward passes alone over the batches plan_batches forms per claim; the best of
    up to `passes` passes (fewer when time is short), after a warm-up batch."""
    batches, real, padded = [], 0, 0
    for claim in claims:
        b, r, p = plan_batches(list(claim), batching, batch_frames)
        batches += b
        real += r
        padded += p
    enc.embed_batch([x.feats for x in batches[0]])  # warm-up: kernels, allocator
    runs = []
    started = time.time()
    while len(runs) < passes:
        t0 = time.perf_counter()
        for batch in batches:
            enc.embed_batch([x.feats for x in batch])  # returns NumPy: synchronised
        runs.append(time.perf_counter() - t0)
        if time.time() - started + runs[-1] > time_left:
            break
    best = min(runs)
    x_rt = audio_s / best
    entry = {"seconds": round(best, 4), "all_seconds": [round(r, 4) for r in runs], "x_realtime": round(x_rt, 1),
             "items_per_s": round(sum(len(b) for b in batches) / best, 1), "batches": len(batches),
             "mean_batch_items": round(sum(len(b) for b in batches) / len(batches), 1),
             "padding_overhead": round(padded / real - 1, 4) if real else 0.0}
    if gflop:
        entry["tflops"] = round(x_rt * gflop / 1000, 1)
    return entry


def cos_stats(cos: np.ndarray) -> dict[str, float]:
    cos = np.nan_to_num(np.asarray(cos, dtype=np.float64), nan=0.0)
    return {"min": round(float(cos.min()), 7), "mean": round(float(cos.mean()), 7)}


def flop_rate(enc: Any, device: str) -> float | None:
    """GFLOP per second of audio: torch's flop counter over one 8 s item."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    try:
        x = torch.zeros(1, 800, enc.fbank_config.num_mel_bins, device=device)
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            enc.model(x)
        return round(counter.get_total_flops() / 8.0 / 1e9, 3)
    except Exception:
        return None


def decode_all(paths: list[str]) -> list[np.ndarray]:
    from concurrent.futures import ThreadPoolExecutor

    from embstore.audio.io import load_for_model

    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        return list(pool.map(lambda p: load_for_model(p, RATE), paths))


def remember_model(state: dict[str, Any], label: str, result: dict[str, Any], ref_file: Path) -> None:
    """What the end-to-end runs use of a model phase: model-only speeds, the reference."""
    state.setdefault("model_only", {})[label] = {d: (e.get("model_only") or {}).get("x_realtime")
                                                  for d, e in (result.get("dtypes") or {}).items()}
    if ref_file.exists():
        state.setdefault("reference", {})[label] = str(ref_file)


def reuse_model(args: argparse.Namespace, label: str, state: dict[str, Any]) -> str:
    """A skipped model phase: an earlier run's numbers from the work folder, if any."""
    result_file = Path(args.work) / f"result-model-{label}.json"
    if not result_file.exists():
        return "not asked for"
    remember_model(state, label, json.loads(result_file.read_text()), Path(args.work) / f"reference-{label}.npy")
    return f"not asked for; the end-to-end runs use the model-only speeds and reference of {result_file}"


def phase_model(args: argparse.Namespace, label: str, state: dict[str, Any], seconds: float) -> dict[str, Any]:
    corpus = state["corpus"]
    files = [p for s in corpus["shards"] for p in sorted(Path(s["path"]).rglob("*")) if p.suffix in (".flac", ".wav")]
    sample_size = 12 if args.quick else min(len(files), args.sample)
    sample = [{"path": str(p), "uid": str(p)} for p in files[:sample_size]]
    ref_file = Path(args.work) / f"reference-{label}.npy"
    ref_file.unlink(missing_ok=True)
    job = {"label": label, "spec": state["specs"][label], "device": args.device, "dtypes": dtypes_for(args.device),
           "fidelity": corpus["fidelity"], "sample": sample, "seconds": seconds * 0.85,
           "reference_file": str(ref_file), "quick": args.quick, "passes": 1 if args.quick else 3}
    result = child_json(args, "model", job, timeout=seconds + 30)
    remember_model(state, label, result, ref_file)
    bad = [d for d, e in (result.get("dtypes") or {}).items() if not str(e.get("status", "")).startswith("ok")]
    if bad and "status" not in result:
        result["status"] = "partial"
        result["reason"] = f"dtype(s) not measured: {', '.join(bad)}"
    return result


# -- end to end -------------------------------------------------------------------------------


class GpuSampler:
    """nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used -lms 200, in the
    background; samples are (unix time, busy %, MiB)."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float, float]] = []
        self.proc: subprocess.Popen | None = None
        self.thread: threading.Thread | None = None
        self.error: str | None = None
        # NVML (the library nvidia-smi reads) sampled alongside: a cross-check, and the
        # numbers if nvidia-smi's output never arrives
        self.nvml_samples: list[tuple[float, float, float]] = []
        self._stop = threading.Event()
        self._nvml: threading.Thread | None = None

    def start(self) -> "GpuSampler":
        if shutil.which("nvidia-smi") is None:
            self.error = "nvidia-smi not found"
            return self
        cmd = ["nvidia-smi", "--query-gpu=timestamp,utilization.gpu,memory.used", "--format=csv,noheader,nounits",
               "-lms", "200"]
        if shutil.which("stdbuf"):
            cmd = ["stdbuf", "-oL"] + cmd  # line-buffered: every sample arrives as it is taken
        try:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError as exc:
            self.error = str(exc)
            return self
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        self._nvml = threading.Thread(target=self._sample_nvml, daemon=True)
        self._nvml.start()
        return self

    def _sample_nvml(self) -> None:
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:
            return
        try:
            while not self._stop.wait(0.2):
                rates = pynvml.nvmlDeviceGetUtilizationRates(handle)
                used = pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20
                self.nvml_samples.append((time.time(), float(rates.gpu), float(used)))
        except Exception:
            return
        finally:
            try:
                pynvml.nvmlShutdown()
            except Exception:
                pass

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            parts = [p.strip() for p in line.split(",")]
            if len(parts) < 3:
                continue
            try:
                stamp = datetime.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
            except ValueError:
                stamp = time.time()
            try:
                self.samples.append((stamp, float(parts[1]), float(parts[2])))
            except ValueError:
                continue

    def stop(self) -> None:
        self._stop.set()
        if self._nvml is not None:
            self._nvml.join(timeout=3)
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.thread is not None:
            self.thread.join(timeout=3)

    def window(self, start: float, end: float) -> dict[str, Any]:
        out = window_stats(self.samples, start, end)
        nvml = window_stats(self.nvml_samples, start, end)
        if not out["samples"] and nvml["samples"]:
            return {**nvml, "source": "nvml (nvidia-smi gave no samples)"}
        if not out["samples"]:
            out["error"] = self.error or "no samples in the window"
        else:
            out["source"] = "nvidia-smi"
            if nvml["samples"]:
                out["nvml_mean_busy_pct"] = nvml["mean_busy_pct"]
        return out


def window_stats(samples: list[tuple[float, float, float]], start: float, end: float) -> dict[str, Any]:
    inside = [s for s in samples if start <= s[0] <= end]
    if not inside:
        return {"samples": 0}
    busy = np.array([s[1] for s in inside])
    return {"samples": len(inside), "mean_busy_pct": round(float(busy.mean()), 1),
            "median_busy_pct": round(float(np.median(busy)), 1),
            "share_of_samples_at_90_pct_or_more": round(float((busy >= 90).mean()), 3),
            "max_memory_used_mib": max(s[2] for s in inside)}


def e2e_configs(args: argparse.Namespace) -> list[tuple[str, str, int]]:
    labels = model_labels(args)
    first = labels[0]
    if args.quick:  # on a CPU one run: two workers are the same code with another flag
        return [(first, "fp32", 1), (first, "bf16", 1), (first, "fp32", 2)] if args.device != "cpu" else [(first, "fp32", 1)]
    # in priority order: runs the budget cannot fit any more are skipped from the end
    configs = [(first, "fp32", 1), (first, "bf16", 1), (first, "bf16", 2), (first, "fp32", 2)]
    configs += [(label, "fp32", 1) for label in labels[1:]]
    return configs + ([(first, "tf32", 1)] if args.device.startswith("cuda") else [])


def e2e_name(config: tuple[str, str, int]) -> str:
    label, dtype, workers = config
    return f"e2e:{label}:{dtype}:w{workers}"


def pick_shards(corpus: dict[str, Any], seconds: float, rate: float, startup: float) -> list[dict[str, Any]]:
    """As many shards as the predicted rate processes in the time given (at least one)."""
    per_shard = max(corpus["shards"][0]["audio_s"], 1.0)
    n = int(max(0.0, seconds - startup) * rate / per_shard)
    return corpus["shards"][: max(1, min(len(corpus["shards"]), n))]


def phase_e2e(args: argparse.Namespace, config: tuple[str, str, int], state: dict[str, Any], seconds: float) -> dict[str, Any]:
    label, dtype, workers = config
    corpus, spec = state["corpus"], state["specs"][label]
    learned = state.setdefault("e2e_rate", {})
    model_only = (state.get("model_only", {}).get(label) or {}).get(dtype)
    # predicted speed: what an earlier run of this model and dtype reached, else a guess
    # below model-only (the pipeline cannot beat it)
    rate = learned.get((label, dtype)) or (0.6 * model_only if model_only else (300.0 if args.device == "cpu" else 3000.0))
    startup = state.get("e2e_startup", 8.0 if args.device == "cpu" else 20.0)
    shards = [corpus["shards"][0]] if args.quick else pick_shards(corpus, seconds * 0.75, rate, startup)
    store = Path(args.work) / "stores" / e2e_name(config).replace(":", "-")
    shutil.rmtree(store, ignore_errors=True)
    store.parent.mkdir(parents=True, exist_ok=True)
    exe = [sys.executable, "-m", "embstore"]
    scan_cmd = exe + ["scan", str(store), *[s["path"] for s in shards], "--json", "--jobs", str(min(8, os.cpu_count() or 1))]
    extract_cmd = exe + ["extract", str(store), "--model", spec, "--device", args.device, "--dtype", dtype,
                         "--workers", str(workers), "--runtime", "torch", "--json"]
    entry: dict[str, Any] = {"model": label, "dtype": dtype, "workers": workers, "shards": len(shards),
                             "files": sum(s["files"] for s in shards), "audio_s": round(sum(s["audio_s"] for s in shards), 1),
                             "predicted_x_realtime": round(rate, 1), "command": " ".join(extract_cmd[2:])}
    logs = Path(args.out) / "children.log"
    sampler = GpuSampler().start()
    t0 = time.time()
    try:
        scan = run_child(scan_cmd, seconds, logs)
        entry["scan_s"] = scan["seconds"]
        if scan["rc"] != 0:
            return {**entry, "status": "failed", "error": f"scan: exit {scan['rc']}: {short(scan['output'], 800)}"}
        t_extract = time.time()
        extract = run_child(extract_cmd, max(5.0, seconds - (t_extract - t0)), logs)
        t_end = time.time()
    finally:
        sampler.stop()
    entry["extract_wall_s"] = round(t_end - t_extract, 2)
    summary = last_json(extract["output"])
    if summary:
        entry["summary"] = {k: summary.get(k) for k in ("done", "failed", "audio_seconds", "seconds", "mean_batch_items",
                                                        "padding_overhead", "batching", "features", "runtime", "devices",
                                                        "error", "x_realtime")}
    entry.update(commit_times(store, t0, t_extract))
    steady = (entry.get("first_commit_s") or 0.0, entry.get("last_commit_s") or 0.0)
    entry["gpu_busy_steady"] = sampler.window(t0 + steady[0], t0 + steady[1])
    entry["gpu_busy_extract"] = sampler.window(t_extract, t_end)
    if model_only:
        entry["model_only_x_realtime"] = model_only
        for key in ("x_realtime_from_start", "x_realtime_steady"):
            if entry.get(key):
                entry[key.replace("x_realtime", "fraction_of_model_only")] = round(entry[key] / model_only, 3)
    entry["fidelity_vs_fp32_embed_file"] = stored_fidelity(store, state, label, corpus)
    if entry.get("x_realtime_steady"):
        learned[(label, dtype)] = entry["x_realtime_steady"]
    if entry.get("first_commit_s"):
        state["e2e_startup"] = entry["first_commit_s"]
    if extract["timed_out"]:
        return {**entry, "status": "timeout", "reason": f"extract killed after {seconds:.0f} s; numbers are of the rows "
                                                       "committed until then"}
    if extract["rc"] not in (0, 3) or not summary:
        return {**entry, "status": "failed", "error": f"extract: exit {extract['rc']}: {short(extract['output'], 800)}"}
    return {**entry, "status": "ok" if not summary.get("failed") else "partial"}


def last_json(text: str) -> dict[str, Any] | None:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    try:
        start = text.index("{")
        return json.loads(text[start:])
    except ValueError:
        return None


def commit_times(store: Path, t0: float, t_extract: float) -> dict[str, Any]:
    """From the manifest: when rows were committed, relative to the scan's start."""
    db = store / "manifest.db"
    if not db.exists():
        return {}
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        rows = conn.execute("SELECT t.done_at, i.duration FROM tasks t JOIN items i ON i.id = t.item_id "
                            "WHERE t.status = 'done' AND t.done_at IS NOT NULL ORDER BY t.done_at").fetchall()
    finally:
        conn.close()
    if not rows:
        return {"committed": 0}
    times = np.array([r[0] for r in rows])
    audio = np.array([r[1] or 0.0 for r in rows])
    first, last = float(times[0]), float(times[-1])
    out = {"committed": len(rows), "committed_audio_s": round(float(audio.sum()), 1),
           "first_commit_s": round(first - t0, 2), "last_commit_s": round(last - t0, 2),
           "extract_start_to_first_commit_s": round(first - t_extract, 2),
           "x_realtime_from_start": round(float(audio.sum()) / max(last - t0, 1e-6), 1)}
    # steady state: what was committed after the first commit, over the time between
    after_first = times > first
    if after_first.any() and last > first:
        out["x_realtime_steady"] = round(float(audio[after_first].sum()) / (last - first), 1)
    return out


def stored_fidelity(store: Path, state: dict[str, Any], label: str, corpus: dict[str, Any]) -> dict[str, Any] | None:
    """The stored rows of the fidelity items against the fp32 `embed_file` reference."""
    ref_file = (state.get("reference") or {}).get(label)
    if not ref_file or not (store / "manifest.db").exists():
        return None
    import embstore
    from embstore.vectors import cosine_rows

    reference = np.load(ref_file)
    uids = [f["uid"] for f in corpus["fidelity"]]
    with embstore.open(str(store), create=False) as st:
        ids, vectors = st.embeddings(dataset="ds00")
    where = {uid: k for k, uid in enumerate(ids)}
    have = [i for i, uid in enumerate(uids) if uid in where]
    if not have:
        return {"items": 0}
    got = np.stack([vectors[where[uids[i]]] for i in have])
    return {"items": len(have), **cos_stats(cosine_rows(got, reference[have]))}


# -- targets and Markdown ---------------------------------------------------------------------


def targets(data: dict[str, Any]) -> list[dict[str, Any]]:
    phases = data["phases"]
    runs = [(n, p) for n, p in phases.items() if n.startswith("e2e:resnet34:") and p.get("x_realtime_from_start")]
    best_name, best = max(runs, key=lambda r: r[1]["x_realtime_from_start"]) if runs else (None, {})
    busy = best.get("gpu_busy_steady") or {}
    if not busy.get("samples"):  # one commit only: no steady window, the extract's whole time
        busy = best.get("gpu_busy_extract") or {}
    out = [
        {"target": f"ResNet34 end to end >= {TARGET_X_REALTIME:,.0f}x realtime (process start to last commit)",
         "value": best.get("x_realtime_from_start"), "where": best_name,
         "met": None if not best else best["x_realtime_from_start"] >= TARGET_X_REALTIME},
        {"target": f"... >= {TARGET_FRACTION} of model-only (same dtype, same batches)",
         "value": best.get("fraction_of_model_only_from_start"), "where": best_name,
         "steady": best.get("fraction_of_model_only_steady"),
         "met": None if best.get("fraction_of_model_only_from_start") is None else
         best["fraction_of_model_only_from_start"] >= TARGET_FRACTION},
        {"target": f"... GPU busy >= {TARGET_BUSY:.0f} % (nvidia-smi, steady state)",
         "value": busy.get("mean_busy_pct"), "where": best_name,
         "met": None if busy.get("mean_busy_pct") is None else busy["mean_busy_pct"] >= TARGET_BUSY},
    ]
    for name, phase in phases.items():
        if name.startswith("model:"):
            cos = ((phase.get("dtypes") or {}).get("fp32") or {}).get("masked_vs_own_embed_file", {}).get("min")
            out.append({"target": f"{name[6:]}: fp32 masked mixed-length batches = embed_file to cosine >= "
                                  f"{TARGET_MASKED_COS}", "value": cos, "where": name,
                        "met": None if cos is None else cos >= TARGET_MASKED_COS})
    return out


def fmt(value: Any, digits: int | None = None) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, float) and digits is not None:
        return f"{value:,.{digits}f}"
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 100 else f"{value:g}"
    return str(value)


def markdown(data: dict[str, Any]) -> str:
    machine = data.get("machine") or {}
    lines = [f"### GPU check ({data['started_at'][:10]}, `benchmarks/device/gpu_check.py"
             f"{' --quick' if data.get('quick') else ''}` on {data['device']})", "",
             f"Machine: {machine.get('described', 'unknown')}."]
    if machine.get("matmul_tflops"):
        lines.append(f"Matrix-product ceilings measured there (TFLOP/s): {machine['matmul_tflops']}.")
    corpus = data["phases"].get("corpus", {})
    if corpus.get("files"):
        lines.append(f"Corpus: {corpus['files']:,} files, {corpus['audio_h']} h of audio (mean {corpus['mean_s']} s, "
                     f"half FLAC half WAV), cut from {corpus.get('speech')}.")
    lines += ["", "| target | value | met | where |", "|---|---|---|---|"]
    for t in data["targets"]:
        met = {True: "yes", False: "**no**", None: "not measured"}[t["met"]]
        extra = f" (steady state: {t['steady']})" if t.get("steady") is not None else ""
        lines.append(f"| {t['target']} | {fmt(t['value'])}{extra} | {met} | {t.get('where') or '-'} |")
    for name, phase in data["phases"].items():
        if name.startswith("model:") and phase.get("dtypes"):
            lines += ["", f"**{name[6:]}** (`{phase.get('batching')}` batching, frame budget {fmt(phase.get('batch_frames'))}"
                      f", {fmt(phase.get('gflop_per_audio_s'))} GFLOP per audio second; model-only sample "
                      f"{(phase.get('sample') or {}).get('items')} items; fidelity set "
                      f"{(phase.get('steps') or {}).get('reference', {}).get('items')} items of "
                      f"{(phase.get('steps') or {}).get('reference', {}).get('frames')} frames)", "",
                      "| dtype | model-only x realtime | items/s | TFLOP/s | mean batch | padding | same items in length "
                      "order x realtime | min cos vs fp32 embed_file | mean cos | masked vs own embed_file (min) |",
                      "|---|---|---|---|---|---|---|---|---|---|"]
            for dtype, e in phase["dtypes"].items():
                mo, lo = e.get("model_only") or {}, e.get("model_only_length_order") or {}
                fid, own = e.get("fidelity_vs_fp32_embed_file") or {}, e.get("masked_vs_own_embed_file") or {}
                lines.append(f"| {dtype} | {fmt(mo.get('x_realtime'))} | {fmt(mo.get('items_per_s'))} | {fmt(mo.get('tflops'))} "
                             f"| {fmt(mo.get('mean_batch_items'))} | {fmt(mo.get('padding_overhead'))} "
                             f"| {fmt(lo.get('x_realtime'))} | {fmt(fid.get('min'), 6)} | {fmt(fid.get('mean'), 6)} "
                             f"| {fmt(own.get('min'), 6)} |" + ("" if str(e.get("status", "ok")).startswith("ok")
                                                               else f" {e.get('status')}"))
            cpu = (phase.get("steps") or {}).get("device_vs_cpu_fp32")
            if cpu:
                lines.append(f"\nfp32 on the GPU against fp32 on the CPU (`embed_file`): min cos {fmt(cpu['min'], 7)}.")
    e2e = [(n, p) for n, p in data["phases"].items() if n.startswith("e2e:")]
    if e2e:
        lines += ["", "End to end (`embstore scan` + `embstore extract`, process start to the last committed row):", "",
                  "| model | dtype | workers | files | audio h | x realtime from start | steady x realtime | "
                  "fraction of model-only (start / steady) | start-up to first row s | GPU busy % steady (mean / median) "
                  "| mean batch | padding | stored rows vs fp32 embed_file (min cos) | status |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, p in e2e:
            if p.get("status") in ("pending", "skipped"):
                lines.append(f"| {name[4:]} | | | | | | | | | | | | | {p['status']} {p.get('reason', '')} |")
                continue
            s, busy, fid = p.get("summary") or {}, p.get("gpu_busy_steady") or {}, p.get("fidelity_vs_fp32_embed_file") or {}
            lines.append(
                f"| {p.get('model')} | {p.get('dtype')} | {p.get('workers')} | {fmt(p.get('files'))} "
                f"| {fmt(round((p.get('audio_s') or 0) / 3600, 2))} | {fmt(p.get('x_realtime_from_start'))} "
                f"| {fmt(p.get('x_realtime_steady'))} | {fmt(p.get('fraction_of_model_only_from_start'))} / "
                f"{fmt(p.get('fraction_of_model_only_steady'))} | {fmt(p.get('first_commit_s'))} "
                f"| {fmt(busy.get('mean_busy_pct'))} / {fmt(busy.get('median_busy_pct'))} | {fmt(s.get('mean_batch_items'))} "
                f"| {fmt(s.get('padding_overhead'))} | {fmt(fid.get('min'), 6)} | {p.get('status')} |")
    pytest = data["phases"].get("pytest_cuda", {})
    lines += ["", f"tests/test_cuda.py: {pytest.get('summary') or pytest.get('status')}.", "",
              "Phases: " + ", ".join(f"{n} {p.get('status')}" + (f" ({p.get('seconds')} s)" if p.get("seconds") else "")
                                     for n, p in data["phases"].items()) + "."]
    failed = [(n, p) for n, p in data["phases"].items() if p.get("status") in ("failed", "timeout")]
    for name, p in failed:
        lines.append(f"- {name}: {p.get('status')}: {short(str(p.get('error') or p.get('reason')), 400)}")
    return "\n".join(lines) + "\n"


# -- main -------------------------------------------------------------------------------------


def planned_phases(args: argparse.Namespace) -> list[str]:
    names = ["env", "pytest_cuda", "corpus", "models"] + [f"model:{m}" for m in model_labels(args)]
    return names + [e2e_name(c) for c in e2e_configs(args)]


def main_check(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.work = args.work or str(Path(tempfile.gettempdir()) / "embstore-gpu-check")
    Path(args.work).mkdir(parents=True, exist_ok=True)
    only = set(args.phases.split(",")) if args.phases else None
    record = Record(out, args, planned_phases(args))
    record.write()
    log(f"embstore GPU check: device {args.device}, quick {args.quick}, budget {args.budget:.0f} s, work {args.work}")
    state: dict[str, Any] = {}

    def wanted(group: str) -> bool:
        return only is None or group in only

    if wanted("env"):
        record.run("env", lambda: phase_env(args, record))
    else:
        record.skip("env", "not asked for (--phases)")
    if wanted("pytest") and not args.skip_pytest:
        record.run("pytest_cuda", lambda: phase_pytest(args))
    else:
        record.skip("pytest_cuda", "not asked for")
    budget = Budget(args.budget)  # the benchmark's own time starts here
    record.data["benchmark_started_s"] = round(time.time() - PROCESS_START, 1)
    record.run("corpus", lambda: phase_corpus(args, budget, state))
    record.run("models", lambda: phase_models(args, state))
    ready = all(record.phases[p]["status"] in ("ok", "partial") for p in ("corpus", "models"))
    labels = model_labels(args)
    for i, label in enumerate(labels):
        name = f"model:{label}"
        if not ready or not wanted("model"):
            record.skip(name, "no corpus or model" if not ready else reuse_model(args, label, state))
            continue
        if label not in state["specs"]:
            record.skip(name, "its model directory was not made")
            continue
        # the first model gets the larger share: its numbers anchor the end-to-end runs
        seconds = budget.share(0.3 if i == 0 else 0.2, 15 if args.quick else 30, 30 if args.quick else 75)
        record.run(name, lambda label=label, seconds=seconds: phase_model(args, label, state, seconds))
    configs = e2e_configs(args)
    for k, config in enumerate(configs):
        name = e2e_name(config)
        if not ready or not wanted("e2e"):
            record.skip(name, "no corpus or model" if not ready else "not asked for")
            continue
        if config[0] not in state["specs"]:
            record.skip(name, "its model directory was not made")
            continue
        left = budget.left() - 5  # the report's seconds
        floor = 10 if args.quick else 25
        if left < floor:
            record.skip(name, f"the benchmark budget is spent ({budget.left():.0f} s left)")
            continue
        # the first runs get the larger shares: later ones are the first to go
        seconds = max(floor, left / min(len(configs) - k, 4))
        record.run(name, lambda config=config, seconds=seconds: phase_e2e(args, config, state, seconds))
    record.data["phases"]["report"] = {"status": "ok"}
    record.data["total_s"] = round(time.time() - PROCESS_START, 1)
    record.write()
    print((out / "results.md").read_text(), flush=True)
    return 0


CHILDREN = {"env": child_env_info, "models": child_models, "model": child_model}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="folder for results.json, results.md, pytest_cuda.txt, children.log")
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    ap.add_argument("--quick", action="store_true", help="a tiny corpus and one model: a smoke run in seconds")
    ap.add_argument("--budget", type=float, default=None, help="seconds for everything after pytest_cuda "
                                                                "(default 360; 120 with --quick)")
    ap.add_argument("--files", type=int, default=None, help="corpus files (default 20000; 12 with --quick)")
    ap.add_argument("--sample", type=int, default=1536, help="files in the model-only sample (default 1536)")
    ap.add_argument("--models", default=None, help="resnet34,ecapa (default; --quick: resnet34 on cuda, a tiny "
                                                   "ECAPA on cpu)")
    ap.add_argument("--mel-bins", type=int, default=None, help="mel bins of the random models (default 80; "
                                                                "32 with --quick on cpu)")
    ap.add_argument("--work", default=None, help="scratch folder: corpus, models, stores (default $TMPDIR/embstore-gpu-check)")
    ap.add_argument("--speech", default=None, help="a LibriSpeech-like folder of speaker folders of FLAC files")
    ap.add_argument("--phases", default=None, help="comma list of env,pytest,model,e2e to run (corpus and models "
                                                   "always run)")
    ap.add_argument("--skip-pytest", action="store_true")
    ap.add_argument("--pytest-timeout", type=float, default=None, help="default 150 s (60 with --quick)")
    ap.add_argument("--corpus-timeout", type=float, default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--job", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        result = ChildResult(args.result)
        try:
            CHILDREN[args.child](json.loads(Path(args.job).read_text()), result)
        except Exception as exc:
            result.data.update(status="failed", error=f"{type(exc).__name__}: {exc}",
                               traceback=short(traceback.format_exc(), 3000))
            result.save()
            return 1
        result.save()
        return 0
    if not args.out:
        ap.error("--out is required")
    if args.budget is None:
        args.budget = 120.0 if args.quick else 360.0
    if args.mel_bins is None:
        args.mel_bins = 32 if args.quick and args.device == "cpu" else 80
    if args.pytest_timeout is None:
        args.pytest_timeout = 60.0 if args.quick else 150.0
    return main_check(args)


if __name__ == "__main__":
    raise SystemExit(main())
