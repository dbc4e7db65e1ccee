"""`--dtype tf32`: CUDA's TF32 matrix mode as its own model key; fp32 on CUDA is strict.

Everything here runs on a CPU: the TF32 switches are plain process flags that exist in
CPU builds of torch too, so what the context sets and restores is checked without a GPU
(tests/test_cuda.py checks the numbers on one)."""

import numpy as np
import pytest

import embstore
from embstore.errors import ExtractionError
from tests.audio_factory import make_tree, write
from tests.wespeaker_dirs import make_wespeaker_dir

torch = pytest.importorskip("torch")


def test_cli_choices_are_the_library_dtypes() -> None:
    from embstore.cli.extract import DTYPE_CHOICES
    from embstore.models.common import DTYPES

    assert tuple(DTYPE_CHOICES) == DTYPES and "tf32" in DTYPES


@pytest.mark.parametrize("dtype, inside", [("fp32", False), ("tf32", True)])
def test_cuda_precision_switches_are_set_for_the_call_and_restored(dtype: str, inside: bool) -> None:
    from embstore.models.common import autocast

    flags = (torch.backends.cuda.matmul, torch.backends.cudnn)
    before = tuple(f.allow_tf32 for f in flags)
    # the opposite of what the call needs, so a context that sets nothing fails
    for f in flags:
        f.allow_tf32 = not inside
    try:
        with autocast("cuda:0", dtype):
            assert tuple(f.allow_tf32 for f in flags) == (inside, inside)
        assert tuple(f.allow_tf32 for f in flags) == (not inside, not inside)
    finally:
        for f, value in zip(flags, before):
            f.allow_tf32 = value


def test_cpu_autocast_leaves_the_switches_alone() -> None:
    from embstore.models.common import autocast

    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    with autocast("cpu", "tf32"):
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before


def test_tf32_is_its_own_model_and_plain_fp32_on_cpu(tmp_path) -> None:
    from embstore.models import load

    spec = f"wespeaker:{make_wespeaker_dir(tmp_path, arch='ecapa')}"
    wav = write(tmp_path / "a.wav", 1.7, seed=3)
    fp32, tf32 = load(spec, dtype="fp32"), load(spec, dtype="tf32")
    assert fp32.fingerprint != tf32.fingerprint and tf32.frontend["compute_dtype"] == "tf32"
    np.testing.assert_array_equal(fp32.embed_file(str(wav)), tf32.embed_file(str(wav)))


def test_extract_refuses_tf32_on_cpu_in_one_line(tmp_path) -> None:
    make_tree(tmp_path / "root", speakers=1, per_speaker=1)
    st = embstore.open(tmp_path / "s")
    st.scan([tmp_path / "root"])
    spec = f"wespeaker:{make_wespeaker_dir(tmp_path / 'm', arch='ecapa')}"
    with pytest.raises(ExtractionError, match="CUDA mode") as info:
        st.extract(model=spec, device="cpu", dtype="tf32")
    assert "\n" not in str(info.value)
