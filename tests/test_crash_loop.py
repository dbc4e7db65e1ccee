"""The crash loop of benchmarks/crash_loop.py, small: a few kill -9 of the whole
`extract` process group at random moments, then a clean finish checked against a
clean reference (exactly once, same vectors, `verify` consistent).

The 100-kill run is the benchmark itself; tests/test_extract.py adds a killed worker
and kills timed from the first claim.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

# subprocesses, kills and full filesystems: `make test` runs these, `make test-fast` does not
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def _crash_loop_module():
    spec = importlib.util.spec_from_file_location("crash_loop", ROOT / "benchmarks" / "crash_loop.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.exhaustive
def test_crash_loop_three_kills(tmp_path):
    crash_loop = _crash_loop_module()
    # the kill window comes from an undisturbed calibration run (first batch), so the kill
    # moments scale with this machine's speed; the reference is embed_file, the per-item
    # path a single-worker run equals (test_extract.py checks that)
    report = crash_loop.crash_loop(tmp_path / "work", kills=3, batches=2, speakers=2, per_speaker=2, seconds=1.0,
                                   workers=2, seed=3, reference="embed_file", log=lambda m: None)
    assert report["kills"] == 3
    # seed 3 kills at 24 %, 54 % and 37 % of the expected run time
    assert report["kills_mid_run"] >= 2, report["cycles"]
    assert report["ok"], {k: v for k, v in report.items() if k != "cycles"}
    assert report["done"] == report["items"] == 8
    assert report["min_cosine"] >= 0.99999 and report["verify_ok"]
    assert report["rows_distinct"] and not report["items_with_several_tasks"]
    # whole-run kills are not the items' fault: nothing became a suspect or a poison item
    assert report["items_blamed_for_kills"] == 0 and report["crash_failed"] == 0
