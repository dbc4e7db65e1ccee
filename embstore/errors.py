"""Every exception embstore raises on purpose, in one leaf module.

The ones a user can cause (a bad path, a bad option, an unreadable file, a model that
cannot load) carry a one-line message; the CLI prints it as is, never a traceback.
"""

from __future__ import annotations


class StoreError(Exception):
    """A problem with the store or a request against it; one line for the user."""


class NewerStoreError(StoreError):
    """The store was written by a newer embstore (its schema has migrations we do not know)."""


class ScanError(StoreError):
    """A source that cannot be scanned (no wav.scp, a malformed list line...)."""


class ExtractionError(StoreError):
    """Extraction options or an environment that cannot run (no CUDA, bad device...)."""


class EnvironmentProblem(ExtractionError):
    """Something the run needs from its machine is missing or unusable: an optional
    package, a model file, a writable cache. Never an item's fault: a run stops on it
    before claiming anything, with one line naming what is missing and the command that
    fixes it, and records no item as failed."""


class ClusteringError(StoreError, ValueError):
    """Corpus clustering that cannot run (bad threshold or speaker count, no embedded
    items, a window model...); one line. A ValueError too, for callers of the engine."""


class AudioError(Exception):
    """A file that cannot be read as audio; the message says why."""


class ModelError(Exception):
    """A model spec that cannot be loaded; the message says why in one line."""


USER_ERRORS: tuple[type[BaseException], ...] = (StoreError, AudioError, ModelError, FileNotFoundError, PermissionError)
