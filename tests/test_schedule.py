"""The per-iteration warm-up + cosine schedule (``linear_warmup_cosine_iter_lr``), alone and through the runner.

The runner runs are in-process ``launch.build_runner`` runs of the demo stage-1 yaml on 48 shapes images with batch
16 (3 iterations per epoch), so every lr the schedule sets is recorded exactly.
"""

import math
import shutil

import pytest
import torch
from lavis.common.optims import LinearWarmupCosineLRScheduler
from lavis.common.registry import registry
from omegaconf import OmegaConf

from lavis_xformer import launch
from lavis_xformer.checkpoints import read_checkpoint
from lavis_xformer.runners.runner_xformer import RunnerXFormer
from lavis_xformer.runners.schedulers import LinearWarmupCosineIterLRScheduler
from helpers import DEMO_TRAIN, PROJECTS, shapes_options

INIT, MIN, WARM_START = 1e-4, 5e-5, 1e-6


def optimizer():
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=0.0)


def schedule(max_epoch=1, warmup_steps=10, iters_per_epoch=50):
    return LinearWarmupCosineIterLRScheduler(optimizer(), max_epoch=max_epoch, min_lr=MIN, init_lr=INIT,
                                             warmup_steps=warmup_steps, warmup_start_lr=WARM_START,
                                             iters_per_epoch=iters_per_epoch)


def test_registered_under_its_name_beside_lavis_epoch_wise_schedule():
    assert registry.get_lr_scheduler_class("linear_warmup_cosine_iter_lr") is LinearWarmupCosineIterLRScheduler
    assert registry.get_lr_scheduler_class("linear_warmup_cosine_lr") is LinearWarmupCosineLRScheduler


def test_one_epoch_warms_up_to_init_lr_and_ends_at_min_lr():
    sched = schedule(max_epoch=1, warmup_steps=10, iters_per_epoch=50)
    lrs = [sched.step(cur_epoch=0, cur_step=i) for i in range(50)]
    assert lrs[0] == pytest.approx(WARM_START)
    assert lrs[5] == pytest.approx(WARM_START + (INIT - WARM_START) * 5 / 10)
    assert lrs[10] == pytest.approx(INIT, rel=1e-12)                       # warm-up reaches init_lr
    assert lrs[-1] == pytest.approx(MIN, rel=1e-12)                         # last iteration: min_lr
    assert sched.optimizer.param_groups[0]["lr"] == lrs[-1]
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))                  # warm-up rises
    assert all(a > b for a, b in zip(lrs[10:-1], lrs[11:]))                 # cosine falls every iteration
    # the cosine's midpoint (t - W = (T - 1 - W) / 2) is halfway between init_lr and min_lr
    sched_odd = schedule(max_epoch=1, warmup_steps=9, iters_per_epoch=50)   # T - 1 - W = 40: midpoint at t = 29
    assert sched_odd.lr_at(0, 29) == pytest.approx((INIT + MIN) / 2, rel=1e-12)


def test_several_epochs_decay_across_epochs_not_within_each():
    sched = schedule(max_epoch=3, warmup_steps=4, iters_per_epoch=10)
    lrs = [sched.lr_at(e, i) for e in range(3) for i in range(10)]
    assert lrs[4] == pytest.approx(INIT) and lrs[-1] == pytest.approx(MIN)
    assert all(a > b for a, b in zip(lrs[4:-1], lrs[5:]))
    t = 17  # epoch 1, step 7: the closed form over global iterations
    assert sched.lr_at(1, 7) == pytest.approx(MIN + (INIT - MIN) * 0.5 * (1 + math.cos(math.pi * (t - 4) / 25)))


def test_lavis_epoch_wise_schedule_is_unchanged():
    """LAVIS's own class and formula: one cosine value per epoch, so a 1-epoch run stays at init_lr after warm-up."""
    sched = LinearWarmupCosineLRScheduler(optimizer(), max_epoch=1, min_lr=MIN, init_lr=INIT, warmup_steps=10,
                                          warmup_start_lr=WARM_START)
    for i in range(50):
        sched.step(cur_epoch=0, cur_step=i)
    assert sched.optimizer.param_groups[0]["lr"] == INIT


def test_lr_is_a_function_of_epoch_step_and_restored_state_only():
    run = schedule(max_epoch=2, warmup_steps=3, iters_per_epoch=7)
    expected = [run.step(e, i) for e in range(2) for i in range(7)]
    resumed = LinearWarmupCosineIterLRScheduler(optimizer(), max_epoch=2, min_lr=MIN, init_lr=INIT, warmup_steps=3,
                                                warmup_start_lr=WARM_START)
    resumed.load_state_dict(run.state_dict())
    assert [resumed.lr_at(e, i) for e in range(2) for i in range(7)][9:] == expected[9:]


def test_without_iters_per_epoch_it_says_which_runner_to_use():
    sched = LinearWarmupCosineIterLRScheduler(optimizer(), max_epoch=1, min_lr=MIN, init_lr=INIT)
    with pytest.raises(RuntimeError, match="runner_xformer"):
        sched.step(cur_epoch=0, cur_step=0)


def test_paper_yamls_use_the_per_iteration_schedule():
    for name in ("pretrain_stage1", "pretrain_stage2_opt2.7b", "pretrain_stage2_opt6.7b", "pretrain_stage2_flant5xl"):
        for suffix in ("", "_blip2"):
            cfg = OmegaConf.load(PROJECTS / "train" / f"{name}{suffix}.yaml")
            assert cfg.run.lr_sched == "linear_warmup_cosine_iter_lr", name + suffix


# ---------------------------------------------------------------------------------------------------------------
# Through the runner
# ---------------------------------------------------------------------------------------------------------------
def _runner(data_root, output_dir, *options):
    # LAVIS's RunnerBase registers its output folders as global paths and refuses a second registration: forget the
    # previous in-process run's.
    for key in ("output_dir", "result_dir"):
        registry.mapping["paths"].pop(key, None)
    argv = ["--cfg-path", str(DEMO_TRAIN), "--options",
            *shapes_options("xformer_shapes_caption", data_root, num_train=48, num_val=4, num_test=8),
            "run.batch_size_train=16", "run.log_freq=1", "run.warmup_steps=2", "run.init_lr=1e-3",
            "run.min_lr=1e-4", "run.warmup_lr=1e-6", f"run.output_dir={output_dir}", "run.valid_splits=[]",
            "run.test_splits=[]", *options]
    return launch.build_runner(argv)


@pytest.fixture
def recorded_lrs(monkeypatch):
    """Every lr a schedule sets, as (class name, epoch, step, lr)."""
    seen = []
    for cls in (LinearWarmupCosineIterLRScheduler, LinearWarmupCosineLRScheduler):
        original = cls.step

        def step(self, cur_epoch, cur_step, _original=original):
            result = _original(self, cur_epoch=cur_epoch, cur_step=cur_step)
            seen.append((type(self).__name__, cur_epoch, cur_step, self.optimizer.param_groups[0]["lr"]))
            return result

        monkeypatch.setattr(cls, "step", step)
    return seen


def test_runner_one_epoch_ends_at_min_lr_and_lavis_schedule_stays_at_init_lr(tmp_path, recorded_lrs):
    data = tmp_path / "shapes"
    _runner(data, tmp_path / "iter", "run.max_epoch=1", "run.lr_sched=linear_warmup_cosine_iter_lr").train()
    assert [(e, i) for _, e, i, _ in recorded_lrs] == [(0, 0), (0, 1), (0, 2)]
    lrs = [lr for *_, lr in recorded_lrs]
    assert lrs[2] == pytest.approx(1e-4, rel=1e-12)  # the last iteration: min_lr
    assert lrs[1] == pytest.approx(1e-6 + (1e-3 - 1e-6) / 2)  # warm-up

    recorded_lrs.clear()
    _runner(data, tmp_path / "epoch", "run.max_epoch=1", "run.lr_sched=linear_warmup_cosine_lr").train()
    assert {name for name, *_ in recorded_lrs} == {"LinearWarmupCosineLRScheduler"}
    assert recorded_lrs[-1][-1] == 1e-3  # LAVIS's epoch-wise cosine: a 1-epoch run never decays


def test_resume_mid_epoch_gives_the_same_lrs(tmp_path, recorded_lrs, monkeypatch):
    data, kept = tmp_path / "shapes", tmp_path / "kept"
    kept.mkdir()
    save_progress = RunnerXFormer.save_progress

    def keep_mid_epoch_checkpoints(self, epoch, next_iter, complete):  # the runner removes them at the epoch's end
        save_progress(self, epoch, next_iter, complete)
        if not complete:
            shutil.copy(self.checkpoint_path(f"{epoch}_iter{next_iter}"), kept)

    monkeypatch.setattr(RunnerXFormer, "save_progress", keep_mid_epoch_checkpoints)
    options = ("run.max_epoch=2", "run.lr_sched=linear_warmup_cosine_iter_lr", "run.checkpoint_every_iters=2")
    _runner(data, tmp_path / "full", *options).train()
    full = [(e, i, lr) for _, e, i, lr in recorded_lrs]
    assert len(full) == 6 and full[-1][2] == pytest.approx(1e-4, rel=1e-12)

    mid = kept / "checkpoint_1_iter2.pth"
    assert read_checkpoint(str(mid))["trainer"]["lr_scheduler"]["state"] == {"iters_per_epoch": 3}
    recorded_lrs.clear()
    resumed = _runner(data, tmp_path / "resumed", *options, f"run.resume_ckpt_path={mid}")
    resumed._resume(str(mid))
    resumed.config.run_cfg.resume_ckpt_path = None  # resumed just above
    assert resumed.lr_scheduler.lr_at(1, 2) == full[-1][2]  # known before the epoch's loop runs
    resumed.train()
    assert [(e, i, lr) for _, e, i, lr in recorded_lrs] == full[5:]
