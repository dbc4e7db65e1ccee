import json
import os
import subprocess
import sys

from click.testing import CliRunner

from embstore.cli import cli
from tests.audio_factory import make_tree


def test_help_does_not_import_torch():
    code = "import sys; from embstore.cli import cli; import click.testing as t; " \
           "r = t.CliRunner().invoke(cli, ['--help']); assert r.exit_code == 0; " \
           "bad = [m for m in ('torch', 'zarr', 'sqlite_utils', 'numpy') if m in sys.modules]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_every_command_has_help_with_examples():
    runner = CliRunner()
    for name, command in cli.commands.items():
        result = runner.invoke(cli, [name, "--help"])
        assert result.exit_code == 0, name
        assert "Examples" in result.output, f"{name} help has no examples"


def test_scan_and_status_through_cli_runner(tmp_path):
    make_tree(tmp_path / "root", speakers=2, per_speaker=2)
    runner = CliRunner()
    store = str(tmp_path / "s")
    result = runner.invoke(cli, ["scan", store, str(tmp_path / "root")])
    assert result.exit_code == 0, result.output
    assert "added 4" in result.output
    result = runner.invoke(cli, ["scan", store, str(tmp_path / "root")])
    assert "no changes" in result.output
    result = runner.invoke(cli, ["status", store, "--json"])
    status = json.loads(result.output)
    assert status["files"] == 4 and status["speakers"] == 2 and status["datasets"] == 1
    result = runner.invoke(cli, ["status", store])
    assert "speakers   2" in result.output


def test_errors_are_one_line_not_tracebacks(tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli, ["status", str(tmp_path / "nothing-here")])
    assert result.exit_code == 1
    assert "Error: no store" in result.output and "Traceback" not in result.output
    d = tmp_path / "kd"
    d.mkdir()
    (d / "wav.scp").write_text("u1 cat x.wav |\n")
    result = runner.invoke(cli, ["scan", str(tmp_path / "s"), "--kaldi", str(d)])
    assert result.exit_code == 1 and "piped commands" in result.output


def test_scan_as_real_subprocess(tmp_path):
    make_tree(tmp_path / "root", speakers=1, per_speaker=2)
    env = dict(os.environ)
    out = subprocess.run(
        [sys.executable, "-m", "embstore", "scan", str(tmp_path / "s"), str(tmp_path / "root"), "--json"],
        capture_output=True, text=True, env=env,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["added"] == 2
