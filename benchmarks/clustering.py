"""Corpus clustering (`embstore.clustering.corpus`): quality on real speech, scale on 1 M vectors.

    python benchmarks/clustering.py real  --out bench-out/cluster_real.json
    python benchmarks/clustering.py scale --rows 100000 1000000 --out bench-out/clustering_scale.json
    python benchmarks/clustering.py store --rows 1000000 --store /tmp/cluster-store --out bench-out/cluster_store.json

real: embeddings (`--model`, default: the default model) of the 100 utterances of
../shared/data (10 speakers), labels hidden from the clustering. The threshold is swept on speakers
0-4 (tuning half) and the chosen one reported on speakers 5-9 and on all 10:
purity, coverage (pyannote.metrics' definitions for whole items) and cluster count.

scale: synthetic unit vectors (dim 256) of `--speakers` speakers, written to a .npy
file and clustered through `np.load(mmap_mode="r")` (streamed in blocks, as a store's
array would be). Each run is a fresh subprocess; reported: wall time per stage,
peak anonymous RSS growth (RssAnon: the memmap's file pages are excluded, they are
the page cache's) sampled every 20 ms, tracemalloc's peak of NumPy allocations,
purity/coverage against the synthetic truth, and time per 100k rows across sizes
(the ratio to the smallest run shows how it scales).

store: the whole `Store.cluster` path (what `embstore cluster` runs) on a store of
`--rows` done items built the fast way (benchmarks/query_scale.py's synthetic store,
500 items per speaker): reading the item rows, streaming the Zarr array, clustering,
writing every label into items.cluster. Run in a fresh subprocess; reported: wall
time, the report's stages, peak RSS and RssAnon growth, purity/coverage against the
store's (hidden) speaker labels.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

# no network in benchmarks: pretrained weights from the user cache (`make setup`) or nowhere
os.environ.setdefault("EMBSTORE_MODEL_SOURCES", "cache,file")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from embstore.clustering.corpus import DEFAULT_THRESHOLD, cluster_corpus  # noqa: E402
from embstore.clustering.labels import purity_coverage  # noqa: E402

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "librispeech-test-other"


def real(args: argparse.Namespace) -> dict:
    from embstore import models

    from embstore.models.thresholds import tuned_for

    encoder = models.load(args.model)
    files = sorted(Path(args.data).glob("*/*.flac"))
    x = np.stack([encoder.embed_file(str(f)) for f in files])
    truth = np.array([f.parent.name for f in files])
    speakers = sorted(set(truth))
    tune = np.isin(truth, speakers[:5])
    sweep = []
    # wide: cosine scales differ by model (Resemblyzer's speakers sit near 0.7, CAM++'s near 0.3)
    for threshold in np.round(np.arange(0.1, 0.951, 0.025), 3):
        labels = cluster_corpus(x[tune], threshold=float(threshold)).labels
        purity, coverage = purity_coverage(labels, truth[tune])
        sweep.append({"threshold": float(threshold), "purity": round(purity, 3), "coverage": round(coverage, 3),
                      "clusters": int(labels.max()) + 1})
    # the middle of the tuning half's plateau of best purity + coverage (its edges are
    # one step from merging two speakers or splitting one)
    top = max(r["purity"] + r["coverage"] for r in sweep)
    plateau = [r["threshold"] for r in sweep if r["purity"] + r["coverage"] == top]
    best = plateau[len(plateau) // 2]

    def report(mask: np.ndarray, threshold: float) -> dict:
        labels = cluster_corpus(x[mask], threshold=threshold).labels
        purity, coverage = purity_coverage(labels, truth[mask])
        return {"threshold": threshold, "purity": round(purity, 3), "coverage": round(coverage, 3),
                "clusters": int(labels.max()) + 1, "speakers": len(set(truth[mask]))}

    held_out = ~tune
    everything = np.ones(len(truth), dtype=bool)
    tuned = tuned_for(encoder.name)
    default = tuned.corpus_cluster if tuned else DEFAULT_THRESHOLD
    return {
        "model": encoder.name,
        "tuning_sweep_speakers_0_4": sweep,
        "plateau": [plateau[0], plateau[-1]],
        "best_on_tuning_half": best,
        "default_threshold": default,
        "held_out_speakers_5_9": {"default": report(held_out, default), "tuned": report(held_out, best)},
        "all_10_speakers": {"default": report(everything, default), "tuned": report(everything, best)},
        "num_speakers_10": purity_coverage(cluster_corpus(x, num_speakers=10).labels, truth),
        # the 1 M-item path on these 100 items: 10 cells, local AHC, merging
        "two_stage_forced_all_10": purity_coverage(
            cluster_corpus(x, max_direct=10, cell_size=10).labels, truth
        ),
    }


def synthetic(path: Path, rows: int, dim: int, speakers: int, seed: int) -> np.ndarray:
    """Unit vectors around `speakers` centres sharing a common direction, so that
    different speakers are cos ~0.5 apart and one speaker's items cos ~0.8 (roughly
    Resemblyzer's spread); written block by block, truth returned."""
    rng = np.random.default_rng(seed)
    common = rng.standard_normal(dim)
    common /= np.linalg.norm(common)
    own = rng.standard_normal((speakers, dim))
    own /= np.linalg.norm(own, axis=1, keepdims=True)
    centres = 0.7 * common + 0.7 * own
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    truth = rng.integers(0, speakers, size=rows).astype(np.int32)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, dim))
    for a in range(0, rows, 65536):
        b = min(a + 65536, rows)
        block = centres[truth[a:b]] + 0.5 * rng.standard_normal((b - a, dim)) / np.sqrt(dim)
        out[a:b] = block.astype(np.float32)
    out.flush()
    del out
    return truth


def rss_anon_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return 0.0


def scale_child(rows: int, dim: int, speakers: int, threshold: float, workdir: str) -> dict:
    import tracemalloc

    path = Path(workdir) / f"synthetic-{rows}-{dim}-{speakers}.npy"
    truth_path = path.with_suffix(".truth.npy")
    if not path.exists() or not truth_path.exists():
        np.save(truth_path, synthetic(path, rows, dim, speakers, seed=0))
    truth = np.load(truth_path)
    matrix = np.load(path, mmap_mode="r")
    peak = {"value": rss_anon_mb()}
    base = peak["value"]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak["value"] = max(peak["value"], rss_anon_mb())
            time.sleep(0.02)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    tracemalloc.start()
    t = time.perf_counter()
    result = cluster_corpus(matrix, threshold=threshold)
    seconds = time.perf_counter() - t
    traced = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    stop.set()
    thread.join()
    purity, coverage = purity_coverage(result.labels, truth)
    return {
        "rows": rows, "dim": dim, "speakers": speakers, "threshold": threshold,
        "seconds": round(seconds, 1), "stage_seconds": {k: round(v, 1) for k, v in result.timings.items()},
        "cells": result.cells, "local_clusters": result.local_clusters, "passes": result.passes,
        "clusters": result.num_clusters,
        "purity": round(purity, 4), "coverage": round(coverage, 4),
        "peak_rss_anon_growth_mb": round(peak["value"] - base, 1),
        "tracemalloc_peak_mb": round(traced / 2**20, 1),
        "matrix_mb": round(rows * dim * 4 / 2**20, 1),
    }


def scale(args: argparse.Namespace) -> list[dict]:
    workdir = args.workdir or tempfile.mkdtemp(prefix="embstore-cluster-")
    os.makedirs(workdir, exist_ok=True)
    results = []
    for rows in args.rows:
        speakers = args.speakers or max(10, rows // 500)
        done = subprocess.run(
            [sys.executable, __file__, "child", "--child-rows", str(rows), "--dim", str(args.dim),
             "--speakers", str(speakers), "--threshold", str(args.threshold), "--workdir", workdir],
            capture_output=True, text=True, check=True,
        )
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        results[-1]["seconds_per_100k"] = round(results[-1]["seconds"] / rows * 100_000, 2)
        print(json.dumps(results[-1]), flush=True)
    return results


def store_child(path: str) -> dict:
    import embstore
    from _memory import Peak

    st = embstore.open(path)
    rss, anon = Peak("VmRSS"), Peak("RssAnon")
    base_rss, base_anon = rss.reset(), anon.reset()
    t = time.perf_counter()
    report = st.cluster("vox")
    seconds = time.perf_counter() - t
    rss.stop()
    anon.stop()
    labelled = st.manifest.query("SELECT count(*) FROM items WHERE cluster IS NOT NULL")[0][0]
    st.close()
    return {
        "items": report.items, "clustered": report.clustered, "labelled_in_store": labelled,
        "clusters": report.clusters, "speakers": report.speakers, "algorithm": report.algorithm,
        "cells": report.cells, "threshold": report.threshold,
        "purity": report.purity, "coverage": report.coverage,
        "seconds": round(seconds, 1), "stage_seconds": report.stage_seconds,
        "peak_rss_mb": round(rss.value, 1), "rss_growth_mb": round(rss.value - base_rss, 1),
        "rss_anon_growth_mb": round(anon.value - base_anon, 1),
    }


def store(args: argparse.Namespace) -> list[dict]:
    from query_scale import build

    results = []
    for rows in args.rows:
        path = Path(args.store or tempfile.mkdtemp(prefix="embstore-cluster-store-")) / f"rows-{rows}"
        t = time.perf_counter()
        build(path, rows, args.dim, per_speaker=500).close()
        built = time.perf_counter() - t
        done = subprocess.run([sys.executable, __file__, "store-child", "--store", str(path)],
                              capture_output=True, text=True, check=True)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]) | {"build_seconds": round(built, 1)})
        print(json.dumps(results[-1]), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=["real", "scale", "child", "store", "store-child"])
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--speakers", type=int, default=None, help="default: rows / 500")
    parser.add_argument("--threshold", type=float, default=0.65)
    parser.add_argument("--model", default=None, help="real mode: the model (default: the default model)")
    parser.add_argument("--workdir", default=None, help="where the synthetic .npy files go (reused)")
    parser.add_argument("--child-rows", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--store", default=None, help="store mode: where the synthetic stores go (reused)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.mode == "store-child":
        print(json.dumps(store_child(args.store)))
        return
    if args.mode == "child":
        print(json.dumps(scale_child(args.child_rows, args.dim, args.speakers, args.threshold, args.workdir)))
        return
    if args.mode == "real" and not Path(args.data).is_dir():
        raise SystemExit(f"{args.data}: the shared speech data is absent")
    result = {"real": real, "scale": scale, "store": store}[args.mode](args)
    print(json.dumps(result, indent=2))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
