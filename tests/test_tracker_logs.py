"""Logs a tracker can read: ``log.txt`` as JSON lines, the config in ``config.yaml``, TensorBoard and W&B through
``run.loggers``, and a resumed run continuing its predecessor's curves (``runners/logs.py``, ``runners/trackers.py``).

The runs are in-process ``RunnerXFormer.train()`` runs of a toy regression (a 4 -> 1 linear layer, 12 samples,
batch 4: 3 iterations per epoch) with a toy task whose validation metric is known, so a run takes well under a
second; the runner, its loop, logs, checkpoints and resume are the real ones.
"""

import json
import sys
import types
from pathlib import Path

import pytest
import torch
from lavis.common.registry import registry
from lavis.tasks.base_task import BaseTask
from omegaconf import OmegaConf

from lavis_xformer.checkpoints import read_checkpoint
from lavis_xformer.checkpoints.card import run_summary
from lavis_xformer.common import distributed
from lavis_xformer.run_config import ConfigError, validate_config
from lavis_xformer.runners import logs, trackers
from lavis_xformer.runners.runner_xformer import RunnerXFormer
from helpers import DEMO_TRAIN

ITERS_PER_EPOCH = 3


class _Regression(torch.utils.data.Dataset):
    def __init__(self, size, seed):
        generator = torch.Generator().manual_seed(seed)
        self.x = torch.randn(size, 4, generator=generator)
        self.y = self.x.sum(1, keepdim=True)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, index):
        return {"x": self.x[index], "y": self.y[index]}

    def collater(self, samples):
        return torch.utils.data.default_collate(samples)


class _Linear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 1)

    def forward(self, samples):
        return {"loss": torch.nn.functional.mse_loss(self.linear(samples["x"]), samples["y"])}

    def before_evaluation(self, **kwargs):
        pass


class _Task(BaseTask):
    """Validation / test metric: the model's mean squared error on the split, and ``agg_metrics`` = 1 / (1 + mse)."""

    def evaluation(self, model, data_loader, cuda_enabled=True):
        with torch.no_grad():
            return [model(batch)["loss"].item() for batch in data_loader]

    def after_evaluation(self, val_result, split_name, epoch, **kwargs):
        mse = sum(val_result) / len(val_result)
        return {"agg_metrics": 1 / (1 + mse), "mse": mse}


class _Config:
    """What the runner reads of LAVIS's ``Config``: ``run_cfg`` and ``to_dict()``."""

    def __init__(self, run):
        self.config = OmegaConf.create({"model": {"arch": "toy_linear"}, "datasets": {"toy": {}}, "run": run})

    @property
    def run_cfg(self):
        return self.config.run

    def to_dict(self):
        return OmegaConf.to_container(self.config, resolve=True)


@pytest.fixture(scope="module", autouse=True)
def process_group():
    """The runner makes a one-process group when none exists; the one made here is removed after these tests."""
    made = not distributed.is_initialized()
    yield
    if made and distributed.is_initialized():
        torch.distributed.destroy_process_group()


def train(output_dir, **run) -> Path:
    """One toy run (2 epochs x 3 iterations unless ``run`` says otherwise); returns its job folder."""
    for key in ("output_dir", "result_dir"):  # LAVIS registers them once per process
        registry.mapping["paths"].pop(key, None)
    settings = dict(task="toy", lr_sched="linear_warmup_cosine_lr", init_lr=0.05, min_lr=0.01, warmup_lr=0.01,
                    warmup_steps=0, weight_decay=0.0, max_epoch=2, batch_size_train=4, batch_size_eval=4,
                    num_workers=0, seed=0, output_dir=str(output_dir), device="cpu", distributed=False,
                    world_size=1, train_splits=["train"], valid_splits=["val"], test_splits=["test"], log_freq=1,
                    evaluate=False, amp=False, checkpoint_every_iters=0, resume_ckpt_path=None)
    settings.update(run)
    torch.manual_seed(0)
    datasets = {"toy": {"train": _Regression(4 * ITERS_PER_EPOCH, 0), "val": _Regression(8, 1),
                        "test": _Regression(8, 2)}}
    runner = RunnerXFormer(cfg=_Config(settings), task=_Task(), model=_Linear(), datasets=datasets, job_id="toy")
    runner.train()
    return Path(runner.output_dir)


def log_lines(job: Path):
    return [json.loads(line) for line in (job / "log.txt").read_text().splitlines()]


def without_kind(record: dict) -> dict:
    return {key: value for key, value in record.items() if key != "kind"}


# =================================================================================================================
# log.txt: JSON lines, numbers as numbers, epoch and iteration everywhere; the config beside it
# =================================================================================================================
def test_every_line_is_json_with_kind_epoch_iteration_and_numbers_as_numbers(tmp_path):
    job = train(tmp_path / "out")
    lines = log_lines(job)  # json.loads of every line: a config pretty-printed at the top would fail here
    best = max((0, 1), key=lambda epoch: lines[4 + 5 * epoch]["val_agg_metrics"])
    assert [(r["kind"], r["epoch"], r["iteration"]) for r in lines] == [
        ("iter", 0, 1), ("iter", 0, 2), ("iter", 0, 3), ("epoch", 0, 3), ("eval", 0, 3),
        ("iter", 1, 4), ("iter", 1, 5), ("iter", 1, 6), ("epoch", 1, 6), ("eval", 1, 6),
        ("eval", best, 3 * (best + 1))]  # the test split, at the best epoch's weights (what it evaluates)
    assert [r.get("split") for r in lines if r["kind"] == "eval"] == ["val", "val", "test"]
    for record in lines:
        assert list(record)[:3] == ["kind", "epoch", "iteration"]
        for key, value in record.items():
            if key not in ("kind", "split"):
                assert isinstance(value, (int, float)) and not isinstance(value, bool), (key, value, record)
    epoch = lines[3]
    assert set(epoch) >= {"train_lr", "train_loss", "train_skipped_steps"}
    # the epoch's average is the average of its iterations' losses (log_freq 1: one line per iteration)
    assert epoch["train_loss"] == pytest.approx(sum(r["loss"] for r in lines[:3]) / 3, rel=1e-9)
    assert lines[4]["val_agg_metrics"] == 1 / (1 + lines[4]["val_mse"]) and lines[4]["val_best_epoch"] == 0
    assert lines[9]["val_best_epoch"] == best

    config = OmegaConf.load(job / "config.yaml")
    assert config.run.max_epoch == 2 and config.model.arch == "toy_linear"
    assert logs.read_epoch_log(job)[1]["train_loss"] == lines[8]["train_loss"]


def test_an_iteration_based_run_logs_global_iterations_and_inner_epochs(tmp_path):
    job = train(tmp_path / "out", max_iters=6, iters_per_inner_epoch=2, test_splits=[])
    assert [(r["kind"], r["epoch"], r["iteration"]) for r in log_lines(job) if r["kind"] != "iter"] == [
        ("epoch", 0, 2), ("eval", 0, 2), ("epoch", 1, 4), ("eval", 1, 4), ("epoch", 2, 6), ("eval", 2, 6)]
    assert [r["iteration"] for r in logs.read_iteration_log(job)] == [1, 2, 3, 4, 5, 6]


def test_a_non_finite_average_is_null_and_older_logs_are_still_read(tmp_path):
    job_log = logs.JobLog(tmp_path)
    job_log.write("epoch", 0, 3, {"loss": float("nan"), "lr": "0.000", "steps": torch.tensor(2),
                                  "note": "text"})
    (line,) = (tmp_path / "log.txt").read_text().splitlines()
    assert json.loads(line) == {"kind": "epoch", "epoch": 0, "iteration": 3, "loss": None, "lr": 0.0, "steps": 2,
                                "note": "text"}
    old = tmp_path / "old"
    old.mkdir()
    (old / "log.txt").write_text('{\n    "run": {\n        "seed": 42\n    }\n}\n'
                                 '{"kind": "iter", "iter": 3, "epoch": 0, "loss": 2.5}\n'
                                 '{"train_lr": "0.001", "train_loss": "2.500"}\n{"val_agg_metrics": 0.5}\n')
    assert [(r["kind"], r.get("iteration")) for r in logs.read_log(old)] == [("iter", 3), ("epoch", None),
                                                                              ("eval", None)]
    assert logs.read_iteration_log(old) == [{"iteration": 3, "epoch": 0, "loss": 2.5}]


# =================================================================================================================
# TensorBoard: training and validation curves, continued by a resumed run
# =================================================================================================================
def test_resumed_run_continues_the_tensorboard_curves_the_iteration_log_and_the_model_card(tmp_path):
    """Run A trains 2 epochs; run B resumes from A's epoch-0 checkpoint with another lr and redoes epoch 1 in a new
    job folder. Read back, TensorBoard (A's folder) and ``read_iteration_log(B)`` hold one series 1..6 whose epoch-1
    values are B's; validation and test metrics are there; the model card of B's checkpoint labels epochs 0, 1."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "out"
    first = train(out, loggers=["tensorboard"])
    second = train(out, loggers="tensorboard", init_lr=0.02, resume_ckpt_path=str(first / "checkpoint_0.pth"))
    assert first != second and not (second / "tensorboard").exists()
    assert json.loads((second / "trackers.json").read_text()) == {"tensorboard": {"folder": str(first / "tensorboard")}}

    resume = log_lines(second)[0]
    assert resume == {"kind": "resume", "epoch": 1, "iteration": 3, "checkpoint": str(first / "checkpoint_0.pth"),
                      "job_dir": str(first)}
    series = logs.read_iteration_log(second)
    assert [r["iteration"] for r in series] == [1, 2, 3, 4, 5, 6]
    own, before = log_lines(second)[1:4], log_lines(first)
    assert series[:3] == [without_kind(r) for r in before[:3]]  # A's epoch 0
    assert series[3:] == [without_kind(r) for r in own]  # B's epoch 1, not A's
    assert own[0]["lr"] != before[5]["lr"]  # (B's lr differs, so the two epoch-1 series are told apart)
    assert [r["epoch"] for r in logs.read_epoch_log(second)] == [0, 1]

    board = EventAccumulator(str(first / "tensorboard"))
    board.Reload()
    loss = board.Scalars("train/loss")
    assert [s.step for s in loss] == [1, 2, 3, 4, 5, 6]
    assert [s.value for s in loss] == pytest.approx([r["loss"] for r in series], rel=1e-6)
    assert [s.value for s in board.Scalars("train/lr")][3:] == pytest.approx([r["lr"] for r in own], rel=1e-6)
    val = board.Scalars("val/agg_metrics")
    assert [s.step for s in val] == [3, 6]
    assert val[-1].value == pytest.approx(log_lines(second)[5]["val_agg_metrics"], rel=1e-6)
    assert len(board.Scalars("test/mse")) == 1
    assert [s.step for s in board.Scalars("train_epoch/loss")] == [3, 6]

    summary = run_summary(read_checkpoint(str(second / "checkpoint_1.pth")), str(second / "checkpoint_1.pth"))
    assert [r["epoch"] for r in summary["train"]] == [0, 1]
    assert summary["train"][1]["train_loss"] == log_lines(second)[4]["train_loss"]


# =================================================================================================================
# W&B
# =================================================================================================================
class _FakeRun:
    def __init__(self, **init):
        self.init, self.logged, self.finished = init, [], False
        self.id, self.project, self.name = init.get("id") or "run0001", init["project"], init["name"]
        self.metrics = []

    def define_metric(self, name, step_metric=None):
        self.metrics.append((name, step_metric))

    def log(self, values):
        self.logged.append(values)

    def finish(self):
        self.finished = True


def test_wandb_gets_every_value_against_iteration_and_a_resumed_run_reopens_the_same_run(tmp_path, monkeypatch):
    runs = []
    fake = types.SimpleNamespace(init=lambda **init: runs.append(_FakeRun(**init)) or runs[-1])
    monkeypatch.setitem(sys.modules, "wandb", fake)
    out = tmp_path / "out"
    first = train(out, loggers=["wandb"], wandb_project="xf-test")
    train(out, loggers=["wandb"], resume_ckpt_path=str(first / "checkpoint_0.pth"))
    a, b = runs
    assert a.init["project"] == "xf-test" and a.init["id"] is None and a.init["config"]["run"]["max_epoch"] == 2
    assert (b.init["id"], b.init["resume"], b.init["project"], b.init["name"]) == ("run0001", "allow", "xf-test",
                                                                                  a.name)
    assert ("*", "iteration") in a.metrics and a.finished and b.finished
    lines = [r for r in log_lines(first) if r["kind"] != "resume"]
    assert [v["iteration"] for v in a.logged] == [r["iteration"] for r in lines]
    assert a.logged[0] == {"train/lr": lines[0]["lr"], "train/loss": lines[0]["loss"],
                           "train/it_per_s": lines[0]["it_per_s"], "train/samples_per_s": lines[0]["samples_per_s"],
                           "iteration": 1}
    assert a.logged[4]["val/agg_metrics"] == lines[4]["val_agg_metrics"]
    assert [v["iteration"] for v in b.logged][:2] == [4, 5]


def test_wandb_offline_run_writes_its_files_under_wandb_dir(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb_dir").mkdir()
    try:
        job = train(tmp_path / "out", loggers=["wandb"], max_epoch=1, test_splits=[])
    finally:
        wandb.teardown()
    run_id = json.loads((job / "trackers.json").read_text())["wandb"]["id"]
    (run_file,) = (tmp_path / "wandb_dir").glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb")
    assert run_file.stat().st_size > 0
    assert not (tmp_path / "out" / "wandb").exists()


# =================================================================================================================
# The switch: names, and a tracker whose package is missing
# =================================================================================================================
def test_logger_switch_names_and_a_missing_package_is_one_clear_error(tmp_path, monkeypatch):
    names = trackers.requested_loggers
    assert names(OmegaConf.create({"loggers": "TensorBoard"})) == ["tensorboard"]
    assert names(OmegaConf.create({"loggers": ["wandb"], "tensorboard": True})) == ["wandb", "tensorboard"]
    assert names(OmegaConf.create({})) == []
    assert trackers.logger_problems(OmegaConf.create({"loggers": ["tensorbord"]})) == [
        "run.loggers: 'tensorbord' is not a tracker; valid: tensorboard, wandb"]

    monkeypatch.setitem(sys.modules, "wandb", None)  # as if wandb were not installed
    (problem,) = trackers.logger_problems(OmegaConf.create({"loggers": ["wandb"]}))
    assert problem.startswith("run.loggers: wandb is asked for, but the wandb package cannot be imported")
    assert problem.endswith("pip install wandb (or pip install 'lavis-xformer[wandb]')") and "\n" not in problem
    with pytest.raises(ConfigError, match=r"run.loggers: wandb is asked for, .*pip install wandb"):
        validate_config(DEMO_TRAIN, ["run.loggers=[wandb]"])  # what check and train report before building
    with pytest.raises(trackers.TrackerError, match=r"pip install wandb"):
        train(tmp_path / "out", loggers=["wandb"])
    (job,) = (tmp_path / "out").iterdir()
    assert not (job / "run.lock").exists()  # the folder is released: nothing ran in it
