"""The runner's resume bookkeeping: its job folder, what a checkpoint holds beyond LAVIS's keys (the ``trainer``
state: position, every rank's RNG states, data order, LR schedule, best metric, guard and bad-data counters), writing
it (``save_progress``) and restoring it (``_resume``: a file, a folder, or ``auto``).

``ResumeMixin`` is mixed into ``RunnerXFormer`` (``runner_xformer.py``), which provides the model, optimizer, loaders,
step guard and robust datasets it saves; see that module's docstring for the rules.
"""

import logging
import os
from pathlib import Path
from typing import Optional

from lavis_xformer.checkpoints import (
    CheckpointError,
    extract_state_dict,
    find_resume_checkpoint,
    load_trainable_state_dict,
    read_checkpoint,
    remove_interrupted_saves,
    save_checkpoint_atomically,
    trainable_state_dict,
)
from lavis_xformer.common import distributed, jobs
from lavis_xformer.common.distributed import get_rank, get_world_size, is_main_process
from lavis_xformer.runners.reliability import EpochLoader, capture_rng_state, restore_rng_state

TRAINER_STATE_FORMAT = 1
# Run settings that change what an exact resume computes: a difference from the checkpoint's config is reported.
_EXACTNESS_KEYS = ("seed", "batch_size_train", "accum_grad_iters", "world_size", "amp", "lr_sched", "init_lr",
                   "min_lr", "warmup_lr", "warmup_steps", "weight_decay", "beta2", "iters_per_inner_epoch",
                   "train_dataset_ratios")


def _lr_scheduler_state(scheduler) -> dict:
    """LAVIS's schedulers are plain objects whose lr is a function of (epoch, step) and their parameters: those
    are saved (a torch scheduler's ``state_dict`` would be saved as such)."""
    if hasattr(scheduler, "state_dict"):
        return {"class": type(scheduler).__name__, "state": scheduler.state_dict()}
    params = {key: value for key, value in vars(scheduler).items()
              if value is None or isinstance(value, (bool, int, float, str))}
    return {"class": type(scheduler).__name__, "params": params}


def _held_by_live_run(folder) -> Optional[str]:
    """``auto``'s folder filter: why a live run holds ``folder``, else None (a stale lock is logged and ignored)."""
    live, why = jobs.lock_status(folder)
    if live:
        return f"held by a live run: {why}"
    if live is False:
        logging.info("resume: %s: %s; not a live run", folder, why)
    return None


def _log_resume_choice(root, path, skipped) -> None:
    """One line for ``auto``: the checkpoint taken, or why none was, naming every folder and file passed over."""
    if path is not None:
        logging.info("resume: auto -> %s", path)
        return
    if not skipped:
        logging.info("resume: auto -> no checkpoint under %s, starting fresh", root)
        return
    logging.warning(
        "resume: auto -> starting fresh: every checkpoint under %s was passed over: %s. To resume from a folder a "
        "live run seems to hold, stop that run or set run.resume_ignore_locks=True; or name a file in "
        "run.resume_ckpt_path", root, "; ".join(f"{where} ({why})" for where, why in skipped))


class ResumeMixin:
    """Job folder, checkpoint content, save and resume of ``RunnerXFormer`` (see the module docstring)."""

    def _claim_job_folder(self, output_dir) -> str:
        """The run's own job folder under ``output_dir``, created and locked by rank 0 (``common.jobs``), its name
        broadcast to every rank. LAVIS's ``job_id`` (``now()``, minutes) is not used: two runs started in the same
        minute shared a folder and overwrote each other's checkpoints."""
        job_id, self._job_lock = None, None
        if is_main_process():
            job_id, self._job_lock = jobs.claim_job_folder(output_dir)
        return distributed.broadcast_from_main(job_id)

    def _release_job_folder(self) -> None:
        if getattr(self, "_job_lock", None) is not None:
            self._job_lock.release()

    def checkpoint_path(self, tag) -> str:
        """``checkpoint_{tag}.pth`` in the job's output folder (tag: an epoch number, "{epoch}_iter{k}" or "best")."""
        return os.path.join(self.output_dir, f"checkpoint_{tag}.pth")

    def checkpoint_state(self, cur_epoch) -> dict:
        """LAVIS's checkpoint content; ``restore_checkpoint_state`` is its inverse."""
        return {
            "model": trainable_state_dict(self.unwrap_dist_model(self.model)),
            "optimizer": self.optimizer.state_dict(),
            "config": self.config.to_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "epoch": cur_epoch,
        }

    def trainer_state(self, epoch, next_iter, iters_per_epoch, complete, rank_states) -> dict:
        """What an exact resume needs beyond LAVIS's content (``checkpoint["trainer"]``)."""
        return {
            "format": TRAINER_STATE_FORMAT,
            "epoch": int(epoch),
            "iteration": int(next_iter),
            "iters_per_epoch": int(iters_per_epoch),
            "complete": bool(complete),
            "world_size": int(get_world_size()),
            "ranks": rank_states,  # per rank: RNG states and bad-data counts
            "data": {"seed": self.data_seed, "batch_size": int(self.config.run_cfg.batch_size_train),
                     "order": "EpochLoader" if isinstance(self.train_loader, EpochLoader) else "lavis"},
            "lr_scheduler": _lr_scheduler_state(self.lr_scheduler),
            "best_agg_metric": float(self.best_agg_metric),
            "best_epoch": int(self.best_epoch),
            "step_guard": self.step_guard.state_dict(),
            **({"loader": self.train_loader.state_dict()}
               if self.iteration_based and hasattr(self.train_loader, "state_dict") else {}),
        }

    def _gather_rank_states(self) -> list:
        """Every rank's RNG states and bad-data counts, in rank order (a collective)."""
        return distributed.gather_objects(
            {"rng": capture_rng_state(), "robust": [d.stats() for d in self.robust_datasets]}
        )

    def save_progress(self, epoch, next_iter, complete):
        """Write a resumable checkpoint: ``checkpoint_{epoch}.pth`` at the end of an epoch, else
        ``checkpoint_{epoch}_iter{next_iter}.pth`` (the older mid-epoch ones of this job are then removed). Called on
        every rank (the RNG states are gathered); rank 0 writes and gets the path (other ranks: None)."""
        rank_states = self._gather_rank_states()
        if getattr(self, "stop_signals", None) is not None:
            self.stop_signals.saved()  # the periodic checkpoint's clock restarts (on every rank)
        if not is_main_process():
            return None
        iters_per_epoch = self._iters_per_epoch or len(self.train_loader)
        path = self.checkpoint_path(epoch if complete else f"{epoch}_iter{next_iter}")
        # LAVIS resumes after ``epoch``: a mid-epoch checkpoint names the last complete epoch there.
        state = self.checkpoint_state(epoch if complete else epoch - 1)
        state["trainer"] = self.trainer_state(epoch, next_iter, iters_per_epoch, complete, rank_states)
        logging.info("Saving checkpoint at epoch %s, iteration %s to %s.", epoch, next_iter, path)
        save_checkpoint_atomically(state, path)
        for old in Path(self.output_dir).glob("checkpoint_*_iter*.pth"):
            if str(old) != path:
                old.unlink(missing_ok=True)
        return path

    def _resume(self, source):
        """``run.resume_ckpt_path``: a file; ``auto`` (the furthest readable checkpoint under run.output_dir); or a
        folder (the furthest readable checkpoint in it and its job folders)."""
        checkpoint = None
        search = str(source).lower() == "auto" or os.path.isdir(str(source))
        if search:
            path = None
            if is_main_process():
                auto = str(source).lower() == "auto"
                root = Path(self.config.run_cfg.output_dir) if auto else Path(str(source))
                remove_interrupted_saves(root)
                # auto: never a folder a live run holds (unless the operator says so); a named folder as given
                force = bool(self.config.run_cfg.get("resume_ignore_locks", False))
                skipped = []
                path, checkpoint = find_resume_checkpoint(
                    root, skip_folder=_held_by_live_run if auto and not force else None, skipped=skipped)
                _log_resume_choice(root, path, skipped)
            path = distributed.broadcast_from_main(path)
            if path is None:
                return
            source = path
        if checkpoint is None:
            checkpoint = read_checkpoint(str(source))
        self.restore_checkpoint_state(checkpoint, str(source))
        logging.info("Resume checkpoint from %s (epoch %d, iteration %d)", source, self.start_epoch, self._start_iter)
        # Build everything lazily built (nothing of it draws random numbers), then put the RNG states back last.
        _ = self.dataloaders, self.lr_scheduler, self.optimizer
        if self._pending_rng is not None:
            restore_rng_state(self._pending_rng)
            self._pending_rng = None
        self._record_resume_point(str(source))

    def _record_resume_point(self, source: str) -> None:
        """Where this run continues, for its logs: ``log.txt`` starts with a ``resume`` line naming the checkpoint
        and its job folder, and the run's trackers continue that job's curves (``runners/logs.py``)."""
        checkpoint = os.path.abspath(source)
        done = int(self.start_epoch) * self._iterations_per_epoch() + int(self._start_iter)
        self._resume_point = {"checkpoint": checkpoint, "job_dir": os.path.dirname(checkpoint),
                              "epoch": int(self.start_epoch), "iteration": done}

    def restore_checkpoint_state(self, checkpoint: dict, source: str) -> None:
        """Load weights, optimizer and scaler; with a ``trainer`` state also the position (epoch, iteration), this
        rank's RNG states and counters. Older/LAVIS checkpoints continue after their epoch, not bit-exactly."""
        if not isinstance(checkpoint, dict) or "optimizer" not in checkpoint or "epoch" not in checkpoint:
            raise CheckpointError(
                f"run.resume_ckpt_path={source!r} holds weights only (no optimizer state and epoch), so a run cannot "
                f"resume from it; give a training checkpoint (checkpoint_*.pth of a run), or start a new run from "
                f"these weights with model.pretrained={source}")
        load_trainable_state_dict(self.unwrap_dist_model(self.model), extract_state_dict(checkpoint), source)
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        if self.scaler is not None and checkpoint.get("scaler"):
            self.scaler.load_state_dict(checkpoint["scaler"])
        self.start_epoch, self._start_iter = int(checkpoint["epoch"]) + 1, 0
        trainer = checkpoint.get("trainer")
        if not trainer:
            logging.warning("%s holds no trainer state (RNG, data order): training continues after epoch %d, but "
                            "not bit-identically to an uninterrupted run", source, self.start_epoch - 1)
            return
        if trainer.get("complete", True):
            self.start_epoch, self._start_iter = int(trainer["epoch"]) + 1, 0
        else:
            self.start_epoch, self._start_iter = int(trainer["epoch"]), int(trainer["iteration"])
        self.best_agg_metric = trainer.get("best_agg_metric", 0)
        self.best_epoch = int(trainer.get("best_epoch", 0))
        self.step_guard.load_state_dict(trainer.get("step_guard", {}))
        self._pending_loader = trainer.get("loader")
        if self.iteration_based and self._pending_loader is None:
            logging.warning("%s holds no training-stream position: the data restarts at its first batch, and the "
                            "resumed run is not bit-identical", source)
        self._report_resume_differences(checkpoint, trainer, source)
        ranks = trainer.get("ranks") or []
        if len(ranks) == get_world_size():
            mine = ranks[get_rank()]
            self._pending_rng = mine["rng"]
            if not trainer.get("complete", True):
                for dataset, counts in zip(self.robust_datasets, mine.get("robust", [])):
                    dataset.load_stats(counts)
        else:
            logging.warning("%s was written by %d ranks, this run has %d: RNG states are not restored, and each "
                            "rank's share of the data differs; training continues, not bit-identically",
                            source, len(ranks), get_world_size())

    def _report_resume_differences(self, checkpoint, trainer, source) -> None:
        saved_run = (checkpoint.get("config") or {}).get("run", {}) or {}
        current = self.config.run_cfg
        changed = [f"{key}: {saved_run.get(key)!r} -> {current.get(key)!r}" for key in _EXACTNESS_KEYS
                   if key in saved_run and saved_run.get(key) != current.get(key)]
        saved_model = (checkpoint.get("config") or {}).get("model")
        if saved_model is not None and saved_model != self.config.to_dict().get("model"):
            changed.append("model config")
        saved_sched = trainer.get("lr_scheduler") or {}
        if "state" in saved_sched and hasattr(self.lr_scheduler, "load_state_dict"):
            self.lr_scheduler.load_state_dict(saved_sched["state"])
        elif "params" in saved_sched:
            now = _lr_scheduler_state(self.lr_scheduler).get("params", {})
            changed += [f"lr schedule {key}: {value!r} -> {now.get(key)!r}"
                        for key, value in saved_sched["params"].items() if now.get(key) != value]
        if changed:
            logging.warning("resuming %s with settings that differ from the checkpoint's (the current ones apply, "
                            "so the run is not a bit-identical continuation): %s", source, "; ".join(changed))

    def _save_checkpoint(self, cur_epoch, is_best=False):
        """LAVIS's save (used for ``checkpoint_best.pth``), atomic; rank 0 writes."""
        if not is_main_process():
            return
        path = self.checkpoint_path("best" if is_best else cur_epoch)
        logging.info("Saving checkpoint at epoch %s to %s.", cur_epoch, path)
        save_checkpoint_atomically(self.checkpoint_state(cur_epoch), path)

    def _load_checkpoint(self, url_or_filename):
        """LAVIS's resume entry point: read safely, then restore everything the checkpoint holds."""
        self._resume(url_or_filename)

    def _reload_best_model(self, model):
        path = self.checkpoint_path("best")
        logging.info("Loading checkpoint from %s.", path)
        load_trainable_state_dict(model, extract_state_dict(read_checkpoint(path)), path)
        return model
