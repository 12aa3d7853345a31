"""Fault-injection hooks, in one place: how the tests break a run where a cluster would, without timing.

Every hook is off unless its environment variable (or run-config key) is set; real runs never set them.

* ``LAVIS_XFORMER_TEST_SAVE_DELAY=SECONDS[@NAME]`` -- a checkpoint save writes half its bytes, fsyncs, then sleeps
  (only for files whose name contains NAME): a test kills the process mid-save (``save_delay``).
* ``LAVIS_XFORMER_TEST_KILL=RANK@STEP`` -- that rank SIGKILLs itself in the forward of global step STEP, in the first
  attempt of a torchrun job only (``kill_at_step``).
* ``LAVIS_XFORMER_TEST_PAUSE=STEP@FILE`` -- in the forward of global step STEP (every rank) the process writes FILE
  (``FILE.rank{r}`` on ranks > 0) and waits there until a signal handler marks a stop request: a test sends
  SIGTERM once the file exists, so the signal arrives at a known step, whatever the machine's speed
  (``pause_at_step``).
* ``run.debug_nan_steps`` / ``run.debug_nan_ranks`` / ``run.debug_nan_loss`` -- the loss term named becomes NaN at
  those global steps (on those ranks) (``inject_nan``).
"""

import logging
import os
import signal
import time
from typing import Callable, Mapping, Optional

logger = logging.getLogger(__name__)

TEST_SAVE_DELAY_ENV = "LAVIS_XFORMER_TEST_SAVE_DELAY"
TEST_KILL_ENV = "LAVIS_XFORMER_TEST_KILL"
TEST_PAUSE_ENV = "LAVIS_XFORMER_TEST_PAUSE"


def save_delay(path: str) -> float:
    """Seconds to stall in the middle of writing ``path`` (``LAVIS_XFORMER_TEST_SAVE_DELAY``), 0 when unset."""
    value = os.environ.get(TEST_SAVE_DELAY_ENV, "")
    if not value:
        return 0.0
    seconds, _, name = value.partition("@")
    if name and name not in os.path.basename(path):
        return 0.0
    return float(seconds)


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def kill_at_step(global_step: int) -> None:
    """``LAVIS_XFORMER_TEST_KILL=RANK@STEP``: SIGKILL this process at global step STEP when it is rank RANK, in the
    first attempt of a torchrun job only (``TORCHELASTIC_RESTART_COUNT`` unset or 0), so the restarted job runs
    through."""
    value = os.environ.get(TEST_KILL_ENV, "")
    if not value or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0:
        return
    rank, _, step = value.partition("@")
    if int(rank) == _rank() and int(step) == global_step:
        logger.warning("%s: killing rank %s at global step %d", TEST_KILL_ENV, rank, global_step)
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)


def pause_at_step(global_step: int, stop_requested: Callable[[], bool]) -> None:
    """``LAVIS_XFORMER_TEST_PAUSE=STEP@FILE``: at global step STEP write FILE (rank r > 0: ``FILE.rank{r}``) and
    wait until ``stop_requested()`` (the run's signal handler sets it). Polls; never returns early on its own."""
    value = os.environ.get(TEST_PAUSE_ENV, "")
    if not value:
        return
    step, _, path = value.partition("@")
    if int(step) != global_step:
        return
    rank = _rank()
    marker = path if rank == 0 else f"{path}.rank{rank}"
    with open(marker, "w") as handle:
        handle.write(str(os.getpid()))
    while not stop_requested():
        time.sleep(0.05)


def inject_nan(output, global_step: int, steps, ranks: Optional[frozenset], loss_name: str):
    """``run.debug_nan_steps``: turn ``loss_name`` (and the total) of a model output into NaN at those global steps
    (on ``ranks`` only, when given)."""
    if global_step not in steps:
        return output
    if ranks is not None and _rank() not in ranks:
        return output
    if not isinstance(output, Mapping) or "loss" not in output:
        return output
    key = loss_name if output.get(loss_name) is not None else "loss"
    poisoned = output[key] * float("nan")
    output[key] = poisoned
    if key != "loss":
        output["loss"] = output["loss"] + poisoned
    logger.warning("debug_nan_steps: %s set to NaN at global step %d", key, global_step)
    return output
