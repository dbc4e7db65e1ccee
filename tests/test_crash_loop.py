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
    # three cycles: each adds 4 synthetic files, kill -9s the run while it holds claims
    # (after a random delay within 0.5 s), then one resume must finish everything
    report = crash_loop.crash_loop(tmp_path / "work", kills=3, per_batch=4, workers=2, seconds=1.0, seed=3,
                                   log=lambda m: None)
    assert report["kills"] == report["resumes"] == 3
    assert report["kills_with_claims_held"] >= 2, report["cycles"]
    assert report["ok"], {k: v for k, v in report.items() if k != "cycles"}
    assert report["resumes_exit_0_all_done"] == 3
    # a run that finished before its kill moment is followed by another batch in its cycle
    assert report["done"] == report["items"] == 4 * (3 + report["missed_kills"]) and report["reference"] == "embed_file"
    assert report["min_cosine"] >= 0.99999 and report["verify_ok"] and report["overlapping_rows"] == 0
    assert not report["items_with_several_tasks"] and not report["missing"]
    # whole-run kills are not the items' fault: nothing became a suspect or a poison item
    assert report["items_blamed_for_kills"] == 0 and report["crash_failed"] == 0