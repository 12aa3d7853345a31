"""Finding where to resume: in the run (job folder) that saved last, the furthest-progressed readable training
checkpoint (``checkpoint_{epoch}.pth``, ``checkpoint_{epoch}_iter{k}.pth``); ``remove_interrupted_saves`` clears the
temporary files of killed saves, never those of a live writer."""

import logging
import os
import re
from pathlib import Path
from typing import Callable, List, Optional, Tuple

from lavis_xformer.checkpoints.files import CheckpointError, read_checkpoint
from lavis_xformer.common import jobs

logger = logging.getLogger("lavis_xformer.checkpoints")

_CHECKPOINT_NAME = re.compile(r"^checkpoint_(\d+)(?:_iter(\d+))?\.pth$")
# ``checkpoint_3.pth.tmp-HOST-PID`` (and the older ``.tmp-PID``, which names no host)
_TEMP_NAME = re.compile(r"^checkpoint_.*\.pth\.tmp-(?:(?P<host>.+)-)?(?P<pid>\d+)$")


# ---------------------------------------------------------------------------------------------------------------
# Finding the checkpoint to resume from
# ---------------------------------------------------------------------------------------------------------------
def checkpoint_progress(path) -> Optional[Tuple[int, int]]:
    """(epoch, next iteration) a checkpoint file resumes at, from its name; None for ``checkpoint_best.pth`` and
    other files. ``checkpoint_3.pth`` -> (4, 0); ``checkpoint_3_iter200.pth`` -> (3, 200)."""
    match = _CHECKPOINT_NAME.match(os.path.basename(os.fspath(path)))
    if match is None:
        return None
    epoch = int(match.group(1))
    return (epoch + 1, 0) if match.group(2) is None else (epoch, int(match.group(2)))


def _checkpoint_candidates(folder: Path) -> List[Path]:
    """The resumable checkpoints directly in ``folder``, furthest progress first."""
    found = [p for p in folder.glob("checkpoint_*.pth") if p.is_file() and checkpoint_progress(p) is not None]
    return sorted(found, key=lambda p: (checkpoint_progress(p), p.stat().st_mtime), reverse=True)


def remove_interrupted_saves(folder) -> List[str]:
    """Delete the ``checkpoint_*.pth.tmp-HOST-PID`` files (in ``folder`` and its job folders) whose writer is provably
    gone (``jobs.writer_is_gone``: on this host, no process with that pid; on another host, untouched for
    ``jobs.STALE_SECONDS``): the leftovers of saves killed before their rename, which is a save's commit point, so
    they can never be valid checkpoints. A live writer's file is never touched."""
    folder = Path(folder)
    removed = []
    for pattern in ("checkpoint_*.pth.tmp-*", "*/checkpoint_*.pth.tmp-*"):
        for path in folder.glob(pattern):
            match = _TEMP_NAME.match(path.name)
            try:
                mtime = path.stat().st_mtime
            except FileNotFoundError:  # its writer renamed or removed it meanwhile
                continue
            host, pid = (match.group("host"), int(match.group("pid"))) if match else (None, None)
            if not jobs.writer_is_gone(host, pid, mtime):
                logger.info("leaving %s: its writer (host %s, pid %s) may still be saving", path, host, pid)
                continue
            logger.warning("removing %s: the temporary file of a save that was interrupted", path)
            path.unlink(missing_ok=True)
            removed.append(str(path))
    return removed


def _read_training_checkpoint(path: Path, skipped: list) -> Optional[dict]:
    try:
        checkpoint = read_checkpoint(str(path))
    except CheckpointError as err:
        logger.warning("resume: skipping %s: %s", path, err)
        skipped.append((str(path), str(err)))
        return None
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "optimizer" not in checkpoint:
        logger.warning("resume: skipping %s: not a training checkpoint (no 'model' and 'optimizer')", path)
        skipped.append((str(path), "not a training checkpoint"))
        return None
    return checkpoint


def find_resume_checkpoint(folder, skip_folder: Optional[Callable[[Path], object]] = None,
                           skipped: Optional[list] = None) -> Tuple[Optional[str], Optional[dict]]:
    """The checkpoint to resume from under ``folder``: ``(path, checkpoint)``, or ``(None, None)`` when there is none.

    ``folder`` itself and each job folder in it is one run. The run chosen is the one whose newest checkpoint file
    was written last (the run a requeued job continues; a neighbour that went further but stopped earlier is not
    taken), skipping the folders ``skip_folder`` rejects (it returns a truthy value, e.g. the reason: a live run holds
    it); in it, the furthest-progressed checkpoint that reads back (safely) and holds weights and optimizer.
    Unreadable files (truncated, corrupt, unsafe, failing their checksum) are skipped with a warning naming them;
    when none of a run's checkpoints reads back, the next-newest run is taken, with a warning. ``skipped`` (a list)
    receives ``(path, reason)`` for every folder holding checkpoints and every file passed over."""
    folder = Path(folder)
    skipped = [] if skipped is None else skipped
    runs = []
    for run in [folder, *sorted(p for p in folder.glob("*") if p.is_dir())]:
        found = _checkpoint_candidates(run)
        reason = skip_folder(run) if (skip_folder and found) else None
        if reason:
            why = reason if isinstance(reason, str) else "rejected"
            logger.warning("resume: passing over %s (%d checkpoints): %s", run, len(found), why)
            skipped.append((str(run), why))
        elif found:
            runs.append((run, found))
    runs.sort(key=lambda run: max(p.stat().st_mtime for p in run[1]), reverse=True)
    for index, (run, candidates) in enumerate(runs):
        for path in candidates:
            checkpoint = _read_training_checkpoint(path, skipped)
            if checkpoint is not None:
                if index:
                    logger.warning("resume: no readable checkpoint in the newest run(s) %s; taking %s",
                                   [str(r) for r, _ in runs[:index]], path)
                return str(path), checkpoint
    return None, None
