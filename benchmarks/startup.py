"""Start-up: process start of `embstore extract` to the first committed row, on a new
store with a model the machine has seen before (its user cache is warm).

    python benchmarks/startup.py --out startup.json [--repeats 3] [--files 20]

For each model: one warm-up run on a throwaway store fills `$EMBSTORE_CACHE` (exports,
model cards), then each repeat scans a fresh store and times `embstore extract` as a
subprocess: `first_row` is the writer's first `done_at` minus the moment the process
was started; `total` is the whole command. Also the cold case (empty user cache).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# no network in benchmarks: pretrained weights from the user cache (`make setup`) or nowhere
os.environ.setdefault("EMBSTORE_MODEL_SOURCES", "cache,file")
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared" / "data" / "librispeech-test-other"


def corpus(root: Path, files: int) -> Path:
    """`files` real utterances (or synthetic voices without ../shared/data) in the dataset layout."""
    import soundfile as sf

    from embstore.synthetic import voice

    if root.exists():
        return root
    sources = sorted(SHARED.glob("*/*.flac")) if SHARED.exists() else []
    for k in range(files):
        target = root / "ds" / f"spk{k % 5}" / f"utt{k:04d}.flac"
        target.parent.mkdir(parents=True, exist_ok=True)
        if sources:
            shutil.copy(sources[k % len(sources)], target)
        else:
            sf.write(str(target), voice(4.0, pitch=100 + 10 * (k % 5), seed=k), 16000)
    return root


def extract_once(store: Path, audio: Path, model: str, env: dict[str, str]) -> dict:
    cli = [sys.executable, "-m", "embstore"]
    subprocess.run([*cli, "scan", str(store), str(audio)], check=True, capture_output=True, env=env)
    started = time.time()
    proc = subprocess.run([*cli, "extract", str(store), "--model", model, "--json"], capture_output=True, text=True,
                          env=env)
    total = time.time() - started
    if proc.returncode != 0:
        raise SystemExit(f"extract failed: {proc.stderr[-2000:]}")
    with sqlite3.connect(store / "manifest.db") as conn:
        first = conn.execute("SELECT min(done_at) FROM tasks WHERE status = 'done'").fetchone()[0]
    return {"first_row": round(first - started, 3), "total": round(total, 3)}


def measure(model: str, audio: Path, work: Path, repeats: int) -> dict:
    cache = work / f"cache-{abs(hash(model))}"
    shutil.rmtree(cache, ignore_errors=True)
    env = dict(os.environ, EMBSTORE_CACHE=str(cache), PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cold = extract_once(work / f"cold-{abs(hash(model))}", audio, model, env)
    warm = [extract_once(work / f"warm-{abs(hash(model))}-{k}", audio, model, env) for k in range(repeats)]
    return {
        "model": model,
        "cold": cold,
        "warm_first_row_median": statistics.median(r["first_row"] for r in warm),
        "warm_total_median": statistics.median(r["total"] for r in warm),
        "warm": warm,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--files", type=int, default=20)
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="embstore-startup-"))
    audio = corpus(work / "audio", args.files)
    from tests.wespeaker_dirs import make_wespeaker_dir

    model_dir = make_wespeaker_dir(work / "models", arch="resnet34", name="resnet34")
    results = {
        "files": args.files,
        "models": [measure(spec, audio, work, args.repeats) for spec in (f"wespeaker:{model_dir}", "resemblyzer")],
    }
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
