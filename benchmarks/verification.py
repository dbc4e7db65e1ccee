"""Speaker verification of the default model (CAM++) against Resemblyzer on real speech,
whole utterances and short cuts, through the store's own paths.

    python benchmarks/verification.py --out bench-out/verification.json --markdown bench-out/verification.md

Every set is its own store under `--work`, filled by `Store.scan`, extracted once per
model by `Store.extract(model=M, device="cpu", workers=2)` and scored by `Store.score`
(raw cosine, no normalisation; EER, and minDCF at p_target 0.01 and 0.05 with
c_miss = c_fa = 1). The sets:

- full: ../shared/data/librispeech-test-other and its `trials.txt` as they are
  (10 speakers x 10 utterances of 2.0-22.8 s; 4950 trials, 450 target).
- cut 3 s, cut 1.5 s: short cuts of the same 100 utterances. An utterance of D seconds
  holds floor(D / L) back-to-back slots of L seconds counted from its first sample; up
  to `--cuts-per-utt` (3) slots are kept, spread evenly over them (the slot indices
  `round(linspace(0, slots - 1, n))`: first, middle, last), so the cuts of one utterance
  never overlap. Each cut is exactly L s, written as 16-bit FLAC to
  `WORK/cut<L>/librispeech-test-other-cut<L>/<speaker>/<utterance>-c<slot>.flac` (the
  dataset/speaker/file layout `scan` reads). Utterances shorter than L give no cut (at
  3 s the 2.x s ones drop out). No VAD or trimming: a cut may begin or end in a pause,
  as real short segments do. Trials: every pair of cuts except pairs of two cuts of one
  utterance (same recording: they would flatter every model), target when the speakers
  match, written beside the cuts as `trials.txt` in the shared list's format.

Extraction x realtime is the extract summary's (audio seconds / wall seconds of that
`extract` call, worker start-up included); each model is first extracted once on a
one-file store, untimed, so ONNX exports and model cards are in the user cache as on a
user's second run. No network: EMBSTORE_MODEL_SOURCES defaults to `cache,file` here, so
CAM++'s weights must be in the user cache already (`embstore models fetch campplus`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# before embstore loads a model: the weights come from the cache or nowhere (no network)
os.environ.setdefault("EMBSTORE_MODEL_SOURCES", "cache,file")

import embstore  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "librispeech-test-other"
RATE = 16000
P_TARGETS = (0.01, 0.05)


# -- the short-cut sets ---------------------------------------------------------------------


def cut_slots(samples: int, cut: int, per_utt: int) -> list[int]:
    """Indices of the non-overlapping `cut`-sample slots kept from an utterance: up to
    `per_utt`, spread evenly from the first slot to the last."""
    slots = samples // cut
    if slots == 0:
        return []
    return sorted({int(k) for k in np.round(np.linspace(0, slots - 1, min(per_utt, slots)))})


def build_cut_set(data: Path, work: Path, seconds: float, per_utt: int) -> dict[str, Any]:
    """Write the cuts of every utterance under `data` and their trial list (module doc);
    returns {root, trials, cuts, utterances, skipped_short, audio_seconds}."""
    import soundfile as sf

    tag = f"{seconds:g}s"
    root = work / f"cut{tag}"
    shutil.rmtree(root, ignore_errors=True)  # rebuilt each run: a few seconds, never stale
    dataset = root / f"{data.name}-cut{tag}"
    cut = int(round(seconds * RATE))
    cuts: list[tuple[str, str, str]] = []  # (cut id, speaker, utterance)
    skipped = 0
    for path in sorted(data.glob("*/*.flac")):
        wav, rate = sf.read(str(path), dtype="int16")
        if rate != RATE:
            raise SystemExit(f"{path}: {rate} Hz, expected {RATE}")
        slots = cut_slots(len(wav), cut, per_utt)
        skipped += not slots
        speaker = path.parent.name
        for k in slots:
            uid = f"{path.stem}-c{k}"
            target = dataset / speaker / f"{uid}.flac"
            target.parent.mkdir(parents=True, exist_ok=True)
            sf.write(str(target), wav[k * cut : (k + 1) * cut], RATE, subtype="PCM_16")
            cuts.append((uid, speaker, path.stem))
    trials = dataset / "trials.txt"
    counts = write_cut_trials(cuts, trials)
    return {"root": str(root), "trials": str(trials), "cuts": len(cuts),
            "utterances": len({c[2] for c in cuts}), "skipped_short": skipped,
            "audio_seconds": round(len(cuts) * seconds, 1), **counts}


def write_cut_trials(cuts: list[tuple[str, str, str]], path: Path) -> dict[str, int]:
    """Every pair of cuts but those of one utterance, `id1 id2 target|nontarget`."""
    target = nontarget = 0
    with open(path, "w", encoding="utf-8") as f:
        for i, (a, spk_a, utt_a) in enumerate(cuts):
            for b, spk_b, utt_b in cuts[i + 1 :]:
                if utt_a == utt_b:
                    continue
                same = spk_a == spk_b
                target += same
                nontarget += not same
                f.write(f"{a} {b} {'target' if same else 'nontarget'}\n")
    return {"target_trials": target, "nontarget_trials": nontarget}


# -- extraction and scoring through the store --------------------------------------------


def warm_up(model: str, data: Path, work: Path) -> None:
    """One file through `extract`, untimed: exports and cards land in the user cache first."""
    audio = work / "warm" / "audio" / "ds" / "spk"
    audio.mkdir(parents=True, exist_ok=True)
    one = audio / "one.flac"
    if not one.exists():
        shutil.copy(next(iter(sorted(data.glob("*/*.flac")))), one)
    store = work / "warm" / f"store-{model}"
    shutil.rmtree(store, ignore_errors=True)
    with embstore.open(store) as st:
        st.scan([audio.parents[1]])
        st.extract(**extract_args(model), device="cpu", workers=1)


def extract_args(spec: str) -> dict[str, str]:
    """`MODEL` or `MODEL@DTYPE` (campplus@bf16: OpenVINO bf16 where the CPU has it)."""
    model, _, dtype = spec.partition("@")
    return {"model": model, "dtype": dtype or "fp32"}


def run_set(name: str, root: Path, trials: Path, models: list[str], work: Path, workers: int) -> dict[str, Any]:
    """Scan `root` into a fresh store, extract and score it with each model."""
    store = work / "stores" / name.replace(" ", "-")
    shutil.rmtree(store, ignore_errors=True)  # fresh: every extraction is timed from nothing
    out: dict[str, Any] = {"root": str(root), "trials_file": str(trials), "models": {}}
    with embstore.open(store) as st:
        st.scan([root])
        for model in models:
            summary = st.extract(**extract_args(model), device="cpu", workers=workers)
            # by fingerprint: one model in two dtypes is two model keys in one store
            report = st.score(trials, model=summary.fingerprint, p_target=list(P_TARGETS))
            row = report.results[0]
            entry = {
                "model": report.model, "eer_percent": round(100 * row["eer"], 3),
                "min_dcf": {p: round(v, 4) for p, v in row["min_dcf"].items()},
                "trials": row["trials"], "targets": row["targets"], "nontargets": row["nontargets"],
                "missing_trials": row["missing"], "items_done": summary.done, "items_failed": summary.failed,
                "audio_seconds": round(summary.audio_seconds, 1), "extract_seconds": round(summary.seconds, 2),
                "x_realtime": round(summary.x_realtime, 1), "runtime": summary.runtime,
                "batching": summary.batching, "mean_batch_items": round(summary.mean_batch_items, 2),
                "dtype": extract_args(model)["dtype"], "warnings": report.warnings,
            }
            if summary.failed:  # short cuts are where a model could refuse an item: say why
                entry["failures"] = [f.error for f in st.errors(model=summary.fingerprint).failures][:5]
            out["models"][model] = entry
            print(f"{name} {model}: EER {entry['eer_percent']} %, minDCF {entry['min_dcf']}, "
                  f"{entry['trials']} trials, {entry['x_realtime']}x realtime", file=sys.stderr, flush=True)
    return out


# -- output ---------------------------------------------------------------------------------


def markdown(results: dict[str, Any]) -> str:
    """One row per set and model."""
    p = [f"{x:g}" for x in P_TARGETS]
    lines = ["| set | model | EER % | " + " | ".join(f"minDCF {x}" for x in p)
             + " | trials (target) | extraction x realtime |",
             "|---|---|---|" + "---|" * len(p) + "---|---|"]
    for name, block in results["sets"].items():
        for model, e in block["models"].items():
            dcf = " | ".join(f"{e['min_dcf'][x]:.4f}" for x in p)
            failed = f", {e['items_failed']} failed" if e["items_failed"] else ""
            lines.append(f"| {name} | {model} | {e['eer_percent']:.3f} | {dcf} | {e['trials']} ({e['targets']}"
                         f"{failed}) | {e['x_realtime']} |")
    return "\n".join(lines)


def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DATA, help="the shared LibriSpeech folder (with trials.txt)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/embstore-verification"))
    parser.add_argument("--models", default="campplus,resemblyzer",
                        help="model specs, MODEL or MODEL@DTYPE (campplus@bf16), comma separated")
    parser.add_argument("--cuts", default="3,1.5", help="cut lengths in seconds")
    parser.add_argument("--cuts-per-utt", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args()
    if not (args.data / "trials.txt").exists():
        raise SystemExit(f"{args.data} is absent (or has no trials.txt)")
    models = [m for m in args.models.split(",") if m]
    started, load_before = time.perf_counter(), os.getloadavg()
    for model in models:
        warm_up(model, args.data, args.work)
    sets: dict[str, Any] = {"full": run_set("full", args.data.parent, args.data / "trials.txt", models, args.work,
                                            args.workers)}
    for seconds in (float(s) for s in args.cuts.split(",") if s):
        info = build_cut_set(args.data, args.work, seconds, args.cuts_per_utt)
        name = f"cut {seconds:g} s"
        sets[name] = run_set(name, Path(info["root"]), Path(info["trials"]), models, args.work, args.workers)
        sets[name]["cut_set"] = info
    import torch

    results = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "date": time.strftime("%Y-%m-%d"),
        "cpu": f"{os.cpu_count()} cores ({cpu_model()})", "torch": torch.__version__,
        "workers": args.workers, "cuts_per_utt": args.cuts_per_utt, "p_targets": list(P_TARGETS),
        "sets": sets, "total_seconds": round(time.perf_counter() - started, 1),
        # x realtime is only as good as the machine was idle: others' processes show here
        "load_average_1min": {"start": round(load_before[0], 2), "end": round(os.getloadavg()[0], 2)},
    }
    table = markdown(results)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
