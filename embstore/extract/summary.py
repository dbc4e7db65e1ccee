"""`ExtractSummary`: what a run did, returned by `Store.extract` and kept in `runs`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from embstore.api import Report
from embstore.outcome import Outcome
from embstore.progress import rate


@dataclass
class ExtractSummary(Report):
    model: str
    fingerprint: str
    batching: str
    # this run's items: embedded, and failed (by this run only; the model's failures
    # over every item, earlier runs' too, are `outcome.failed`)
    done: int = 0
    failed: int = 0
    audio_seconds: float = 0.0
    seconds: float = 0.0
    workers: int = 0
    devices: list[str] = field(default_factory=list)
    mean_batch_items: float = 0.0
    padding_overhead: float = 0.0
    nothing_to_do: bool = False
    interrupted: bool = False
    error: str | None = None
    run_id: int | None = None
    features: str = "cpu"
    runtime: str = "torch"
    prepared: dict[str, int] = field(default_factory=dict)
    left: int = 0
    dropped: int = 0  # results whose claim had been taken back before the commit
    # cluster runs: {node: {"workers": n, "devices": {device: n}, "lost": n}}
    workers_per_node: dict[str, dict[str, Any]] = field(default_factory=dict)
    model_id: int | None = None
    rounds: int = 0  # times the workers were started (again when dead runs' claims came free at the end)
    # the model's work after the run, over every live item (earlier runs' failures too,
    # so "nothing to do" runs report the failures here): what the exit status says
    # (`embstore.outcome`)
    outcome: Outcome = field(default_factory=Outcome)

    @property
    def items_per_second(self) -> float:
        return rate(self.done, self.seconds)

    @property
    def x_realtime(self) -> float:
        return rate(self.audio_seconds, self.seconds)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"items_per_second": round(self.items_per_second, 2), "x_realtime": round(self.x_realtime, 1),
                               "outcome": self.outcome.as_dict()}
