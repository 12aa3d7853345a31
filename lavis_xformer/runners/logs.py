"""Per-iteration training logs: json lines in the job's ``log.txt`` and, optionally, TensorBoard scalars.

Every ``run.log_freq`` iterations ``runner_xformer`` appends one line to ``<job>/log.txt``::

    {"kind": "iter", "iter": 64, "epoch": 0, "lr": 0.0049, "loss": 5.81, "loss_itc": 3.41, ..., "it_per_s": 7.9,
     "samples_per_s": 252.8}

``iter`` is the number of iterations done since the run began (epochs included), ``epoch`` the (inner) epoch it is
in; ``loss`` and every loss term the task names (``logged_loss_terms``) are averaged over the usable steps of the
window since the previous line and over all ranks; ``lr`` is the learning rate of the window's last step;
``it_per_s`` / ``samples_per_s`` are the window's throughput of the whole job (all ranks). LAVIS's per-epoch lines
(``{"train_loss": ...}``) stay as they are: they start with ``{"train_``, these with ``{"kind": "iter"``.

``run.tensorboard: True`` also writes the same values as scalars (``train/<name>``, step = ``iter``) to
``<job>/tensorboard`` with ``torch.utils.tensorboard``; without the ``tensorboard`` package one INFO line says so and
training continues. ``read_iteration_log(job_dir)`` reads the lines back (the demo's loss curves use it).
"""

import json
import logging
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from lavis_xformer.common import distributed

ITERATION_KIND = "iter"
TENSORBOARD_FOLDER = "tensorboard"


def read_iteration_log(job_dir) -> List[Dict[str, float]]:
    """The per-iteration lines of ``<job_dir>/log.txt`` in order (``kind`` removed); [] when there are none."""
    records = []
    path = Path(job_dir) / "log.txt"
    if not path.is_file():
        return records
    for line in path.read_text().splitlines():
        if not line.startswith('{"kind"'):
            continue
        record = json.loads(line)
        if record.pop("kind", None) == ITERATION_KIND:
            records.append(record)
    return records


class IterationLog:
    """Writes the per-iteration lines (rank 0) from the loss meters' running totals; every rank calls ``step``.

    The window's averages come from differences of LAVIS's ``SmoothedValue`` totals and counts (the meters the loop
    already keeps), summed over ranks with one all-reduce per line."""

    def __init__(self, output_dir, samples_per_iteration: int, tensorboard: bool = False):
        self.path = Path(output_dir) / "log.txt"
        self.samples_per_iteration = int(samples_per_iteration)
        self.writer = None
        if tensorboard and distributed.is_main_process():
            self.writer = _summary_writer(Path(output_dir) / TENSORBOARD_FOLDER)
        self._last = {}  # meter name -> (total, count) at the previous line
        self._last_time, self._last_iter = time.perf_counter(), 0  # where the current window began

    def start(self, global_iter: int) -> None:
        """Open a window at ``global_iter`` (a run's or a resumed run's first iteration)."""
        self._last_time, self._last_iter = time.perf_counter(), int(global_iter)

    def end_epoch(self, meters: Dict[str, object], names: Sequence[str]) -> None:
        """The epoch's meters are about to be replaced by fresh ones: carry the values since the last line over."""
        for name in names:
            meter = meters.get(name)
            total, count = (float(meter.total), float(meter.count)) if meter is not None else (0.0, 0.0)
            last_total, last_count = self._last.get(name, (0.0, 0.0))
            self._last[name] = (last_total - total, last_count - count)

    def step(self, global_iter: int, epoch: int, lr: float, meters: Dict[str, object], names: Sequence[str],
             log_freq: int) -> Optional[dict]:
        """After iteration ``global_iter`` (0-based): every ``log_freq`` iterations, average ``meters[name]`` (LAVIS
        ``SmoothedValue``s; absent ones count as no values) over the window and all ranks, and write the line."""
        done = int(global_iter) + 1
        if log_freq <= 0 or done % log_freq:
            return None
        deltas = []
        for name in names:
            meter = meters.get(name)
            total, count = (float(meter.total), float(meter.count)) if meter is not None else (0.0, 0.0)
            last_total, last_count = self._last.get(name, (0.0, 0.0))
            deltas += [total - last_total, count - last_count]
            self._last[name] = (total, count)
        summed = distributed.sum_over_ranks(
            torch.tensor(deltas, dtype=torch.float64, device=distributed.collective_device())).tolist()
        now = time.perf_counter()
        iterations, seconds = done - self._last_iter, max(now - self._last_time, 1e-9)
        self._last_time, self._last_iter = now, done
        record = {"kind": ITERATION_KIND, "iter": done, "epoch": int(epoch), "lr": float(lr)}
        for index, name in enumerate(names):
            total, count = summed[2 * index], summed[2 * index + 1]
            if count:
                record[name] = total / count
        record["it_per_s"] = iterations / seconds
        record["samples_per_s"] = iterations * self.samples_per_iteration / seconds
        if distributed.is_main_process():
            self._write(record)
        return record

    def _write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key not in ("kind", "iter"):
                    self.writer.add_scalar(f"train/{key}", value, global_step=record["iter"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _summary_writer(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch's module imports the optional ``tensorboard`` package
        logging.info("run.tensorboard: the tensorboard package is not installed (pip install tensorboard); the "
                     "per-iteration values go to log.txt only")
        return None
    logging.info("TensorBoard: %s", folder)
    return SummaryWriter(log_dir=str(folder))
