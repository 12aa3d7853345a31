"""Job folders and their writers: every run writes into a folder of its own, and a file left by a process is only
removed once that process is provably gone.

* ``claim_job_folder(output_dir)`` -- rank 0 names the run's folder ``<YYYYmmddHHMMSS>-<6 hex digits>`` and creates
  it with ``mkdir(exist_ok=False)``, drawing a new suffix until the name is free: two runs started in the same
  second, in two processes or on two nodes sharing the filesystem, never share a folder (the runner broadcasts the
  name to the other ranks). The folder holds a ``run.lock`` naming the writer -- host, pid, a random per-run
  ``token``, the machine's boot id and the process's start time -- whose modification time a daemon thread refreshes
  every ``HEARTBEAT_SECONDS``; it is removed when the run ends, normally or on a stop signal.
* ``lock_status(folder)`` -- whether a ``run.lock`` still has a live writer, and why (``folder_in_use``, which ``auto``
  resume asks). Dead: a heartbeat older than ``LOCK_STALE_SECONDS`` whatever the pid; on this host, a pid that no
  longer exists, or that exists but is not the writer (this process with another run's token -- a container's
  trainer is pid 1 every time --, another boot, or another start time: the pid was reused). Live: a fresh heartbeat
  from another host, or this host's writer process itself.
* ``writer_is_gone(host, pid, mtime)`` -- the rule for a lock or a temporary checkpoint file left by a writer: on
  this host, gone iff no process with that pid exists (a live pid is never touched); on another host (whose pids
  cannot be checked from here), gone only when the file has not been touched for ``STALE_SECONDS`` (its lock's
  heartbeat, or a temporary file's writes, would have touched it).
* ``folder_in_use(folder)`` -- a job folder whose lock's writer is live (``auto`` resume passes over it).
"""

import atexit
import json
import os
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Optional, Tuple

LOCK_NAME = "run.lock"
HEARTBEAT_SECONDS = 30.0
# A run.lock whose heartbeat is this old belongs to a dead run, whatever its pid (10 missed heartbeats: room for a
# loaded file server and clock skew between nodes, short enough that a requeued job on another node resumes).
LOCK_STALE_SECONDS = 10 * HEARTBEAT_SECONDS
# A temporary checkpoint file of another host untouched this long belongs to a dead writer (a big save's writes
# touch it; there is no heartbeat).
STALE_SECONDS = 15 * 60.0
# This process's run identity, written into its locks: a lock naming this pid with another token is a dead run's.
RUN_TOKEN = secrets.token_hex(8)


def this_host() -> str:
    return socket.gethostname()


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (one owned by another user counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def boot_id() -> Optional[str]:
    """This machine's boot id (Linux), or None."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def process_start(pid: int) -> Optional[int]:
    """The start time of process ``pid`` (clock ticks after boot, Linux ``/proc/PID/stat`` field 22), or None."""
    try:
        stat = Path(f"/proc/{int(pid)}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def writer_is_gone(host: Optional[str], pid: Optional[int], mtime: float, now: Optional[float] = None) -> bool:
    """True only when the process that wrote a file can no longer write to it (see the module docstring). An
    unknown host or pid is treated as another host's."""
    if host == this_host() and pid is not None:
        return not pid_alive(int(pid))
    return (time.time() if now is None else now) - mtime > STALE_SECONDS


class JobLock:
    """``run.lock`` in a job folder: who writes there, kept fresh by a heartbeat thread; released at exit."""

    def __init__(self, folder):
        self.path = Path(folder) / LOCK_NAME
        self.path.write_text(json.dumps({"host": this_host(), "pid": os.getpid(), "started": time.time(),
                                         "token": RUN_TOKEN, "boot_id": boot_id(),
                                         "pid_start": process_start(os.getpid())}))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="job-lock-heartbeat", daemon=True)
        self._thread.start()
        atexit.register(self.release)

    def _beat(self):
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                os.utime(self.path)
            except OSError:  # the folder was removed under us: nothing left to protect
                return

    def release(self) -> None:
        self._stop.set()
        self.path.unlink(missing_ok=True)


def read_lock(folder) -> Optional[dict]:
    """The lock of a job folder (host, pid, token, boot_id, pid_start, mtime), or None when it has none."""
    path = Path(folder) / LOCK_NAME
    try:
        mtime = path.stat().st_mtime
        content = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        content = {}
    content = content if isinstance(content, dict) else {}
    fields = ("host", "pid", "token", "boot_id", "pid_start")
    return {**{key: content.get(key) for key in fields}, "mtime": mtime}


def lock_status(folder, now: Optional[float] = None) -> Tuple[Optional[bool], str]:
    """(live, why) for the ``run.lock`` of ``folder``; ``(None, "no run.lock")`` when there is none. See the module
    docstring for the rules."""
    lock = read_lock(folder)
    if lock is None:
        return None, "no run.lock"
    age = (time.time() if now is None else now) - lock["mtime"]
    host, pid = lock["host"], lock["pid"]
    writer = f"host {host}, pid {pid}"
    if age > LOCK_STALE_SECONDS:
        return False, f"its run.lock ({writer}) has had no heartbeat for {age:.0f} s (> {LOCK_STALE_SECONDS:.0f} s)"
    if host != this_host() or pid is None:
        return True, (f"its run.lock ({writer}) had a heartbeat {max(age, 0):.0f} s ago: another node's run may "
                      f"still be writing there (it counts as dead after {LOCK_STALE_SECONDS:.0f} s without one)")
    pid = int(pid)
    if pid == os.getpid() and lock["token"] and lock["token"] != RUN_TOKEN:
        return False, (f"its run.lock names this process's pid {pid} with another run's token: a dead run whose pid "
                       "was reused (a container's trainer is pid 1 every time)")
    if not pid_alive(pid):
        return False, f"its run.lock's process (pid {pid}) is gone"
    if lock["boot_id"] and boot_id() and lock["boot_id"] != boot_id():
        return False, "its run.lock was written before this machine rebooted"
    if lock["pid_start"] is not None and process_start(pid) not in (None, int(lock["pid_start"])):
        return False, f"its run.lock's pid {pid} now belongs to another process (started later: pid reused)"
    return True, f"a live process on this host holds it (pid {pid}, heartbeat {max(age, 0):.0f} s ago)"


def folder_in_use(folder) -> bool:
    """Whether a live run holds ``folder`` (``lock_status``)."""
    return bool(lock_status(folder)[0])


def claim_job_folder(output_dir) -> Tuple[str, JobLock]:
    """Create a new, exclusively owned job folder under ``output_dir`` and lock it: ``(job_id, lock)``."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    while True:
        job_id = f"{time.strftime('%Y%m%d%H%M%S')}-{secrets.token_hex(3)}"
        try:
            (output_dir / job_id).mkdir(exist_ok=False)
        except FileExistsError:
            continue
        return job_id, JobLock(output_dir / job_id)


# ---------------------------------------------------------------------------------------------------------------
# The output folder, checked before anything is built
# ---------------------------------------------------------------------------------------------------------------
def output_dir_problems(output_dir, need_bytes: int = 0) -> list:
    """Why a run could not write under ``output_dir`` (relative: from the current folder), checked before anything is
    built: a file where a folder should be, a folder that cannot be created or written (a real file is created and
    removed: permission bits do not tell read-only mounts), or less free space than ``need_bytes`` (the estimated
    size of the checkpoints the run keeps at once). Empty when fine."""
    import shutil
    import tempfile

    path = Path(str(output_dir)).expanduser()
    path = path if path.is_absolute() else Path.cwd() / path
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        where = "is" if existing == path else f"has a file in its way: {existing}"
        return [f"run.output_dir {path} {where} a file, not a folder: choose another run.output_dir or move the file"]
    try:
        handle, probe = tempfile.mkstemp(prefix=".write-test-", dir=existing)
        os.close(handle)
        os.unlink(probe)
    except OSError as err:
        what = "" if existing == path else f" (it does not exist, and its parent {existing} cannot be written)"
        return [f"run.output_dir {path} is not writable{what}: {err.strerror or err}; choose a writable "
                "run.output_dir"]
    free = shutil.disk_usage(existing).free
    if need_bytes and free < need_bytes:
        return [f"run.output_dir {path}: {free / 2**30:.2f} GiB free on its file system, the run's checkpoints need "
                f"about {need_bytes / 2**30:.2f} GiB (weights and optimizer state, two files at once while one is "
                "saved); free space or choose another run.output_dir"]
    return []


def checkpoint_bytes_estimate(model) -> int:
    """About the disk a run needs for its checkpoints: the trainable weights and AdamW's two moments (3 copies),
    twice (the previous checkpoint stays until the new one is renamed in)."""
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return int(2 * 3 * trainable)
