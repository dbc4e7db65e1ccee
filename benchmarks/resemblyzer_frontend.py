"""Resemblyzer's preprocessing: the package's, embstore's before (librosa mel) and embstore's
vectorised frontend, side by side in one run, plus their equality.

    python benchmarks/resemblyzer_frontend.py --out bench-resem          # ~1 min on 2 cores
    python benchmarks/resemblyzer_frontend.py --corpus bench-out/corpus --repeats 3

Frontends, all giving the same windows:
  package     resemblyzer.audio's normalize_volume, trim_long_silences (one Python int per
              sample through struct.pack) and wav_to_mel_spectrogram (librosa), what
              `embed_utterance(preprocess_wav(...))` runs
  librosa     embstore's frontend before the vectorised one: flat-memory VAD trimming and
              librosa's mel; the seed loops of benchmarks/run.py use it for Resemblyzer
              (`--seed-frontend librosa`), as in BENCHMARKS.md before
  vectorised  embstore.models.resemblyzer_frontend
Measured for each, on the same files:
  first_call_s     a fresh process: imports plus the first item (librosa's lazy imports)
  frontend_1t      features of decoded audio, one thread: x realtime per core
                   (_cpu: per CPU second of the process, what a loaded machine distorts least)
  load_1t          decode + features, one thread (and _cpu)
  threads_2        decode + features, 2 loader threads in one process
  processes_2      decode + features, 2 loader processes (spawned, warm), results pickled back
scaling = threads_2 / load_1t: 2.0 means the GIL is out of the way on 2 cores; compare it
with machine_scaling_2, what 2 processes of pure C hashing get on the machine at the time.
Equality: kept samples after trimming identical per file, the mel's largest relative
difference per element, the partial windows' largest absolute difference.
Speed is medians over interleaved repeats; ratios between frontends are what survive a
loaded machine.
"""

from __future__ import annotations

import os

# loaders run single-threaded BLAS, as benchmarks/run.py runs every system; before NumPy loads
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import hashlib
import json
import multiprocessing
import statistics
import subprocess
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared" / "data" / "librispeech-test-other"
FRONTENDS = ("package", "librosa", "vectorised")


def package_features(wav: np.ndarray) -> np.ndarray:
    """The package's own steps, as embed_utterance(preprocess_wav(wav)) runs them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from resemblyzer import audio
        from resemblyzer.voice_encoder import VoiceEncoder

    wav = audio.trim_long_silences(audio.normalize_volume(wav, -30, increase_only=True))
    wav_slices, mel_slices = VoiceEncoder.compute_partial_slices(len(wav), 1.3, 0.75)
    return _librosa_windows(wav, wav_slices[-1].stop, mel_slices)


def _librosa_windows(wav: np.ndarray, needed: int, slices: list[slice]) -> np.ndarray:
    """embed_utterance's cut: pad to cover the last partial, librosa's mel, copy the windows."""
    from resemblyzer.audio import wav_to_mel_spectrogram

    if needed >= len(wav):
        wav = np.pad(wav, (0, needed - len(wav)))
    mel = wav_to_mel_spectrogram(wav)
    return np.stack([mel[s] for s in slices])


def librosa_features(wav: np.ndarray) -> np.ndarray:
    """embstore's frontend before: the same kept samples as the package, librosa's mel."""
    from embstore.models import resemblyzer_frontend as rf

    wav = rf.preprocess(wav)
    return _librosa_windows(wav, *rf.partial_slices(len(wav)))


def frontend(name: str):
    if name == "package":
        return package_features
    if name == "librosa":
        return librosa_features
    from embstore.models.resemblyzer_frontend import features

    return features


def load_and_features(name: str, path: str) -> np.ndarray:
    """One loader task: decode + features (top level, so a process pool can call it)."""
    from embstore.audio.io import load_for_model

    return frontend(name)(load_for_model(path, 16000))


def _warm(name: str, path: str) -> None:
    """Process-pool initializer: imports and the first item happen before any timing."""
    warnings.simplefilter("ignore")
    load_and_features(name, path)


def first_call(name: str, path: str) -> float:
    """A fresh interpreter: seconds from start to the first item's features."""
    code = (f"import time; t=time.perf_counter(); import sys; sys.path.insert(0, {str(REPO)!r}); "
            f"import benchmarks.resemblyzer_frontend as b; b.load_and_features({name!r}, {path!r}); "
            "print(time.perf_counter()-t)")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return float(out.stdout.split()[-1])


def _hash(n: int) -> None:
    block = b"\0" * (1 << 22)
    for _ in range(n):
        hashlib.blake2b(block).digest()


def machine_scaling() -> float:
    """What 2 processes of pure C work (no GIL, no shared state) get over one on this machine
    now: the ceiling for any 2-way scaling measured next to it (a shared machine gives < 2)."""
    one = timed(lambda: _hash(40))
    procs = [multiprocessing.get_context("spawn").Process(target=_hash, args=(40,)) for _ in range(2)]
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    return 2 * one / (time.perf_counter() - t0)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def cpu_timed(fn) -> float:
    """CPU seconds of this process (one thread working): what a loaded machine distorts least."""
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


def measure(name: str, paths: list[str], wavs: list[np.ndarray], pool: ProcessPoolExecutor) -> dict[str, float]:
    """One repeat of every measurement for one frontend: seconds (first_call_s: its own unit)."""
    fn = frontend(name)

    def load_one(path: str) -> np.ndarray:
        return load_and_features(name, path)

    with ThreadPoolExecutor(2) as threads:
        return {
            "first_call_s": first_call(name, paths[0]),
            "frontend_1t": timed(lambda: [fn(w) for w in wavs]),
            "frontend_1t_cpu": cpu_timed(lambda: [fn(w) for w in wavs]),
            "load_1t": timed(lambda: [load_one(p) for p in paths]),
            "load_1t_cpu": cpu_timed(lambda: [load_one(p) for p in paths]),
            "threads_2": timed(lambda: list(threads.map(load_one, paths))),
            "processes_2": timed(lambda: list(pool.map(load_and_features, [name] * len(paths), paths, chunksize=4))),
        }


def equality(paths: list[str]) -> dict:
    from embstore.audio.io import load_for_model
    from embstore.models import resemblyzer_frontend as rf

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from resemblyzer import audio

    same_kept, mel_rel, window_abs = 0, 0.0, 0.0
    for path in paths:
        wav = load_for_model(path, 16000)
        theirs = audio.trim_long_silences(audio.normalize_volume(wav, -30, increase_only=True))
        ours = rf.trim_long_silences(rf.normalize_volume(wav))
        same_kept += bool(np.array_equal(ours, theirs))
        a, b = rf.mel_spectrogram(theirs).astype(np.float64), audio.wav_to_mel_spectrogram(theirs).astype(np.float64)
        nz = b > 0
        mel_rel = max(mel_rel, float((np.abs(a - b)[nz] / b[nz]).max(initial=0.0)))
        window_abs = max(window_abs, float(np.abs(rf.features(wav) - package_features(wav)).max()))
    return {"files": len(paths), "kept_samples_identical": same_kept, "mel_max_rel_diff": mel_rel,
            "windows_max_abs_diff": window_abs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=SHARED, help="folder of .flac/.wav files (default: ../shared/data)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("bench-resem"))
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    from embstore.audio.io import load_for_model

    paths = sorted(str(p) for p in args.corpus.rglob("*") if p.suffix in (".flac", ".wav"))
    if not paths:
        raise SystemExit(f"no audio under {args.corpus}")
    wavs = [load_for_model(p, 16000) for p in paths]
    audio_s = sum(len(w) for w in wavs) / 16000
    for name in FRONTENDS:
        frontend(name)(wavs[0])  # imports and lazy initialisation outside the timing
    ctx = multiprocessing.get_context("spawn")
    pools = {name: ProcessPoolExecutor(2, mp_context=ctx, initializer=_warm, initargs=(name, paths[0]))
             for name in FRONTENDS}
    for pool in pools.values():  # two tasks in flight start both workers, warm, before any timing
        list(pool.map(time.sleep, [0.5, 0.5]))
    runs: dict[str, dict[str, list[float]]] = {n: {} for n in FRONTENDS}
    scaling = []
    for _ in range(args.repeats):
        scaling.append(machine_scaling())
        for name in FRONTENDS:  # interleaved: drift in a shared machine hits all alike
            for key, value in measure(name, paths, wavs, pools[name]).items():
                runs[name].setdefault(key, []).append(value)
    for pool in pools.values():
        pool.shutdown()
    results = {"files": len(paths), "audio_seconds": round(audio_s, 1), "cpu_count": os.cpu_count(),
               "repeats": args.repeats,
               "machine_scaling_2": round(statistics.median(scaling), 2), "frontends": {}}
    for name, r in runs.items():
        med = {k: statistics.median(v) for k, v in r.items()}
        entry = {"first_call_s": round(med.pop("first_call_s"), 3)}
        for key, seconds in med.items():
            entry[key + "_x_realtime"] = round(audio_s / seconds, 1)
        entry["thread_scaling_2"] = round(med["load_1t"] / med["threads_2"], 2)
        entry["process_scaling_2"] = round(med["load_1t"] / med["processes_2"], 2)
        results["frontends"][name] = entry
    for base in ("package", "librosa"):
        results[f"vectorised_over_{base}"] = {
            k: round(results["frontends"]["vectorised"][k] / results["frontends"][base][k], 2)
            for k in results["frontends"][base] if k.endswith("_x_realtime")}
    results["equality"] = equality(paths)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "resemblyzer_frontend.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
