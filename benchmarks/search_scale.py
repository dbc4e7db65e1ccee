"""Search scale: the ANN index, top-10 and range queries, incremental adds, near-duplicates
and overlap on synthetic stores written through the store's own paths
(benchmarks/query_scale.py's builder: dim 192, 100 items per speaker, clusters with
cosine ~0.8 between two items of a speaker), and the false-positive side of overlap on
real CAM++ embeddings of ../shared/data.

    python benchmarks/search_scale.py --rows 1000000 --store /tmp/s1m --out bench-out/search_scale_1m.json
    python benchmarks/search_scale.py --rows 10000000 --store /tmp/s10m --no-overlap --no-real --queries 50 \\
        --out bench-out/search_scale_10m.json
    python benchmarks/search_scale.py --rows 0 --overlap-items 1000000 --out bench-out/search_overlap.json

Each run appends `--add` rows to the store (the incremental add; 1 % of them planted
near-copies of existing rows, cosine ~0.99, for the near-duplicate recall): give a
fresh store, or one of exactly --rows rows.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from query_scale import build, speaker_of  # noqa: E402

from embstore.query import similar, unit_rows  # noqa: E402
from embstore.search import duplicates, knn, overlap  # noqa: E402
from embstore.search import index as ann  # noqa: E402


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def uid_of(row: int, per_speaker: int, dataset: str = "vox") -> str:
    spk = speaker_of(row, per_speaker)
    return f"{dataset}/{spk}/v{(row % per_speaker) // 8:03d}/{row % 8:05d}"


def pct(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)) * 1000, 2)


def index_section(st, args) -> dict:
    """The index built from scratch (the normalised-row cache first), its size and memory."""
    m = st.manifest.resolve_model()
    out: dict = {}
    shutil.rmtree(args.store / "cache", ignore_errors=True)
    started = time.perf_counter()
    unit_rows(st.manifest, m)
    out["row_cache_seconds"] = round(time.perf_counter() - started, 1)
    before = rss_mb()
    result = ann.ensure(st.manifest, m, kind="ivf" if args.rows < ann.IVF_MIN_ROWS else "auto")
    out.update(action=result.action, kind=result.meta.kind, lists=result.meta.lists, nprobe=result.meta.nprobe,
               build_seconds=round(result.seconds, 1), build_rss_growth_mb=round(rss_mb() - before, 1),
               peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))
    size = os.path.getsize(ann.folder_of(st.manifest, m) / result.meta.file)
    out["file_bytes_per_row"] = round(size / result.meta.rows, 1)
    out["loaded_bytes_per_row"] = round(loaded_bytes(args.store) / result.meta.rows, 1)
    return out


def loaded_bytes(store: Path) -> float:
    """Resident memory the published index adds to a fresh process that opens it."""
    import subprocess

    code = (
        "import sys, embstore; sys.path.insert(0, 'benchmarks'); from search_scale import rss_mb\n"
        "from embstore.search import index as ann\n"
        f"st = embstore.open({str(store)!r}); m = st.manifest.resolve_model(); ann._faiss()\n"
        "before = rss_mb(); ann.open_index(st.manifest, m); print((rss_mb() - before) * 2**20)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).resolve().parent.parent)
    return float(done.stdout.strip().splitlines()[-1])


def query_section(st, args, rows: int) -> dict:
    """Top-10 through the index vs the exact scan: recall@10 and the index's own time per
    nprobe (the exact answers computed once), then end to end at the default nprobe
    (`similar`: the id resolved, rows mapped to live items through the manifest); range
    queries at --range-threshold vs the exact set."""
    m = st.manifest.resolve_model()
    picks = np.random.default_rng(7).choice(rows, size=args.queries, replace=False)
    source = unit_rows(st.manifest, m)
    fast = knn.searcher(st.manifest, m, source)
    exact = knn.Searcher(source)
    vectors = source.take(np.sort(picks))[np.argsort(np.argsort(picks))]
    truth = [set(exact.top(v, 11)[0].tolist()) - {int(r)} for v, r in zip(vectors, picks)]
    out: dict = {"index": fast.name, "queries": len(picks), "default_nprobe": fast.meta.nprobe, "sweep": {}}
    range_truth = [set(exact.at_least(v, args.range_threshold)[0].tolist()) for v in vectors[: args.range_queries]]
    for nprobe in args.nprobe_sweep:
        ann.tune(fast.index, nprobe)
        in_range = [len(set(fast.at_least(v, args.range_threshold)[0].tolist()) & want) / max(len(want), 1)
                    for v, want in zip(vectors, range_truth)]
        recalls, times = [], []
        for v, r, want in zip(vectors, picks, truth):
            started = time.perf_counter()
            got, _ = fast.top(v, 44)  # what `similar` asks for k=10: max(4 (k+1), k+1+32) rows
            times.append(time.perf_counter() - started)
            recalls.append(len(set(got[:11].tolist()) - {int(r)} & want) / 10)
        out["sweep"][nprobe] = {"recall_at_10": round(float(np.mean(recalls)), 4),
                                "recall_min": round(float(np.min(recalls)), 2),
                                "p50_ms": pct(times, 50), "p95_ms": pct(times, 95),
                                "range_recall": round(float(np.mean(in_range)), 4) if in_range else None}
    ann.tune(fast.index, fast.meta.nprobe)
    timed, recalls = [], []
    uids = [uid_of(int(r), args.per_speaker) for r in picks]
    similar(st.manifest, item_id=uids[0], k=10)  # warm: the index loaded once per process
    for uid, r, want in zip(uids, picks, truth):
        started = time.perf_counter()
        found = similar(st.manifest, item_id=uid, k=10)
        timed.append(time.perf_counter() - started)
    out.update(similar_top10_p50_ms=pct(timed, 50), similar_top10_p95_ms=pct(timed, 95))
    range_recalls, range_sizes, range_timed = [], [], []
    for v in vectors[: args.range_queries]:
        started = time.perf_counter()
        got, _ = fast.at_least(v, args.range_threshold)
        range_timed.append(time.perf_counter() - started)
        want, _ = exact.at_least(v, args.range_threshold)
        range_sizes.append(len(want))
        range_recalls.append(len(set(got.tolist()) & set(want.tolist())) / max(len(want), 1))
    out.update(range_threshold=args.range_threshold, range_queries=len(range_recalls),
               range_recall=round(float(np.mean(range_recalls)), 4), range_recall_min=round(float(np.min(range_recalls)), 3),
               range_mean_size=round(float(np.mean(range_sizes)), 1), range_p50_ms=pct(range_timed, 50))
    return out


def add_section(st, args, rows: int) -> dict:
    """`--add` rows appended (1 % planted near-copies of old rows), the index extended,
    then near-duplicates: time and how many planted pairs were found."""
    m = st.manifest.resolve_model()
    arrays = st.manifest.model_arrays(m)
    rng = np.random.default_rng(12)
    originals = planted_copies(rows, args.add)
    planted = len(originals)
    copies = l2(arrays.read_rows(originals))
    copies += 0.01 * rng.standard_normal(copies.shape, dtype=np.float32)  # cosine ~0.99 to its original

    def make_vectors(first, spk_idx, block_rng):
        centres = np.random.default_rng(0).standard_normal((int(spk_idx.max()) + 1, m.dim), dtype=np.float32)
        out = centres[spk_idx] + 0.5 * block_rng.standard_normal((len(spk_idx), m.dim), dtype=np.float32)
        lo, hi = first - rows, first - rows + len(spk_idx)
        if lo < planted:
            out[: min(hi, planted) - lo] = copies[lo : min(hi, planted)]
        return out

    started = time.perf_counter()
    build(args.store, rows + args.add, m.dim, args.per_speaker, make_vectors=make_vectors)
    out = {"added_rows": args.add, "append_store_seconds": round(time.perf_counter() - started, 1)}
    m = st.manifest.resolve_model()
    # the add itself, even past the drift bound (`embstore index` would retrain instead)
    result = ann.ensure(st.manifest, m, retrain=False)
    out.update(action=result.action, extend_seconds=round(result.seconds, 1), reason=result.reason,
               added_residual=round(result.meta.added_residual, 4), train_residual=round(result.meta.train_residual, 4),
               past_drift_bound=result.meta.drifted())
    # recall@10 of queries among the added rows (new speakers the centroids never saw)
    source = unit_rows(st.manifest, m)
    fast, exact = knn.searcher(st.manifest, m, source), knn.Searcher(source)
    recalls = []
    for row in np.random.default_rng(5).choice(np.arange(rows + planted, rows + args.add), size=20, replace=False):
        vector = source.take(np.array([row]))[0]
        got, _ = fast.top(vector, 11)
        want, _ = exact.top(vector, 11)
        recalls.append(len(set(got.tolist()) & set(want.tolist())) / 11)
    out["added_rows_recall_at_10"] = round(float(np.mean(recalls)), 4)
    if args.duplicates:
        out["duplicates"] = duplicates_section(st, args, rows)
    return out


def planted_copies(rows: int, add: int) -> np.ndarray:
    """The old rows whose near-copies `add_section` appends right after row `rows`."""
    return np.sort(np.random.default_rng(11).choice(rows, size=max(1, add // 100), replace=False))


def duplicates_section(st, args, rows: int) -> dict:
    """Near-duplicates at 0.98 over the whole store: time, and the planted copies found."""
    originals = planted_copies(rows, args.add)
    report = duplicates.near_duplicates(st.manifest, min_score=0.98, limit=10**6)
    want = {(uid_of(int(o), args.per_speaker), uid_of(rows + j, args.per_speaker)) for j, o in enumerate(originals)}
    got = {(p.a, p.b) for p in report.pairs}
    return {"seconds": report.seconds, "rows": report.rows, "index": report.index, "pairs": report.total,
            "planted": len(originals), "planted_found": len(want & got), "recall": round(len(want & got) / len(want), 4)}


def l2(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def overlap_section(args) -> dict:
    """Two datasets of `--overlap-items` items each (100 per speaker), `--planted`
    speakers of ds1 given the centre of a speaker of ds0 (new items): overlap's time,
    planted pairs found, other pairs above the threshold."""
    per = args.per_speaker
    speakers = 2 * args.overlap_items // per
    centres = np.random.default_rng(3).standard_normal((speakers, 192), dtype=np.float32)
    half = speakers // 2
    step = half // args.planted
    shared = {j * step: half + j * step for j in range(args.planted)}
    for a, b in shared.items():
        centres[b] = centres[a]
    started = time.perf_counter()
    st = build(args.overlap_store, 2 * args.overlap_items, 192, per, datasets=2, centres=centres)
    out: dict = {"items_per_dataset": args.overlap_items, "speakers_per_dataset": half, "planted": args.planted,
                 "store_build_seconds": round(time.perf_counter() - started, 1)}
    unit_rows(st.manifest, st.manifest.resolve_model())  # the row cache, as a query would have it
    for threshold in (args.threshold,):
        report = overlap.overlap(st.manifest, "ds0", "ds1", threshold=threshold)
        want = {(speaker_of(a * per, per), speaker_of(b * per, per)) for a, b in shared.items()}
        got = {(p.speaker, p.other) for p in report.pairs}
        out[f"threshold_{threshold}"] = {
            "seconds": report.seconds, "pairs": len(got), "planted_found": len(want & got),
            "other_pairs": len(got - want),
            "lowest_planted_score": min((p.score for p in report.pairs if (p.speaker, p.other) in want), default=None),
        }
    st.close()
    return out


def real_section(args) -> dict:
    """The false-positive side on real speech: ../shared/data's 10 speakers x 10
    utterances embedded with CAM++, each speaker's utterances split into dataset "a"
    (odd) and "b" (even): overlap(a, b) should find the 10 same-speaker pairs and none
    of the 90 others; near-duplicates at 0.98 should find no pair (no copies)."""
    import embstore

    data = Path(__file__).resolve().parents[2] / "shared" / "data" / "librispeech-test-other"
    if not data.exists():
        return {"skipped": f"{data} is absent"}
    folder = Path(tempfile.mkdtemp(prefix="search-real-"))
    try:
        st = embstore.open(folder / "store")
        st.scan([data.parent])
        started = time.perf_counter()
        st.extract(progress=False)
        out: dict = {"extract_seconds": round(time.perf_counter() - started, 1)}
        with st.manifest.write() as conn:
            conn.execute("UPDATE items SET dataset = CASE WHEN id % 2 = 1 THEN 'a' ELSE 'b' END")
        report = overlap.overlap(st.manifest, "a", "b", threshold=-1.0)
        same = [p.score for p in report.pairs if p.speaker == p.other]
        other = [p.score for p in report.pairs if p.speaker != p.other]
        out.update(speakers=report.speakers, same_pairs=len(same), other_pairs=len(other),
                   same_min=round(min(same), 4), other_max=round(max(other), 4),
                   other_mean=round(float(np.mean(other)), 4))
        for threshold in (0.5, 0.6, 0.7, 0.8):
            out[f"at_{threshold}"] = {"same_found": sum(s >= threshold for s in same),
                                      "false_pairs": sum(s >= threshold for s in other)}
        items = overlap.overlap(st.manifest, "a", "b", threshold=args.threshold, items=True)
        out["items_mode"] = {"threshold": args.threshold,
                             "same_found": sum(p.speaker == p.other for p in items.pairs),
                             "false_pairs": sum(p.speaker != p.other for p in items.pairs)}
        dup = duplicates.near_duplicates(st.manifest, min_score=0.98)
        out["near_duplicates_at_0.98"] = dup.total
        st.close()
        return out
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="0: skip the index/query/add sections")
    parser.add_argument("--reuse-index", action="store_true", help="time queries on the published index")
    parser.add_argument("--per-speaker", type=int, default=100)
    parser.add_argument("--store", type=Path, default=Path("/tmp/embstore-search-scale"))
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--range-queries", type=int, default=30)
    parser.add_argument("--range-threshold", type=float, default=0.7)
    parser.add_argument("--nprobe-sweep", type=int, nargs="*", default=[8, 16, 32, 64, 128])
    parser.add_argument("--add", type=int, default=100_000)
    parser.add_argument("--no-duplicates", dest="duplicates", action="store_false")
    parser.add_argument("--duplicates-of", type=int, default=None, metavar="ROWS",
                        help="only near-duplicates, on a store a run with --rows ROWS extended")
    parser.add_argument("--overlap-items", type=int, default=1_000_000, help="per dataset; 0: skip")
    parser.add_argument("--overlap-store", type=Path, default=Path("/tmp/embstore-search-overlap"))
    parser.add_argument("--planted", type=int, default=50)
    parser.add_argument("--threshold", type=float, default=0.7)
    parser.add_argument("--no-real", dest="real", action="store_false")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import platform

    results: dict = {"rows": args.rows, "dim": 192, "per_speaker": args.per_speaker, "cpus": os.cpu_count(),
                     "machine": platform.processor() or platform.machine(), "load_average": os.getloadavg()}

    def save() -> None:
        text = json.dumps(results, indent=2)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(text + "\n")
        print(text, flush=True)

    if args.rows:
        started = time.perf_counter()
        st = build(args.store, args.rows, 192, args.per_speaker)
        results["store_build_seconds"] = round(time.perf_counter() - started, 1)
        if not args.reuse_index:
            results["index"] = index_section(st, args)
        save()
        results["query"] = query_section(st, args, args.rows)
        save()
        if args.duplicates_of is not None:  # a store that already holds add_section's planted copies
            results["duplicates"] = duplicates_section(st, args, args.duplicates_of)
            save()
        elif args.add:
            results["incremental"] = add_section(st, args, args.rows)
            save()
        st.close()
    if args.overlap_items:
        results["overlap"] = overlap_section(args)
        save()
    if args.real:
        results["real"] = real_section(args)
    results["load_average_after"] = os.getloadavg()
    save()


if __name__ == "__main__":
    main()
