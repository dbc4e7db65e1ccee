"""Parquet scan scale: `embstore scan --hf` over an HF-style dataset of N rows (FLAC bytes
in an audio struct, `id` and `speaker_id` columns) in several shards; time and peak
memory of the first scan, of an unchanged rescan, and of a rescan after one shard
changed; then reading random rows the way the workers do.

    python benchmarks/parquet_scan.py --rows 100000 --data /tmp/hf-100k --out bench-out/parquet_scan.json

The audio is real speech when ../shared/data is there (the first `--seconds` of each
file, re-encoded as FLAC, cycled with a per-row gain so rows differ), else synthetic
tones. Peak memory is VmHWM of the scan process and its children, next to the size of
a shard on disk: a scan that read a whole shard's audio at once would reach it.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks._memory import tree_peak_mb  # noqa: E402

SHARED = ROOT.parent / "shared" / "data" / "librispeech-test-other"


def clips(seconds: float, count: int = 100) -> list[tuple[np.ndarray, str]]:
    """(int16 samples, speaker) of up to `count` sources."""
    import soundfile as sf

    out = []
    for f in sorted(SHARED.rglob("*.flac"))[:count]:
        data, _ = sf.read(str(f), dtype="int16", frames=int(seconds * 16000))
        out.append((data, f.parent.name))
    if not out:
        t = np.arange(int(seconds * 16000)) / 16000
        out = [((3000 * np.sin(2 * np.pi * (100 + 7 * k) * t)).astype(np.int16), f"spk{k % 10}") for k in range(count)]
    return out


def flac(samples: np.ndarray) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, samples, 16000, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def build(data: Path, rows: int, shards: int, row_group: int, seconds: float) -> list[Path]:
    """The dataset (kept between runs: a marker names its shape)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    marker = data / f".built-{rows}-{shards}-{row_group}-{seconds}"
    paths = [data / f"train-{k:05d}-of-{shards:05d}.parquet" for k in range(shards)]
    if marker.exists():
        return paths
    data.mkdir(parents=True, exist_ok=True)
    sources = clips(seconds)
    per_shard = -(-rows // shards)
    n = 0
    for k, path in enumerate(paths):
        schema = pa.schema([("id", pa.string()), ("speaker_id", pa.string()),
                            ("audio", pa.struct([("bytes", pa.binary()), ("path", pa.string())]))])
        with pq.ParquetWriter(path, schema) as writer:
            for start in range(0, per_shard, row_group):
                batch = []
                for _ in range(min(row_group, per_shard - start, rows - n)):
                    samples, speaker = sources[n % len(sources)]
                    gain = 0.5 + (n // len(sources)) % 997 / 1994  # distinct bytes per row
                    batch.append({"id": f"utt{n:07d}", "speaker_id": speaker,
                                  "audio": {"bytes": flac((samples * gain).astype(np.int16)), "path": f"utt{n:07d}.flac"}})
                    n += 1
                if batch:
                    writer.write_table(pa.Table.from_pylist(batch, schema=schema))
    marker.touch()
    return paths


def scan(store: Path, data: Path) -> dict:
    cmd = [sys.executable, "-m", "embstore", "scan", str(store), "--hf", str(data), "--json"]
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    peak = tree_peak_mb(proc)
    out, err = proc.communicate()
    seconds = time.monotonic() - started
    if proc.returncode != 0:
        raise SystemExit(f"scan failed: {err[-2000:]}")
    report = json.loads(out)
    keep = ("added", "changed", "removed", "unchanged", "failed", "items_added", "items_stale", "items_removed")
    return {"wall_seconds": round(seconds, 2), "scan_seconds": report["seconds"], "peak_rss_mb": round(peak, 1),
            **{k: report[k] for k in keep}}


def random_reads(paths: list[Path], rows_per_shard: int, n: int = 2000) -> dict:
    """Rows read as the workers read them (`content_hash` + `read_audio` of the address),
    in claim-like runs of 8 neighbouring rows."""
    from embstore.audio.io import content_hash, read_audio, row_address

    rng = random.Random(0)
    started = time.monotonic()
    done = 0
    while done < n:
        shard = str(rng.choice(paths))
        first = rng.randrange(0, rows_per_shard - 8)
        for row in range(first, first + 8):
            content_hash(row_address(shard, row))
            read_audio(row_address(shard, row))
            done += 1
    seconds = time.monotonic() - started
    return {"rows": done, "seconds": round(seconds, 2), "rows_per_second": round(done / seconds, 1)}


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except Exception:
        return platform.processor() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--shards", type=int, default=10)
    ap.add_argument("--row-group", type=int, default=1000, help="rows per Parquet row group")
    ap.add_argument("--seconds", type=float, default=1.0, help="audio per row")
    ap.add_argument("--data", type=Path, default=Path("/tmp/hf-parquet-scan"))
    ap.add_argument("--out", type=Path, default=Path("bench-out/parquet_scan.json"))
    args = ap.parse_args()
    started = time.monotonic()
    paths = build(args.data, args.rows, args.shards, args.row_group, args.seconds)
    built = time.monotonic() - started
    store = args.data.parent / (args.data.name + "-store")
    if store.exists():
        import shutil

        shutil.rmtree(store)
    first = scan(store, args.data)
    unchanged = scan(store, args.data)
    os.utime(paths[0])  # one shard touched: its rows are read again, the others are not
    one_shard = scan(store, args.data)
    sizes = [p.stat().st_size for p in paths]
    result = {
        "rows": args.rows, "shards": args.shards, "row_group_rows": args.row_group, "seconds_per_row": args.seconds,
        "dataset_mb": round(sum(sizes) / 2**20, 1), "largest_shard_mb": round(max(sizes) / 2**20, 1),
        "build_seconds": round(built, 1), "first_scan": first, "unchanged_rescan": unchanged,
        "one_shard_touched": one_shard, "rows_per_second_first_scan": round(args.rows / first["scan_seconds"], 1),
        "worker_reads": random_reads(paths, -(-args.rows // args.shards)),
        "cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
