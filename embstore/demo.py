"""The README's main job: scan + extract + queries with the default model.

    python -m embstore.demo STORE

Uses ../shared/data/librispeech-test-other when present (real speech), else makes a
small corpus of synthetic voices so the job runs anywhere.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from embstore.synthetic import make_corpus


def find_shared_data() -> Path | None:
    candidates = [Path.cwd().parent / "shared" / "data", Path(__file__).resolve().parents[2] / "shared" / "data"]
    for base in candidates:
        if (base / "librispeech-test-other" / "trials.txt").exists():
            return base
    return None


def run(argv: list[str]) -> None:
    print("$ embstore " + " ".join(argv), flush=True)
    proc = subprocess.run([sys.executable, "-m", "embstore", *argv])
    if proc.returncode not in (0, 3):  # 3 = some items failed, shown by the command itself
        raise SystemExit(proc.returncode)


def main() -> None:
    store = Path(sys.argv[1] if len(sys.argv) > 1 else "demo-store")
    data = find_shared_data()
    if data is None:
        data = make_corpus(store.parent / (store.name + "-audio"))
        print(f"../shared/data not found: generated a synthetic corpus in {data}")
    corpus = data / "librispeech-test-other"
    run(["scan", str(store), str(data)])
    run(["extract", str(store), "--device", "cpu", "--workers", "2"])
    run(["extract", str(store)])  # a second run has nothing to do
    run(["status", str(store)])
    from embstore.cli import cli

    for name, args in (
        ("speakers", [str(store)]),
        ("similar", [str(store), _first_item(store), "-k", "5"]),
        ("score", [str(store), str(corpus / "trials.txt")] if (corpus / "trials.txt").exists() else None),
    ):
        if name in cli.commands and args is not None:
            run([name, *args])


def _first_item(store: Path) -> str:
    import embstore

    with embstore.open(store) as st:
        ids, _ = st.embeddings()
    return ids[0] if ids else ""


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
