"""A plain `pip install` of the checkout into a clean venv gives working defaults.

No Makefile, no hand-installed package: torch 2.13.0 first (as the README says), then
the checkout, both from the wheels `make wheels` collected (`.wheels/`, torch from the
local wheel cache), with `--no-index`, so the test talks to no network. Then `scan`,
`extract` and `diarize` with every default (model, VAD, runtime) on two real files, from
outside the checkout so nothing is imported from the source tree.
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WHEELS = Path(os.environ.get("EMBSTORE_WHEELS", ROOT / ".wheels"))

pytestmark = [pytest.mark.slow, pytest.mark.long]


def _run(cmd: list, cwd: Path, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}: exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_plain_pip_install_in_a_clean_venv_gives_working_defaults(tmp_path, shared_data, campplus_weights):
    if not (WHEELS / ".complete").exists():
        pytest.skip("no wheelhouse: `make wheels` collects it (make test does)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "PIP_"))}
    env.update(PIP_NO_INDEX="1", PIP_FIND_LINKS=str(WHEELS), PIP_DISABLE_PIP_VERSION_CHECK="1",
               EMBSTORE_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
    bin_dir = env_dir / "bin"
    # --no-compile: byte-compiling torch's thousands of files is most of an install's time
    pip = [bin_dir / "python", "-m", "pip", "install", "-q", "--no-compile", "--no-index", "--find-links", WHEELS]
    _run(pip + ["torch==2.13.0"], tmp_path, env)
    _run(pip + [ROOT], tmp_path, env)
    # nothing but what the package declares: no hand-installed silero-vad, no WeSpeaker
    listed = _run([bin_dir / "python", "-m", "pip", "list", "--format=freeze"], tmp_path, env).stdout.lower()
    assert "silero-vad==" in listed and "onnxruntime==" in listed and "wespeaker" not in listed

    root = tmp_path / "root" / "ds" / "spk"
    root.mkdir(parents=True)
    for f in sorted(shared_data.rglob("*.flac"), key=lambda p: p.stat().st_size)[:2]:  # the shortest two
        os.symlink(f, root / f.name)
    embstore = bin_dir / "embstore"
    # the default model's weights into the empty cache, as on an offline machine (the
    # suite reaches no hub: EMBSTORE_MODEL_SOURCES=cache,file)
    fetched = _run([embstore, "models", "fetch", "campplus", "--from-file", campplus_weights], tmp_path, env)
    assert "sha256 verified" in fetched.stdout
    store = tmp_path / "s"
    _run([embstore, "scan", store, tmp_path / "root"], tmp_path, env)
    out = _run([embstore, "extract", store], tmp_path, env).stdout
    assert ": 2 done, 0 failed, 0 left" in out, out
    rttm = tmp_path / "out.rttm"
    diarized = _run([embstore, "diarize", store, "--rttm", rttm], tmp_path, env)
    lines = rttm.read_text().splitlines()
    assert {line.split()[1] for line in lines} == {f"ds/spk/{p.stem}" for p in root.iterdir()}, diarized.stderr
    assert "2 items (2 diarized now, 0 stored)" in diarized.stderr
    # the installed package, not the checkout, answered
    where = _run([bin_dir / "python", "-c", "import embstore; print(embstore.__file__)"], tmp_path, env).stdout
    assert str(env_dir) in where and sys.prefix not in where
