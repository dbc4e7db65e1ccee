"""Memory and speed of diarizing long items: is the window-embedding stage flat?

    python benchmarks/diarize_long.py --minutes 10 60 --out bench-out/diarize_long.json
    python benchmarks/diarize_long.py --minutes 10 60 --store --out bench-out/extract_long.json

For each length, in a fresh subprocess (so peak RSS is its own): a synthetic 4-speaker
conversation of that length (embstore.synthetic), the default model, then the
pipeline stage by stage while a thread samples VmRSS every 20 ms. Reported per stage:
peak RSS above the RSS before the stage (the waveform and the model already loaded),
and x realtime. Window embeddings stream in blocks of 128 windows, so their growth
should not depend on the length; spectral clustering holds one dense
[windows x windows] float64 Laplacian (~180 MB for an hour), which does.

--store: the store path instead. The conversation is written as one WAV, scanned into a
fresh store, and `embstore extract STORE --windows 1.5:0.75 --workers 1` runs as a
subprocess; reported: wall time, x realtime, windows stored, and the peak RSS of the
largest process of that run (the worker; VmHWM of every process of the run, polled).
A 5 s item is extracted first in a store of its own, so every length finds the same
warm model cache.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# no network in benchmarks: pretrained weights from the user cache (`make setup`) or nowhere
os.environ.setdefault("EMBSTORE_MODEL_SOURCES", "cache,file")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _memory import Peak, status_mb, tree_peak_mb  # noqa: E402

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "librispeech-test-other"


def one(minutes: float, data: str) -> dict:
    import numpy as np

    from embstore import models
    from embstore.diarize.pipeline import diarize_windows
    from embstore.synthetic import corpus_by_speaker, make_conversation
    from embstore.segments.vad import speech_regions
    from embstore.segments.window_embed import WindowEmbedder
    from embstore.segments.windows import windows_in_regions

    encoder = models.load("resemblyzer")
    embedder = WindowEmbedder(encoder)
    conv = make_conversation(corpus_by_speaker(data), 4, seed=42, duration=minutes * 60)
    embedder.embed(conv.wav, windows_in_regions([(0.0, 3.0)]))  # warm-up
    peak = Peak()
    out: dict = {"minutes": round(conv.duration / 60, 1), "rss_before_mb": round(status_mb(), 1)}

    def stage(name: str, fn):
        start = peak.reset()
        t = time.perf_counter()
        value = fn()
        seconds = time.perf_counter() - t
        time.sleep(0.05)
        out[name] = {"peak_growth_mb": round(peak.value - start, 1), "x_realtime": round(conv.duration / seconds, 1)}
        return value

    regions = stage("vad", lambda: speech_regions(conv.wav, conv.sample_rate, "silero"))
    plan = windows_in_regions(regions, 1.5, 0.75, conv.duration)
    matrix = stage("embed", lambda: embedder.embed(conv.wav, plan))
    _, segments = stage("cluster", lambda: diarize_windows(plan.starts, plan.ends, matrix))
    peak.stop()
    out["windows"] = len(plan)
    out["speakers_found"] = len({s.speaker for s in segments})
    out["finite_rows"] = int(np.isfinite(matrix).all(axis=1).sum())
    return out


def one_store(minutes: float, data: str) -> dict:
    import tempfile

    import soundfile as sf

    import embstore
    from embstore.synthetic import corpus_by_speaker, make_conversation

    speakers = corpus_by_speaker(data)
    work = Path(tempfile.mkdtemp(prefix="embstore-long-"))

    def extract(name: str, conv) -> tuple[dict, float, float]:
        (work / name / "root" / "talks" / "mixed").mkdir(parents=True)
        sf.write(work / name / "root" / "talks" / "mixed" / "conversation.wav", conv.wav, conv.sample_rate,
                 subtype="PCM_16")
        st = embstore.open(work / name / "store")
        st.scan([work / name / "root"])
        st.close()
        t = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "embstore", "extract", str(work / name / "store"), "--windows", "1.5:0.75",
             "--workers", "1", "--device", "cpu", "--json"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True,
        )
        peak = tree_peak_mb(proc)
        seconds = time.perf_counter() - t
        if proc.returncode != 0:
            raise SystemExit(f"extract failed ({proc.returncode})")
        return json.loads(proc.stdout.read()), seconds, peak

    extract("warm-up", make_conversation(speakers, 2, seed=1, duration=5.0))
    conv = make_conversation(speakers, 4, seed=42, duration=minutes * 60)
    summary, seconds, peak = extract("timed", conv)
    st = embstore.open(work / "timed" / "store")
    starts, _, _ = st.windows("talks/mixed/conversation")
    st.close()
    return {
        "minutes": round(conv.duration / 60, 1), "seconds": round(seconds, 1),
        "x_realtime": round(conv.duration / seconds, 1), "windows": len(starts), "done": summary.get("done"),
        "peak_rss_largest_process_mb": round(peak, 1),
        "samples_mb": round(len(conv.wav) * 4 / 2**20, 1), "store": str(work / "timed" / "store"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, nargs="+", default=[10.0, 60.0])
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--out", default=None)
    parser.add_argument("--store", action="store_true", help="measure `embstore extract --windows` instead")
    parser.add_argument("--child", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps((one_store if args.store else one)(args.child, args.data)))
        return
    results = []
    for minutes in args.minutes:
        done = subprocess.run(
            [sys.executable, __file__, "--child", str(minutes), "--data", args.data] + ["--store"] * args.store,
            capture_output=True, text=True, check=True,
        )
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
