"""Job folders and their writers: every run writes into a folder of its own, and a file left by a process is only
removed once that process is provably gone.

* ``claim_job_folder(output_dir)`` -- rank 0 names the run's folder ``<YYYYmmddHHMMSS>-<6 hex digits>`` and creates
  it with ``mkdir(exist_ok=False)``, drawing a new suffix until the name is free: two runs started in the same
  second, in two processes or on two nodes sharing the filesystem, never share a folder (the runner broadcasts the
  name to the other ranks). The folder holds a ``run.lock`` naming the writer (host, pid) whose modification time a
  daemon thread refreshes every ``HEARTBEAT_SECONDS``; it is removed when the run ends normally.
* ``writer_is_gone(host, pid, mtime)`` -- the rule for a lock or a temporary checkpoint file left by a writer: on
  this host, gone iff no process with that pid exists (a live pid is never touched); on another host (whose pids
  cannot be checked from here), gone only when the file has not been touched for ``STALE_SECONDS`` (its lock's
  heartbeat, or a temporary file's writes, would have touched it).
* ``folder_in_use(folder)`` -- a job folder whose lock's writer is not gone (``auto`` resume passes over it).
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
HEARTBEAT_SECONDS = 60.0
# A lock or temporary file of another host untouched this long belongs to a dead writer (15 heartbeats).
STALE_SECONDS = 15 * 60.0


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
        self.path.write_text(json.dumps({"host": this_host(), "pid": os.getpid(), "started": time.time()}))
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
    """The lock of a job folder (host, pid, mtime), or None when it has none."""
    path = Path(folder) / LOCK_NAME
    try:
        mtime = path.stat().st_mtime
        content = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        content = {}
    content = content if isinstance(content, dict) else {}
    return {"host": content.get("host"), "pid": content.get("pid"), "mtime": mtime}


def folder_in_use(folder) -> bool:
    """Whether a live run holds ``folder`` (its ``run.lock``'s writer is not gone)."""
    lock = read_lock(folder)
    return lock is not None and not writer_is_gone(lock["host"], lock["pid"], lock["mtime"])


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
