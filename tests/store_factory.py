"""Stores with known embeddings, without running a model.

`make_store` writes a tree of real tiny audio files (tests/audio_factory.py), scans it
with the real scanner (so files, items, speakers and paths are real), then fills the
embeddings of a registered fake model through the real claim and writer code path
(`SqliteManifestClient` claims + `ZarrWriter` with `ItemResult`s): rows land in the
store exactly where and how extraction puts them. The vectors are synthetic: a
per-speaker centre plus item noise, so speakers cluster and every vector is known.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

import embstore
from embstore.audio.io import content_hash
from embstore.extract.client import SqliteManifestClient
from embstore.extract.messages import ItemResult
from embstore.extract.writer import ZarrWriter
from embstore.manifest.registry import ModelRecord, model_row
from embstore.manifest.tasks import new_owner
from embstore.store import Store
from tests.audio_factory import write


def fake_model_description(dim: int = 16, name: str = "fake") -> dict:
    """A model row's description; the fingerprint depends on name and dim only."""
    fp = hashlib.blake2b(f"{name}:{dim}".encode(), digest_size=12).hexdigest()
    return {
        "name": name, "spec": f"fake:{name}", "fingerprint": fp, "dim": dim, "sample_rate": 16000,
        "batching": "any", "frontend": {"fake": True},
    }


def synthetic_vector(uid: str, speaker: str, dim: int, seed: int = 0, noise: float = 0.3) -> np.ndarray:
    """Deterministic float32 vector: the speaker's centre plus noise seeded by the item id."""
    def rng_of(text: str) -> np.random.Generator:
        return np.random.default_rng(int.from_bytes(hashlib.blake2b(f"{seed}:{text}".encode(), digest_size=8).digest(), "little"))

    centre = rng_of("speaker:" + speaker).standard_normal(dim)
    return (centre + noise * rng_of("item:" + uid).standard_normal(dim)).astype(np.float32)


def make_tree(
    root: Path, speakers: int = 3, per_speaker: int = 4, datasets: Sequence[str] = ("ds",),
    videos: int = 0, seconds: float = 0.2,
) -> list[Path]:
    """ROOT/<dataset>/spk<s>/utt<n>.wav, or with `videos` > 0 the VoxCeleb shape
    ROOT/<dataset>/spk<s>/vid<v>/<n>.wav where stems repeat across a speaker's videos."""
    out = []
    for d, dataset in enumerate(datasets):
        for s in range(speakers):
            for n in range(per_speaker):
                if videos:
                    rel = Path(dataset, f"spk{s}", f"vid{n % videos}", f"{n // videos:05d}.wav")
                else:
                    rel = Path(dataset, f"spk{s}", f"utt{n}.wav")
                # distinct content per file, so dedup only joins files that are copies
                out.append(write(root / rel, seconds, pitch=110 + 25 * s, seed=1000 * d + 100 * s + n))
    return out


def fill_embeddings(
    store: Store,
    dim: int = 16,
    seed: int = 0,
    name: str = "fake",
    vector_of: Callable[[str, str], np.ndarray] | None = None,
    dedup: bool = True,
) -> ModelRecord:
    """Mark every pending item of a fake model done with a synthetic vector, through the
    claim + writer path; items with identical audio share one row, as extraction does.
    Returns the model's record, read after the writes (its row count is current)."""
    if vector_of is None:
        vector_of = lambda uid, speaker: synthetic_vector(uid, speaker, dim, seed)  # noqa: E731
    store = getattr(store, "manifest", store)  # a Store holds its Manifest
    model = store.register_model(fake_model_description(dim, name))
    owner = new_owner()
    client = SqliteManifestClient(store.path, model.id, owner, 600, "item", lambda n: max(1, n // 160), 16000)
    client.refresh()
    speaker_of = {r["id"]: r["speaker"] for r in store.query("SELECT id, speaker FROM items")}
    writer = ZarrWriter(str(store.path), model.id, None)
    try:
        twins: list[tuple[object, str]] = []
        first_item_of: dict[tuple, int] = {}
        while True:
            claimed = client.claim(512, 10**12)
            if not claimed:
                break
            for task in claimed:
                digest = content_hash(task.path)
                key = (digest, task.start, task.end)
                if dedup and key in first_item_of:
                    twins.append((task, digest))
                    continue
                first_item_of[key] = task.item_id
                vector = vector_of(task.uid, speaker_of[task.item_id])
                writer.add(ItemResult(task.task_id, task.item_id, owner, digest, task.duration, vector))
            writer.flush()
        # duplicates point at the row their first copy got, like the worker's dedup lookup
        for task, digest in twins:
            first = first_item_of[(digest, task.start, task.end)]
            row = store.conn.execute(
                "SELECT row FROM tasks WHERE item_id = ? AND model_id = ?", (first, model.id)
            ).fetchone()[0]
            writer.add(ItemResult(task.task_id, task.item_id, owner, digest, task.duration, None, row))
        writer.flush()
    finally:
        writer.close()
        client.close()
    return model_row(store.conn, model.id)


def make_store(
    tmp_path: Path,
    speakers: int = 3,
    per_speaker: int = 4,
    dim: int = 16,
    datasets: Sequence[str] = ("ds",),
    videos: int = 0,
    seed: int = 0,
    name: str = "fake",
    copies: int = 0,
) -> Store:
    """A scanned store of real tiny files whose items all have synthetic embeddings.

    `copies` > 0 adds that many byte-identical copies of spk0's first file under a
    speaker `dup`, so the store holds rows shared by several items (dedup)."""
    root = tmp_path / "audio"
    files = make_tree(root, speakers, per_speaker, datasets, videos)
    for c in range(copies):
        target = root / datasets[0] / "dup" / f"copy{c}.wav"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(files[0].read_bytes())
    store = embstore.open(tmp_path / "store")
    store.scan([root])
    fill_embeddings(store, dim=dim, seed=seed, name=name)
    return store


def kaldi_dir(tmp_path: Path, utts: dict[str, str], recording_seconds: float = 2.0) -> Path:
    """A Kaldi data dir with one recording split into segments: {utt id: speaker}."""
    d = tmp_path / "kaldi"
    d.mkdir(parents=True, exist_ok=True)
    wav = write(tmp_path / "rec" / "rec1.wav", recording_seconds, seed=7)
    (d / "wav.scp").write_text(f"rec1 {wav}\n")
    step = recording_seconds / (len(utts) + 1)
    lines, spk = [], []
    for k, (utt, speaker) in enumerate(utts.items()):
        lines.append(f"{utt} rec1 {k * step:.3f} {(k + 1) * step:.3f}")
        spk.append(f"{utt} {speaker}")
    (d / "segments").write_text("\n".join(lines) + "\n")
    (d / "utt2spk").write_text("\n".join(spk) + "\n")
    return d


__all__ = ["fake_model_description", "synthetic_vector", "make_tree", "fill_embeddings", "make_store", "kaldi_dir"]


def assert_second_run_held_off(st: Store, summary: object, second: subprocess.CompletedProcess) -> None:
    """A first run whose claims outlived their lease finished both items (nothing dropped),
    while a second run started meanwhile found them held (exit 5) and claimed none twice."""
    assert summary.dropped == 0 and summary.done == 2, summary  # type: ignore[attr-defined]
    assert second.returncode == 5 and "held by another run still running" in second.stderr, second.stderr
    assert st.manifest.query("SELECT max(attempts) FROM tasks")[0][0] == 1  # nothing claimed twice
