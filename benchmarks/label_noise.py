"""Label-noise detection: relabel 5 % of the real corpus's items to a wrong speaker and
see how many `Store.outliers` puts in its top K (precision and recall), real embeddings
from the default model.

    python benchmarks/label_noise.py --store /tmp/label-noise-store --out bench-out/label_noise.json

The store is scanned from ../shared/data and extracted once (reused when it is already
complete); each trial relabels a fresh random 5 % (each to a random other speaker),
ranks, and puts the true labels back.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
# no network in benchmarks: pretrained weights from the user cache (`make setup`) or nowhere
os.environ.setdefault("EMBSTORE_MODEL_SOURCES", "cache,file")
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import embstore  # noqa: E402
from score_scale import emit  # noqa: E402

DATA = ROOT.parent / "shared" / "data"


def ready_store(path: Path):
    st = embstore.open(path)
    st.scan([DATA])
    models = st.models()
    status = st.status().models
    if not models or next(iter(status.values()))["pending"]:
        summary = st.extract(device="cpu", workers=1)
        print(f"extracted {summary.done} items in {summary.seconds:.0f} s", file=sys.stderr)
    return st


def one_trial(st, rng: np.random.Generator, fraction: float, ks: list[int]) -> dict:
    items = st.manifest.query("SELECT uid, speaker FROM items WHERE removed = 0 ORDER BY uid")
    speakers = sorted({r["speaker"] for r in items})
    n = max(1, round(fraction * len(items)))
    chosen = rng.choice(len(items), n, replace=False)
    planted = {}
    for k in chosen:
        true = items[k]["speaker"]
        planted[items[k]["uid"]] = (true, str(rng.choice([s for s in speakers if s != true])))
    try:
        with st.manifest.write() as conn:
            conn.executemany("UPDATE items SET speaker = ? WHERE uid = ?", [(w, u) for u, (_, w) in planted.items()])
        ranked = st.outliers(top=max(ks)).outliers
    finally:
        with st.manifest.write() as conn:
            conn.executemany("UPDATE items SET speaker = ? WHERE uid = ?", [(t, u) for u, (t, _) in planted.items()])
    out = {"planted": n}
    for k in ks:
        hits = sum(o.id in planted for o in ranked[:k])
        out[f"precision@{k}"] = hits / k
        out[f"recall@{k}"] = hits / n
    # of the planted items found in the top n, how many name their true speaker as nearest
    found = [o for o in ranked[:n] if o.id in planted]
    out["true_speaker_named"] = sum(o.nearest_speaker == planted[o.id][0] for o in found) / max(1, len(found))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path, default=Path("/tmp/embstore-label-noise"))
    parser.add_argument("--fraction", type=float, default=0.05)
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if not (DATA / "librispeech-test-other" / "trials.txt").exists():
        raise SystemExit(f"{DATA} is absent")
    st = ready_store(args.store)
    items = st.status().items
    n = max(1, round(args.fraction * items))
    ks = sorted({n, 2 * n, 10})
    rng = np.random.default_rng(args.seed)
    started = time.perf_counter()
    runs = [one_trial(st, rng, args.fraction, ks) for _ in range(args.trials)]
    seconds = time.perf_counter() - started
    results = {
        "items": items, "speakers": st.status().speakers, "model": st.manifest.model_key(st.models()[0]),
        "fraction": args.fraction, "planted_per_trial": n, "trials": args.trials,
        "mean": {key: round(float(np.mean([r[key] for r in runs])), 3) for key in runs[0] if key != "planted"},
        "min": {key: round(float(np.min([r[key] for r in runs])), 3) for key in runs[0] if key != "planted"},
        "outliers_seconds_per_trial": round(seconds / args.trials, 3),
    }
    st.close()
    emit(results, args.out)


if __name__ == "__main__":
    main()
