"""Training logs a tracker can read: ``<job>/log.txt`` as JSON lines, the run config in ``<job>/config.yaml``, and
the same values to the trackers ``run.loggers`` names (TensorBoard, W&B: ``runners/trackers.py``).

Every line of ``log.txt`` is one JSON object whose first keys are ``kind``, ``epoch`` and ``iteration`` (iterations
done since the run began, across epochs and resumes); numbers are JSON numbers, a non-finite one is ``null``::

    {"kind": "iter", "epoch": 0, "iteration": 64, "lr": 0.0049, "loss": 5.81, "loss_itc": 3.41, ..., "it_per_s": 7.9, "samples_per_s": 252.8}
    {"kind": "epoch", "epoch": 0, "iteration": 64, "train_lr": 0.0049, "train_loss": 5.79, ..., "train_skipped_steps": 0}
    {"kind": "eval", "epoch": 0, "iteration": 64, "split": "val", "val_agg_metrics": 0.41, ..., "val_best_epoch": 0}
    {"kind": "resume", "epoch": 1, "iteration": 64, "checkpoint": ".../checkpoint_0.pth", "job_dir": "..."}

``iter``: every ``run.log_freq`` iterations, the window's averages over its usable steps and all ranks of ``loss``
and every term the task names (``logged_loss_terms``), the lr of its last step and the whole job's throughput.
``epoch``: LAVIS's per-epoch averages (its ``{"train_loss": ...}`` keys). ``eval``: a validation split's metrics
after each epoch, and the test splits' after training (``epoch``/``iteration``: where the evaluated weights were
saved). ``resume``: the first line of a resumed run, naming the checkpoint and the job folder it continues.

``read_log(job_dir)`` reads the records back as one series: a resumed run's predecessors come first, each up to the
iteration its successor resumed after (what a killed run logged past its checkpoint is dropped, as the resumed run
redoes it). ``read_iteration_log`` / ``read_epoch_log`` keep one kind (the demo's loss curves and the model card use
them). Logs written before these kinds existed (a pretty-printed config first, ``{"train_...}`` lines) are read too.
"""

import json
import time
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch

from lavis_xformer.common import distributed
from lavis_xformer.common.atomic import atomic_write_json, atomic_write_text
from lavis_xformer.common.run_log import (  # noqa: F401  (the reading side, re-exported: readers import it from here)
    EPOCH_KIND,
    EVAL_KIND,
    ITERATION_KIND,
    LOG_NAME,
    POSITION_KEYS,
    RESUME_KIND,
    json_value,
    read_epoch_log,
    read_iteration_log,
    read_log,
)

CONFIG_NAME = "config.yaml"
TRACKERS_NAME = "trackers.json"  # what a resumed run needs to continue the trackers' curves (runners/trackers.py)


# ---------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------
def tracker_scalars(record: dict) -> Dict[str, float]:
    """A record's numbers under the names the trackers show: ``train/<name>`` (iteration lines),
    ``train_epoch/<name>`` (epoch averages), ``<split>/<metric>`` (evaluations)."""
    kind = record.get("kind")
    if kind == ITERATION_KIND:
        prefix, strip = "train/", ""
    elif kind == EPOCH_KIND:
        prefix, strip = "train_epoch/", "train_"
    elif kind == EVAL_KIND:
        prefix, strip = f"{record.get('split', 'eval')}/", f"{record.get('split', 'eval')}_"
    else:
        return {}
    scalars = {}
    for key, value in record.items():
        if key in POSITION_KEYS or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        scalars[prefix + (key[len(strip):] if strip and key.startswith(strip) else key)] = value
    return scalars


class JobLog:
    """Rank 0's writer: one record -> one line of ``<job>/log.txt`` -> the same numbers to every tracker."""

    def __init__(self, job_dir, trackers: Optional[Dict[str, object]] = None):
        self.path = Path(job_dir) / LOG_NAME
        self.trackers = dict(trackers or {})

    def write(self, kind: str, epoch: int, iteration: int, values: dict, **fields) -> dict:
        record = {"kind": kind, "epoch": int(epoch), "iteration": int(iteration)}
        record.update({key: json_value(value) for key, value in fields.items()})
        record.update({str(key): json_value(value) for key, value in values.items() if key not in POSITION_KEYS})
        with open(self.path, "a") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")
        scalars = tracker_scalars(record)
        if scalars:
            for tracker in self.trackers.values():
                tracker.log(scalars, record["iteration"])
        return record

    def close(self) -> None:
        trackers, self.trackers = self.trackers, {}
        for tracker in trackers.values():
            tracker.close()


def write_config(job_dir, config: dict) -> Path:
    """The run config (LAVIS's ``Config.to_dict()``) as ``<job>/config.yaml``."""
    from omegaconf import OmegaConf

    return atomic_write_text(Path(job_dir) / CONFIG_NAME, OmegaConf.to_yaml(OmegaConf.create(config)))


def write_tracker_state(job_dir, state: dict) -> None:
    atomic_write_json(Path(job_dir) / TRACKERS_NAME, state)


def read_tracker_state(job_dir) -> dict:
    """The trackers a job wrote to (``trackers.json``; {} when none)."""
    path = Path(job_dir) / TRACKERS_NAME
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


class IterationLog:
    """The per-iteration lines, from the loss meters' running totals: every rank calls ``step`` (one all-reduce
    per line), rank 0 writes through its ``JobLog`` (``job_log`` None on the other ranks).

    The window's averages come from differences of LAVIS's ``SmoothedValue`` totals and counts (the meters the loop
    already keeps)."""

    def __init__(self, job_log: Optional[JobLog], samples_per_iteration: int):
        self.job_log = job_log
        self.samples_per_iteration = int(samples_per_iteration)
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
        ``SmoothedValue``s; absent ones count as no values) over the window and all ranks, and write the line.
        Returns the line's values (every rank), else None."""
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
        values = {"lr": float(lr)}
        for index, name in enumerate(names):
            total, count = summed[2 * index], summed[2 * index + 1]
            if count:
                values[name] = total / count
        values["it_per_s"] = iterations / seconds
        values["samples_per_s"] = iterations * self.samples_per_iteration / seconds
        if self.job_log is not None:
            return self.job_log.write(ITERATION_KIND, epoch, done, values)
        return {"kind": ITERATION_KIND, "epoch": int(epoch), "iteration": done, **values}
