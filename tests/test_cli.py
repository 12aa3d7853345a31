"""``lavis-xformer COMMAND``: every sub-command's --help (its own options and examples), one-line user errors with
exit 1 and tracebacks behind --debug, model types listed on a typo, identical warnings once."""

import logging
import subprocess
import sys

import pytest
from lavis.models import load_model

from lavis_xformer import cli
from helpers import REPO, subprocess_env

AVAILABLE = [name for name in cli.COMMANDS if name != "experiment"]


@pytest.mark.parametrize("name", AVAILABLE)
def test_every_subcommand_help_shows_its_usage_and_examples(name, capsys):
    assert cli.main([name, "--help"]) == 0
    out = capsys.readouterr().out
    assert f"lavis-xformer {name}" in out and "examples:" in out and "-h, --help" in out


def test_experiment_dispatches_lazily_wherever_it_lands(capsys):
    code = cli.main(["experiment", "--help"])  # branch exp adds it; until then one line, exit 1
    captured = capsys.readouterr()
    assert (code == 0 and "lavis-xformer experiment" in captured.out) or (
        code == 1 and "not available" in captured.err)


def test_the_top_level_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {name}" in out for name in cli.COMMANDS)


def test_a_mistyped_command_gets_a_suggestion(capsys):
    assert cli.main(["tran"]) == 2
    assert "did you mean 'train'" in capsys.readouterr().err


def test_user_errors_are_one_line_each_and_exit_1_tracebacks_behind_debug(tmp_path, capsys):
    assert cli.main(["inspect", str(tmp_path / "missing.pth")]) == 1
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err
    assert cli.main(["train", "--cfg-path", str(tmp_path / "missing.yaml")]) == 1
    err = capsys.readouterr().err
    assert "no such file" in err and "Traceback" not in err and "--debug" in err
    with pytest.raises(ValueError):
        cli.main(["--debug", "train", "--cfg-path", str(tmp_path / "missing.yaml")])


def test_a_mistyped_model_type_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"'tni' is not a model type of XFormer \(did you mean 'tiny'\?\); valid: "):
        load_model("xformer", "tni")


def test_identical_warnings_are_shown_once():
    records = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    root = logging.getLogger()
    handler, filters = Collect(logging.WARNING), list(root.filters)
    root.addHandler(handler)
    try:
        cli.warn_once()
        for _ in range(3):
            logging.warning("UNTRAINED queries")
        logging.warning("another")
    finally:
        root.removeHandler(handler)
        root.filters[:] = filters
    assert records == ["UNTRAINED queries", "another"]


def test_python_dash_m_runs_the_cli_without_a_runpy_warning():
    result = subprocess.run([sys.executable, "-W", "default", "-m", "lavis_xformer", "check", "--help"], cwd=REPO,
                            env={**subprocess_env(), "PYTHONWARNINGS": "default::RuntimeWarning"},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "lavis-xformer check" in result.stdout
    assert "RuntimeWarning" not in result.stderr
    result = subprocess.run([sys.executable, "-m", "lavis_xformer.checkpoints", "--help"], cwd=REPO,
                            env={**subprocess_env(), "PYTHONWARNINGS": "default::RuntimeWarning"},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "found in sys.modules" not in result.stderr


def test_setup_declares_the_console_script():
    assert "lavis-xformer = lavis_xformer.cli:main" in (REPO / "setup.py").read_text()
