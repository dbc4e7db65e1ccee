"""`Outbox`: where a worker sends what it computed and how it is doing.

Results go to the one writer; reports (batch statistics, a fatal error) go to whoever
supervises the run. `QueueOutbox` uses the two multiprocessing queues of a local run; a
cluster worker's outbox returns them from its actor calls instead.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from embstore.extract.messages import ItemOutcome, ProgressReport, ResultBatch, WorkerFinished


class Outbox(ABC):
    @abstractmethod
    def results(self, outcomes: list[ItemOutcome]) -> None:
        """One claim's results and failures, for the writer."""

    @abstractmethod
    def finished(self, index: int, owner: str) -> None:
        """This worker stops: the writer commits what it sent, then frees what it holds."""

    @abstractmethod
    def report(self, message: ProgressReport) -> None:
        """Statistics or a fatal error, for the supervisor."""


class QueueOutbox(Outbox):
    def __init__(self, inbox: Any, progress: Any):
        self.inbox = inbox  # the writer's queue
        self.progress = progress  # the supervisor's queue

    def results(self, outcomes: list[ItemOutcome]) -> None:
        self.inbox.put(ResultBatch(outcomes))

    def finished(self, index: int, owner: str) -> None:
        self.inbox.put(WorkerFinished(index, owner))

    def report(self, message: ProgressReport) -> None:
        self.progress.put(message)
