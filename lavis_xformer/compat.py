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
   malformed one fails with a bare ``JSONDecodeError`` that names no file, a file of the wrong shape with a
   traceback deep in a dataset class. Replaced by the same body with every file checked as it is parsed: an
   ``AnnotationFileError`` names the file and the line and column, or the entry index and the field.
"""

import contextlib
import json
import logging

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
    """An annotation file that cannot be used: not JSON, or not the shape LAVIS's datasets read (named: the file,
    the entry index and the field)."""


# Fields LAVIS's dataset classes read from every entry while they are built (a missing one was a KeyError naming
# no file): CaptionDataset / RetrievalDataset index ``image_id``, RetrievalEvalDataset reads ``image`` and
# ``caption``. Matched by class name along the dataset's MRO.
REQUIRED_AT_BUILD = {"CaptionDataset": ("image_id",), "RetrievalDataset": ("image_id",),
                     "RetrievalEvalDataset": ("image", "caption")}
# Field -> (allowed types, what to say): checked in every entry that has the field.
FIELD_TYPES = {
    "image_id": ((str, int), "a string or an integer"),
    "image": ((str,), "a file path (string)"),
    "question": ((str,), "a string"),
    "caption": ((str, list), "a string or a list of strings"),
    "answer": ((str, list), "a string or a list of strings"),
}


def _load_annotation_file(path) -> list:
    try:
        with open(path, "r") as handle:
            entries = json.load(handle)
    except json.JSONDecodeError as err:
        raise AnnotationFileError(f"annotation file {path} is not valid JSON (line {err.lineno}, column "
                                  f"{err.colno}: {err.msg}); fix or re-create it") from err
    except RecursionError as err:
        raise AnnotationFileError(f"annotation file {path} is nested too deeply to read (an entry is a dict or list "
                                  "holding entries: expected a flat list of objects)") from err
    except UnicodeDecodeError as err:
        raise AnnotationFileError(f"annotation file {path} is not UTF-8 text ({err.reason} at byte {err.start})") \
            from err
    if not isinstance(entries, list):
        raise AnnotationFileError(f"annotation file {path}: the top level is a JSON {type(entries).__name__}, "
                                  "expected a list of entries (objects such as {\"image\": ..., \"caption\": ...})")
    return entries


def check_annotation_entries(entries: list, path, required=()) -> None:
    """Every entry an object; the fields LAVIS reads of the right type, and ``required`` ones present; the first
    problem raises ``AnnotationFileError`` naming the file, the entry index and the field."""
    for index, entry in enumerate(entries):
        where = f"annotation file {path}, entry {index}"
        if not isinstance(entry, dict):
            raise AnnotationFileError(f"{where} is a JSON {type(entry).__name__} ({str(entry)[:60]!r}); every "
                                      "entry must be an object with the dataset's fields")
        for field in required:
            if field not in entry:
                raise AnnotationFileError(f"{where} has no {field!r} field, which "
                                          f"{'/'.join(required)} entries need (it has: {', '.join(map(str, entry))})")
        for field, (types, said) in FIELD_TYPES.items():
            if field in entry and (not isinstance(entry[field], types) or isinstance(entry[field], bool)):
                raise AnnotationFileError(f"{where}: {field!r} is a JSON {type(entry[field]).__name__} "
                                          f"({str(entry[field])[:60]!r}); it must be {said}")
            if field in entry and isinstance(entry[field], list) and not all(isinstance(x, str) for x in entry[field]):
                raise AnnotationFileError(f"{where}: {field!r} must be a list of strings")


def _check_image_paths(entries, path, vis_root) -> None:
    from lavis_xformer.processors import image_path_problem

    for index, entry in enumerate(entries):
        problem = image_path_problem(vis_root, entry.get("image"))
        if problem:
            raise AnnotationFileError(f"annotation file {path}, entry {index}: 'image' {problem}; set "
                                      "run.allow_outside_image_paths=True to read images outside the root")


def empty_question(entry) -> bool:
    """An entry whose ``question`` is an empty or whitespace-only string (nothing to answer: the model would answer
    the prompt alone)."""
    return isinstance(entry, dict) and isinstance(entry.get("question"), str) and not entry["question"].strip()


def _warn_empty_questions(entries, path) -> None:
    """Name the entries of a file with an empty question, once, when the dataset is built; each is a bad sample
    (``RobustDataset`` replaces and counts it; the models refuse an empty question)."""
    empty = [index for index, entry in enumerate(entries) if empty_question(entry)]
    if empty:
        shown = ", ".join(map(str, empty[:10])) + (f" and {len(empty) - 10} more" if len(empty) > 10 else "")
        logging.getLogger(__name__).warning(
            "annotation file %s: %d entr%s with an empty 'question' (entry %s): bad samples, skipped and counted "
            "in training; fix or remove them", path, len(empty), "y" if len(empty) == 1 else "ies", shown)


def base_dataset_init(self, vis_processor=None, text_processor=None, vis_root=None, ann_paths=()):
    """LAVIS's ``BaseDataset.__init__`` (base_dataset.py:27) with every annotation file checked first: not JSON, a
    top level that is not a list, an entry that is not an object, a field of the wrong type, or a field the
    dataset's class reads at build time missing -- each an ``AnnotationFileError`` naming the file, the entry index
    and the field, instead of a traceback naming none. Entries with an empty question are named in one warning (bad
    samples, see ``_warn_empty_questions``)."""
    required = tuple(dict.fromkeys(field for cls in type(self).__mro__
                                   for field in REQUIRED_AT_BUILD.get(cls.__name__, ())))
    self.vis_root = vis_root
    self.annotation = []
    for path in ann_paths:  # (LAVIS's body, with each file parsed once and checked)
        entries = _load_annotation_file(path)
        check_annotation_entries(entries, path, required)
        _check_image_paths(entries, path, vis_root)
        _warn_empty_questions(entries, path)
        self.annotation.extend(entries)
    self.vis_processor = vis_processor
    self.text_processor = text_processor
    self._add_instance_ids()


# ---------------------------------------------------------------------------------------------------------------
_lavis_default_config_path = None


def default_config_path(cls, model_type):
    """LAVIS's ``BaseModel.default_config_path`` with its bare ``AssertionError: Unknown model type x`` replaced by a
    ``ValueError`` listing the valid types with a did-you-mean (``load_model("xformer", "tni")``)."""
    types = sorted(getattr(cls, "PRETRAINED_MODEL_CONFIG_DICT", {}) or {})
    if model_type not in types:
        import difflib

        close = difflib.get_close_matches(str(model_type), types, n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"{model_type!r} is not a model type of {cls.__name__}{hint}; valid: {', '.join(types)}")
    return _lavis_default_config_path.__func__(cls, model_type)


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
    from lavis.models.base_model import BaseModel

    global _lavis_default_config_path
    _lavis_default_config_path = BaseModel.__dict__["default_config_path"]
    BaseModel.default_config_path = classmethod(default_config_path)
    _applied = True
