"""OpenVINO runtime (embstore.models.openvino) and the user cache (embstore.models.cache).

Fast tests use one small random ResNet and a few seconds of a few shared files; the
every-item bf16 fidelity checks (random ResNet34 and the default model) are slow tests.
bf16 tests skip where the CPU has no native bf16; everything skips without OpenVINO.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from embstore.models import ModelError, load
from tests.conftest import CAMPPLUS_BF16_MIN_COS
from tests.wespeaker_dirs import make_wespeaker_dir

pytest.importorskip("openvino")

from embstore.models import cache
from embstore.eval.fidelity import summary
from embstore.models import openvino as ovm

ROOT = Path(__file__).resolve().parent.parent
BF16, BF16_WHY = ovm.cpu_bf16_support()
needs_bf16 = pytest.mark.skipif(not BF16, reason=f"no bf16 here: {BF16_WHY}")


@pytest.fixture(scope="module")
def user_cache(_user_cache):
    # conftest's session cache, set here too: module fixtures are built before the
    # per-test autouse fixture that sets it
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EMBSTORE_CACHE", str(_user_cache))
        yield _user_cache


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory, user_cache):
    return make_wespeaker_dir(tmp_path_factory.mktemp("models"), arch="resnet18", num_mel_bins=32)


@pytest.fixture(scope="module")
def torch_small(small_dir):
    return load(f"wespeaker:{small_dir}")


@pytest.fixture(scope="module")
def ov_small(small_dir, torch_small):
    return load(f"openvino:{small_dir}", threads=1)


def _clips(shared_data: Path, count: int = 3) -> list[str]:
    return sorted(str(p) for p in shared_data.glob("*/*.flac"))[:count]


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


# -- bf16 support and refusals ---------------------------------------------------------------


def test_cpu_bf16_support_follows_the_cpu_flags(monkeypatch):
    ok, why = ovm.cpu_bf16_support()
    flags = ovm._cpu_flags()
    assert isinstance(why, str) and why
    if flags:
        assert ok == bool({"amx_bf16", "avx512_bf16"} & flags) or not ok
    monkeypatch.setattr(ovm, "_cpu_flags", lambda: {"sse4_2", "avx2", "avx512f"})
    ok, why = ovm.cpu_bf16_support()
    assert not ok and "AMX" in why and "AVX512-BF16" in why


def test_bf16_is_refused_in_one_line_without_native_bf16(monkeypatch, small_dir, ov_small):
    monkeypatch.setattr(ovm, "_cpu_flags", lambda: {"avx2"})
    with pytest.raises(ModelError) as info:
        load(f"openvino:{small_dir}", dtype="bf16")
    message = str(info.value)
    assert "bf16 is not offered here" in message and "AMX" in message and "\n" not in message


def test_bad_dtype_device_and_options_are_model_errors(small_dir, ov_small):
    with pytest.raises(ModelError, match="fp16 is not supported"):
        load(f"openvino:{small_dir}", dtype="fp16")
    with pytest.raises(ModelError, match="runs on the CPU"):
        load(f"openvino:{small_dir}", device="cuda")
    with pytest.raises(ModelError, match="bad option"):
        load(f"openvino:{small_dir}", nonsense=1)
    with pytest.raises(ModelError, match="no such"):
        load("openvino:/nonexistent/model.onnx")


# -- numbers ---------------------------------------------------------------------------------


def test_f32_equals_onnxruntime(shared_data, small_dir, ov_small):
    pytest.importorskip("onnxruntime")
    ort = load("onnx:" + ovm._export(str(small_dir), None, None)["onnx"], threads=1)
    for path in _clips(shared_data):
        a, b = ov_small.embed_file(path, 0, 3), ort.embed_file(path, 0, 3)
        assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()


@needs_bf16
def test_bf16_is_close_to_torch_fp32(shared_data, small_dir, torch_small):
    bf16 = load(f"openvino:{small_dir}", dtype="bf16", threads=1)
    for path in _clips(shared_data):
        assert _cos(bf16.embed_file(path, 0, 3), torch_small.embed_file(path, 0, 3)) >= 0.9999


def test_fingerprints_name_runtime_and_precision(small_dir, torch_small, ov_small):
    assert ov_small.frontend["runtime"] == "openvino" and ov_small.frontend["compute_dtype"] == "fp32"
    assert ov_small.frontend["source_fingerprint"] == torch_small.fingerprint
    assert ov_small.fingerprint != torch_small.fingerprint
    assert load(f"openvino:wespeaker:{small_dir}").fingerprint == ov_small.fingerprint  # stable, prefix accepted
    described = ov_small.describe()
    assert described["batching"] == "equal" and described["name"].endswith("-openvino-fp32")
    if BF16:
        bf16 = load(f"openvino:{small_dir}", dtype="bf16")
        assert bf16.fingerprint not in (ov_small.fingerprint, torch_small.fingerprint)
        assert bf16.frontend["compute_dtype"] == "bf16"
        assert bf16._run.stages == ["f32", "bf16"]  # a ResNet: full-resolution stem in f32
        everywhere = load(f"openvino:{small_dir}", dtype="bf16", f32_stem=False)
        assert everywhere._run.stages == ["bf16"] and everywhere.fingerprint != bf16.fingerprint


def test_batches_are_cut_into_few_shapes_exactly(ov_small):
    feats = np.random.default_rng(0).standard_normal((5, 230, 32)).astype(np.float32)
    chunked = load(ov_small.spec, threads=1, max_batch=2)
    rows = chunked.embed_batch(list(feats))
    assert chunked.shapes_seen == {(2, 230): 2, (1, 230): 1}
    single = np.stack([ov_small.embed_batch([f])[0] for f in feats])
    assert np.abs(rows - single).max() <= 1e-5 * np.abs(single).max()
    with pytest.raises(ValueError, match="same number of frames"):
        ov_small.embed_batch([feats[0], feats[1][:200]])


def test_openvino_spec_names_the_worker_spec(tmp_path):
    assert ovm.openvino_spec("resemblyzer") == "openvino:resemblyzer"
    assert ovm.openvino_spec(None) == ovm.openvino_spec("campplus") == "openvino:campplus"  # the default
    assert ovm.openvino_spec(f"wespeaker:{tmp_path}") == f"openvino:{tmp_path}"
    assert ovm.openvino_spec("onnx:x.onnx") == f"openvino:{Path('x.onnx').absolute()}"
    assert ovm.openvino_spec("openvino:resemblyzer") == "openvino:resemblyzer"
    with pytest.raises(ModelError, match="hub model"):
        ovm.openvino_spec("wespeaker-hub:english")


@pytest.mark.parametrize("n, max_batch, sizes", [(7, 4, [4, 2, 1]), (5, 1, [1] * 5), (64, 64, [64]), (0, 4, []),
                                                 (70, 64, [64, 4, 2]), (3, 6, [2, 1])])
def test_chunk_sizes(n, max_batch, sizes):
    assert ovm._chunk_sizes(n, max_batch) == sizes


def test_warm_up_prepares_each_length_once(ov_small):
    encoder = load(ov_small.spec, threads=1, max_frames=300)
    assert encoder.warm_up([250, 250, 170, 700]) == 3  # 700 frames: windows of 300 frames only
    assert {(1, 250), (1, 170), (1, 300)} <= set(encoder.shapes_seen)
    assert encoder.warm_up([170, 250]) == 0


def test_long_items_follow_the_window_policy(speech_corpus, ov_small):
    encoder = load(ov_small.spec, threads=1, max_frames=200)
    path = _clips(speech_corpus.path, 1)[0]  # real, or synthetic speech without ../shared/data
    feats = encoder.features(encoder.load(path, 0, 4.5))
    assert len(feats) > 400
    assert np.allclose(encoder.embed_batch([feats])[0], encoder.embed_file(path, 0, 4.5), atol=1e-5)
    assert set(encoder.shapes_seen) == {(1, 200)}


def test_resemblyzer_on_openvino(shared_data, user_cache):
    reference = load("resemblyzer")
    paths = _clips(shared_data)
    feats = [reference.features(reference.load(p, 0, 4)) for p in paths]
    want = reference.embed_batch(feats)
    # the second load imports the compiled blob: OpenVINO 2026.4 gets that import wrong
    # for batches > 1 of this LSTM, which the blob probe must catch
    for _ in range(2):
        f32 = load("openvino:resemblyzer", threads=1)
        assert f32.fingerprint != reference.fingerprint and f32.frontend["runtime"] == "openvino"
        got = f32.embed_batch(feats)
        assert min(_cos(a, b) for a, b in zip(got, want)) >= 0.999999
        assert max(b for b, _ in f32.shapes_seen) > 1
    assert max(b for b, _ in f32.shapes_seen) <= ovm.RESEMBLYZER_MAX_BATCH
    if BF16:
        bf16 = load("openvino:resemblyzer", dtype="bf16", threads=1)
        assert min(_cos(a, b) for a, b in zip(bf16.embed_batch(feats), want)) >= 0.9999


def test_a_blob_that_does_not_reproduce_its_probe_is_refused(user_cache, ov_small):
    stage = user_cache / "openvino" / ov_small.fingerprint / "model"
    with np.load(stage / "probe.npz") as saved:
        x, y = saved["x"], saved["y"]
    np.savez(stage / "probe.npz", x=x, y=-y)  # as if the import had computed something else
    again = load(ov_small.spec, threads=1)
    assert (stage / "no-blob").exists() and not list(stage.glob("*.blob"))
    feats = np.random.default_rng(1).standard_normal((2, 180, 32)).astype(np.float32)
    assert np.allclose(again.embed_batch(feats), ov_small.embed_batch(feats), atol=1e-5)


# -- the user cache --------------------------------------------------------------------------


def test_cache_entries_live_in_the_user_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("EMBSTORE_CACHE", str(tmp_path / "c"))
    assert cache.entry_dir("onnx", "abc123") == tmp_path / "c" / "onnx" / "abc123"
    for bad in ("../escape", "a/b", ""):
        with pytest.raises(ValueError):
            cache.entry_dir("onnx", bad)


def test_export_goes_to_the_user_cache_once(user_cache, torch_small):
    from embstore.models.onnx import export_onnx

    path = Path(export_onnx(torch_small))
    assert path == user_cache / "onnx" / torch_small.fingerprint / "model.onnx"
    stamp = path.stat().st_mtime_ns
    assert Path(export_onnx(torch_small)).stat().st_mtime_ns == stamp  # reused, not redone
    assert "source_fingerprint" in (path.parent / "config.yaml").read_text()


def test_a_known_model_loads_without_torch(user_cache, small_dir, ov_small):
    code = (
        "import sys, time; from embstore.models import load; "
        f"e = load('openvino:{small_dir}', threads=1); "
        "print(e.fingerprint, 'torch' in sys.modules)"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "EMBSTORE_CACHE": str(user_cache)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=True)
    fingerprint, torch_loaded = out.stdout.split()
    assert fingerprint == ov_small.fingerprint and torch_loaded == "False"
    assert list((user_cache / "openvino" / ov_small.fingerprint).iterdir())  # OpenVINO wrote its blob there


def _fill(folder: str, log: str, barrier) -> str:
    import time

    def build(tmp: Path) -> None:
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        (tmp / "part.bin").write_bytes(os.urandom(1 << 20))
        time.sleep(0.3)  # widen the window in which a second builder would collide
        (tmp / "done").write_text("ok")

    barrier.wait()
    out = cache.fill_once(Path(folder), "done", build)
    return (out / "part.bin").read_bytes()[:16].hex()


def test_fill_once_builds_once_when_processes_race(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Manager().Barrier(3)
    folder, log = tmp_path / "entry", tmp_path / "builds.log"
    with ctx.Pool(3) as pool:
        heads = pool.starmap(_fill, [(str(folder), str(log), barrier)] * 3)
    assert len(log.read_text().split()) == 1  # one builder; the others waited and reused
    assert len(set(heads)) == 1 and sorted(os.listdir(folder)) == ["done", "part.bin"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".entry.")]  # no temporary left


def test_write_json_is_atomic_and_read_json_tolerates_garbage(tmp_path):
    target = tmp_path / "index" / "k.json"
    cache.write_json(target, {"a": 1})
    assert cache.read_json(target) == {"a": 1}
    target.write_text("{not json")
    assert cache.read_json(target) is None and cache.read_json(tmp_path / "missing.json") is None


# -- slow: every item, and real processes racing on an empty cache ---------------------------


@pytest.fixture(scope="module")
def resnet34_dir(tmp_path_factory, user_cache):
    return make_wespeaker_dir(tmp_path_factory.mktemp("r34"), arch="resnet34")


def _embed_all(encoder, shared_data: Path, method: str = "embed_file") -> dict[str, np.ndarray]:
    return {p.stem: getattr(encoder, method)(str(p)) for p in sorted(shared_data.glob("*/*.flac"))}


def _check_bf16_fidelity(bf16, reference, shared_data: Path, min_cos: float = 0.9999) -> None:
    result = summary(_embed_all(bf16, shared_data), _embed_all(reference, shared_data),
                     str(shared_data / "trials.txt"))
    assert result["min_cos"] >= min_cos, result
    assert abs(result["eer_pct"] - result["reference_eer_pct"]) <= 0.1, result


@pytest.mark.slow
@needs_bf16
@pytest.mark.exhaustive
def test_bf16_every_item_random_resnet34(shared_data, resnet34_dir):
    _check_bf16_fidelity(load(f"openvino:{resnet34_dir}", dtype="bf16", threads=1),
                         load(f"wespeaker:{resnet34_dir}"), shared_data)


@pytest.mark.slow
@needs_bf16
@pytest.mark.exhaustive
def test_bf16_every_item_default_model(shared_data, campplus_weights):
    # EER 0.000 as fp32's; 3 s / 1.5 s cuts within 0.03 points (benchmarks/verification.py)
    _check_bf16_fidelity(load("openvino:campplus", dtype="bf16", threads=1), load("campplus"), shared_data,
                         min_cos=CAMPPLUS_BF16_MIN_COS)


@pytest.mark.slow
@needs_bf16
@pytest.mark.exhaustive
def test_bf16_every_item_resemblyzer(shared_data, user_cache):
    _check_bf16_fidelity(load("openvino:resemblyzer", dtype="bf16", threads=1), load("resemblyzer"), shared_data)


@pytest.mark.slow
@pytest.mark.exhaustive
def test_three_processes_fill_an_empty_cache_at_once(tmp_path, resnet34_dir, shared_data):
    code = (
        "import sys, json; from embstore.models import load; "
        "e = load(sys.argv[1], threads=1); "
        "print(json.dumps([e.fingerprint, e.embed_file(sys.argv[2], 0, 2).tolist()]))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "EMBSTORE_CACHE": str(tmp_path / "fresh"), "OMP_NUM_THREADS": "1"}
    clip = _clips(shared_data, 1)[0]
    procs = [subprocess.Popen([sys.executable, "-c", code, f"openvino:{resnet34_dir}", clip], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
        results.append(json.loads(out))
    assert len({r[0] for r in results}) == 1
    assert all(np.allclose(r[1], results[0][1], atol=1e-6) for r in results)
    exports = list((tmp_path / "fresh" / "onnx").iterdir())
    assert [p.name for p in exports if p.is_dir()] and len([p for p in exports if p.is_dir()]) == 1


_SIGNAL_STACK_PROBE = """
import faulthandler, gc, os, signal, sys
from embstore.models import load

faulthandler.enable()  # as pytest and PYTHONFAULTHANDLER do: Python's own alternate stack
first = load("openvino:" + sys.argv[1], threads=1)
second = load("openvino:" + sys.argv[1], threads=1)
del first  # first in, first out: OpenVINO frees the first model's stack ...
gc.collect()
del second  # ... and the second puts that freed stack back as the thread's
gc.collect()
signal.signal(signal.SIGINT, lambda *_: print("interrupted"))
os.kill(os.getpid(), signal.SIGINT)  # runs on the alternate stack: freed memory segfaults
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sigaltstack via glibc")
def test_ctrl_c_after_openvino_models_come_and_go_is_not_a_segfault(small_dir, ov_small):
    # OpenVINO's CPU plugin installs its own alternate signal stack on the compiling thread
    # and frees such stacks out of order: left in place, a later Ctrl-C segfaulted the
    # process. A fresh process: this one has loaded OpenVINO models already.
    done = subprocess.run([sys.executable, "-c", _SIGNAL_STACK_PROBE, str(small_dir)],
                          capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout) == (0, "interrupted\n"), done.stderr[-2000:]
