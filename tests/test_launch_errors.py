"""A user error found before a run starts (config, paths, output folder) is one ``error:`` line per problem on stderr
and exit status 1 from every entry point -- ``python -m lavis_xformer.train`` / ``evaluate`` (and their console
scripts) as ``lavis-xformer train`` -- with the traceback only behind ``--debug`` (a caught config error printed a
14-line traceback before its one useful line). In-process: ``main()`` and ``runpy`` as ``python -m`` runs it."""

import runpy
import sys

import pytest

from lavis_xformer import cli, evaluate, train
from lavis_xformer.run_config import ConfigError
from helpers import DEMO_EVAL, DEMO_TRAIN


def assert_one_line_each(err: str, expected: str):
    lines = err.strip().splitlines()
    assert "Traceback" not in err and expected in err, err
    assert all(line.startswith("error: ") for line in lines[:-1]) and "--debug" in lines[-1], err
    assert not any(line.startswith("error: ERROR") for line in lines), err


# (config errors stop the check before datasets or models are looked at: fast. The output-folder, path and data
# errors take the same way out of build_runner; test_paths_and_output_folder tests their messages.)
BAD_TRAIN = ["--cfg-path", str(DEMO_TRAIN), "--options", "run.beta2=1.5", "run.seed=-1"]
EXPECTED = ("run.beta2=1.5", "run.seed=-1")


def test_train_config_errors_are_one_line_each_and_exit_1(capsys):
    assert train.main(BAD_TRAIN) == 1
    err = capsys.readouterr().err
    for expected in EXPECTED:
        assert_one_line_each(err, expected)
    with pytest.raises(ConfigError, match=r"run.beta2"):
        train.main(["--debug", *BAD_TRAIN])


def test_python_dash_m_train_exits_1_and_the_cli_says_the_same(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lavis_xformer.train", *BAD_TRAIN])
    monkeypatch.delitem(sys.modules, "lavis_xformer.train")  # as `python -m` finds it: not imported yet
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module("lavis_xformer.train", run_name="__main__")
    assert exit_.value.code == 1
    assert_one_line_each(capsys.readouterr().err, EXPECTED[0])
    assert cli.main(["train", *BAD_TRAIN]) == 1
    assert_one_line_each(capsys.readouterr().err, EXPECTED[0])
    with pytest.raises(ConfigError):
        cli.main(["--debug", "train", *BAD_TRAIN])


def test_evaluate_config_error_is_one_line_and_exit_1(capsys, monkeypatch):
    args = ["--cfg-path", str(DEMO_EVAL), "--options", "model.model_type=tny"]
    assert evaluate.main(args) == 1
    assert_one_line_each(capsys.readouterr().err, "model.model_type='tny' is not a type of")
    monkeypatch.setenv("LAVIS_XFORMER_DEBUG", "1")
    with pytest.raises(ConfigError, match="tny"):
        evaluate.main(args)
