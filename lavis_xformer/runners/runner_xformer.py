"""``runner_xformer``: LAVIS's epoch-based ``RunnerBase``, made to run on any device, with atomic checkpoints.

Select it with ``run.runner: runner_xformer`` (the project's yamls do; ``python -m lavis_xformer.train`` also
picks it when a yaml names no runner). Training, evaluation, schedules and logging are LAVIS's; the overrides fix
what breaks off-GPU in LAVIS 1.0.2, each citing the line it replaces:

* process group -- LAVIS's ``train.py`` creates none without a launcher, but BLIP-2's forward calls
  ``dist.get_rank()`` and ``RunnerBase.train`` calls ``dist.barrier()`` (runner_base.py:406): a one-process group
  is made here when none exists (gloo on CPU).
* ``model`` -- runner_base.py:85-97 sets ``_wrapped_model`` only when the model had to be moved, so a model
  already on the CPU gives ``None.train()``; and it wraps DDP with ``device_ids=[gpu]`` (line 92), which is wrong
  for CPU modules. Here the model is wrapped once, with ``device_ids=None`` off-GPU.
* ``create_loaders`` -- runner_base.py:538 wraps loaders in the CUDA-only ``PrefetchLoader``; off-GPU the
  loaders are built inside ``compat.host_prefetch_loader()``.
* ``eval_epoch`` -- runner_base.py:469 calls ``task.evaluation(model, data_loader)``, whose ``cuda_enabled``
  defaults to True (base_task.py:79) and moves every batch to the GPU; here the run's device decides.
* ``scaler`` -- runner_base.py:137 makes a CUDA ``GradScaler`` for ``amp: True`` on any device; off-GPU amp is
  switched off (with a log line) instead.
* ``device`` -- ``device: cuda`` on a machine without CUDA fails with an actionable message, not deep in LAVIS.
* ``output_dir`` -- LAVIS resolves a relative ``run.output_dir`` against its own package folder, i.e. inside
  site-packages for an installed LAVIS; here it is resolved against the current directory.
* the job id is taken from rank 0 (LAVIS lets every rank read its own clock, so ranks may disagree on it).

Checkpoints keep LAVIS's content and names (``checkpoint_{epoch}.pth`` / ``checkpoint_best.pth``: trainable
weights, optimizer, scaler, config, epoch), but are written atomically (temporary file, fsync, ``os.replace``)
and read back with ``weights_only=True``. What goes into a checkpoint and how it is restored are separate
methods (``checkpoint_state`` / ``restore_checkpoint_state``), so that exact resume can extend them.
"""

import logging
import os
from pathlib import Path

import torch
import torch.distributed as dist
from lavis.common.dist_utils import main_process
from lavis.common.registry import registry
from lavis.runners.runner_base import RunnerBase
from torch.nn.parallel import DistributedDataParallel as DDP

from lavis_xformer import compat
from lavis_xformer.checkpoints import CheckpointError, extract_state_dict, load_state_dict_checked, read_checkpoint
from lavis_xformer.common import distributed


def save_checkpoint_atomically(obj, path) -> str:
    """``torch.save`` to ``path`` so that a reader sees the old file or the complete new one, never a torn one.

    The bytes go to a temporary file in the same folder, are flushed and fsync'ed, then ``os.replace`` swaps the
    file in (atomic on POSIX and Windows); the folder is fsync'ed so that the rename survives a power cut.
    """
    path = os.fspath(path)
    tmp_path = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp_path, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise
    _fsync_directory(os.path.dirname(os.path.abspath(path)))
    return path


def _fsync_directory(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows, where folders cannot be opened; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems do not support fsync on folders
    finally:
        os.close(fd)


def trainable_state_dict(model: torch.nn.Module) -> dict:
    """The model's state dict without its frozen parameters (what LAVIS saves: frozen encoders are not copied)."""
    frozen = {name for name, param in model.named_parameters() if not param.requires_grad}
    return {key: value for key, value in model.state_dict().items() if key not in frozen}


@registry.register_runner("runner_xformer")
class RunnerXFormer(RunnerBase):
    def __init__(self, cfg, task, model, datasets, job_id):
        run_cfg = cfg.run_cfg
        if not dist.is_initialized():
            device = distributed.check_device(run_cfg.get("device", "cuda"))
            distributed.init_single_process_group(distributed.backend_for(device))
        job_id = distributed.broadcast_from_main(job_id)
        output_dir = Path(str(run_cfg.output_dir)).expanduser()
        run_cfg.output_dir = str(output_dir if output_dir.is_absolute() else Path.cwd() / output_dir)
        super().__init__(cfg=cfg, task=task, model=model, datasets=datasets, job_id=job_id)

    # ------------------------------------------------------------------------------------------------------------
    # Device, model, AMP
    # ------------------------------------------------------------------------------------------------------------
    @property
    def device(self):
        if self._device is None:
            self._device = distributed.check_device(self.config.run_cfg.device)
        return self._device

    @property
    def model(self):
        """The model on the run device, DDP-wrapped when distributed; built once."""
        if self._wrapped_model is None:
            self._model = self._model.to(self.device)
            if self.use_distributed:
                self._wrapped_model = DDP(
                    self._model,
                    device_ids=[self.config.run_cfg.gpu] if self.cuda_enabled else None,
                    find_unused_parameters=bool(self.config.run_cfg.get("find_unused_parameters", False)),
                )
            else:
                self._wrapped_model = self._model
        return self._wrapped_model

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
    def create_loaders(self, *args, **kwargs):
        if self.cuda_enabled:
            return super().create_loaders(*args, **kwargs)
        with compat.host_prefetch_loader():
            return super().create_loaders(*args, **kwargs)

    @torch.no_grad()
    def eval_epoch(self, split_name, cur_epoch, skip_reload=False):
        """LAVIS's ``eval_epoch`` with the run's device passed on to ``task.evaluation`` (``cuda_enabled``)."""
        data_loader = self.dataloaders.get(split_name, None)
        assert data_loader, "data_loader for split {} is None.".format(split_name)

        model = self.unwrap_dist_model(self.model)
        if not skip_reload and cur_epoch == "best":
            model = self._reload_best_model(model)
        model.eval()

        self.task.before_evaluation(model=model, dataset=self.datasets[split_name])
        results = self.task.evaluation(model, data_loader, cuda_enabled=self.cuda_enabled)
        if results is not None:
            return self.task.after_evaluation(val_result=results, split_name=split_name, epoch=cur_epoch)

    # ------------------------------------------------------------------------------------------------------------
    # Checkpoints
    # ------------------------------------------------------------------------------------------------------------
    def checkpoint_path(self, tag) -> str:
        """``checkpoint_{tag}.pth`` in the job's output folder (tag: an epoch number or "best")."""
        return os.path.join(self.output_dir, f"checkpoint_{tag}.pth")

    def checkpoint_state(self, cur_epoch) -> dict:
        """Everything a checkpoint holds; ``restore_checkpoint_state`` is its inverse."""
        return {
            "model": trainable_state_dict(self.unwrap_dist_model(self.model)),
            "optimizer": self.optimizer.state_dict(),
            "config": self.config.to_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "epoch": cur_epoch,
        }

    def restore_checkpoint_state(self, checkpoint: dict, source: str) -> None:
        """Load weights, optimizer and scaler from a checkpoint dict and continue after its epoch."""
        self.load_model_state(self.unwrap_dist_model(self.model), extract_state_dict(checkpoint), source)
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        if self.scaler is not None and checkpoint.get("scaler"):
            self.scaler.load_state_dict(checkpoint["scaler"])
        self.start_epoch = int(checkpoint["epoch"]) + 1

    @staticmethod
    def load_model_state(model, state_dict, source: str) -> None:
        """Load a (trainable-only) state dict: unknown keys and missing trainable weights are errors; frozen
        parameters may be absent (LAVIS does not save them, and its strict load then fails on its own files)."""
        result = load_state_dict_checked(model, state_dict, source, strict_unexpected=True)
        frozen = {name for name, param in model.named_parameters() if not param.requires_grad}
        missing = [key for key in result.missing_keys if key not in frozen]
        if missing:
            raise CheckpointError(f"checkpoint {source!r} lacks trainable weights of the model: {missing[:10]}")

    @main_process
    def _save_checkpoint(self, cur_epoch, is_best=False):
        path = self.checkpoint_path("best" if is_best else cur_epoch)
        logging.info("Saving checkpoint at epoch %s to %s.", cur_epoch, path)
        save_checkpoint_atomically(self.checkpoint_state(cur_epoch), path)

    def _load_checkpoint(self, url_or_filename):
        """Resume (``run.resume_ckpt_path``)."""
        self.restore_checkpoint_state(read_checkpoint(url_or_filename), url_or_filename)
        logging.info("Resume checkpoint from %s", url_or_filename)

    def _reload_best_model(self, model):
        path = self.checkpoint_path("best")
        logging.info("Loading checkpoint from %s.", path)
        self.load_model_state(model, extract_state_dict(read_checkpoint(path)), path)
        return model
