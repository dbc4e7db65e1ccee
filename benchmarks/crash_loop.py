"""Crash loop: kill -9 `embstore extract` at random moments, over and over, then check
that the store ends up exactly as a clean run would have made it.

    python benchmarks/crash_loop.py --kills 100 --out bench-out/crash_loop.json

Each cycle starts `embstore extract STORE --device cpu --workers 2` in a new session and
sends SIGKILL to its whole process group (parent, writer, workers) at a moment drawn
uniformly within the time a full run of the remaining work takes (estimated from a
calibration run). To keep every cycle busy, the corpus grows in batches: whenever less
than two batches of work are left, new files are written into the tree and scanned.
After the last kill a run finishes undisturbed. Then a clean single-worker run embeds
the same corpus into a fresh store, and:

- every live item has exactly one task, done, and no two items share a row;
- every stored vector equals the clean run's vector (cosine >= 0.99999);
- `embstore.verify` finds the manifest and the arrays consistent;
- no item was blamed for the kills (no suspects, no `crash` failures: the deaths were
  the run's, not the items').

The JSON report counts how many kills landed mid-run (the process alive with work
left), how many while workers held claims, and the final figures.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

MIN_COSINE = 0.99999


def write_batch(folder: Path, speakers: int, per_speaker: int, seconds: float, seed: int) -> int:
    """speakers x per_speaker short synthetic voices under folder/<speaker>/."""
    import soundfile as sf

    from embstore.demo import voice

    n = 0
    for s in range(speakers):
        for k in range(per_speaker):
            path = folder / f"b{seed}-spk{s}" / f"b{seed}-spk{s}-{k}.wav"
            path.parent.mkdir(parents=True, exist_ok=True)
            length = seconds + 0.11 * k
            sf.write(str(path), voice(length, 16000, 100 + 23 * s + 3 * seed % 40, seed * 1000 + 10 * s + k), 16000)
            n += 1
    return n


def _extract_cmd(store: Path, workers: int) -> list[str]:
    return [sys.executable, "-m", "embstore", "extract", str(store), "--device", "cpu", "--workers", str(workers),
            "--json"]


def _counts(store: Path) -> dict[str, int]:
    """Task states straight from SQLite (a separate reader, as a kill leaves it)."""
    conn = sqlite3.connect(str(store / "manifest.db"), timeout=60)
    try:
        out = {s: n for s, n in conn.execute("SELECT status, count(*) FROM tasks GROUP BY status")}
        out["items"] = conn.execute("SELECT count(*) FROM items WHERE removed = 0").fetchone()[0]
        out["no_task"] = conn.execute(
            "SELECT count(*) FROM items i WHERE removed = 0"
            " AND NOT EXISTS (SELECT 1 FROM tasks t WHERE t.item_id = i.id)"
        ).fetchone()[0]
    except sqlite3.OperationalError:  # no tables yet
        out = {}
    finally:
        conn.close()
    return out


def _left(c: dict[str, int]) -> int:
    return c.get("pending", 0) + c.get("claimed", 0) + c.get("stale", 0) + c.get("no_task", 0)


def timed_run(store: Path, workers: int, env: dict[str, str]) -> tuple[float, float, str]:
    """One undisturbed `extract` subprocess: (seconds to the first done item, total seconds, stdout)."""
    t0 = time.monotonic()
    proc = subprocess.Popen(_extract_cmd(store, workers), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True, text=True)
    first_done = None
    while proc.poll() is None:
        if first_done is None and _counts(store).get("done", 0) > 0:
            first_done = time.monotonic() - t0
        time.sleep(0.05)
    total = time.monotonic() - t0
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"an undisturbed run failed ({proc.returncode}): {err[-1000:]}")
    return (first_done if first_done is not None else total), total, out


def reference_vectors(root: Path, work: Path, how: str, env: dict[str, str]) -> tuple[dict[str, np.ndarray], dict]:
    """uid -> vector of a clean run, and its timing.

    how="run": a single-worker `extract` subprocess over the whole corpus (its timing
    also sizes the kill window); how="embed_file": the per-item reference in-process.
    """
    import embstore

    started = time.monotonic()
    if how == "run":
        clean = work / "clean-store"
        shutil.rmtree(clean, ignore_errors=True)
        st = embstore.open(clean)
        st.scan([root])
        st.close()
        startup, total, _ = timed_run(clean, 1, env)
        st = embstore.open(clean, create=False)
        ids, vectors = st.embeddings()
        failed = st.query("SELECT count(*) FROM tasks WHERE status != 'done'")[0][0]
        st.close()
        if failed:
            raise SystemExit(f"the clean reference run left {failed} items not done")
        return dict(zip(ids, vectors)), {"seconds": total, "startup_s": startup,
                                         "per_item_s": max(total - startup, 0.1) / max(len(ids), 1)}
    from embstore.models import load

    encoder = load("resemblyzer")
    out = {}
    for path in sorted(root.rglob("*.wav")):
        uid = os.path.splitext(str(path.relative_to(root)))[0]
        out[uid] = encoder.embed_file(str(path))
    return out, {"seconds": time.monotonic() - started}


def crash_loop(
    work: Path,
    kills: int = 3,
    batches: int | None = None,
    speakers: int = 2,
    per_speaker: int = 4,
    seconds: float = 1.0,
    workers: int = 2,
    window_s: float | None = None,
    reference: str = "run",
    seed: int = 0,
    log=print,
) -> dict[str, Any]:
    """Run the crash loop in `work` (created); returns the report (see module doc)."""
    import embstore
    from embstore.verify import verify_store

    started = time.monotonic()
    rng = random.Random(seed)
    work = Path(work)
    root, store = work / "corpus", work / "store"
    for p in (root, store, work / "clean-store"):
        shutil.rmtree(p, ignore_errors=True)
    root.mkdir(parents=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    next_batch = 0
    per_batch = speakers * per_speaker

    def add_batch() -> bool:
        """New files into the tree, scanned: the work of the next cycles."""
        nonlocal next_batch
        if batches is not None and next_batch >= batches:
            return False
        write_batch(root / "crash", speakers, per_speaker, seconds, next_batch)
        next_batch += 1
        st = embstore.open(store)
        st.scan([root])
        st.close()
        return True

    add_batch()
    # the kill window: how long a full run of what is left takes (startup + per item),
    # measured by an undisturbed run with the same workers
    startup_s = per_item_s = calibration = None
    if window_s is None:
        startup_s, total, _ = timed_run(store, workers, env)
        per_item_s = max(total - startup_s, 0.1) / per_batch
        calibration = {"seconds": round(total, 2), "items": per_batch}
        log(f"calibration: full run of {per_batch} items {total:.1f}s (startup {startup_s:.1f}s)")
        add_batch()

    cycles = []
    for k in range(kills):
        before = _counts(store)
        if _left(before) < 2 * per_batch:
            add_batch()
            before = _counts(store)
        left = _left(before)
        window = window_s if window_s is not None else startup_s + per_item_s * left + 1.0
        at = rng.uniform(0, window)
        t0 = time.monotonic()
        proc = subprocess.Popen(_extract_cmd(store, workers), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        while proc.poll() is None and time.monotonic() - t0 < at:
            time.sleep(0.005)
        alive = proc.poll() is None
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        after = _counts(store)
        cycle = {
            "kill": k + 1, "at_s": round(at, 2), "window_s": round(window, 2), "alive_at_kill": alive,
            "left_before": left, "left_at_kill": _left(after), "claims_at_kill": after.get("claimed", 0),
            "done_before": before.get("done", 0), "done_after": after.get("done", 0),
            "exit_code": None if alive else proc.returncode,
        }
        # mid-run: the process was running and the store still had work for it
        cycle["mid_run"] = alive and cycle["left_at_kill"] > 0
        cycles.append(cycle)
        log(f"kill {k + 1}/{kills} at {at:.2f}s of {window:.1f}s: alive={alive} claims={cycle['claims_at_kill']}"
            f" done {cycle['done_before']}->{cycle['done_after']} left {cycle['left_at_kill']}")

    t0 = time.monotonic()
    final = subprocess.run(_extract_cmd(store, workers), env=env, capture_output=True, text=True, timeout=3600)
    final_s = time.monotonic() - t0
    # the reference: the same corpus, from scratch, undisturbed
    clean, timing = reference_vectors(root, work, reference, env)
    log(f"reference: {len(clean)} items in {timing['seconds']:.1f}s ({reference})")
    report: dict[str, Any] = {
        "kills": kills,
        "kills_mid_run": sum(c["mid_run"] for c in cycles),
        "kills_with_claims_held": sum(c["claims_at_kill"] > 0 for c in cycles),
        "kills_after_run_ended": sum(not c["alive_at_kill"] for c in cycles),
        "phases": {
            # nothing claimed nor finished yet in this cycle: imports, model loading, spawning
            "startup": sum(c["alive_at_kill"] and not c["claims_at_kill"] and c["done_after"] == c["done_before"]
                           for c in cycles),
            "claims_held": sum(c["alive_at_kill"] and c["claims_at_kill"] > 0 for c in cycles),
            "between_claims_or_finishing": sum(c["alive_at_kill"] and not c["claims_at_kill"]
                                               and c["done_after"] > c["done_before"] for c in cycles),
            "after_run_ended": sum(not c["alive_at_kill"] for c in cycles),
        },
        "items": len(clean),
        "batches": next_batch,
        "workers": workers,
        "reference": reference,
        "reference_seconds": round(timing["seconds"], 1),
        "window": {"fixed_s": window_s, "startup_s": startup_s and round(startup_s, 2),
                   "per_item_s": per_item_s and round(per_item_s, 3), "calibration_run": calibration},
        "final_run": {"exit_code": final.returncode, "seconds": round(final_s, 1)},
    }
    try:
        report["final_run"]["summary"] = json.loads(final.stdout)
    except ValueError:
        report["final_run"]["stderr"] = final.stderr[-2000:]
    report.update(check_store(store, clean, verify_store))
    report["ok"] = bool(report["final_run"]["exit_code"] == 0 and report["checks_ok"])
    report["seconds_total"] = round(time.monotonic() - started, 1)
    report["cycles"] = cycles
    return report


def check_store(store: Path, clean: dict[str, np.ndarray], verify_store) -> dict[str, Any]:
    """Exactly once, equal to the clean run, and consistent by `verify`."""
    import embstore

    st = embstore.open(store, create=False)
    try:
        tasks = st.query(
            "SELECT i.uid, t.status, t.row, t.attempts FROM items i LEFT JOIN tasks t ON t.item_id = i.id"
            " WHERE i.removed = 0"
        )
        per_item: dict[str, int] = {}
        for r in tasks:
            per_item[r["uid"]] = per_item.get(r["uid"], 0) + 1
        not_done = [r["uid"] for r in tasks if r["status"] != "done"]
        rows = [r["row"] for r in tasks if r["status"] == "done"]
        ids, vectors = st.embeddings()
        missing = sorted(set(clean) - set(ids))
        extra = sorted(set(ids) - set(clean))
        common = [i for i in ids if i in clean]
        mine = np.stack([vectors[ids.index(i)] for i in common]) if common else np.zeros((0, 1))
        ref = np.stack([clean[i] for i in common]) if common else np.zeros((0, 1))
        if common:
            cos = (mine * ref).sum(1) / (np.linalg.norm(mine, axis=1) * np.linalg.norm(ref, axis=1))
            min_cos = float(cos.min())
        else:
            min_cos = float("nan")
        verify = verify_store(st)
        runs = {s: n for s, n in st.query("SELECT status, count(*) FROM runs GROUP BY status")}
        garbage = sum(1 for _ in st.zarr_path.rglob("*.partial"))
        # killing the whole run is never an item's fault: no suspects, no poison items
        blamed = st.query("SELECT count(*) FROM tasks WHERE suspect = 1 OR crashed_workers IS NOT NULL")[0][0]
        crash_failed = st.query("SELECT count(*) FROM tasks WHERE stage = 'crash'")[0][0]
        result = {
            "done": len(rows),
            "not_done": not_done[:20],
            "items_with_several_tasks": sorted(u for u, n in per_item.items() if n > 1)[:20],
            "rows_distinct": len(set(rows)) == len(rows),
            "committed_rows": st.models()[0]["rows"],
            "max_attempts": max((r["attempts"] or 0 for r in tasks), default=0),
            "missing": missing[:20],
            "unexpected": extra[:20],
            "min_cosine": round(min_cos, 7),
            "verify_ok": verify.ok,
            "verify_problems": [p.message for p in verify.problems],
            "verify_warnings": [w.message for w in verify.warnings],
            "runs_by_status": runs,
            "leftover_partial_files": garbage,
            "items_blamed_for_kills": blamed,
            "crash_failed": crash_failed,
        }
    finally:
        st.close()
    result["checks_ok"] = bool(
        not result["not_done"] and not result["items_with_several_tasks"] and result["rows_distinct"]
        and not missing and not extra and min_cos >= MIN_COSINE and verify.ok
        and not blamed and not crash_failed
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=100)
    parser.add_argument("--out", type=Path, required=True, help="JSON report")
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: next to --out)")
    parser.add_argument("--batches", type=int, default=None,
                        help="stop adding files after this many batches (default: add as long as kills go on)")
    parser.add_argument("--speakers", type=int, default=2, help="speakers per batch")
    parser.add_argument("--per-speaker", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=1.0, help="length of the shortest file")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--window", type=float, default=None,
                        help="kill uniformly within this many seconds (default: from a calibration run)")
    parser.add_argument("--reference", choices=["run", "embed_file"], default="run")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    work = args.work or args.out.parent / "crash-loop-work"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = crash_loop(work, kills=args.kills, batches=args.batches, speakers=args.speakers,
                        per_speaker=args.per_speaker, seconds=args.seconds, workers=args.workers,
                        window_s=args.window, reference=args.reference, seed=args.seed,
                        log=lambda m: print(m, flush=True))
    args.out.write_text(json.dumps(report, indent=2, default=str))
    brief = {k: v for k, v in report.items() if k != "cycles"}
    print(json.dumps(brief, indent=2, default=str))
    raise SystemExit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()
