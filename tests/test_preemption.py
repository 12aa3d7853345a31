"""Preemption: SIGTERM (or SIGUSR1) to a real training process ends it with a checkpoint, a released lock, one log
line and exit code 128 + signal; ``auto`` resume then ends bit-identical to the uninterrupted run.

The signal arrives at a known step without any timing: ``LAVIS_XFORMER_TEST_PAUSE=STEP@FILE`` makes the run write FILE
in the forward of that global step and wait there until a stop signal is recorded; the test sends SIGTERM once FILE
exists. Assertions are on files and exit codes only.
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lavis_xformer.checkpoints import read_checkpoint
from lavis_xformer.common import jobs
from lavis_xformer.runners.preemption import Preempted, StopSignals, parse_signals
from helpers import DEMO_TRAIN, shapes_options, subprocess_env

BUILDER = "xformer_shapes_caption"
SIZES = dict(num_train=48, num_val=4, num_test=8)  # 48 / batch 16 = 3 steps per epoch


def train_args(data_root, output_dir, *options):
    return [sys.executable, "-m", "lavis_xformer.train", "--cfg-path", str(DEMO_TRAIN), "--options",
            *shapes_options(BUILDER, data_root, **SIZES), "run.max_epoch=2", "run.batch_size_train=16",
            "run.log_freq=1", "run.warmup_steps=2", f"run.output_dir={output_dir}", *options]


def env(**extra):
    return dict(subprocess_env(), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **extra)


def run_to_end(args, cwd):
    result = subprocess.run(args, cwd=cwd, env=env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    return result.stdout + result.stderr


def run_until_paused_then_signal(args, cwd, step, signum, tmp_path):
    """Start a run that pauses in the forward of global step ``step``, send ``signum`` once it is there, return
    (exit code, output). Waiting for the marker file is not a timing assumption: the run cannot pass the step."""
    marker = tmp_path / f"paused-{step}"
    log = tmp_path / f"run-{step}.log"
    with open(log, "w") as out:
        process = subprocess.Popen(args, cwd=cwd, env=env(LAVIS_XFORMER_TEST_PAUSE=f"{step}@{marker}"),
                                   stdout=out, stderr=subprocess.STDOUT)
        try:
            while not marker.exists():
                assert process.poll() is None, log.read_text()[-5000:]
                try:
                    process.wait(timeout=0.2)
                except subprocess.TimeoutExpired:
                    pass
            process.send_signal(signum)
            code = process.wait(timeout=600)
        finally:
            if process.poll() is None:
                process.kill()
    return code, log.read_text()


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("shapes")


@pytest.fixture(scope="module")
def reference(data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    run_to_end(train_args(data_root, out), cwd=out)
    (path,) = out.glob("*/checkpoint_1.pth")
    return path


def assert_same_training_state(a_path, b_path):
    a, b = (read_checkpoint(str(p)) for p in (a_path, b_path))
    differing = [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
    assert a["model"].keys() == b["model"].keys() and not differing, differing[:5]
    state_a, state_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(state_a[p][k], state_b[p][k]) for p in state_a for k in state_a[p])


def test_sigterm_mid_epoch_saves_releases_the_lock_exits_143_and_resume_is_exact(reference, data_root, tmp_path):
    out = tmp_path / "out"
    # global step 4 = epoch 1, iteration 1: the signal lands in the forward of the epoch's second step
    code, log = run_until_paused_then_signal(train_args(data_root, out), tmp_path, 4, signal.SIGTERM, tmp_path)
    assert code == 128 + signal.SIGTERM == 143, log[-5000:]
    (job,) = [p for p in out.iterdir() if p.is_dir()]
    # the step in progress was finished (iteration 1 done -> the next is 2), then one checkpoint written
    assert sorted(p.name for p in job.glob("checkpoint_*")) == ["checkpoint_0.pth", "checkpoint_1_iter2.pth"]
    trainer = read_checkpoint(str(job / "checkpoint_1_iter2.pth"))["trainer"]
    assert (trainer["epoch"], trainer["iteration"], trainer["complete"]) == (1, 2, False)
    assert not (job / jobs.LOCK_NAME).exists()  # released: the requeued job can take this folder
    assert not list(job.glob("*.tmp-*"))
    lines = [line for line in log.splitlines() if "preempted: SIGTERM" in line]
    assert len(lines) == 1 and "checkpoint_1_iter2.pth" in lines[0] and "exiting 143" in lines[0], log[-3000:]
    assert "Traceback" not in log

    output = run_to_end(train_args(data_root, out, "run.resume_ckpt_path=auto"), cwd=tmp_path)
    assert f"resume: auto -> {job / 'checkpoint_1_iter2.pth'}" in output
    assert "resuming epoch 1 at iteration 2" in output
    (final,) = out.glob("*/checkpoint_1.pth")
    assert_same_training_state(final, reference)


def test_sigusr1_is_configurable_and_a_signal_at_the_last_step_still_resumes(data_root, tmp_path):
    """run.preemption_signals=[SIGUSR1]: SIGUSR1 stops the run (exit 138) at the epoch's last step; the checkpoint
    resumes at the end of that epoch (nothing redone)."""
    out = tmp_path / "out"
    code, log = run_until_paused_then_signal(
        train_args(data_root, out, "run.max_epoch=1", "run.preemption_signals=[SIGUSR1]"), tmp_path, 2,
        signal.SIGUSR1, tmp_path)
    assert code == 128 + signal.SIGUSR1, log[-5000:]
    (path,) = out.glob("*/checkpoint_0_iter3.pth")
    assert read_checkpoint(str(path))["trainer"]["iteration"] == 3
    output = run_to_end(train_args(data_root, out, "run.max_epoch=1", "run.resume_ckpt_path=auto"), cwd=tmp_path)
    assert f"resume: auto -> {path}" in output and "Start training epoch 0," in output
    assert len(list(out.glob("*/checkpoint_0.pth"))) == 1


# ---------------------------------------------------------------------------------------------------------------
# In-process pieces
# ---------------------------------------------------------------------------------------------------------------
def test_signal_names_are_parsed_and_uncatchable_ones_refused():
    assert parse_signals(["SIGTERM", "usr1", 2]) == (signal.SIGTERM, signal.SIGUSR1, 2)
    assert parse_signals([]) == () and parse_signals(None) == ()
    for bad in ("SIGKILL", "SIGNOPE"):
        with pytest.raises(ValueError, match=bad):
            parse_signals([bad])


def test_a_stop_signal_only_sets_a_flag_and_the_handlers_are_restored():
    before = signal.getsignal(signal.SIGUSR1)
    stop = StopSignals(["SIGUSR1"], every_minutes=0)
    stop.install()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)  # delivered before os.kill returns (the calling thread is main)
        assert stop.requested() and stop.poll() == (signal.SIGUSR1, False)
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGUSR1) is before
    assert Preempted(signal.SIGTERM, "x").code == 143


def test_periodic_checkpoint_is_due_after_the_interval_and_restarts_on_save():
    now = [0.0]
    stop = StopSignals((), every_minutes=30, clock=lambda: now[0])
    assert stop.poll() == (0, False)
    now[0] = 30 * 60.0
    assert stop.poll() == (0, True)
    stop.saved()
    assert stop.poll() == (0, False)
    assert StopSignals((), every_minutes=0, clock=lambda: 1e9).poll() == (0, False)  # 0 = off
    with pytest.raises(ValueError, match="checkpoint_every_minutes"):
        StopSignals((), every_minutes=-1)


def test_default_is_a_checkpoint_every_30_minutes_on_sigterm_and_sigusr1():
    from lavis_xformer.runners import preemption

    assert preemption.DEFAULT_CHECKPOINT_MINUTES == 30
    assert parse_signals(preemption.DEFAULT_SIGNALS) == (signal.SIGTERM, signal.SIGUSR1)
    assert Path(preemption.__file__).is_file()


def test_torchrun_sigterm_every_rank_stops_at_the_same_step_and_one_checkpoint_resumes(data_root, tmp_path):
    """SIGTERM to torchrun's agent (what SLURM / Kubernetes signal): the agent passes it to both workers, which
    finish the step, agree to stop (one all-reduce), write one checkpoint holding both ranks' states and release the
    lock; a requeued torchrun resumes from it."""
    out = tmp_path / "out"
    marker = tmp_path / "paused"
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "lavis_xformer.train", "--cfg-path", str(DEMO_TRAIN), "--options",
            *shapes_options(BUILDER, data_root, num_train=16, num_val=2, num_test=2), "run.max_epoch=2",
            "run.batch_size_train=4", "run.warmup_steps=1", "run.device=cpu", "run.resume_ckpt_path=auto",
            f"run.output_dir={out}"]
    log = tmp_path / "torchrun.log"
    with open(log, "w") as stream:  # 16 samples / 2 ranks / batch 4 = 2 steps per epoch; global step 2 = epoch 1
        process = subprocess.Popen(args, cwd=tmp_path, env=env(LAVIS_XFORMER_TEST_PAUSE=f"2@{marker}"),
                                   stdout=stream, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while not (marker.exists() and Path(f"{marker}.rank1").exists()):
                assert process.poll() is None, log.read_text()[-5000:]
                try:
                    process.wait(timeout=0.2)
                except subprocess.TimeoutExpired:
                    pass
            process.send_signal(signal.SIGTERM)
            code = process.wait(timeout=600)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
    text = log.read_text()
    assert code != 0, text[-5000:]
    (job,) = [p for p in out.iterdir() if p.is_dir()]
    assert sorted(p.name for p in job.glob("checkpoint_*")) == ["checkpoint_0.pth", "checkpoint_1_iter1.pth"], text
    trainer = read_checkpoint(str(job / "checkpoint_1_iter1.pth"))["trainer"]
    assert (trainer["epoch"], trainer["iteration"], trainer["world_size"], len(trainer["ranks"])) == (1, 1, 2, 2)
    assert not (job / jobs.LOCK_NAME).exists()
    assert text.count("preempted: SIGTERM at epoch 1 iteration 1") == 1, text[-5000:]

    result = subprocess.run(args, cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=600,
                            start_new_session=True)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    assert f"resume: auto -> {job / 'checkpoint_1_iter1.pth'}" in output
    assert "resuming epoch 1 at iteration 1" in output and len(list(out.glob("*/checkpoint_1.pth"))) == 1


def test_a_tasks_own_loop_runs_under_pythons_handlers():
    """A task with its own training loop never polls the flag: the signal must act as Python's default there."""
    before = signal.getsignal(signal.SIGUSR1)
    stop = StopSignals(["SIGUSR1"], every_minutes=0)
    stop.install()
    try:
        with stop.suspended():
            assert signal.getsignal(signal.SIGUSR1) is before
        assert signal.getsignal(signal.SIGUSR1) == stop._handle
    finally:
        stop.restore()
