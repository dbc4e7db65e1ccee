"""Every exception embstore defines lives in `embstore.errors`, and the ones a user can
cause end a command with one line: an item id that an RTTM file cannot hold stops
`embstore diarize --rttm` before any work, and exit 4 has one name (EnvironmentProblem)."""

from __future__ import annotations

import ast
import builtins
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

import embstore
from embstore import errors
from embstore.cli import cli
from embstore.cli.common import library_errors
from tests.audio_factory import write

PACKAGE = Path(__file__).resolve().parents[1] / "embstore"
BUILTIN_EXCEPTIONS = {
    name for name in dir(builtins)
    if isinstance(getattr(builtins, name), type) and issubclass(getattr(builtins, name), BaseException)
}
# a base named like this is an exception even when it comes from a library (click's
# ClickException, a library's FooError): the class itself is one too
EXCEPTION_SUFFIXES = ("Error", "Exception", "Problem", "Warning", "Failure", "Interrupt")


def _base_name(node: ast.expr) -> str | None:
    """`ValueError` -> ValueError, `click.ClickException` -> ClickException."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def exception_classes(sources: dict[str, str]) -> set[tuple[str, str]]:
    """(file, class) of every exception class defined in the sources {file: text}: a base
    that is a builtin exception or named like one, or (through any number of steps) a
    class of the sources found to be one."""
    classes = [
        (path, node.name, {_base_name(b) for b in node.bases} - {None})
        for path, text in sources.items()
        for node in ast.walk(ast.parse(text, filename=path))
        if isinstance(node, ast.ClassDef)
    ]
    found: set[tuple[str, str]] = set()
    known = set(BUILTIN_EXCEPTIONS)
    while True:  # until no class joins: a subclass of a subclass is found in a later pass
        more = {
            (path, name) for path, name, bases in classes
            if (path, name) not in found
            and any(b in known or b.endswith(EXCEPTION_SUFFIXES) for b in bases)  # type: ignore[union-attr]
        }
        if not more:
            return found
        found |= more
        known |= {name for _, name in more}


def package_sources() -> dict[str, str]:
    return {str(p.relative_to(PACKAGE.parent)): p.read_text(encoding="utf-8") for p in sorted(PACKAGE.rglob("*.py"))}


def test_the_finder_sees_exceptions_however_they_are_derived():
    sources = {
        "embstore/a.py": "import click\nclass Plain:\n    pass\nclass Bad(ValueError):\n    pass\n"
                         "class Cli(click.ClickException):\n    exit_code = 4\n",
        "embstore/b.py": "from embstore.a import Bad\nclass Worse(Bad):\n    pass\nclass Worst(Worse):\n    pass\n"
                         "class Odd(SomeLibraryProblem):\n    pass\nclass Data(dict):\n    pass\n",
    }
    assert exception_classes(sources) == {
        ("embstore/a.py", "Bad"), ("embstore/a.py", "Cli"), ("embstore/b.py", "Worse"), ("embstore/b.py", "Worst"),
        ("embstore/b.py", "Odd"),
    }


def test_every_exception_class_lives_in_errors_py():
    found = exception_classes(package_sources())
    # the finder sees every exception errors.py really defines, so it reads this code right
    defined = {name for name, value in vars(errors).items()
               if isinstance(value, type) and issubclass(value, BaseException) and value.__module__ == errors.__name__}
    assert {name for path, name in found if path == "embstore/errors.py"} == defined
    elsewhere = sorted(f"{path}: {name}" for path, name in found if path != "embstore/errors.py")
    assert not elsewhere, "exceptions outside embstore/errors.py (move them there):\n" + "\n".join(elsewhere)


def test_the_modules_that_raised_them_still_name_them():
    from embstore.diarize import rttm, speakers
    from embstore.models import masked
    from embstore.segments import policy, vad, windows

    assert vad.VadError is errors.VadError and vad.VadUnavailable is errors.VadUnavailable
    assert vad.NoSpeech is errors.NoSpeech and windows.WindowSpecError is errors.WindowSpecError
    assert rttm.RttmError is errors.RttmError and policy.ItemCutFailed is errors.ItemCutFailed
    assert masked.UnsupportedModel is errors.UnsupportedModel
    assert speakers.ClusteringError is errors.ClusteringError
    assert not hasattr(speakers, "ClusterError") and not hasattr(errors, "ClusterError")  # one name


@pytest.mark.parametrize("name", ["WindowSpecError", "VadError", "RttmError", "ClusteringError"])
def test_user_errors_are_one_line_store_errors_and_still_value_errors(name):
    cls = getattr(errors, name)
    assert issubclass(cls, errors.StoreError) and issubclass(cls, ValueError)


def test_a_missing_vad_package_is_the_machines_problem():
    assert issubclass(errors.VadUnavailable, errors.VadError)
    assert issubclass(errors.VadUnavailable, errors.EnvironmentProblem)


def _command_raising(exc: BaseException) -> click.Command:
    @click.command()
    @library_errors
    def command() -> None:
        raise exc

    return command


@pytest.mark.parametrize("exc, status", [
    (errors.EnvironmentProblem("the webrtc VAD needs the webrtcvad package"), 4),
    (errors.VadUnavailable("the silero VAD needs the silero-vad package"), 4),
    (errors.VadError("VAD threshold must be in (0, 1), got 2"), 1),
    (errors.WindowSpecError("--windows '1:0': expected WINDOW:SHIFT"), 1),
    (errors.RttmError("x.rttm:3: a SPEAKER line needs at least 8 fields, got 2"), 1),
])
def test_library_errors_end_the_command_with_one_line(exc, status):
    out = CliRunner().invoke(_command_raising(exc), [])
    assert out.exit_code == status, out.output
    assert isinstance(out.exception, SystemExit), out.exception  # no traceback
    assert out.output == f"Error: {exc}\n"


def test_a_full_disk_is_an_environment_problem_exit_4():
    import errno

    out = CliRunner().invoke(_command_raising(OSError(errno.ENOSPC, "No space left on device")), [])
    assert out.exit_code == 4 and out.output.startswith("Error: disk full") and out.output.count("\n") == 1


@pytest.fixture
def spaced_store(tmp_path: Path) -> Path:
    """A scanned store (nothing extracted) of three items, two with a space in their ids."""
    root = tmp_path / "root"
    write(root / "ds" / "spk0" / "utt0.wav", 3.0, pitch=120, seed=1)
    write(root / "ds" / "spk 1" / "a b.wav", 3.0, pitch=190, seed=2)
    write(root / "ds" / "spk 1" / "c.wav", 3.0, pitch=190, seed=3)
    store = tmp_path / "s"
    st = embstore.open(store, create=True)
    try:
        st.scan([root])
    finally:
        st.close()
    return store


def _counts(store: Path) -> dict[str, int]:
    st = embstore.open(store)
    try:
        return {table: st.manifest.conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
                for table in ("items", "models", "tasks", "runs", "speech", "diarization")}
    finally:
        st.close()


def _spaced_ids(store: Path) -> list[str]:
    st = embstore.open(store)
    try:
        return [uid for (uid,) in st.manifest.conn.execute("SELECT uid FROM items ORDER BY id") if " " in uid]
    finally:
        st.close()


def test_diarize_rttm_refuses_ids_with_whitespace_before_any_work(spaced_store, tmp_path):
    spaced = _spaced_ids(spaced_store)
    assert len(spaced) == 2  # "ds/spk 1/a b", "ds/spk 1/c": the scan keeps the spaces
    before = _counts(spaced_store)
    rttm = tmp_path / "out.rttm"
    out = CliRunner().invoke(cli, ["diarize", str(spaced_store), "--rttm", str(rttm)])
    assert out.exit_code == 1, out.output
    assert isinstance(out.exception, SystemExit), out.exception  # one line, no traceback
    lines = out.output.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: 2 item ids contain whitespace"), out.output
    assert repr(spaced[0]) in lines[0] and "--rttm" in lines[0]
    assert not rttm.exists()
    # nothing extracted, claimed, registered or diarized: the check came first
    assert _counts(spaced_store) == before == {"items": 3, "models": 0, "tasks": 0, "runs": 0, "speech": 0,
                                               "diarization": 0}


def test_the_library_call_refuses_them_too_and_only_with_rttm(spaced_store):
    st = embstore.open(spaced_store)
    try:
        with pytest.raises(errors.RttmError, match=r"2 item ids contain whitespace .*'ds/spk 1/"):
            st.diarize(rttm=True, vad="none", embedder="null:16", workers=1)
        assert st.manifest.conn.execute("SELECT count(*) FROM tasks").fetchone()[0] == 0
    finally:
        st.close()


def test_one_bad_id_is_named_alone(tmp_path):
    root = tmp_path / "root"
    write(root / "ds" / "spk0" / "utt0.wav", 1.0, seed=1)
    write(root / "ds" / "spk0" / "take\t2.wav", 1.0, seed=2)  # a tab is whitespace too
    st = embstore.open(tmp_path / "s", create=True)
    try:
        st.scan([root])
        with pytest.raises(errors.RttmError, match=r"^item id 'ds/spk0/take\\t2' contains whitespace"):
            st.diarize(rttm=True)
    finally:
        st.close()


def test_without_rttm_ids_with_whitespace_still_diarize(spaced_store):
    st = embstore.open(spaced_store)
    try:
        report = st.diarize(windows="1.5:0.75", vad="none", embedder="null:16", workers=1)
        assert report.outcome.exit_status == 0, report.outcome
        assert set(report.segments) == {"ds/spk0/utt0", "ds/spk 1/a b", "ds/spk 1/c"}
        assert st.manifest.conn.execute("SELECT count(*) FROM diarization").fetchone()[0] == 3  # stored
    finally:
        st.close()
