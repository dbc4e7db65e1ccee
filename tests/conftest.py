import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data" / "librispeech-test-other"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real speech corpus from ../shared/data; tests using it skip when it is absent."""
    if not (SHARED_DATA / "trials.txt").exists():
        pytest.skip("../shared/data/librispeech-test-other is absent")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _few_threads(monkeypatch):
    # two cores here: keep torch and BLAS from oversubscribing when pytest-xdist runs workers
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
