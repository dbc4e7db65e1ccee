"""Results on the wire between a cluster worker and the coordinator: `PackedResults`.

Hundreds of `ItemResult`s, each with its own small vector, pickle slowly; the same
results as a handful of arrays cost a fraction of it (the coordinator's one core is
what a large cluster shares). Packing is exact: unpacking gives back equal outcomes.
"""

from __future__ import annotations

import numpy as np

from embstore.extract.messages import ItemOutcome, ItemResult, PackedResults


def pack(owner: str, outcomes: list[ItemOutcome], max_bytes: int = 0) -> list[PackedResults]:
    """The outcomes as messages of at most about `max_bytes` of vectors each (0: one)."""
    def packable(o: object) -> bool:
        # one vector per item, nothing else; window results and speech regions travel as they are
        return (isinstance(o, ItemResult) and o.vector is not None and o.vector.ndim == 1 and o.speech is None
                and o.owner == owner)

    fresh = [o for o in outcomes if packable(o)]
    others = tuple(o for o in outcomes if not packable(o))
    row_bytes = fresh[0].vector.size * 4 + 64 if fresh else 1
    step = max(1, max_bytes // row_bytes) if max_bytes else max(1, len(fresh))
    parts = [fresh[k:k + step] for k in range(0, len(fresh), step)] or [[]]
    return [_packed(owner, part, others if k == 0 else ()) for k, part in enumerate(parts)]


def _packed(owner: str, fresh: list[ItemResult], others: tuple) -> PackedResults:
    vectors = np.stack([o.vector for o in fresh]).astype(np.float32, copy=False) if fresh else np.zeros((0, 0))
    return PackedResults(
        owner,
        np.fromiter((o.task_id for o in fresh), dtype=np.int64, count=len(fresh)),
        np.fromiter((o.item_id for o in fresh), dtype=np.int64, count=len(fresh)),
        np.fromiter((o.seconds for o in fresh), dtype=np.float64, count=len(fresh)),
        tuple(o.content_hash for o in fresh),
        vectors,
        others,
    )


def unpack(packed: PackedResults) -> list[ItemOutcome]:
    fresh = [
        ItemResult(int(t), int(i), packed.owner, h, float(s), v)
        for t, i, s, h, v in zip(packed.task_ids, packed.item_ids, packed.seconds, packed.hashes, packed.vectors)
    ]
    return fresh + list(packed.others)
