"""Scan scale: N tiny WAV files in a VoxCeleb-like tree; time scan, unchanged rescan, and
"nothing to do" of extract at that size.

    python benchmarks/scan_scale.py --files 1000000 --tree /tmp/scan-tree --out bench-out/scan_scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path


def tiny_wav(samples: int = 16, rate: int = 16000) -> bytes:
    data = b"\x00\x01" * samples
    return (
        b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVE"
        + b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
        + b"data" + struct.pack("<I", len(data)) + data
    )


def build_tree(root: Path, files: int, per_video: int = 8, videos_per_speaker: int = 20) -> None:
    """root/vox/idNNNNN/videoNNN/000NN.wav, like VoxCeleb."""
    marker = root / f".built-{files}"
    if marker.exists():
        return
    blob = tiny_wav()
    made = 0
    spk = 0
    while made < files:
        for v in range(videos_per_speaker):
            d = root / "vox" / f"id{spk:05d}" / f"video{v:03d}"
            d.mkdir(parents=True, exist_ok=True)
            for k in range(per_video):
                if made >= files:
                    break
                with open(d / f"{k:05d}.wav", "wb") as f:
                    f.write(blob)
                made += 1
        spk += 1
    marker.touch()


def timed(cmd: list[str]) -> tuple[float, str, int]:
    started = time.monotonic()
    proc = subprocess.run(
        ["/usr/bin/time", "-f", "%M"] + cmd, capture_output=True, text=True
    )
    seconds = time.monotonic() - started
    if proc.returncode != 0:
        raise SystemExit(f"{cmd} failed:\n{proc.stderr}")
    peak_kb = int(proc.stderr.strip().splitlines()[-1])
    return seconds, proc.stdout, peak_kb


def nothing_to_do_at_scale(store: str) -> float:
    """`embstore extract` on a store whose every item is done: how long to say so.

    The done rows are marked directly in the manifest (no 1 M real embeddings here);
    the command still runs its real path: open, model lookup, task refresh, counts.
    """
    import embstore
    from embstore.models import load

    encoder = load("resemblyzer")
    with embstore.open(store) as st:
        model = st.manifest.register_model(encoder.describe())
        with st.manifest.write() as conn:
            conn.execute(
                "INSERT OR IGNORE INTO tasks (item_id, model_id, status, length, row)"
                " SELECT id, ?, 'done', 0, id - 1 FROM items WHERE removed = 0",
                (model.id,),
            )
    seconds, out, _ = timed([sys.executable, "-m", "embstore", "extract", store, "--model", "resemblyzer", "--json"])
    if not json.loads(out)["nothing_to_do"]:
        raise SystemExit("expected nothing to do")
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--tree", default="/tmp/embstore-scan-tree")
    ap.add_argument("--store", default=None)
    ap.add_argument("--out", default="bench-out/scan_scale.json")
    args = ap.parse_args()
    tree = Path(args.tree)
    t0 = time.monotonic()
    build_tree(tree, args.files)
    build_s = time.monotonic() - t0
    store = args.store or str(tree) + ".store"
    subprocess.run(["rm", "-rf", store], check=True)
    exe = [sys.executable, "-m", "embstore"]
    first_s, out1, rss1 = timed(exe + ["scan", store, str(tree), "--json"])
    again_s, out2, rss2 = timed(exe + ["scan", store, str(tree), "--json"])
    nothing_s = nothing_to_do_at_scale(store)
    report = {
        "files": args.files,
        "tree_build_s": round(build_s, 1),
        "scan_s": round(first_s, 1),
        "scan_files_per_s": round(args.files / first_s),
        "scan_peak_rss_mb": round(rss1 / 1024),
        "rescan_unchanged_s": round(again_s, 1),
        "rescan_peak_rss_mb": round(rss2 / 1024),
        "rescan_no_changes": json.loads(out2)["no_changes"],
        "extract_nothing_to_do_s": round(nothing_s, 2),
        "cpus": os.cpu_count(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
