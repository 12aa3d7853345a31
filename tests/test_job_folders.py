"""Job folders: two runs never share one, and a resume never touches a live run's files or takes a neighbour's run."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from lavis_xformer.checkpoints import find_resume_checkpoint, remove_interrupted_saves
from lavis_xformer.common import jobs
from test_reliability import child_env, train_args


# =================================================================================================================
# Job folders
# =================================================================================================================
def test_two_runs_started_together_write_into_their_own_folders(tmp_path):
    """Two training runs into one output_dir, started at the same moment: two job folders, each with its own
    checkpoint and log (LAVIS's minute-resolution job id put both into one folder, the second run's checkpoint
    replacing the first's)."""
    out = tmp_path / "out"
    env = child_env()
    args = train_args(tmp_path / "data", out, "run.max_epoch=1", "run.checkpoint_every_iters=0")
    runs = [subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for _ in range(2)]
    outputs = [run.communicate(timeout=300)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    folders = sorted(p for p in out.iterdir() if p.is_dir())
    assert len(folders) == 2
    for folder in folders:
        assert (folder / "checkpoint_0.pth").is_file()
        assert not (folder / jobs.LOCK_NAME).exists()  # released at the end of the run
        log = (folder / "log.txt").read_text()
        assert log.count('{"kind": "epoch"') == 1  # one run's epoch, not two interleaved


def test_claimed_job_folders_are_unique_within_one_second(tmp_path):
    ids = [jobs.claim_job_folder(tmp_path)[0] for _ in range(20)]
    assert len(set(ids)) == 20 and all((tmp_path / i).is_dir() for i in ids)
    stamp = time.strftime("%Y%m%d%H")
    assert all(i.startswith(stamp) or i[:10] > stamp for i in ids)  # a timestamp first (the newest sorts last)


def _training_checkpoint(path: Path, epoch: int):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": {"w": torch.full((2,), float(epoch))}, "optimizer": {"state": {}}, "epoch": epoch}, path)


def _age(path: Path, seconds: float):
    stamp = time.time() - seconds
    os.utime(path, (stamp, stamp))


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _lock(folder: Path, host: str, pid: int):
    (folder / jobs.LOCK_NAME).write_text(json.dumps({"host": host, "pid": pid}))


def test_auto_resume_takes_the_newest_run_never_a_live_one_or_a_neighbour(tmp_path):
    """Under one output_dir: an older run that went further (neighbour), the newest finished-or-killed run, and a
    run still alive. ``auto`` (skipping live folders) resumes the newest dead run's furthest checkpoint."""
    neighbour, newest, live = tmp_path / "20260101000000-aaaaaa", tmp_path / "20260102000000-bbbbbb", tmp_path / "c"
    _training_checkpoint(neighbour / "checkpoint_5.pth", 5)
    _age(neighbour / "checkpoint_5.pth", 3600)
    _training_checkpoint(newest / "checkpoint_0.pth", 0)
    _training_checkpoint(newest / "checkpoint_1_iter2.pth", 0)
    _age(newest / "checkpoint_0.pth", 60)
    _lock(newest, jobs.this_host(), _dead_pid())  # killed: its lock stays behind
    _training_checkpoint(live / "checkpoint_2.pth", 2)
    _lock(live, jobs.this_host(), os.getpid())
    path, checkpoint = find_resume_checkpoint(tmp_path, skip_folder=jobs.folder_in_use)
    assert path == str(newest / "checkpoint_1_iter2.pth")
    # without the live check the live run's file would be taken; a named folder is searched as given
    assert find_resume_checkpoint(tmp_path)[0] == str(live / "checkpoint_2.pth")
    assert find_resume_checkpoint(neighbour)[0] == str(neighbour / "checkpoint_5.pth")
    # another host's lock is live while its heartbeat is fresh, stale after jobs.STALE_SECONDS
    _lock(live, "another-host", 1)
    assert jobs.folder_in_use(live)
    _age(live / jobs.LOCK_NAME, jobs.STALE_SECONDS + 60)
    assert not jobs.folder_in_use(live)


def test_resume_removes_only_temporary_files_of_dead_writers(tmp_path):
    host, dead = jobs.this_host(), _dead_pid()
    job = tmp_path / "job"
    job.mkdir()
    names = {
        "own": f"checkpoint_1.pth.tmp-{host}-{os.getpid()}",  # this (live) process: a save under way
        "dead": f"checkpoint_1.pth.tmp-{host}-{dead}",
        "legacy_dead": f"checkpoint_2.pth.tmp-{dead}",  # the old name, without a host: treated as another host's
        "foreign_fresh": "checkpoint_3.pth.tmp-node-17.cluster-4242",
        "foreign_stale": "checkpoint_4.pth.tmp-node-17.cluster-4243",
    }
    for name in names.values():
        (job / name).write_bytes(b"partial")
    _age(job / names["foreign_stale"], jobs.STALE_SECONDS + 60)
    removed = {Path(p).name for p in remove_interrupted_saves(tmp_path)}
    assert removed == {names["dead"], names["foreign_stale"]}
    assert all((job / names[k]).exists() for k in ("own", "legacy_dead", "foreign_fresh"))


SAVER = """
import sys, torch
from lavis_xformer.checkpoints import save_checkpoint_atomically
save_checkpoint_atomically({"model": {"w": torch.ones(1000)}, "optimizer": {}, "epoch": 0}, sys.argv[1])
"""


def test_a_save_under_way_survives_a_resume_in_the_same_folder(tmp_path):
    """The original failure: resume deleted the temporary file of a live save, which then died with
    FileNotFoundError at its rename and lost its epoch."""
    target = tmp_path / "job" / "checkpoint_0.pth"
    target.parent.mkdir()
    saver = subprocess.Popen([sys.executable, "-c", SAVER, str(target)], env=child_env(
        LAVIS_XFORMER_TEST_SAVE_DELAY="4", PYTHONPATH=str(Path(__file__).resolve().parents[1])),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 60
    while not list(target.parent.glob("*.tmp-*")) and time.time() < deadline:
        time.sleep(0.05)
    assert list(target.parent.glob("*.tmp-*")), "the save never started"
    assert remove_interrupted_saves(tmp_path) == []
    output = saver.communicate(timeout=120)[0]
    assert saver.returncode == 0, output
    assert torch.load(target, weights_only=True)["model"]["w"].sum() == 1000
