"""Model sources behind one `Encoder` interface (base.py), chosen by a spec string
(registry.py lists the forms). Nothing here imports torch at module import."""

from __future__ import annotations

from embstore.errors import ModelError
from embstore.models.base import Capabilities, Encoder
from embstore.models.common import DTYPES
from embstore.models.registry import DEFAULT_SPEC, SPEC_FORMS, load

__all__ = ["load", "Encoder", "Capabilities", "ModelError", "DEFAULT_SPEC", "DTYPES", "SPEC_FORMS"]
