"""Scoring scale: 1 M trials over 100 k items, mean subtraction + AS-norm (top 300)
against a 6 k-speaker cohort, through `Store.score` end to end (trial parsing, id
resolution, Zarr reads, cohort means, normalisation, EER/minDCF) and `embstore score`
as a process.

    python benchmarks/score_scale.py --items 100000 --trials 1000000 --cohort 6000 \\
        --store /tmp/score-store --out bench-out/score_scale.json

Side by side in the same process, as baselines: raw cosine scoring of the same list
(`--norm none`, embstore 0.1's only mode) and a bare float32 matrix product of the size
the cohort statistics need (the machine's ceiling for that step). The store is built
the fast way (benchmarks/query_scale.py's builder: rows written straight through the
manifest and `ModelArrays`), 16 items per speaker, and reused when it has the size.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from query_scale import build, speaker_of  # noqa: E402


def uid_of(i: int, per_speaker: int) -> str:
    spk = speaker_of(i, per_speaker)
    return f"vox/{spk}/v{(i % per_speaker) // 8:03d}/{i % 8:05d}"


def write_trials(path: Path, items: int, trials: int, per_speaker: int, seed: int = 1) -> None:
    """Half target trials (two items of one speaker), half non-target (random pairs)."""
    if path.exists() and sum(1 for _ in open(path)) == trials:
        return
    rng = np.random.default_rng(seed)
    half = trials // 2
    a = rng.integers(0, items, trials)
    same = (a // per_speaker) * per_speaker + rng.integers(0, per_speaker, trials)
    same = np.minimum(same, items - 1)
    other = rng.integers(0, items, trials)
    b = np.where(np.arange(trials) < half, same, other)
    clash = b == a
    b[clash] = (b[clash] + 1) % items
    with open(path, "w") as f:
        for x, y in zip(a, b):
            label = "target" if x // per_speaker == y // per_speaker else "nontarget"
            f.write(f"{uid_of(int(x), per_speaker)} {uid_of(int(y), per_speaker)} {label}\n")


def emit(results: dict, out: Path | None) -> None:
    """Print the results as JSON, and write them to `out` when given."""
    text = json.dumps(results, indent=2)
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")


def timed(fn):
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--trials", type=int, default=1_000_000)
    parser.add_argument("--cohort", type=int, default=6000, help="cohort speakers")
    parser.add_argument("--top-n", type=int, default=300)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--per-speaker", type=int, default=16)
    parser.add_argument("--store", type=Path, default=Path("/tmp/embstore-score-scale"))
    parser.add_argument("--no-cli", action="store_true", help="skip the `embstore score` process run")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    speakers = (args.items + args.per_speaker - 1) // args.per_speaker
    if args.cohort > speakers:
        raise SystemExit(f"--cohort {args.cohort}: the store has only {speakers} speakers")
    results: dict = {"items": args.items, "trials": args.trials, "cohort_speakers": args.cohort,
                     "top_n": args.top_n, "dim": args.dim, "cpus": os.cpu_count()}
    seconds, st = timed(lambda: build(args.store, args.items, args.dim, args.per_speaker))
    results["build_seconds"] = round(seconds, 1)
    work = args.store.parent / f"{args.store.name}-files"
    work.mkdir(parents=True, exist_ok=True)
    trials = work / f"trials-{args.trials}.txt"
    seconds, _ = timed(lambda: write_trials(trials, args.items, args.trials, args.per_speaker))
    results["write_trials_seconds"] = round(seconds, 1)
    # the cohort: the last `cohort` speakers (their items also appear in trials, as in a
    # cohort drawn from the evaluation set; it does not change the work)
    cohort_file = work / f"cohort-{args.cohort}.txt"
    cohort_file.write_text("".join(f"{speaker_of(s * args.per_speaker, args.per_speaker)}\n"
                                   for s in range(speakers - args.cohort, speakers)))
    asnorm = dict(norm="asnorm", mean_from="dataset:vox", cohort=f"speakers:{cohort_file}", top_n=args.top_n)

    seconds, raw = timed(lambda: st.score(trials))
    results["none_seconds"] = round(seconds, 2)
    seconds, out = timed(lambda: st.score(trials, **asnorm))
    results["asnorm_seconds"] = round(seconds, 2)
    results["asnorm_over_none"] = round(results["asnorm_seconds"] / results["none_seconds"], 2)
    results["eer_none"] = raw.results[0]["eer"]
    results["eer_asnorm"] = out.results[0]["eer"]
    results["scored"] = out.results[0]["trials"]
    seconds, out = timed(lambda: st.score(trials, scores=work / "scores.txt", **asnorm))
    results["asnorm_with_score_file_seconds"] = round(seconds, 2)

    # the bare product the cohort statistics need (every trial side x every cohort speaker)
    rng = np.random.default_rng(0)
    a = rng.standard_normal((min(args.items, 100_000), args.dim), dtype=np.float32)
    c = rng.standard_normal((args.cohort, args.dim), dtype=np.float32)
    seconds, _ = timed(lambda: [a[i : i + 2048] @ c.T for i in range(0, len(a), 2048)])
    results["bare_gemm_seconds"] = round(seconds, 2)
    st.close()

    if not args.no_cli:
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
        command = [sys.executable, "-m", "embstore", "score", str(args.store), str(trials), "--norm", "asnorm",
                   "--mean-from", "dataset:vox", "--cohort", f"speakers:{cohort_file}", "--top-n",
                   str(args.top_n), "--json"]
        seconds, proc = timed(lambda: subprocess.run(command, capture_output=True, text=True, env=env))
        if proc.returncode:
            raise SystemExit(proc.stderr)
        results["cli_asnorm_seconds"] = round(seconds, 2)
    results["target_seconds"] = 60
    emit(results, args.out)


if __name__ == "__main__":
    main()
