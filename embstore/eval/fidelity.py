"""How close one runtime's embeddings are to a reference: cosines per item, EER on trials.

Used by the bf16 fidelity tests and by `benchmarks/runtimes.py`, so both judge alike.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from embstore.eval.metrics import compute_eer
from embstore.eval.trials import parse_trials
from embstore.vectors import cosine_rows


def cosines(embeddings: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Cosine of each reference item's embedding to its counterpart (every id must be there)."""
    ids = sorted(reference)
    missing = [i for i in ids if i not in embeddings]
    if missing:
        raise KeyError(f"{len(missing)} items have no embedding, e.g. {missing[0]}")
    values = cosine_rows(np.stack([embeddings[i] for i in ids]), np.stack([reference[i] for i in ids]))
    return dict(zip(ids, (float(v) for v in values)))


def trial_eer(embeddings: Mapping[str, np.ndarray], trials_path: str) -> float:
    """EER (in [0, 1]) of cosine scores on a trial list whose ids are the embeddings' keys."""
    trials = parse_trials(trials_path)
    a = np.stack([embeddings[x] for x, _, _ in trials])
    b = np.stack([embeddings[y] for _, y, _ in trials])
    return compute_eer(cosine_rows(a, b), [int(t) for _, _, t in trials])


def summary(embeddings: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray],
            trials_path: str | None = None) -> dict[str, float]:
    """min/mean cosine to the reference, and with trials the EER of both in percent."""
    values = list(cosines(embeddings, reference).values())
    out = {"min_cos": min(values), "mean_cos": float(np.mean(values))}
    if trials_path:
        out["eer_pct"] = 100 * trial_eer(embeddings, trials_path)
        out["reference_eer_pct"] = 100 * trial_eer(reference, trials_path)
    return out
