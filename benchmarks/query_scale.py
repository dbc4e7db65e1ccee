"""Query scale: a synthetic store of N rows (default 1 M, dim 256), then time the
queries users run against it: one speaker's embeddings, top-10 cosine neighbours,
per-speaker centroids.

    python benchmarks/query_scale.py --rows 1000000 --store /tmp/query-store --out bench-out/query_scale.json

The store is built the fast way: a model registered with `Store.register_model`, the
files/items/tasks rows inserted in bulk, the vectors written with
`ModelArrays.write_rows` in big blocks, one speaker's rows contiguous as extraction
writes them. It is reused when it already has the requested size.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import embstore  # noqa: E402
from embstore.manifest.connection import utcnow  # noqa: E402
from tests.store_factory import fake_model_description  # noqa: E402

BLOCK = 65536


def speaker_of(index: int, per_speaker: int) -> str:
    return f"id{index // per_speaker:06d}"


def build(path: Path, rows: int, dim: int, per_speaker: int, seed: int = 0, datasets: int = 1,
          centres: np.ndarray | None = None, noise: float = 0.5, make_vectors=None):
    """A store holding `rows` done items of one synthetic model (reused if already built;
    a smaller one built the same way is extended to `rows`). Speaker s has centre
    `centres[s]` (default: standard normal) and items centre + `noise` x N(0, 1) (cosine
    ~0.8 between two items of a speaker at noise 0.5); with `datasets` > 1 the speakers
    are split evenly into datasets ds0, ds1, ... `make_vectors(first, speaker_index, rng)`
    replaces the vectors of a block (planted copies)."""
    st = embstore.open(path)
    model = st.manifest.register_model(fake_model_description(dim, name="synthetic"))
    if model.rows == rows:
        return st
    if model.rows > rows:
        raise SystemExit(f"{path} holds a store of another size; remove it first")
    now = utcnow()
    rng = np.random.default_rng(seed + model.rows)
    speakers = (rows + per_speaker - 1) // per_speaker
    if centres is None:
        # a fixed stream: the first n speakers' centres are the same for any store size
        centres = np.random.default_rng(seed).standard_normal((speakers, dim), dtype=np.float32)
    arrays = st.manifest.model_arrays(model)
    with st.manifest.write() as conn:
        conn.execute(
            "INSERT OR IGNORE INTO roots (kind, path, layout, created_at, scanned_at) VALUES ('tree', ?, 'dataset', ?, ?)",
            (str(path / "audio"), now, now),
        )
        root_id = conn.execute("SELECT id FROM roots WHERE kind = 'tree' AND path = ?", (str(path / "audio"),)).fetchone()[0]
    for start in range(model.rows, rows, BLOCK):
        stop = min(start + BLOCK, rows)
        idx = range(start, stop)
        files, items, tasks = [], [], []
        for i in idx:
            spk = speaker_of(i, per_speaker)
            ds = "vox" if datasets == 1 else f"ds{(i // per_speaker) * datasets // speakers}"
            rel = f"{ds}/{spk}/v{(i % per_speaker) // 8:03d}/{i % 8:05d}.wav"
            files.append((i + 1, root_id, os.path.dirname(rel), rel, ds, spk, 64000, 0, 16000, 1, 64000, 4.0,
                          "PCM_16", "ok", now))
            items.append((i + 1, rel[:-4], i + 1, ds, spk, 4.0))
            tasks.append((i + 1, model.id, 398, i, time.time()))
        with st.manifest.write() as conn:
            conn.executemany(
                "INSERT INTO files (id, root_id, dir, path, dataset, speaker, size, mtime_ns, sample_rate, channels,"
                " frames, duration, subtype, status, scanned_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", files)
            conn.executemany(
                "INSERT INTO items (id, uid, file_id, dataset, speaker, duration) VALUES (?,?,?,?,?,?)", items)
            conn.executemany(
                "INSERT INTO tasks (item_id, model_id, status, length, row, done_at, attempts)"
                " VALUES (?, ?, 'done', ?, ?, ?, 1)", tasks)
        spk_idx = np.arange(start, stop) // per_speaker
        if make_vectors is not None:
            vectors = make_vectors(start, spk_idx, rng)
        else:
            vectors = centres[spk_idx] + noise * rng.standard_normal((stop - start, dim), dtype=np.float32)
        arrays.write_rows(start, vectors, np.arange(start + 1, stop + 1, dtype=np.int64))
        with st.manifest.write() as conn:
            conn.execute("UPDATE models SET rows = ? WHERE id = ?", (stop, model.id))
        print(f"\rbuilt {stop}/{rows} rows", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return st


TIMES: dict[str, list[float]] = {}


def best_of(fn, repeat: int, label: str | None = None) -> tuple[float, object]:
    """(best wall seconds, last result) over `repeat` calls; all times kept under `label`."""
    times, result = [], None
    for _ in range(repeat):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    if label:
        TIMES[label] = [round(t * 1000, 1) for t in times]
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--per-speaker", type=int, default=100)
    parser.add_argument("--store", type=Path, default=Path("/tmp/embstore-query-scale"))
    parser.add_argument("--export-items", type=int, default=10_000,
                        help="size of the separate store export-pkl is timed on (0: skip)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()

    from embstore.query import centroid_table, similar

    results: dict = {"rows": args.rows, "dim": args.dim, "per_speaker": args.per_speaker, "cpus": os.cpu_count()}
    started = time.perf_counter()
    st = build(args.store, args.rows, args.dim, args.per_speaker)
    results["build_seconds"] = round(time.perf_counter() - started, 1)
    n_speakers = (args.rows + args.per_speaker - 1) // args.per_speaker
    speaker = speaker_of((n_speakers // 2) * args.per_speaker, args.per_speaker)
    item = f"vox/{speaker}/v000/00003"

    seconds, (ids, vectors) = best_of(lambda: st.embeddings(speaker=speaker), args.repeat, "speaker_embeddings")
    results["speaker_embeddings_ms"] = round(seconds * 1000, 1)
    results["speaker_items"] = len(ids)

    # the first search builds (or extends) STORE/cache; later ones memory-map it
    cache = args.store / "cache"
    if cache.exists():
        import shutil

        shutil.rmtree(cache)
    seconds, _ = best_of(lambda: similar(st, item_id=item, k=10), 1)
    results["similar_first_ms_builds_cache"] = round(seconds * 1000, 1)
    seconds, found = best_of(lambda: similar(st, item_id=item, k=10), args.repeat, "similar_top10")
    results["similar_top10_ms"] = round(seconds * 1000, 1)
    results["similar_top10_same_speaker"] = sum(r["speaker"] == speaker for r in found)
    seconds, _ = best_of(lambda: similar(st, item_id=item, k=10, use_cache=False), 1)
    results["similar_top10_ms_streaming_zarr"] = round(seconds * 1000, 1)

    seconds, (names, matrix, counts) = best_of(lambda: centroid_table(st), max(1, args.repeat // 2), "centroids")
    results["centroids_ms"] = round(seconds * 1000, 1)
    results["centroids_speakers"] = len(names)
    st.close()

    if args.export_items:
        export_store = args.store.parent / f"{args.store.name}-export-{args.export_items}"
        ex = build(export_store, args.export_items, args.dim, args.per_speaker)
        out = export_store.parent / f"{export_store.name}-pkl"
        if out.exists():
            import shutil

            shutil.rmtree(out)
        first = ex.export_pkl(out)
        again = ex.export_pkl(out)
        results["export_pkl"] = {
            "items": first.items, "seconds": first.seconds, "files_per_second": round(first.files_per_second, 1),
            "second_run_seconds": again.seconds, "second_run_written": again.written,
        }
        ex.close()

    results["all_times_ms"] = TIMES
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
