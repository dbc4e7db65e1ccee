"""The errors a user can cause; the CLI prints them as one line, never a traceback."""

from __future__ import annotations

from embstore.audio import AudioError
from embstore.models.base import ModelError
from embstore.store import StoreError

USER_ERRORS: tuple[type[BaseException], ...] = (StoreError, AudioError, ModelError, FileNotFoundError, PermissionError)
