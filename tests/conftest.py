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


# EMBSTORE_TEST_NO_SHARED_DATA=1: behave as if ../shared/data were absent (to run the suite
# as a source tree without it runs, without touching ../shared)
NO_SHARED_DATA = os.environ.get("EMBSTORE_TEST_NO_SHARED_DATA") == "1"


def shared_data_present() -> bool:
    return not NO_SHARED_DATA and (SHARED_DATA / "trials.txt").exists()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real speech corpus from ../shared/data; tests using it skip when it is absent.
    Only for what needs real speech (EER on real trials, a model against its package on
    real utterances): a test of segments in time takes `speech_corpus`."""
    if not shared_data_present():
        why = "EMBSTORE_TEST_NO_SHARED_DATA=1" if NO_SHARED_DATA else "../shared/data/librispeech-test-other is absent"
        pytest.skip(why)
    return SHARED_DATA


@pytest.fixture(scope="session")
def speech_corpus(tmp_path_factory):
    """The real corpus when ../shared/data has it, else a small synthetic one in the same
    layout (tests/audio_factory.py: 5 speakers x 4 files of 4-7 s, about 2 s to write)."""
    from tests.audio_factory import SpeechCorpus, write_speech_corpus

    if shared_data_present():
        return SpeechCorpus(SHARED_DATA, real=True)
    return write_speech_corpus(tmp_path_factory.mktemp("speech") / "synthetic-speech")


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
