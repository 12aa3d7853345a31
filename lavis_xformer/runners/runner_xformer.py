"""``runner_xformer``: LAVIS's epoch-based ``RunnerBase``, made to run on any device, with atomic checkpoints.

Select it with ``run.runner: runner_xformer`` (the project's yamls do; ``python -m lavis_xformer.train`` also
picks it when a yaml names no runner). Training, evaluation, schedules and logging are LAVIS's; the overrides fix
what breaks off-GPU in LAVIS 1.0.2, each citing the line it replaces:

* process group -- LAVIS's ``train.py`` creates none without a launcher, but BLIP-2's forward calls
  ``dist.get_rank()`` and ``RunnerBase.train`` calls ``dist.barrier()`` (runner_base.py:406): a one-process group
  is made here when none exists (gloo on CPU).
* ``model`` -- runner_base.py:85-97 sets ``_wrapped_model`` only when the model had to be moved, so a model
  already on the CPU gives ``None.train()``; and it wraps DDP with ``device_ids=[gpu]`` (line 92), which is wrong
  for CPU modules. Here the model is wrapped once, with ``device_ids=None`` off-GPU (``compat.runner_model``, also
  patched onto ``RunnerBase`` for LAVIS's ``evaluate.py``).
* ``create_loaders`` -- runner_base.py:538 wraps loaders in the CUDA-only ``PrefetchLoader``; off-GPU the
  loaders are built inside ``compat.host_prefetch_loader()``.
* ``eval_epoch`` -- runner_base.py:469 calls ``task.evaluation(model, data_loader)``, whose ``cuda_enabled``
  defaults to True (base_task.py:79) and moves every batch to the GPU; here the run's device decides.
* ``train_epoch`` -- runner_base.py:427 hands the epoch to ``task.train_epoch`` and the task's
  ``_train_inner_loop`` (base_task.py:151); here the runner runs its own loop, ``train_inner_loop``: LAVIS's steps
  over the task's ``train_step``, plus the step guard, the resume position and the mid-epoch checkpoints. The task
  only names the model-output loss terms to average next to the total (``logged_loss_terms``).
* ``scaler`` -- runner_base.py:137 makes a CUDA ``GradScaler`` for ``amp: True`` on any device; off-GPU amp is
  switched off (with a log line) instead.
* ``device`` -- ``device: cuda`` on a machine without CUDA fails with an actionable message, not deep in LAVIS.
* ``output_dir`` -- LAVIS resolves a relative ``run.output_dir`` against its own package folder, i.e. inside
  site-packages for an installed LAVIS; here it is resolved against the current directory.
* the job folder -- LAVIS names it ``now()`` (10-minute resolution, read by every rank), so runs started close
  together shared a folder; here rank 0 creates a folder of the run's own and broadcasts its name (``common.jobs``).

Iteration mode and logs (run-config keys, optional):

* ``run.max_iters`` / ``run.iters_per_inner_epoch`` -- LAVIS's ``runner_iter`` through this runner's loop: inner
  epochs of K iterations over an endless stream (the ``EpochLoader`` rolls over data epochs by itself, and its
  position goes into the checkpoint), validation and a checkpoint after each; ``run.train_dataset_ratios`` mixes
  several train datasets batch by batch (``reliability.MixedLoader``).
* ``log.txt`` is JSON lines, each with ``kind``, ``epoch`` and ``iteration`` (``runners/logs.py``): every
  ``run.log_freq`` iterations the window's loss terms, lr and throughput; after every epoch LAVIS's averages and the
  validation metrics; after training the test metrics. The run config goes to ``config.yaml`` beside it. The same
  values go to the trackers ``run.loggers`` names (``[tensorboard, wandb]``; ``runners/trackers.py``); a resumed
  run continues its predecessor's curves (its log's first line names the checkpoint and job it resumes).

Reliability (run-config keys, all optional):

* **Exact resume.** A checkpoint is written after every epoch (``checkpoint_{epoch}.pth``, also when validation
  splits exist) and, with ``run.checkpoint_every_iters: N``, every N optimiser steps inside an epoch
  (``checkpoint_{epoch}_iter{k}.pth``; only the newest is kept, and it goes once the epoch's own is written). Besides
  LAVIS's keys (trainable weights, optimizer, scaler, config, epoch) it holds ``trainer``: epoch and next iteration,
  every rank's RNG states (python, numpy, torch CPU, all CUDA devices), the data-order state (seed, batch size: the
  order is a function of (run.seed, epoch), see ``reliability.EpochLoader``), the LR schedule's parameters (LAVIS's
  schedulers are stateless functions of epoch and step), the best validation metric, the NaN-guard's and the bad-data
  counters. ``run.resume_ckpt_path`` takes a file (a weights-only file is refused, saying so), or ``auto``: the
  furthest-progressed readable checkpoint of the newest run under ``run.output_dir`` that no live run holds (none:
  start fresh), so a preempted job is simply requeued with the same command (a folder path searches that folder the
  same way, without the live check). The resumed run writes into a new job folder; README "Reliability" has the rules.
  Resuming from the end of an epoch or from a mid-epoch checkpoint gives bit-identical weights to an uninterrupted
  run on CPU (tests/test_reliability.py). Saves are atomic (temporary file, fsync, ``os.replace``): a process killed
  mid-save leaves the previous checkpoint intact; resume removes the orphaned temporary file once its writer is
  provably gone.
* **Bad data.** Train splits are wrapped in ``RobustDataset`` (``run.robust_data``: unset = the plugin's builders
  only, which wrap by default; True = every train dataset, any LAVIS builder; False = none), with
  ``run.max_bad_fraction`` (0.01), ``run.max_bad_samples`` (none: an absolute count of bad files per epoch),
  ``run.bad_fraction_min_samples`` (100: loads before the fraction is checked inside an epoch; it is always checked at
  the end of an epoch, over all ranks) and ``run.max_image_pixels`` (PIL's limit). The per-epoch counts (each bad file
  once), summed over ranks, go to log.txt as ``train_bad_samples`` / ``train_loaded_samples``.
* **Non-finite losses.** A NaN/inf in any loss term skips the optimiser step on every rank (one all-reduced flag),
  with a warning naming the terms; ``train_skipped_steps`` is logged per epoch; ``run.max_consecutive_bad_steps``
  (10) in a row stop the run with ``NonFiniteLossError`` naming the loss. Under amp the scaler is neither stepped nor
  updated on such a step (its scale and growth tracker are untouched); finite losses with overflowing gradients are
  the scaler's own business (it skips and backs off). Without amp a non-finite gradient also skips the step.
  Test hooks (NaN steps, a stalled save, a killed rank, a pause for a signal): ``lavis_xformer/testing.py``.
* Resume bookkeeping (job folder, checkpoint content, save, resume) lives in ``runners/resume.py``.
"""

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import torch
import torch.distributed as dist
from lavis.common.logger import MetricLogger, SmoothedValue
from lavis.common.registry import registry
from lavis.datasets.data_utils import prepare_sample
from lavis.datasets.datasets.dataloader_utils import PrefetchLoader
from lavis.runners.runner_base import RunnerBase
from lavis.tasks.base_task import BaseTask

from lavis_xformer import compat, run_config
from lavis_xformer.common import distributed
from lavis_xformer.common.distributed import get_rank, get_world_size, is_main_process
from lavis_xformer.datasets.robust import RobustDataset, check_bad_sample_limits
from lavis_xformer.runners.logs import (
    EPOCH_KIND,
    EVAL_KIND,
    RESUME_KIND,
    IterationLog,
    JobLog,
    read_tracker_state,
    write_config,
    write_tracker_state,
)
from lavis_xformer.runners.trackers import open_trackers
from lavis_xformer.runners.reliability import (
    EpochLoader,
    MixedLoader,
    OutputWatch,
    StepGuard,
    derive_seed,
    first_nonfinite_gradient,
)
from lavis_xformer.runners.preemption import (
    DEFAULT_CHECKPOINT_MINUTES,
    DEFAULT_SIGNALS,
    Preempted,
    StopSignals,
    log_preempted,
)
from lavis_xformer.runners.resume import ResumeMixin

# ---------------------------------------------------------------------------------------------------------------
# Bad data
# ---------------------------------------------------------------------------------------------------------------
def _is_map_style(dataset) -> bool:
    return (
        isinstance(dataset, torch.utils.data.Dataset)
        and not isinstance(dataset, torch.utils.data.IterableDataset)
        and hasattr(dataset, "__len__")
    )


def make_train_datasets_robust(datasets: dict, train_splits, run_cfg) -> List[RobustDataset]:
    """Wrap (or unwrap) the train splits of LAVIS's ``{name: {split: dataset}}`` in place; returns the wrapped ones.

    ``run.robust_data``: unset keeps what the builders made (the plugin's wrap their train split), True wraps every
    map-style train dataset of any LAVIS builder, False unwraps everything. The limits come from
    ``run.max_bad_fraction``, ``run.bad_fraction_min_samples`` and ``run.max_image_pixels``.
    """
    mode = run_cfg.get("robust_data", None)
    limits = dict(
        max_bad_fraction=float(run_cfg.get("max_bad_fraction", 0.01)),
        min_samples_before_limit=int(run_cfg.get("bad_fraction_min_samples", 100)),
        max_image_pixels=run_cfg.get("max_image_pixels", None),
        max_bad_samples=run_cfg.get("max_bad_samples", None),
    )
    robust = []
    for name, splits in datasets.items():
        if not isinstance(splits, dict):
            continue
        for split in list(splits):
            if split not in train_splits:
                continue
            dataset = splits[split]
            if isinstance(dataset, RobustDataset):
                if mode is False:
                    splits[split] = dataset.dataset
                    logging.info("%s/%s: run.robust_data=False, bad samples will stop the run", name, split)
                    continue
            elif mode is True and _is_map_style(dataset):
                dataset = splits[split] = RobustDataset(dataset)
            else:
                if mode is True:
                    logging.warning("%s/%s (%s) is not a map-style dataset: not wrapped in RobustDataset",
                                    name, split, type(dataset).__name__)
                continue
            dataset.configure(**limits)
            robust.append(dataset)
            logging.info("%s/%s: unusable samples are replaced and counted (max_bad_fraction %g)",
                         name, split, dataset.max_bad_fraction)
    return robust


def _format_meter(meter) -> str:
    return "{:.3f}".format(meter.global_avg) if meter.count else "nan"


def _meter_average(meter) -> float:
    return float(meter.global_avg) if meter.count else float("nan")


@dataclass
class _TrainEpoch:
    """What the steps of one training epoch share (``RunnerXFormer.train_inner_loop``)."""

    epoch: int
    iters_per_epoch: int
    start_iters: Optional[int]  # None for epoch-based runs; the iteration count so far for iteration-based ones
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: Optional[torch.amp.GradScaler]
    accum_grad_iters: int
    cuda_enabled: bool
    trainable: list  # (name, parameter) of the trainable parameters, for the gradient check
    watch: OutputWatch
    window_bad: List[str] = field(default_factory=list)  # non-finite terms met in the current accumulation window
    log_freq: int = 0
    iteration_log: Optional[IterationLog] = None  # the per-iteration lines (runners/logs.py); None: not written
    metric_logger: MetricLogger = field(init=False)  # LAVIS's: lr and the total loss, printed every log_freq steps
    loss_terms: MetricLogger = field(init=False)  # the task's logged_loss_terms

    def __post_init__(self):
        self.metric_logger = MetricLogger(delimiter="  ")
        self.metric_logger.add_meter("lr", SmoothedValue(window_size=1, fmt="{value:.6f}"))
        self.loss_terms = MetricLogger(delimiter="  ")

    @property
    def inner_epoch(self) -> int:
        """The epoch the LR schedule sees: the epoch, or for iteration-based runs the inner epoch (LAVIS's rule)."""
        return self.epoch if self.start_iters is None else self.start_iters // self.iters_per_epoch

    @property
    def header(self) -> str:
        if self.start_iters is None:
            return "Train: data epoch: [{}]".format(self.epoch)
        return "Train: inner epoch [{}]".format(self.inner_epoch)

    @property
    def use_amp(self) -> bool:
        return self.scaler is not None and self.cuda_enabled

    @property
    def autocast_device(self) -> str:
        return "cuda" if self.cuda_enabled else "cpu"

    def global_step(self, iteration: int) -> int:
        return (self.epoch * self.iters_per_epoch if self.start_iters is None else self.start_iters) + iteration


_iteration_mode = run_config.iteration_mode  # one rule for check and the runner (run_config.py)


@registry.register_runner("runner_xformer")
class RunnerXFormer(ResumeMixin, RunnerBase):
    # Set by __init__ / train(); class defaults keep a bare instance's loop (tests build one) epoch-based, unlogged.
    max_iters = iters_per_inner_epoch = 0
    _iteration_log = None
    _job_log = None  # rank 0's log.txt and trackers while train() runs (runners/logs.py)
    _log_position = (0, 0)  # (epoch, iterations done) that LAVIS's log_stats lines are written at
    _resume_point = None  # where a resumed run continues (set by _resume): its log and curves continue from there
    _train_ratios = None
    stop_signals = StopSignals(signals=(), every_minutes=0)  # no handlers, no periodic checkpoint

    def __init__(self, cfg, task, model, datasets, job_id):
        run_cfg = cfg.run_cfg
        if not distributed.is_initialized():
            device = distributed.check_device(run_cfg.get("device", "cuda"))
            distributed.init_single_process_group(distributed.backend_for(device))
        output_dir = Path(str(run_cfg.output_dir)).expanduser()
        run_cfg.output_dir = str(output_dir if output_dir.is_absolute() else Path.cwd() / output_dir)
        job_id = self._claim_job_folder(run_cfg.output_dir)
        super().__init__(cfg=cfg, task=task, model=model, datasets=datasets, job_id=job_id)

        self.robust_datasets = make_train_datasets_robust(self.datasets, run_cfg.get("train_splits", []) or [], run_cfg)
        self.step_guard = StepGuard(
            max_consecutive=int(run_cfg.get("max_consecutive_bad_steps", 10)),
            debug_nan_steps=run_cfg.get("debug_nan_steps", None) or (),
            debug_nan_ranks=run_cfg.get("debug_nan_ranks", None),
            debug_nan_loss=run_cfg.get("debug_nan_loss", "loss_itc"),
        )
        every = run_cfg.get("checkpoint_every_iters", None)
        self.checkpoint_every_iters = int(every) if every else 0
        if self.checkpoint_every_iters < 0:
            raise ValueError(f"run.checkpoint_every_iters={every} must be >= 0")
        self.max_iters, self.iters_per_inner_epoch = _iteration_mode(run_cfg)
        self.stop_signals = StopSignals(run_cfg.get("preemption_signals", DEFAULT_SIGNALS),
                                        run_cfg.get("checkpoint_every_minutes", DEFAULT_CHECKPOINT_MINUTES))
        self.best_agg_metric, self.best_epoch = 0, 0
        self._start_iter = 0  # the iteration the first (resumed) epoch starts at
        self._pending_loader = None  # iteration mode: the training loader's position from the checkpoint
        self._iters_per_epoch = None
        self._pending_rng = None  # this rank's RNG states from the checkpoint, restored just before training

    @property
    def iteration_based(self) -> bool:
        """``run.max_iters`` set: training runs ``max_iters`` iterations in inner epochs of ``iters_per_inner_epoch``
        (LAVIS's ``runner_iter``) over an endless data stream, instead of ``max_epoch`` passes over the data."""
        return bool(self.max_iters)

    @property
    def max_epoch(self):
        """The number of (inner) epochs: LAVIS's ``max_epoch``, or ``max_iters / iters_per_inner_epoch`` (which the
        LR schedule then also sees, as in LAVIS's ``runner_iter``)."""
        if self.iteration_based:
            return self.max_iters // self.iters_per_inner_epoch
        return super().max_epoch

    @property
    def data_seed(self) -> int:
        """The data order's seed: ``run.seed``, the same on every rank (the ranks take slices of one permutation)."""
        return int(self.config.run_cfg.get("seed", 0))

    # ------------------------------------------------------------------------------------------------------------
    # Device, model, AMP
    # ------------------------------------------------------------------------------------------------------------
    @property
    def device(self):
        if self._device is None:
            self._device = distributed.check_device(self.config.run_cfg.device)
        return self._device

    model = property(compat.runner_model)  # the model on the run device, DDP-wrapped when distributed; built once

    @property
    def scaler(self):
        if not self.cuda_enabled:
            if self.config.run_cfg.get("amp", False) and not getattr(self, "_amp_off_logged", False):
                logging.info("amp: True is ignored on %s (mixed precision here is CUDA-only)", self.device)
                self._amp_off_logged = True
            return None
        return super().scaler

    # ------------------------------------------------------------------------------------------------------------
    # Data and evaluation
    # ------------------------------------------------------------------------------------------------------------
    @property
    def dataloaders(self) -> dict:
        """LAVIS's loaders by split. With ``run.train_dataset_ratios`` ({dataset name: weight}, iteration mode) the
        train datasets, which LAVIS 1.0.2 concatenates whatever the ratios say, are each given their own loader and
        every batch comes from one of them, drawn with those weights (``reliability.MixedLoader``)."""
        if self._dataloaders is None:
            self._train_ratios = self._ordered_train_ratios()
        return super().dataloaders

    def _ordered_train_ratios(self) -> Optional[List[float]]:
        """``run.train_dataset_ratios`` in the order LAVIS concatenates the train datasets (``self.datasets``)."""
        ratios = self.config.run_cfg.get("train_dataset_ratios", None)
        if not ratios:
            return None
        names = [name for name, splits in self.datasets.items() if isinstance(splits, dict) and "train" in splits]
        missing = [name for name in ratios if name not in names]
        unlisted = [name for name in names if name not in ratios]
        if missing or unlisted:
            raise ValueError(f"run.train_dataset_ratios must name every train dataset once: {names}; "
                             f"not train datasets: {missing}; without a ratio: {unlisted}")
        weights = [float(ratios[name]) for name in names]
        if min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"run.train_dataset_ratios={dict(ratios)} must be non-negative with a positive sum")
        logging.info("train batches drawn from %s with ratios %s", names, weights)
        return weights

    def create_loaders(self, datasets, num_workers, batch_sizes, is_trains, collate_fns, dataset_ratios=None):
        """LAVIS's loaders, except a map-style training set, which gets an ``EpochLoader`` (the data order is a
        function of (run.seed, epoch), so resumed epochs see the same batches; see ``reliability``), or with
        ``run.train_dataset_ratios`` a ``MixedLoader`` over one ``EpochLoader`` per train dataset."""
        loaders = []
        context = contextlib.nullcontext() if self.cuda_enabled else compat.host_prefetch_loader()
        with context:
            for dataset, batch_size, is_train, collate_fn in zip(datasets, batch_sizes, is_trains, collate_fns):
                if is_train and self._train_ratios and isinstance(dataset, torch.utils.data.ConcatDataset):
                    loaders.append(MixedLoader(
                        [self._epoch_loader(part, batch_size, num_workers, getattr(part, "collater", None),
                                            seed=derive_seed(self.data_seed, index))
                         for index, part in enumerate(dataset.datasets)],
                        self._train_ratios, seed=self.data_seed))
                    continue
                if is_train and _is_map_style(dataset):
                    loaders.append(self._epoch_loader(dataset, batch_size, num_workers, collate_fn, self.data_seed))
                    continue
                if is_train:
                    logging.warning("the training set (%s) is not one map-style dataset: LAVIS's loader is used, "
                                    "and a resumed run is not bit-identical", type(dataset).__name__)
                loaders.extend(super().create_loaders([dataset], num_workers, [batch_size], [is_train], [collate_fn],
                                                      dataset_ratios))
        return loaders

    def _epoch_loader(self, dataset, batch_size, num_workers, collate_fn, seed) -> EpochLoader:
        return EpochLoader(
            dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_fn, seed=seed,
            num_replicas=get_world_size() if self.use_distributed else 1,
            rank=get_rank() if self.use_distributed else 0,
            pin_memory=self.cuda_enabled, wrap=PrefetchLoader if self.cuda_enabled else None,
        )

    eval_epoch = compat.runner_eval_epoch  # LAVIS's, with the run's device passed on to task.evaluation

    # ------------------------------------------------------------------------------------------------------------
    # Training
    # ------------------------------------------------------------------------------------------------------------
    def train(self):
        """LAVIS's ``RunnerBase.train`` (same phases, logs and best-checkpoint rule) with: resume (``auto`` too)
        restoring the full trainer state, a resumable checkpoint after every epoch (after its validation, so the
        saved RNG states are those the next epoch starts with), and the best metric kept across resumes."""
        start_time = time.time()
        self.log_config()
        if not self.evaluate_only and self.resume_ckpt_path is not None:
            self._resume(self.resume_ckpt_path)
        try:
            self._job_log = self._open_job_log()
        except Exception:
            self._release_job_folder()  # e.g. a tracker that cannot open: nothing ran, the folder is no one's
            raise
        try:
            if not self.evaluate_only:
                self.stop_signals.install()
            try:
                cur_epoch = self._train_epochs()
            except Preempted as stop:
                self._release_job_folder()
                if is_main_process():
                    log_preempted(stop.signum, stop.epoch, stop.iteration, stop.checkpoint)
                raise
            finally:
                self.stop_signals.restore()
            test_epoch = "best" if len(self.valid_splits) > 0 else cur_epoch
            test_logs = self.evaluate(cur_epoch=test_epoch, skip_reload=self.evaluate_only)
            weights_epoch = self.best_epoch if test_epoch == "best" else cur_epoch
            self._log_position = (weights_epoch, self._iterations_done(weights_epoch))
            for split_name, metrics in (test_logs or {}).items():
                self.log_stats(metrics, split_name)
        finally:
            self._close_job_log()
        logging.info("Training time {}".format(time.strftime("%H:%M:%S", time.gmtime(time.time() - start_time))))
        self._release_job_folder()

    # ------------------------------------------------------------------------------------------------------------
    # Logs (runners/logs.py, runners/trackers.py)
    # ------------------------------------------------------------------------------------------------------------
    def log_config(self):
        """The run config to ``<job>/config.yaml``. LAVIS's (runner_base.py:647) pretty-printed it at the top of
        log.txt, which was then no longer JSON lines."""
        if is_main_process():
            write_config(self.output_dir, self.config.to_dict())

    def log_stats(self, stats, split_name):
        """LAVIS's per-epoch lines (runner_base.py:638; keys ``{split}_{name}``) as ``log.txt`` records with kind,
        epoch and iteration, numbers as numbers, and to the trackers (rank 0)."""
        if not isinstance(stats, dict) or not is_main_process():
            return
        epoch, iteration = self._log_position
        values = {f"{split_name}_{key}": value for key, value in stats.items()}
        job_log = self._job_log or JobLog(self.output_dir)
        if split_name == "train":
            job_log.write(EPOCH_KIND, epoch, iteration, values)
        else:
            job_log.write(EVAL_KIND, epoch, iteration, values, split=split_name)

    def _open_job_log(self) -> Optional[JobLog]:
        """Rank 0: the job's log writer with the trackers ``run.loggers`` asks for; a resumed run's log starts with
        a ``resume`` line, and its trackers continue the predecessor's (``trackers.json``)."""
        if not is_main_process():
            return None
        resume = self._resume_point
        previous = read_tracker_state(resume["job_dir"]) if resume else {}
        trackers = open_trackers(self.config.run_cfg, self.output_dir, run_name=str(self.job_id),
                                 config=self.config.to_dict(), previous=previous,
                                 purge_step=resume["iteration"] + 1 if resume else None)
        if trackers:
            write_tracker_state(self.output_dir, {name: tracker.state() for name, tracker in trackers.items()})
        job_log = JobLog(self.output_dir, trackers)
        if resume:
            job_log.write(RESUME_KIND, resume["epoch"], resume["iteration"], {},
                          checkpoint=resume["checkpoint"], job_dir=resume["job_dir"])
        return job_log

    def _close_job_log(self) -> None:
        job_log, self._job_log = self._job_log, None
        if job_log is not None:
            job_log.close()

    def _iterations_per_epoch(self) -> int:
        """Iterations per (inner) epoch: the loop's, ``iters_per_inner_epoch``, or the training loader's length."""
        if self._iters_per_epoch:
            return int(self._iters_per_epoch)
        if self.iteration_based:
            return int(self.iters_per_inner_epoch)
        try:
            return len(self.train_loader)
        except TypeError:  # a loader without a length (not one map-style dataset)
            return 0

    def _iterations_done(self, epoch) -> int:
        """Iterations done when (inner) epoch ``epoch`` ends; 0 for a run that only evaluates."""
        return 0 if self.evaluate_only else (int(epoch) + 1) * self._iterations_per_epoch()

    def _train_epochs(self):
        """The epochs of ``train`` (LAVIS's loop body); returns the last epoch."""
        if not self.evaluate_only:
            self._iteration_log = IterationLog(self._job_log, int(self.config.run_cfg.batch_size_train) * get_world_size())

        cur_epoch = self.max_epoch - 1
        for cur_epoch in range(self.start_epoch, self.max_epoch):
            if not self.evaluate_only:
                logging.info("Start training")
                train_stats = self.train_epoch(cur_epoch)
                self._log_position = (cur_epoch, self._iterations_done(cur_epoch))
                self.log_stats(split_name="train", stats=train_stats)
            else:
                self._log_position = (cur_epoch, 0)

            for split_name in self.valid_splits:
                logging.info("Evaluating on {}.".format(split_name))
                val_log = self.eval_epoch(split_name=split_name, cur_epoch=cur_epoch)
                if val_log is not None and is_main_process():
                    assert "agg_metrics" in val_log, "No agg_metrics found in validation log."
                    if val_log["agg_metrics"] > self.best_agg_metric and split_name == "val":
                        self.best_epoch, self.best_agg_metric = cur_epoch, val_log["agg_metrics"]
                        self._save_checkpoint(cur_epoch, is_best=True)
                    val_log.update({"best_epoch": self.best_epoch})
                    self.log_stats(val_log, split_name)

            if self.evaluate_only:
                break
            self.save_progress(cur_epoch, self._iters_per_epoch or len(self.train_loader), complete=True)
            dist.barrier()
        return cur_epoch

    def train_epoch(self, epoch):
        """One epoch of LAVIS's training (the task's ``train_step``, LAVIS's schedule, accumulation, amp and logs)
        through this runner's guarded loop, ``train_inner_loop``; a resumed epoch starts at its saved iteration.
        In iteration mode ``epoch`` is an inner epoch: ``iters_per_inner_epoch`` iterations from
        ``epoch * iters_per_inner_epoch`` on, over the endless training stream (LAVIS's ``train_iters``).

        A task that brings its own ``train_epoch``/``train_iters`` or ``_train_inner_loop`` keeps it (LAVIS's
        behaviour), without the step guard, mid-epoch checkpoints or per-iteration lines."""
        self.model.train()
        first_iter = self._start_epoch_data(epoch)
        train_args = dict(epoch=epoch, model=self.model, data_loader=self.train_loader, optimizer=self.optimizer,
                          scaler=self.scaler, lr_scheduler=self.lr_scheduler, cuda_enabled=self.cuda_enabled,
                          log_freq=self.log_freq, accum_grad_iters=self.accum_grad_iters)
        if self.iteration_based:
            loop = dict(iters_per_epoch=self.iters_per_inner_epoch, start_iters=epoch * self.iters_per_inner_epoch)
            task_entry, task_args = "train_iters", dict(train_args, start_iters=loop["start_iters"],
                                                        iters_per_inner_epoch=self.iters_per_inner_epoch)
        else:
            loop = dict(iters_per_epoch=len(self.train_loader))
            task_entry, task_args = "train_epoch", train_args
        task_class = type(self.task)
        if (getattr(task_class, task_entry) is not getattr(BaseTask, task_entry)
                or task_class._train_inner_loop is not BaseTask._train_inner_loop):
            logging.warning("%s has its own training loop: non-finite losses are not guarded and no mid-epoch "
                            "checkpoints are written", task_class.__name__)
            with self.stop_signals.suspended():  # its loop never polls: a stop signal ends it as Python would
                stats = getattr(self.task, task_entry)(**task_args)
        else:
            stats = self.train_inner_loop(first_iter=first_iter, **loop, **train_args)
        stats.update(self._reliability_stats(epoch))
        return stats

    def _start_epoch_data(self, epoch) -> int:
        """Put the data order at ``epoch`` (and at the resumed iteration, once) and reset the epoch's counters;
        returns the iteration the epoch starts at."""
        loader = self.train_loader
        start_iter, self._start_iter = self._start_iter, 0
        if self.iteration_based:  # the stream goes on across inner epochs; a resume puts it where it was
            pending, self._pending_loader = self._pending_loader, None
            if pending is not None:
                loader.load_state_dict(pending)
        elif isinstance(loader, EpochLoader):
            loader.start_epoch(epoch, start_iter)
        elif start_iter:
            logging.warning("this training loader cannot start inside an epoch: epoch %d restarts at iteration 0",
                            epoch)
            start_iter = 0
        if start_iter == 0:  # a run resumed inside an epoch keeps that epoch's counts (restored with the checkpoint)
            self.step_guard.start_epoch()
            for dataset in self.robust_datasets:
                dataset.start_epoch()
        return start_iter

    def train_inner_loop(self, epoch, iters_per_epoch, model, data_loader, optimizer, lr_scheduler, scaler=None,
                         start_iters=None, log_freq=50, cuda_enabled=False, accum_grad_iters=1, first_iter=0):
        """LAVIS's ``BaseTask._train_inner_loop`` (base_task.py:164-246, same arguments: same samples, schedule,
        accumulation, amp and logs) over ``task.train_step``, each step guarded: a non-finite loss on any rank skips
        the optimiser step everywhere. Starts at ``first_iter`` (a resumed epoch), writes the mid-epoch checkpoints
        and averages the task's ``logged_loss_terms`` over the steps kept."""
        if not hasattr(data_loader, "__next__"):
            data_loader = iter(data_loader)
        self._iters_per_epoch = iters_per_epoch
        if hasattr(lr_scheduler, "set_iters_per_epoch"):  # per-iteration schedules (runners/schedulers.py)
            lr_scheduler.set_iters_per_epoch(iters_per_epoch)
        run = _TrainEpoch(
            epoch=epoch, iters_per_epoch=iters_per_epoch, start_iters=start_iters, model=model, optimizer=optimizer,
            scaler=scaler, accum_grad_iters=accum_grad_iters, cuda_enabled=cuda_enabled,
            trainable=[(n, p) for n, p in self.unwrap_dist_model(model).named_parameters() if p.requires_grad],
            watch=OutputWatch(self.unwrap_dist_model(model), self.step_guard, self.stop_signals.requested),
            log_freq=log_freq, iteration_log=self._iteration_log,
        )
        first = first_iter
        if run.iteration_log is not None:
            run.iteration_log.start(run.global_step(first))
        logging.info("Start training epoch {}, {} iters per inner epoch.".format(epoch, iters_per_epoch))
        if first:
            logging.info("resuming epoch %s at iteration %d", epoch, first)
        try:
            steps = range(first, iters_per_epoch)  # empty for a run resumed at the epoch's very end
            for i in run.metric_logger.log_every(steps, log_freq, run.header) if len(steps) else steps:
                samples = prepare_sample(next(data_loader), cuda_enabled=cuda_enabled)
                samples.update({"epoch": run.inner_epoch, "num_iters_per_epoch": iters_per_epoch, "iters": i})
                lr_scheduler.step(cur_epoch=run.inner_epoch, cur_step=i)
                loss, bad = self._guarded_forward(run, samples, i)
                self._backward(run, loss, bad)
                if (i + 1) % accum_grad_iters == 0:
                    self._optimizer_step(run, i)
                self._log_step(run, loss, bad)
                self._log_iteration(run, i)
                self._checkpoint_inside_epoch(run, done=i + 1)
                self._stop_or_save(run, done=i + 1)
        finally:
            run.watch.remove()
        if first < iters_per_epoch:  # (a run resumed at the epoch's very end has no step of its own here)
            self.step_guard.end_epoch(epoch)
        if run.iteration_log is not None:
            run.iteration_log.end_epoch(self._loss_meters(run), self._iteration_log_names)
        return self._epoch_stats(run)

    # -- the steps of the loop -----------------------------------------------------------------------------------
    def _guarded_forward(self, run, samples, iteration):
        """The task's ``train_step`` (under autocast with amp), then the step guard's verdict: the loss and its
        non-finite terms, agreed between ranks (empty: the step is usable)."""
        with run.watch.watching(run.global_step(iteration)), torch.autocast(run.autocast_device, enabled=run.use_amp):
            loss = self.task.train_step(model=run.model, samples=samples)
        bad = self.step_guard.check(loss, run.watch.output)
        run.window_bad = run.window_bad or bad
        return loss, bad

    def _backward(self, run, loss, bad) -> None:
        """Backward of a usable step (scaled under amp). A bad step has none without DDP; under DDP every rank still
        runs backward, so DDP's reducer stays in step, and the optimiser step drops the gradients."""
        if bad:
            if self.use_distributed:
                loss.backward()
        elif run.scaler is not None:
            run.scaler.scale(loss).backward()
        else:
            loss.backward()

    def _optimizer_step(self, run, iteration) -> None:
        """The end of an accumulation window: skipped when one of its micro-batches had a non-finite loss, else an
        amp step or a plain step whose gradients are checked first."""
        bad, run.window_bad = run.window_bad, []
        if bad:
            self._skip_step(run, bad, iteration)
        elif run.scaler is not None:
            self._amp_step(run)
        else:
            name = first_nonfinite_gradient(run.trainable)  # DDP: gradients are already averaged, so ranks agree
            if name is not None:
                self._skip_step(run, [f"gradient of {name}"], iteration)
                return
            run.optimizer.step()
            self.step_guard.stepped()
            run.optimizer.zero_grad()

    def _skip_step(self, run, bad, iteration) -> None:
        run.optimizer.zero_grad()
        self.step_guard.skipped(bad, run.epoch, iteration, run.global_step(iteration))  # raises after too many

    def _amp_step(self, run) -> None:
        """``GradScaler`` step and update: the scaler itself skips a step whose unscaled gradients overflowed (and
        backs off its scale), which is counted, not treated as a bad step."""
        scale_before = run.scaler.get_scale()
        run.scaler.step(run.optimizer)
        run.scaler.update()
        scale_after = run.scaler.get_scale()
        if scale_after < scale_before:
            self.step_guard.amp_overflow(scale_before, scale_after)
        else:
            self.step_guard.stepped()
        run.optimizer.zero_grad()

    def _log_step(self, run, loss, bad) -> None:
        """The step's total loss and the task's ``logged_loss_terms`` (from the model's output) enter the epoch's
        averages only if the step was usable; the learning rate always."""
        if not bad:
            if "loss" not in run.metric_logger.meters:
                run.metric_logger.add_meter("loss", SmoothedValue(window_size=1, fmt="{value:.4f}"))
            run.metric_logger.update(loss=loss.item())
            output = run.watch.output if isinstance(run.watch.output, dict) else {}
            terms = {key: output[key] for key in self.logged_loss_terms if output.get(key) is not None}
            run.loss_terms.update(**{key: value.detach().item() for key, value in terms.items()})
        run.metric_logger.update(lr=run.optimizer.param_groups[0]["lr"])

    def _log_iteration(self, run, iteration) -> None:
        """Every ``log_freq`` iterations: the window's loss terms, lr and throughput to log.txt and TensorBoard
        (``runners/logs.py``)."""
        if run.iteration_log is not None:
            run.iteration_log.step(run.global_step(iteration), run.epoch, run.optimizer.param_groups[0]["lr"],
                                   self._loss_meters(run), self._iteration_log_names, run.log_freq)

    @property
    def _iteration_log_names(self):
        return ("loss",) + self.logged_loss_terms

    @staticmethod
    def _loss_meters(run) -> dict:
        return {**run.loss_terms.meters, "loss": run.metric_logger.meters.get("loss")}

    def _checkpoint_inside_epoch(self, run, done) -> None:
        """``run.checkpoint_every_iters``: a resumable checkpoint after every N iterations of an (inner) epoch, at
        the end of an accumulation window (the epoch's last iteration gets the epoch's own checkpoint instead)."""
        every = self.checkpoint_every_iters
        if every and done < run.iters_per_epoch and done % every == 0 and done % run.accum_grad_iters == 0:
            self.save_progress(run.epoch, done, complete=False)

    def _stop_or_save(self, run, done) -> None:
        """At the end of an accumulation window: on a stop signal (any rank's), a resumable checkpoint and
        ``Preempted``; else the periodic checkpoint when ``run.checkpoint_every_minutes`` have passed
        (``runners/preemption.py``)."""
        if done % run.accum_grad_iters:
            return
        stop, due = self.stop_signals.poll()
        if stop:
            path = self.save_progress(run.epoch, done, complete=False)
            raise Preempted(stop, path, run.epoch, done)
        if due and done < run.iters_per_epoch:
            self.save_progress(run.epoch, done, complete=False)

    def _epoch_stats(self, run) -> dict:
        """The epoch's averages over all ranks: LAVIS's ``lr`` and ``loss``, then the task's loss terms."""
        run.metric_logger.synchronize_between_processes()
        meters = run.metric_logger.meters
        logging.info("Averaged stats: " + "  ".join(f"{k}: {_format_meter(m)}" for k, m in meters.items()))
        stats = {k: _meter_average(meter) for k, meter in meters.items()}  # numbers: log.txt is for trackers too
        stats.setdefault("loss", float("nan"))  # every step of the epoch was skipped
        if self.logged_loss_terms:
            run.loss_terms.synchronize_between_processes()
            logging.info("Averaged loss terms: %s", run.loss_terms.global_avg())
            stats.update({k: _meter_average(meter) for k, meter in run.loss_terms.meters.items()})
        return stats

    @property
    def logged_loss_terms(self):
        """The model output's loss terms the task asks to average and log next to the total (e.g. stage 1's
        ``loss_itc``, ``loss_itm``, ``loss_lm``, ``loss_rec``); none for LAVIS's tasks."""
        return tuple(getattr(self.task, "logged_loss_terms", ()))

    def _reliability_stats(self, epoch) -> dict:
        stats = {"skipped_steps": self.step_guard.skipped_epoch}
        if self.scaler is not None:
            stats["amp_overflow_steps"] = self.step_guard.amp_overflows_epoch
        if self.robust_datasets:
            counts = [[d.stats()["bad"], d.stats()["attempted"]] for d in self.robust_datasets]
            totals = torch.tensor(counts, dtype=torch.float64, device=distributed.collective_device()).sum(0)
            distributed.sum_over_ranks(totals)
            bad, loaded = (int(x) for x in totals.tolist())
            stats.update(bad_samples=bad, loaded_samples=loaded)
            if bad:
                logging.warning("epoch %s: %d unusable training samples replaced (of %d loaded, %.2f%%)",
                                epoch, bad, loaded, 100.0 * bad / max(loaded, 1))
            # the epoch's totals over all ranks (the same on every rank): the limits also hold for an epoch too
            # small for the in-epoch check (run.bad_fraction_min_samples)
            first = self.robust_datasets[0]
            check_bad_sample_limits(bad, loaded, first.max_bad_fraction, first.max_bad_samples)
        return stats
