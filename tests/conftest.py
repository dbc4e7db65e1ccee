import os
from pathlib import Path

# one thread per library in every test process, set before any test module imports torch
# or NumPy (OpenMP reads it once, at load): two xdist workers, each with as many threads as
# cores, beside the subprocesses of the kill tests, spin-wait one another into minutes
for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data" / "librispeech-test-other"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real speech corpus from ../shared/data; tests using it skip when it is absent."""
    if not (SHARED_DATA / "trials.txt").exists():
        pytest.skip("../shared/data/librispeech-test-other is absent")
    return SHARED_DATA


@pytest.fixture(scope="session")
def _user_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("embstore-user-cache")


@pytest.fixture(autouse=True)
def _isolated_user_cache(monkeypatch, _user_cache):
    # model cards and exports go to a per-session cache, never the developer's ~/.cache
    monkeypatch.setenv("EMBSTORE_CACHE", str(_user_cache))


@pytest.fixture(autouse=True)
def _few_threads(monkeypatch):
    # two cores here: keep torch and BLAS from oversubscribing when pytest-xdist runs workers
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))


def pytest_collection_modifyitems(config, items):
    """`long` tests (a minute or more) are collected first, so each xdist worker starts
    one early instead of one worker finishing a long test alone at the end.

    `exhaustive` tests (every shared file through a second runtime, kill loops that
    need a quiet machine) run only with EMBSTORE_EXHAUSTIVE=1 (`make test-exhaustive`):
    the default suite must stay under 5 minutes on 2 cores."""
    items.sort(key=lambda item: "long" not in item.keywords)  # stable: the others keep their order
    if os.environ.get("EMBSTORE_EXHAUSTIVE") == "1":
        return
    skip = pytest.mark.skip(reason="exhaustive: run with EMBSTORE_EXHAUSTIVE=1 (make test-exhaustive)")
    for item in items:
        if "exhaustive" in item.keywords:
            item.add_marker(skip)
