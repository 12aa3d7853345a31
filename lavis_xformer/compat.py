"""The few patches to LAVIS 1.0.2 that cannot be subclasses, in one place; ``import lavis_xformer`` applies them.

Everything else that LAVIS gets wrong off-GPU is fixed by subclassing (``runner_xformer``, the plugin's tasks and
models). What is left has no extension point: a module-level function or a class LAVIS instantiates itself.
Each patch keeps LAVIS's behaviour on GPUs, names the line it replaces, and is tested in tests/test_lavis_on_cpu.py by
running the saved original (``ORIGINALS``) into its failure first.

1. ``SmoothedValue.synchronize_between_processes`` -- lavis/common/logger.py:43 builds its tensor with
   ``device="cuda"`` whenever a process group exists, so the end of every training epoch dies on CPU. Patched to
   put the tensor where the process group's backend needs it (GPU for nccl, CPU for gloo).
2. ``lavis.common.dist_utils.init_distributed_mode`` -- lavis/common/dist_utils.py:72-73 call
   ``torch.cuda.set_device`` and hard-code nccl, so ``torchrun`` on CPU dies before training starts. Replaced by
   ``lavis_xformer.common.distributed.init_distributed_mode`` (gloo on CPU, a one-process group without a
   launcher). Scripts that did ``from lavis.common.dist_utils import init_distributed_mode`` *before* importing
   the plugin keep LAVIS's function; import ``lavis_xformer`` first (the plugin's own entry points don't need it).
3. ``host_prefetch_loader()`` -- not applied globally: a context manager the runner enters around
   ``RunnerBase.create_loaders`` when the run device is not CUDA. lavis/runners/runner_base.py:538 wraps every
   map-style loader in ``PrefetchLoader``, whose constructor (lavis/datasets/datasets/dataloader_utils.py:56)
   creates a ``torch.cuda.Stream()`` and whose iterator copies every batch to the GPU. Inside the context that
   name resolves to ``HostPrefetchLoader``: the same wrapper (length, attribute pass-through) without CUDA.
4. ``RunnerBase`` off the GPU -- LAVIS's ``evaluate.py`` (GitHub) builds ``RunnerBase`` itself, whatever
   ``run.runner`` says, so ``runner_xformer``'s fixes do not reach it and an eval yaml dies on a CPU-only machine:
   ``create_loaders`` makes the CUDA-only ``PrefetchLoader`` (runner_base.py:538); the ``model`` property returns
   ``None`` for a model already on the run device (runner_base.py:85-97 set ``_wrapped_model`` only after a move)
   and wraps DDP with ``device_ids=[gpu]`` (line 92); ``eval_epoch`` calls ``task.evaluation`` with its default
   ``cuda_enabled=True`` (line 469, base_task.py:79), which moves every batch to the GPU. Patched on ``RunnerBase``:
   ``create_loaders`` runs inside ``host_prefetch_loader()`` when the run device is not CUDA (unchanged on GPUs),
   ``model`` is ``runner_model`` and ``eval_epoch`` is ``runner_eval_epoch`` (LAVIS's with the run's device passed
   on), the same functions ``runner_xformer`` uses.
5. ``BaseDataset.__init__`` -- lavis/datasets/datasets/base_dataset.py:27 ``json.load``s every annotation file; a
   malformed one fails with a bare ``JSONDecodeError`` that names no file. Wrapped: the same load, and on a decode
   error an ``AnnotationFileError`` naming the file, the line and column.
"""

import contextlib
import json

import lavis.common.dist_utils as lavis_dist_utils
import lavis.runners.runner_base as lavis_runner_base
import torch
import torch.distributed as dist
from lavis.common.logger import SmoothedValue
from lavis.datasets.datasets.base_dataset import BaseDataset
from lavis.datasets.datasets.dataloader_utils import PrefetchLoader
from lavis.runners.runner_base import RunnerBase
from torch.nn.parallel import DistributedDataParallel as DDP

from lavis_xformer.common import distributed

# name -> LAVIS's original, kept for the tests (which reproduce each original failure) and for inspection.
ORIGINALS = {
    "SmoothedValue.synchronize_between_processes": SmoothedValue.synchronize_between_processes,
    "dist_utils.init_distributed_mode": lavis_dist_utils.init_distributed_mode,
    "RunnerBase.create_loaders": RunnerBase.create_loaders,
    "RunnerBase.model": RunnerBase.model,
    "RunnerBase.eval_epoch": RunnerBase.eval_epoch,
    "BaseDataset.__init__": BaseDataset.__init__,
}


# ---------------------------------------------------------------------------------------------------------------
# 1. SmoothedValue on the process group's device
# ---------------------------------------------------------------------------------------------------------------
def synchronize_between_processes(self):
    """LAVIS's method with the tensor on ``collective_device()`` instead of ``"cuda"`` (logger.py:43)."""
    if not lavis_dist_utils.is_dist_avail_and_initialized():
        return
    totals = torch.tensor([self.count, self.total], dtype=torch.float64, device=distributed.collective_device())
    dist.barrier()
    dist.all_reduce(totals)
    count, total = totals.tolist()
    self.count = int(count)
    self.total = total


# ---------------------------------------------------------------------------------------------------------------
# 3. PrefetchLoader without CUDA (scoped)
# ---------------------------------------------------------------------------------------------------------------
class HostPrefetchLoader(PrefetchLoader):
    """``PrefetchLoader``'s interface (``len``, attribute pass-through to the DataLoader) with batches left where
    the DataLoader puts them; the task's ``prepare_sample`` moves them to the run device."""

    def __init__(self, loader):
        self.loader = loader  # no torch.cuda.Stream()

    def __iter__(self):
        return iter(self.loader)


@contextlib.contextmanager
def host_prefetch_loader():
    """Within the block, ``RunnerBase.create_loaders`` wraps loaders in ``HostPrefetchLoader``."""
    saved = lavis_runner_base.PrefetchLoader
    lavis_runner_base.PrefetchLoader = HostPrefetchLoader
    try:
        yield
    finally:
        lavis_runner_base.PrefetchLoader = saved


# ---------------------------------------------------------------------------------------------------------------
# 4. RunnerBase off the GPU (LAVIS's evaluate.py instantiates it directly)
# ---------------------------------------------------------------------------------------------------------------
def runner_create_loaders(self, *args, **kwargs):
    """LAVIS's ``create_loaders``, inside ``host_prefetch_loader()`` when the run device is not CUDA."""
    context = contextlib.nullcontext() if self.cuda_enabled else host_prefetch_loader()
    with context:
        return ORIGINALS["RunnerBase.create_loaders"](self, *args, **kwargs)


def runner_model(self):
    """The model on the run device, DDP-wrapped when distributed (``device_ids`` only on a GPU); built once."""
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


@torch.no_grad()
def runner_eval_epoch(self, split_name, cur_epoch, skip_reload=False):
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


# ---------------------------------------------------------------------------------------------------------------
# 5. Annotation files that are not JSON are named
# ---------------------------------------------------------------------------------------------------------------
class AnnotationFileError(ValueError):
    """An annotation file that cannot be read as JSON."""


def base_dataset_init(self, vis_processor=None, text_processor=None, vis_root=None, ann_paths=()):
    """LAVIS's ``BaseDataset.__init__``; a file that is not JSON is named in the error (base_dataset.py:27)."""
    try:
        ORIGINALS["BaseDataset.__init__"](self, vis_processor, text_processor, vis_root, list(ann_paths))
    except json.JSONDecodeError as err:
        for path in ann_paths:  # find the file (LAVIS's error does not say which)
            try:
                with open(path, "r") as handle:
                    json.load(handle)
            except json.JSONDecodeError as file_err:
                raise AnnotationFileError(
                    f"annotation file {path} is not valid JSON (line {file_err.lineno}, column {file_err.colno}: "
                    f"{file_err.msg}); fix or re-create it"
                ) from err
        raise


# ---------------------------------------------------------------------------------------------------------------
_applied = False


def apply() -> None:
    """Apply patches 1, 2 and 4 (idempotent)."""
    global _applied
    if _applied:
        return
    SmoothedValue.synchronize_between_processes = synchronize_between_processes
    lavis_dist_utils.init_distributed_mode = distributed.init_distributed_mode
    RunnerBase.create_loaders = runner_create_loaders
    RunnerBase.model = property(runner_model)
    RunnerBase.eval_epoch = runner_eval_epoch
    BaseDataset.__init__ = base_dataset_init
    _applied = True
