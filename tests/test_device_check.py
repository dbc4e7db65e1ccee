"""The one-call GPU check (benchmarks/device/) run on a CPU, so it cannot rot before the
next GPU session: every phase recorded with a status, the Markdown section written,
the numbers that do not need a GPU right; and the wheel staging's dependency check."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEVICE = ROOT / "benchmarks" / "device"
STATUSES = {"ok", "partial", "skipped", "failed", "timeout"}


def load_module(name: str):
    spec = importlib.util.spec_from_file_location(name, DEVICE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.exhaustive
def test_gpu_check_runs_on_cpu_and_records_every_phase(tmp_path) -> None:
    out, work = tmp_path / "out", tmp_path / "work"
    run = subprocess.run(
        [sys.executable, str(DEVICE / "gpu_check.py"), "--out", str(out), "--device", "cpu", "--quick",
         "--work", str(work)],
        cwd=ROOT, capture_output=True, text=True, timeout=400,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    phases = data["phases"]
    expected = {"env", "pytest_cuda", "corpus", "models", "model:tiny", "e2e:tiny:fp32:w1", "report"}
    assert expected <= set(phases)
    assert {name: p["status"] for name, p in phases.items() if p["status"] not in STATUSES} == {}
    # on a CPU everything but the GPU's own numbers is measured
    failed = {n: p.get("error") or p.get("reason") for n, p in phases.items() if p["status"] != "ok"}
    assert failed == {}
    assert "5 skipped" in phases["pytest_cuda"]["summary"]  # no CUDA here: test_cuda.py skips
    assert phases["corpus"]["files"] == 12
    model = phases["model:tiny"]
    fp32, bf16 = model["dtypes"]["fp32"], model["dtypes"]["bf16"]
    assert fp32["masked_vs_own_embed_file"]["min"] >= 0.99999
    assert 0.99 <= bf16["fidelity_vs_fp32_embed_file"]["min"] < 1.0  # bf16 really ran
    assert fp32["model_only"]["x_realtime"] > 0 and fp32["model_only"]["batches"] >= 1
    e2e = phases["e2e:tiny:fp32:w1"]
    assert e2e["summary"]["done"] == e2e["files"] == e2e["committed"] > 0 and e2e["summary"]["failed"] == 0
    assert e2e["fidelity_vs_fp32_embed_file"]["items"] > 0
    assert e2e["fidelity_vs_fp32_embed_file"]["min"] >= 0.9999
    assert 0 < e2e["first_commit_s"] <= e2e["last_commit_s"] and e2e["x_realtime_from_start"] > 0
    assert e2e["fraction_of_model_only_from_start"] > 0
    assert e2e["gpu_busy_steady"]["samples"] == 0  # no nvidia-smi on a CPU machine
    md = (out / "results.md").read_text()
    assert "### GPU check" in md and "| target | value | met | where |" in md and "| tiny | fp32 | 1 |" in md
    assert (out / "pytest_cuda.txt").exists()


def test_targets_are_judged_from_the_phases() -> None:
    gpu_check = load_module("gpu_check")
    phases = {
        "e2e:resnet34:fp32:w1": {"x_realtime_from_start": 8000.0, "fraction_of_model_only_from_start": 0.8,
                                 "gpu_busy_steady": {"samples": 40, "mean_busy_pct": 95.0}},
        "e2e:resnet34:bf16:w2": {"x_realtime_from_start": 12000.0, "fraction_of_model_only_from_start": 0.92,
                                 "fraction_of_model_only_steady": 0.97, "gpu_busy_steady": {"samples": 40, "mean_busy_pct": 85.0}},
        "model:resnet34": {"dtypes": {"fp32": {"masked_vs_own_embed_file": {"min": 0.999995}}}},
        "model:ecapa": {"dtypes": {"fp32": {"masked_vs_own_embed_file": {"min": 0.9999}}}},
        "e2e:ecapa:fp32:w1": {"x_realtime_from_start": 50000.0},  # not ResNet34: not the target's run
    }
    got = gpu_check.targets({"phases": phases})
    assert [t["met"] for t in got] == [True, True, False, True, False]
    assert got[0]["where"] == "e2e:resnet34:bf16:w2" and got[1]["steady"] == 0.97
    assert [t["met"] for t in gpu_check.targets({"phases": {}})] == [None, None, None]


def test_claim_groups_follow_the_claim_rule() -> None:
    import numpy as np

    gpu_check = load_module("gpu_check")

    class Item:
        def __init__(self, n):
            self.feats = np.zeros((n, 2))

    items = [Item(n) for n in (100, 100, 300, 50, 50, 50)]
    groups = gpu_check.claim_groups(items, claim_items=3, claim_frames=400)
    assert [[len(x.feats) for x in g] for g in groups] == [[100, 100], [300, 50, 50], [50]]


def test_wheel_requirements_are_checked_against_the_image() -> None:
    fetch = load_module("fetch_wheels")
    metadata = "\n".join([
        "Name: librosa", "Requires-Dist: numpy>=1.22", "Requires-Dist: audioread>=2.1.9",
        'Requires-Dist: standard-aifc; python_version >= "3.13"', 'Requires-Dist: pytest; extra == "tests"',
        "Requires-Dist: webrtcvad>=2.0.10", "Requires-Dist: Lazy_Loader>=0.1",
    ])
    assert fetch.requirements(metadata) == ["numpy", "audioread", "webrtcvad", "lazy-loader"]
    assert "standard-aifc" in fetch.requirements(metadata, python=(3, 13))
    staged = {"librosa": metadata, "webrtcvad-wheels": ""}
    assert fetch.unmet(staged, image={"numpy", "lazy-loader"}) == ["librosa needs audioread"]
    names = [fetch.canonical(s.split("==")[0]) for s in fetch.WHEELS]
    assert len(names) == len(set(names)) and all("==" in s for s in fetch.WHEELS)
    assert "openvino" not in names  # 59 MB: over the per-call limit with the rest (see the script)


def test_gpu_sampler_reads_nvidia_smi_lines(tmp_path, monkeypatch) -> None:
    """A stand-in nvidia-smi printing the real CSV format every 50 ms: samples are parsed
    with their own timestamps and the window picks those inside it."""
    import os
    import time

    gpu_check = load_module("gpu_check")
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/usr/bin/env python3\nimport datetime, time, sys\nk = 0\nwhile True:\n"
                    "    now = datetime.datetime.now().strftime('%Y/%m/%d %H:%M:%S.%f')[:-3]\n"
                    "    print(f'{now}, {50 + k % 2 * 50}, 1234', flush=True)\n    k += 1\n    time.sleep(0.05)\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    sampler = gpu_check.GpuSampler().start()
    start = time.time()
    time.sleep(0.8)
    sampler.stop()
    window = sampler.window(start - 1, time.time())
    assert window["samples"] >= 5 and 50 <= window["mean_busy_pct"] <= 100
    assert window["max_memory_used_mib"] == 1234 and 0 < window["share_of_samples_at_90_pct_or_more"] < 1
    assert sampler.window(start - 100, start - 50)["samples"] == 0
