"""Crash loop: kill -9 `embstore extract` at random moments while it holds claims, and
resume every kill with exactly one command, started at once.

    python benchmarks/crash_loop.py --kills 100 --out bench-out/crash_loop.json
    python benchmarks/crash_loop.py --kills 20 --source ../shared/data/librispeech-test-other \\
        --model wespeaker:DIR --out bench-out/crash_loop_ecapa.json
    python benchmarks/crash_loop.py --kills 10 --source ../shared/data/librispeech-test-other \\
        --windows 1.5:0.75 --out bench-out/crash_loop_windows.json

Each cycle:
1. new files are written into the tree and scanned: the cycle's work (real speech from
   `--source`, re-encoded with a gain of its own per batch so no two batches share
   bytes, or synthetic voices without it);
2. `embstore extract STORE ...` starts in a new session; once its workers hold claims,
   after a random delay (uniform within `--delay`), at the first moment claims are held
   again, the whole process group (parent, writer, workers) gets SIGKILL;
3. at once, with the killed processes still unreaped zombies (this process makes itself
   their subreaper and waits for none of them, as in a container whose PID 1 never
   reaps), the same command runs **once**. It must exit 0 with every item done and
   nothing claimed;
4. then the zombies are reaped.

At the end:
- every live item has exactly one task, done, and no two items' rows overlap;
- every vector equals the reference: `embed_file` per item for a whole-item model, a
  clean undisturbed run into a fresh store for a window model (cosine >= 0.99999, the
  same window spans);
- `embstore.verify` finds the manifest and the arrays consistent;
- no item was blamed for the kills (no suspects, no `crash` failures).

Linux only (the subreaper is prctl(PR_SET_CHILD_SUBREAPER)).
"""

from __future__ import annotations

import argparse
import ctypes
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
from typing import Any, Callable, Iterator

import numpy as np

MIN_COSINE = 0.99999
PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Orphans of our children (the killed run's writer and workers) become ours, and
    stay zombies until we reap them."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _proc_stats() -> Iterator[tuple[int, list[str]]]:
    """(pid, the fields of /proc/<pid>/stat after the command name: state, ppid, pgrp...)
    of every process that is still there when read."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                text = f.read()
        except OSError:
            continue
        yield int(entry), text[text.rindex(")") + 2:].split()


def zombie_children(besides: int = 0) -> int:
    """Our children that have died and wait to be reaped (`besides`: not counting that
    one, the killed parent, so that what is left are its writer and workers)."""
    me, n = os.getpid(), 0
    for pid, fields in _proc_stats():
        if fields[0] == "Z" and int(fields[1]) == me and pid != besides:
            n += 1
    return n


def zombie_owners(store: Path) -> int:
    """Claim owners (host:pid:start:token) whose process is a zombie: what the resume must
    see as dead."""
    conn = sqlite3.connect(str(store / "manifest.db"), timeout=60)
    try:
        owners = [r[0] for r in conn.execute("SELECT DISTINCT owner FROM tasks WHERE status = 'claimed'")]
    finally:
        conn.close()
    pids = {int(o.split(":")[1]) for o in owners if o and not o.startswith("ray:")}
    return sum(_state(pid) == "Z" for pid in pids)


def reap_all() -> int:
    reaped = 0
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return reaped
        if pid == 0:
            return reaped
        reaped += 1


# -- the corpus -----------------------------------------------------------------------------


class Corpus:
    """A tree that grows by one batch of `per_batch` files per call."""

    def __init__(self, root: Path, per_batch: int, source: Path | None, seconds: float, seed: int):
        self.root = root
        self.per_batch = per_batch
        self.sources = sorted(source.rglob("*.flac")) + sorted(source.rglob("*.wav")) if source else []
        if source and not self.sources:
            raise SystemExit(f"no .flac or .wav files under {source}")
        self.seconds = seconds
        self.seed = seed
        self.batches = 0

    def add_batch(self) -> list[Path]:
        import soundfile as sf

        from embstore.synthetic import voice

        k, written = self.batches, []
        for n in range(self.per_batch):
            if self.sources:
                src = self.sources[(k * self.per_batch + n) % len(self.sources)]
                wav, rate = sf.read(str(src), dtype="float32")
                speaker = src.parent.name
                # a gain of the batch's own: identical bytes would be deduplicated, not computed
                wav = wav * np.float32(1.0 - 1e-3 * (k + 1))
                path = self.root / "crash" / speaker / f"b{k:04d}-{src.stem}.flac"
            else:
                speaker = f"spk{n % 2}"
                rate = 16000
                wav = voice(self.seconds + 0.11 * n, rate, 100 + 23 * (n % 2) + 3 * k % 40, self.seed + 1000 * k + n)
                path = self.root / "crash" / speaker / f"b{k:04d}-{n}.flac"
            path.parent.mkdir(parents=True, exist_ok=True)
            sf.write(str(path), wav, rate)
            written.append(path)
        self.batches += 1
        return written


def _counts(store: Path) -> dict[str, int]:
    """Task states straight from SQLite (a separate reader, as a kill leaves it)."""
    conn = sqlite3.connect(str(store / "manifest.db"), timeout=60)
    try:
        out = {s: n for s, n in conn.execute(
            "SELECT t.status, count(*) FROM tasks t JOIN items i ON i.id = t.item_id WHERE i.removed = 0"
            " GROUP BY t.status")}
        out["items"] = conn.execute("SELECT count(*) FROM items WHERE removed = 0").fetchone()[0]
        out["no_task"] = conn.execute(
            "SELECT count(*) FROM items i WHERE removed = 0 AND NOT EXISTS (SELECT 1 FROM tasks t WHERE t.item_id = i.id)"
        ).fetchone()[0]
    except sqlite3.OperationalError:  # no tables yet
        out = {}
    finally:
        conn.close()
    return out


def _left(c: dict[str, int]) -> int:
    return c.get("pending", 0) + c.get("claimed", 0) + c.get("stale", 0) + c.get("no_task", 0)


# -- one cycle --------------------------------------------------------------------------------


def _claimed(conn: sqlite3.Connection) -> int:
    try:
        return conn.execute("SELECT count(*) FROM tasks WHERE status = 'claimed'").fetchone()[0]
    except sqlite3.OperationalError:  # no tables yet, or a writer holds the lock a moment
        return 0


def _add_and_scan(corpus: Any, store: Path, root: Path) -> None:
    import embstore

    corpus.add_batch()
    st = embstore.open(store)
    st.scan([root])
    st.close()


def kill_a_run(cmd: list[str], store: Path, env: dict[str, str], delay: float, add_work: Callable[[], None],
               attempts: int = 6) -> tuple[dict, int]:
    """(`kill_while_claimed`'s result, runs missed first): new work, a run, and a kill
    `delay` after its first claim; a run that finished before that moment is reaped and the
    cycle tries again with new work and half the delay, so a fast machine still kills."""
    for missed in range(attempts):
        add_work()
        hit = kill_while_claimed(cmd, store, env, delay)
        if (hit["alive_at_kill"] and hit["claims_at_kill"] > 0) or missed == attempts - 1:
            return hit, missed
        hit["proc"].wait()  # it exited on its own: reap it, it is not this cycle's kill
        reap_all()
        delay /= 2
    raise AssertionError("unreachable")


def kill_while_claimed(cmd: list[str], store: Path, env: dict[str, str], delay: float, timeout: float = 120) -> dict:
    """Start `cmd`, wait for claims, wait `delay`, then SIGKILL its process group at the
    first moment claims are held; nothing is reaped. Returns what the kill hit."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    first_claim = None
    # one reader connection, polled every 5 ms: light enough not to slow the run it watches
    conn = sqlite3.connect(str(store / "manifest.db"), timeout=5)
    while proc.poll() is None and time.monotonic() - t0 < timeout:
        claimed = _claimed(conn)
        if claimed and first_claim is None:
            first_claim = time.monotonic()
        if first_claim is not None and time.monotonic() - first_claim >= delay and claimed:
            break
        time.sleep(0.005)
    conn.close()
    alive = proc.returncode is None and proc.poll() is None
    at = time.monotonic() - t0
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    # every process of the group dead (nothing is reaped: the parent too stays a zombie until
    # the resume has run, and its run row still reads "running")
    deadline = time.monotonic() + 10
    while _group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.001)
    after = _counts(store)
    return {"proc": proc, "alive_at_kill": alive, "at_s": round(at, 3),
            "claims_at_kill": after.get("claimed", 0), "done_at_kill": after.get("done", 0),
            "left_at_kill": _left(after)}


def _group_alive(pgid: int) -> bool:
    """Whether a process of the group is not yet dead (SIGKILL takes a moment to land)."""
    for _, fields in _proc_stats():
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False


def _state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    return text[text.rindex(")") + 2]


def crash_loop(
    work: Path,
    kills: int = 20,
    per_batch: int = 6,
    source: Path | None = None,
    model: str | None = None,
    windows: str | None = None,
    vad: str | None = None,
    workers: int = 2,
    delay: float = 0.5,
    seconds: float = 1.0,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the crash loop in `work` (created); returns the report (see module doc)."""
    import embstore

    started = time.monotonic()
    subreaper = become_subreaper()
    rng = random.Random(seed)
    work = Path(work)
    root, store = work / "corpus", work / "store"
    for p in (root, store, work / "clean-store"):
        shutil.rmtree(p, ignore_errors=True)
    root.mkdir(parents=True)
    corpus = Corpus(root, per_batch, source, seconds, seed)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "embstore", "extract", str(store), "--device", "cpu", "--workers", str(workers),
           "--json"]
    cmd += (["--model", model] if model else []) + (["--windows", windows] if windows else [])
    cmd += ["--vad", vad] if vad else []

    cycles = []
    for k in range(kills):
        wait = rng.uniform(0, delay)
        hit, missed = kill_a_run(cmd, store, env, wait, lambda: _add_and_scan(corpus, store, root))
        killed = hit.pop("proc")
        zombies = zombie_children(besides=killed.pid)
        owners_zombie = zombie_owners(store)
        t0 = time.monotonic()
        resume = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        resume_s = time.monotonic() - t0
        after = _counts(store)
        killed.wait()
        reaped = reap_all()
        cycle = hit | {
            "kill": k + 1, "delay_s": round(wait, 3), "missed_before": missed,
            "zombies_at_resume": zombies, "reaped": reaped,
            "claim_owners_zombie_at_resume": owners_zombie,
            "resume_exit": resume.returncode, "resume_s": round(resume_s, 2),
            "left_after_resume": _left(after), "failed_after_resume": after.get("failed", 0),
            "done_after_resume": after.get("done", 0), "items": after.get("items", 0),
        }
        cycle["one_resume_finished"] = (resume.returncode == 0 and cycle["left_after_resume"] == 0
                                        and cycle["failed_after_resume"] == 0)
        if not cycle["one_resume_finished"]:
            cycle["resume_stderr"] = resume.stderr[-1500:]
        cycles.append(cycle)
        log(f"kill {k + 1}/{kills} at {hit['at_s']:.2f}s: claims {hit['claims_at_kill']}, zombies {zombies}"
            f" ({owners_zombie} holding claims);"
            f" one resume: exit {resume.returncode} in {resume_s:.1f}s, left {cycle['left_after_resume']},"
            f" done {cycle['done_after_resume']}/{cycle['items']}")

    reference, how = reference_of(store, root, work, model, windows, vad)
    report: dict[str, Any] = {
        "kills": kills,
        "kills_with_claims_held": sum(c["claims_at_kill"] > 0 for c in cycles),
        "kills_while_running": sum(c["alive_at_kill"] for c in cycles),
        # runs that finished before their kill moment (a fast machine): each was followed by
        # a new batch and a new run with half the delay, so every cycle ends in a real kill
        "missed_kills": sum(c["missed_before"] for c in cycles),
        "resumes": len(cycles),
        "resumes_exit_0_all_done": sum(c["one_resume_finished"] for c in cycles),
        # zombies among the killed run's writer and workers (its parent not counted)
        "resumes_with_zombies": sum(c["zombies_at_resume"] > 0 for c in cycles),
        # ... and among them the very processes whose claims the resume had to take over
        "resumes_with_zombie_claim_owners": sum(c["claim_owners_zombie_at_resume"] > 0 for c in cycles),
        "subreaper": subreaper,
        "items": corpus.batches * per_batch,
        "batches": corpus.batches,
        "workers": workers,
        "model": model or "default",
        "windows": windows,
        "reference": how,
        "resume_seconds_mean": round(float(np.mean([c["resume_s"] for c in cycles])), 2) if cycles else 0.0,
    }
    report.update(check_store(store, reference, windows is not None))
    report["ok"] = bool(report["checks_ok"] and report["resumes_exit_0_all_done"] == kills)
    report["seconds_total"] = round(time.monotonic() - started, 1)
    report["cycles"] = cycles
    return report


# -- the reference and the checks ------------------------------------------------------------


def reference_of(store: Path, root: Path, work: Path, model: str | None, windows: str | None,
                 vad: str | None) -> tuple[dict[str, Any], str]:
    """uid -> vector (`embed_file` per item) for a whole-item model; uid -> (starts,
    ends, rows) of a clean undisturbed run for a window model."""
    import embstore

    if windows is not None:
        clean = embstore.open(work / "clean-store")
        clean.scan([root])
        summary = clean.extract(model=model, windows=windows, vad=vad, progress=False)
        out = {uid: clean.windows(uid, model=summary.model) for (uid,) in clean.manifest.query(
            "SELECT i.uid FROM items i JOIN tasks t ON t.item_id = i.id WHERE t.status = 'done'")}
        clean.close()
        return out, "a clean run"
    from embstore.models import load

    st = embstore.open(store)
    spec = st.models()[0].spec
    items = st.manifest.query("SELECT i.uid, r.path AS root, f.path FROM items i JOIN files f ON f.id = i.file_id"
                     " JOIN roots r ON r.id = f.root_id WHERE i.removed = 0")
    st.close()
    encoder = load(spec)
    return {r["uid"]: encoder.embed_file(os.path.join(r["root"], r["path"])) for r in items}, "embed_file"


def check_store(store: Path, reference: dict[str, Any], windowed: bool) -> dict[str, Any]:
    """Exactly once, equal to the reference, consistent by `verify`."""
    import embstore
    from embstore.vectors import cosine_rows

    st = embstore.open(store, create=False)
    try:
        tasks = st.manifest.query(
            "SELECT i.uid, t.status, t.row, coalesce(t.row_count, 1) AS n FROM items i LEFT JOIN tasks t"
            " ON t.item_id = i.id WHERE i.removed = 0"
        )
        per_item: dict[str, int] = {}
        for r in tasks:
            per_item[r["uid"]] = per_item.get(r["uid"], 0) + 1
        not_done = [r["uid"] for r in tasks if r["status"] != "done"]
        spans = sorted((r["row"], r["row"] + r["n"]) for r in tasks if r["status"] == "done")
        # deduplicated items share a row; otherwise no two items' rows overlap
        distinct = sorted(set(spans))
        overlapping = sum(1 for a, b in zip(distinct, distinct[1:]) if a[1] > b[0])
        cosines, missing = [], sorted(set(reference) - {r["uid"] for r in tasks if r["status"] == "done"})
        if windowed:
            key = st.models()[0].name
            for uid, (starts, ends, rows) in reference.items():
                if uid in missing:
                    continue
                got = st.windows(uid, model=key)
                if not (np.array_equal(got[0], starts) and np.array_equal(got[1], ends)):
                    cosines.append(-1.0)
                    continue
                cosines.append(float(cosine_rows(got[2], rows).min()))
        else:
            ids, vectors = st.embeddings()
            for uid, vector in zip(ids, vectors):
                if uid in reference:
                    cosines.append(float(cosine_rows(vector[None], reference[uid][None])[0]))
        verify = st.verify()
        blamed = st.manifest.query("SELECT count(*) FROM tasks WHERE suspect = 1 OR crashed_workers IS NOT NULL")[0][0]
        crash_failed = st.manifest.query("SELECT count(*) FROM tasks WHERE stage = 'crash'")[0][0]
        runs = {s: n for s, n in st.manifest.query("SELECT status, count(*) FROM runs GROUP BY status")}
        result = {
            "done": len(spans),
            "not_done": not_done[:20],
            "items_with_several_tasks": sorted(u for u, n in per_item.items() if n > 1)[:20],
            "overlapping_rows": overlapping,
            "missing": missing[:20],
            "min_cosine": round(min(cosines), 7) if cosines else float("nan"),
            "compared": len(cosines),
            "verify_ok": verify.ok,
            "verify_problems": [p.message for p in verify.problems],
            "runs_by_status": runs,
            "items_blamed_for_kills": blamed,
            "crash_failed": crash_failed,
        }
    finally:
        st.close()
    result["checks_ok"] = bool(
        not result["not_done"] and not result["items_with_several_tasks"] and not overlapping and not missing
        and cosines and min(cosines) >= MIN_COSINE and verify.ok and not blamed and not crash_failed
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=100)
    parser.add_argument("--out", type=Path, required=True, help="JSON report")
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: next to --out)")
    parser.add_argument("--per-batch", type=int, default=6, help="files added before each cycle")
    parser.add_argument("--source", type=Path, default=None,
                        help="real speech to copy batches from (default: synthetic voices)")
    parser.add_argument("--model", default=None, help="model spec (default: embstore's default)")
    parser.add_argument("--windows", default=None, metavar="WINDOW:SHIFT", help="a window model")
    parser.add_argument("--vad", default=None, help="--vad for extract")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--delay", type=float, default=0.5, help="kill within this many seconds after claims")
    parser.add_argument("--seconds", type=float, default=1.0, help="length of the shortest synthetic file")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    work = args.work or args.out.parent / "crash-loop-work"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = crash_loop(work, kills=args.kills, per_batch=args.per_batch, source=args.source, model=args.model,
                        windows=args.windows, vad=args.vad, workers=args.workers, delay=args.delay,
                        seconds=args.seconds, seed=args.seed, log=lambda m: print(m, flush=True))
    args.out.write_text(json.dumps(report, indent=2, default=str))
    brief = {k: v for k, v in report.items() if k != "cycles"}
    print(json.dumps(brief, indent=2, default=str))
    raise SystemExit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()
