"""Preemption: a scheduler's stop signal ends the run at a step boundary with a checkpoint, never with lost work.

SLURM and Kubernetes send SIGTERM (SLURM's ``--signal=USR1@90``: SIGUSR1) and a grace period before SIGKILL. While
the runner trains, the signals of ``run.preemption_signals`` (default ``[SIGTERM, SIGUSR1]``; ``[]`` keeps Python's
default, an immediate exit) only set a flag. At the end of the current optimiser step (accumulation window) the ranks
agree (one all-reduce, MAX, under DDP: a signal on any rank stops every rank at the same step), every rank takes part
in writing one resumable mid-epoch checkpoint, the job folder's ``run.lock`` is released, one line is logged and the
process exits with ``128 + signal number`` (143 for SIGTERM), the code schedulers read as "terminated by the signal"
and requeue on. A requeued job resumes with ``run.resume_ckpt_path: auto``.

The same per-step agreement carries the periodic mid-epoch checkpoint: ``run.checkpoint_every_minutes`` (default 30;
0 = off) writes a resumable checkpoint when that much training time passed since the last one, so a long epoch
loses at most that much to a SIGKILL or a node failure. (``run.checkpoint_every_iters`` counts steps instead.)
"""

import contextlib
import logging
import signal
import threading
import time
from typing import Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from lavis_xformer.common import distributed

DEFAULT_SIGNALS = ("SIGTERM", "SIGUSR1")
DEFAULT_CHECKPOINT_MINUTES = 30.0


class Preempted(SystemExit):
    """The run stopped on a signal after writing a checkpoint; exits with ``128 + signum``."""

    def __init__(self, signum: int, checkpoint: Optional[str], epoch=None, iteration: int = 0):
        super().__init__(128 + int(signum))
        self.signum, self.checkpoint, self.epoch, self.iteration = int(signum), checkpoint, epoch, int(iteration)


def parse_signals(names) -> Tuple[int, ...]:
    """``["SIGTERM", "USR1", 15]`` -> signal numbers; a ``ValueError`` names an unknown one."""
    numbers = []
    for name in names or ():
        if isinstance(name, int) or str(name).isdigit():
            numbers.append(int(name))
            continue
        text = str(name).upper()
        text = text if text.startswith("SIG") else "SIG" + text
        number = getattr(signal, text, None)
        if not isinstance(number, signal.Signals) or text in ("SIGKILL", "SIGSTOP"):
            raise ValueError(f"run.preemption_signals: {name!r} is not a signal that can be caught (e.g. SIGTERM, "
                             "SIGUSR1)")
        numbers.append(int(number))
    return tuple(numbers)


def ignore_stop_signals(*_args) -> None:
    """A DataLoader ``worker_init_fn``: workers ignore the stop signals (``scancel`` signals every process of the
    step), so the main process, which stops them itself, finishes its step instead of finding a dead worker."""
    for name in DEFAULT_SIGNALS:
        signal.signal(getattr(signal, name), signal.SIG_IGN)


class StopSignals:
    """Records the first stop signal received while installed; ``poll`` says, agreed over ranks, whether to stop
    (the signal number) and whether a periodic checkpoint is due."""

    def __init__(self, signals: Sequence = DEFAULT_SIGNALS, every_minutes: float = DEFAULT_CHECKPOINT_MINUTES,
                 clock=time.monotonic):
        self.signals = parse_signals(signals)
        if float(every_minutes) < 0:
            raise ValueError(f"run.checkpoint_every_minutes={every_minutes} must be >= 0 (0: off)")
        self.every_seconds = 60.0 * float(every_minutes)
        self.clock = clock
        self.received: Optional[int] = None
        self._previous = {}
        self._last_save = clock()

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():  # signal handlers: main thread only
            return
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}

    @contextlib.contextmanager
    def suspended(self):
        """Python's own handlers inside the block (a task's own training loop, which never polls: a stop signal
        must still end it)."""
        installed = bool(self._previous)
        self.restore()
        try:
            yield
        finally:
            if installed:
                self.install()

    def _handle(self, signum, _frame) -> None:
        if self.received is None:  # only a flag: no logging or I/O inside a signal handler
            self.received = int(signum)

    def requested(self) -> bool:
        return self.received is not None

    def saved(self) -> None:
        """A resumable checkpoint was just written: the periodic clock restarts."""
        self._last_save = self.clock()

    def poll(self) -> Tuple[int, bool]:
        """(signal number to stop on, 0 for none; periodic checkpoint due), the same on every rank."""
        due = bool(self.every_seconds) and self.clock() - self._last_save >= self.every_seconds
        stop = self.received or 0
        if distributed.get_world_size() > 1:
            flags = torch.tensor([stop, int(due)], dtype=torch.int64, device=distributed.collective_device())
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            stop, due = int(flags[0]), bool(flags[1])
        return stop, due


def log_preempted(signum: int, epoch, iteration: int, checkpoint: Optional[str]) -> None:
    logging.warning("preempted: %s at epoch %s iteration %d: checkpoint %s written, run.lock released; exiting %d "
                    "(requeue with run.resume_ckpt_path=auto)", signal.Signals(signum).name, epoch, iteration,
                    checkpoint, 128 + signum)
