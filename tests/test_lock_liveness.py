"""``run.lock`` liveness survives pid reuse and other hosts, and ``auto`` says what it passed over and why.

A container's trainer is pid 1 in every run, so a dead run's lock names a live pid: simulated by a lock written
with this process's pid and another run's token. A requeue on another node sees another host's lock: dead once its
heartbeat is older than ``jobs.LOCK_STALE_SECONDS``, whatever its pid.
"""

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from lavis_xformer.checkpoints import find_resume_checkpoint
from lavis_xformer.common import jobs
from lavis_xformer.run_config import known_run_keys
from lavis_xformer.runners import resume as runner_resume


def _checkpoint(path: Path, epoch: int):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": {"w": torch.zeros(1)}, "optimizer": {"state": {}, "param_groups": []}, "epoch": epoch},
               path)


def _lock(folder: Path, age: float = 0.0, **fields):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / jobs.LOCK_NAME
    path.write_text(json.dumps(fields))
    if age:
        stamp = time.time() - age
        os.utime(path, (stamp, stamp))


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_lock_with_this_pid_and_a_dead_runs_token_is_dead(tmp_path):
    """pid 1 in a container: the requeued trainer has the dead run's pid."""
    job = tmp_path / "20260101000000-aaaaaa"
    _checkpoint(job / "checkpoint_3.pth", 3)
    _lock(job, host=jobs.this_host(), pid=os.getpid(), token="0123456789abcdef")
    live, why = jobs.lock_status(job)
    assert live is False and "another run's token" in why
    assert not jobs.folder_in_use(job)
    path, _ = find_resume_checkpoint(tmp_path, skip_folder=runner_resume._held_by_live_run)
    assert path == str(job / "checkpoint_3.pth")


def test_this_process_own_lock_is_live(tmp_path):
    lock = jobs.JobLock(tmp_path)
    try:
        assert jobs.lock_status(tmp_path)[0] is True and jobs.folder_in_use(tmp_path)
        assert jobs.read_lock(tmp_path)["token"] == jobs.RUN_TOKEN
    finally:
        lock.release()
    assert jobs.lock_status(tmp_path) == (None, "no run.lock")


def test_a_reused_pid_or_a_dead_pid_or_another_boot_is_dead(tmp_path):
    parent = os.getppid()  # alive, but not the process that wrote the lock (its start time differs)
    start = jobs.process_start(parent)
    assert start is not None
    _lock(tmp_path / "reused", host=jobs.this_host(), pid=parent, token="x", pid_start=start + 12345)
    assert jobs.lock_status(tmp_path / "reused")[0] is False
    _lock(tmp_path / "same", host=jobs.this_host(), pid=parent, token="x", pid_start=start, boot_id=jobs.boot_id())
    assert jobs.lock_status(tmp_path / "same")[0] is True
    _lock(tmp_path / "dead", host=jobs.this_host(), pid=_dead_pid(), token="x")
    assert "is gone" in jobs.lock_status(tmp_path / "dead")[1]
    _lock(tmp_path / "reboot", host=jobs.this_host(), pid=parent, token="x", boot_id="another-boot")
    assert jobs.boot_id() is None or "rebooted" in jobs.lock_status(tmp_path / "reboot")[1]


def test_another_hosts_lock_is_dead_once_its_heartbeat_is_stale_whatever_the_pid(tmp_path):
    assert jobs.LOCK_STALE_SECONDS <= 10 * jobs.HEARTBEAT_SECONDS < 15 * 60  # was 15 minutes: requeues started fresh
    _lock(tmp_path / "fresh", host="node-7", pid=1, token="t")
    live, why = jobs.lock_status(tmp_path / "fresh")
    assert live is True and "node-7" in why
    _lock(tmp_path / "stale", age=jobs.LOCK_STALE_SECONDS + 30, host="node-7", pid=1, token="t")
    live, why = jobs.lock_status(tmp_path / "stale")
    assert live is False and "no heartbeat" in why
    # also this host's own live pid: a stale heartbeat means dead
    _lock(tmp_path / "mine", age=jobs.LOCK_STALE_SECONDS + 30, host=jobs.this_host(), pid=os.getpid())
    assert jobs.lock_status(tmp_path / "mine")[0] is False


def test_auto_names_the_folder_it_passed_over_and_why_and_never_says_no_checkpoint(tmp_path, caplog):
    held = tmp_path / "20260101000000-bbbbbb"
    _checkpoint(held / "checkpoint_1.pth", 1)
    _lock(held, host="node-9", pid=4242, token="t")  # a live run on another node, by its heartbeat
    skipped = []
    with caplog.at_level(logging.INFO):
        path, _ = find_resume_checkpoint(tmp_path, skip_folder=runner_resume._held_by_live_run, skipped=skipped)
        assert path is None and skipped and skipped[0][0] == str(held) and "node-9" in skipped[0][1]
        runner_resume._log_resume_choice(tmp_path, path, skipped)
    line = [r.getMessage() for r in caplog.records if "resume: auto ->" in r.getMessage()][-1]
    assert "no checkpoint" not in line and str(held) in line and "node-9" in line
    assert "run.resume_ignore_locks=True" in line
    # the operator forces it: the folder is taken whatever its lock says
    assert find_resume_checkpoint(tmp_path, skip_folder=None)[0] == str(held / "checkpoint_1.pth")
    assert "resume_ignore_locks" in known_run_keys()
