"""Import WeSpeaker's model zoo without running its package ``__init__`` files.

``wespeaker/__init__.py`` imports its command-line tool (silero_vad, torchaudio) and
``wespeaker/frontend/__init__.py`` imports s3prl, whisper, transformers and peft; none of
them is needed to build or run a zoo model from fbank features, and installing them
would pull in large dependencies. The model modules themselves only need torch (and
numpy/scipy for ``redimnet2``, via ``wespeaker.frontend.tfmel``).

So when the real packages have not been imported yet, empty namespace-like package
modules stand in for ``wespeaker`` and ``wespeaker.frontend``: their ``__path__`` points
at the installed directories, so ``import wespeaker.models.resnet`` finds the files as
usual but the two ``__init__`` files never execute. If some other code already imported
the real packages, they are used as they are.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
import types

_LOCK = threading.Lock()


def _stub_package(name: str, path: list[str]) -> None:
    """Register an empty package module `name` whose submodules are found under `path`."""
    module = types.ModuleType(name)
    module.__path__ = list(path)
    module.__package__ = name
    # a ModuleSpec marks it as a package for importlib's parent lookups and reloads
    spec = importlib.util.spec_from_loader(name, loader=None, is_package=True)
    if spec is not None:
        spec.submodule_search_locations = list(path)
        module.__spec__ = spec
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    if parent and parent in sys.modules:
        setattr(sys.modules[parent], child, module)


def import_wespeaker_models() -> types.ModuleType:
    """Return ``wespeaker.models.speaker_model`` (``get_speaker_model(name)`` gives the class).

    Raises ImportError when the wespeaker package is not installed.
    """
    return import_wespeaker("models.speaker_model")


def import_wespeaker(module: str) -> types.ModuleType:
    """``wespeaker.<module>`` (e.g. "models.speaker_model", "cli.hub") with the two
    heavy package ``__init__`` files stubbed; ImportError when wespeaker is missing."""
    with _LOCK:
        if "wespeaker" not in sys.modules:
            spec = importlib.util.find_spec("wespeaker")
            if spec is None or not spec.submodule_search_locations:
                raise ImportError("the wespeaker package is not installed")
            _stub_package("wespeaker", list(spec.submodule_search_locations))
        if "wespeaker.frontend" not in sys.modules:
            # find_spec on a submodule does not run the parent's (stubbed) __init__
            spec = importlib.util.find_spec("wespeaker.frontend")
            if spec is not None and spec.submodule_search_locations:
                _stub_package("wespeaker.frontend", list(spec.submodule_search_locations))
    return importlib.import_module(f"wespeaker.{module}")
