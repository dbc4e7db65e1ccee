"""What a command did of the items it was asked to cover, and the exit status that says so.

Every command that does work over items (extract, diarize, cluster, score, report, the
exports) ends with an `Outcome`. Its exit status is 0 only when every selected item is
done; otherwise it names what is missing in one line:

    0    every selected item is done
    3    some items failed (their reasons: `embstore errors`)
    4    the run stopped on an error of its environment (disk full, a missing package or
         model file, workers dying): `errors.EnvironmentProblem`, whether raised before
         the run (the CLI's one line) or met during it (`Outcome.error`); items may be left
    5    work is left that this command could not do now: items held by another run still
         running, items not extracted (or not clustered) yet; the line says which and why
    130  interrupted (Ctrl-C); what was computed is kept
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

EXIT_DONE = 0
EXIT_SOME_FAILED = 3
EXIT_ENVIRONMENT = 4
EXIT_WORK_LEFT = 5
EXIT_INTERRUPTED = 130


@dataclass
class Outcome:
    """Counts over the selected items: done, failed, left (neither), and why."""

    done: int = 0
    failed: int = 0
    left: int = 0
    # one phrase: why items are left and what finishes them
    why_left: str = ""
    # the most common failure reason, for a line when every item failed
    reason: str | None = None
    # the environment's problem (an `EnvironmentProblem`'s line) that stopped the run: exit 4
    error: str | None = None
    interrupted: bool = False
    noun: str = "items"

    @property
    def exit_status(self) -> int:
        if self.interrupted:
            return EXIT_INTERRUPTED
        if self.error:
            return EXIT_ENVIRONMENT
        if self.left:
            return EXIT_WORK_LEFT
        if self.failed:
            return EXIT_SOME_FAILED
        return EXIT_DONE

    @property
    def all_failed(self) -> bool:
        return self.failed > 0 and self.done == 0 and self.left == 0

    def count(self, n: int) -> str:
        """`1 item`, `3 items`."""
        return f"{n} {self.noun[:-1] if n == 1 and self.noun.endswith('s') else self.noun}"

    def messages(self, store: str = "STORE") -> list[str]:
        """The lines for stderr: nothing when every item is done."""
        out = []
        if self.error:
            out.append(f"error: {self.error}" + (f" ({self.count(self.left)} left)" if self.left else ""))
        elif self.interrupted:
            out.append("interrupted: claims released; run the same command to continue")
        elif self.left:
            out.append(f"{self.count(self.left)} left: {self.why_left or 'not done yet'}")
        if self.all_failed:
            why = f": {self.reason}" if self.reason else ""
            out.append(f"all {self.count(self.failed)} failed{why}; see `embstore errors {store}`")
        elif self.failed:
            out.append(f"{self.count(self.failed)} failed: see `embstore errors {store}`")
        return out

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"exit_status": self.exit_status}

    def add(self, other: "Outcome") -> "Outcome":
        """Both outcomes' counts; the first error, reason and explanation."""
        return Outcome(
            done=self.done + other.done, failed=self.failed + other.failed, left=self.left + other.left,
            why_left=self.why_left or other.why_left, reason=self.reason or other.reason,
            error=self.error or other.error, interrupted=self.interrupted or other.interrupted, noun=self.noun,
        )


__all__ = ["Outcome", "EXIT_DONE", "EXIT_SOME_FAILED", "EXIT_ENVIRONMENT", "EXIT_WORK_LEFT", "EXIT_INTERRUPTED"]
