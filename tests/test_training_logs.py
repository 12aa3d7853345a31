"""runner_xformer's per-iteration logs: json lines in log.txt, TensorBoard scalars, loss curves read back.

The runs are real ``python -m lavis_xformer.train`` subprocesses on the shapes data (tiny X-Former, 48 images,
batch 16: 3 batches per data epoch), as in test_reliability.py.
"""

import sys

import pytest
import torch
from lavis.common.optims import LinearWarmupCosineLRScheduler

from lavis_xformer.runners import logs, trackers
from lavis_xformer.runners.logs import read_iteration_log
from test_reliability import epoch_stats, job_folder, run_cli, train_args


LOSS_TERMS = ("loss", "loss_itc", "loss_itm", "loss_lm", "loss_rec")  # stage 1: the total and the task's terms


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("shapes")


# =================================================================================================================
# Per-iteration log
# =================================================================================================================
def test_per_iteration_lines_hold_every_loss_term_lr_and_throughput_and_go_to_tensorboard(data_root, tmp_path):
    """3 epochs x 3 steps with log_freq 3: one line per epoch, whose averages are the epoch's own (LAVIS's per-epoch
    line); lr is LAVIS's schedule at the window's last step; TensorBoard holds the same."""
    out = tmp_path / "out"
    run_cli(train_args(data_root, out, "run.log_freq=3", "run.tensorboard=True", "run.checkpoint_every_iters=0"),
            cwd=tmp_path)
    job = job_folder(out)
    lines = read_iteration_log(job)
    epochs = epoch_stats(job)  # LAVIS's per-epoch lines are still there, and still read as before
    assert [line["iteration"] for line in lines] == [3, 6, 9] and [line["epoch"] for line in lines] == [0, 1, 2]
    assert len(epochs) == 3
    for line, epoch in zip(lines, epochs):
        assert set(line) == {"iteration", "epoch", "lr", *LOSS_TERMS, "it_per_s", "samples_per_s"}
        for term in LOSS_TERMS:
            assert line[term] == pytest.approx(epoch[f"train_{term}"], rel=1e-9)
        assert line["samples_per_s"] == pytest.approx(16 * line["it_per_s"]) and line["it_per_s"] > 0

    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = LinearWarmupCosineLRScheduler(optimizer, max_epoch=3, min_lr=1e-4, init_lr=5e-3, warmup_steps=2,
                                             warmup_start_lr=1e-6)
    for line in lines:
        schedule.step(cur_epoch=line["epoch"], cur_step=2)  # the epoch's last step (the window's last)
        assert line["lr"] == optimizer.param_groups[0]["lr"]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = (job / "tensorboard").glob("events.out.tfevents.*")
    board = EventAccumulator(str(events.parent))
    board.Reload()
    for name in ("lr", *LOSS_TERMS, "samples_per_s"):
        scalars = board.Scalars(f"train/{name}")
        assert [s.step for s in scalars] == [3, 6, 9]
        assert [s.value for s in scalars] == pytest.approx([line[name] for line in lines], rel=1e-6)


def test_window_averages_carry_across_epochs_and_a_missing_tensorboard_is_one_clear_error(tmp_path, monkeypatch):
    """log_freq 2 over epochs of 3 steps: the line at iteration 4 averages steps 3 (epoch 0) and 4 (epoch 1)."""
    from lavis.common.logger import SmoothedValue
    from omegaconf import OmegaConf

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if tensorboard were not installed
    with pytest.raises(trackers.TrackerError, match=r"run.loggers: tensorboard is asked for, but the tensorboard "
                                                    r"package cannot be imported .*: pip install tensorboard$"):
        trackers.open_trackers(OmegaConf.create({"tensorboard": True}), tmp_path, "job", config={})
    log = logs.IterationLog(logs.JobLog(tmp_path), samples_per_iteration=8)
    values = [1.0, 2.0, 4.0, 8.0]
    log.start(0)
    meter = SmoothedValue()
    for step, value in enumerate(values):
        if step == 3:  # a new epoch: fresh meters
            log.end_epoch({"loss": meter}, ["loss", "loss_absent"])
            meter = SmoothedValue()
        meter.update(value)
        log.step(step, epoch=step // 3, lr=0.5, meters={"loss": meter}, names=["loss", "loss_absent"], log_freq=2)
    lines = read_iteration_log(tmp_path)
    assert [(line["iteration"], line["epoch"], line["loss"]) for line in lines] == [(2, 0, 1.5), (4, 1, 6.0)]
    assert all("loss_absent" not in line for line in lines)


def test_loss_curves_read_per_iteration_lines_or_epoch_averages(tmp_path):
    """The demo's loss figure takes ``read_iteration_log``'s records (x: iteration) as well as LAVIS's per-epoch
    lines (x: epoch); stage 2's LM loss falls back to its total; the figure is written as PNG and SVG."""
    from lavis_xformer.analysis import figures

    per_iteration = [{"iteration": 32, "epoch": 0, "loss": 9.0, "loss_lm": 4.0},
                     {"iteration": 64, "epoch": 0, "loss": 8.0}]
    assert figures.loss_series(per_iteration, "loss_lm") == ([32.0], [4.0])
    assert figures.loss_series(per_iteration, "loss") == ([32.0, 64.0], [9.0, 8.0])
    per_epoch = [{"train_loss": "3.5"}, {"train_loss": "2.5"}]
    assert figures.loss_series(per_epoch, "loss_lm") == ([], [])
    assert figures.loss_series(per_epoch, "loss_lm", or_total=True) == ([1.0, 2.0], [3.5, 2.5])
    path = figures.loss_curves_png({"x": {"stage1": per_iteration, "stage2": per_epoch}}, {"x": "X-Former"},
                                   tmp_path / "loss_curves.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "<svg" in path.with_suffix(".svg").read_text()
