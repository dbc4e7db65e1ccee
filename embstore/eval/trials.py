"""Trial lists: Kaldi (`id1 id2 target|nontarget`) or VoxCeleb (`1 id1 id2`) layout."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from embstore.errors import StoreError

TRIAL_LABELS = {
    "target": True, "tgt": True, "true": True, "1": True, "same": True,
    "nontarget": False, "non-target": False, "nontgt": False, "impostor": False, "imp": False,
    "false": False, "0": False, "different": False,
}


@dataclass
class TrialList:
    """One trial list as read: both sides' ids as written in the file, and the labels."""

    path: str
    enroll: list[str]
    test: list[str]
    labels: np.ndarray  # bool, True = target

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    def __len__(self) -> int:
        return len(self.labels)


def read_trials(path: str | os.PathLike) -> TrialList:
    """Read a trial list: `id1 id2 label` (Kaldi) or `label id1 id2` (VoxCeleb).

    Labels: target/nontarget, 1/0, true/false. The first trial line decides where the
    label is; blank lines and `#` comments are skipped. Errors name the file and line."""
    path = str(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as exc:
        raise StoreError(f"{path}: not a text trial list ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise StoreError(f"{path}: cannot read the trial list ({exc.strerror})") from None
    return _whole_columns(path, text) or _line_by_line(path, text)


def _whole_columns(path: str, text: str) -> TrialList | None:
    """The common case as three column slices (~5x faster than parsing line by line):
    every line holds three fields, no comments or blank lines, known labels. None
    otherwise, and the line-by-line reader then finds the bad line."""
    if "#" in text or not all(len(line.split()) == 3 for line in text.splitlines()):
        return None
    words = text.split()
    if not words:
        return None
    label_at = 2 if words[2].lower() in TRIAL_LABELS else 0
    column = words[label_at::3]
    meaning = {w: TRIAL_LABELS.get(w.lower()) for w in set(column)}
    if None in meaning.values():
        return None
    a, b = (words[0::3], words[1::3]) if label_at == 2 else (words[1::3], words[2::3])
    return TrialList(path, a, b, np.array([meaning[w] for w in column], dtype=bool))


def _line_by_line(path: str, text: str) -> TrialList:
    enroll: list[str] = []
    test: list[str] = []
    labels: list[bool] = []
    label_at: int | None = None
    for lineno, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) != 3:
            raise StoreError(
                f"{path}:{lineno}: expected 3 fields (id id label), got {len(fields)}: {line.strip()[:200]!r}"
            )
        if label_at is None:
            label_at = 2 if fields[2].lower() in TRIAL_LABELS else 0 if fields[0].lower() in TRIAL_LABELS else None
            if label_at is None:
                raise StoreError(f"{path}:{lineno}: no target/nontarget (or 1/0) label in the first or last column")
        label = TRIAL_LABELS.get(fields[label_at].lower())
        if label is None:
            raise StoreError(f"{path}:{lineno}: {fields[label_at]!r} is not a trial label (target/nontarget, 1/0)")
        a, b = (fields[0], fields[1]) if label_at == 2 else (fields[1], fields[2])
        enroll.append(a)
        test.append(b)
        labels.append(label)
    if not labels:
        raise StoreError(f"{path}: no trials in the file (the trial list is empty)")
    return TrialList(path, enroll, test, np.array(labels, dtype=bool))


def parse_trials(path: str | os.PathLike) -> list[tuple[str, str, bool]]:
    """(id1, id2, is_target) per trial line; see `read_trials`."""
    trials = read_trials(path)
    return list(zip(trials.enroll, trials.test, trials.labels.tolist()))


__all__ = ["TRIAL_LABELS", "TrialList", "read_trials", "parse_trials"]
