"""What ``runner_xformer`` needs to survive real clusters and resume exactly: RNG states, a data order that is a
function of (seed, epoch), and the guard that skips optimiser steps with non-finite losses.

* ``capture_rng_state`` / ``restore_rng_state`` -- python ``random``, numpy, torch CPU and every CUDA device, in a
  form ``torch.load(weights_only=True)`` reads back (tensors, ints, floats, strings; no numpy objects).
* ``EpochLoader`` -- the training loader. Its order is ``ResumableSampler``'s (``DistributedSampler`` semantics,
  seeded with ``run.seed``, ``set_epoch`` every epoch, able to start at a batch inside an epoch), and every sample is
  loaded under an RNG seeded from (seed, epoch, sample index) (``SeededSamples``), so the random augmentations do not
  depend on ``num_workers``, on the world size or on where a run was resumed. LAVIS's ``IterLoader`` draws the order
  from the global RNG (one process) or restarts ``set_epoch`` at 0 after a resume (DDP), and sleeps 2 s per epoch.
* ``StepGuard`` -- finds non-finite loss terms, makes every DDP rank agree to skip, counts skipped steps and stops
  the run after ``max_consecutive`` in a row (``NonFiniteLossError``, naming the losses).
"""

import contextlib
import itertools
import logging
import math
import random
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from lavis_xformer import testing
from lavis_xformer.common import distributed
from lavis_xformer.datasets.robust import DatasetWrapper
from lavis_xformer.runners.preemption import ignore_stop_signals

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------
# RNG states
# ---------------------------------------------------------------------------------------------------------------
def capture_rng_state() -> dict:
    """This process's RNG states (python, numpy, torch CPU, CUDA devices) as tensors and plain values."""
    py_version, py_internal, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    cuda = []
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = [state.clone() for state in torch.cuda.get_rng_state_all()]
    return {
        "python": {"version": int(py_version), "state": torch.tensor(py_internal, dtype=torch.int64),
                   "gauss_next": py_gauss},
        "numpy": {"kind": str(np_kind), "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_cached)},
        "torch": torch.get_rng_state(),
        "cuda": cuda,
    }


def restore_rng_state(state: dict) -> None:
    """Inverse of ``capture_rng_state``."""
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(x) for x in py["state"].tolist()), py["gauss_next"]))
    npy = state["numpy"]
    np.random.set_state(
        (npy["kind"], npy["keys"].numpy().astype(np.uint32), int(npy["pos"]), int(npy["has_gauss"]),
         float(npy["cached_gaussian"]))
    )
    torch.set_rng_state(state["torch"])
    cuda = list(state.get("cuda") or [])
    if cuda and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            logger.warning("checkpoint has CUDA RNG states of %d devices, this machine %d: CUDA RNG not restored",
                           len(cuda), torch.cuda.device_count())


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from non-negative integers (numpy's SeedSequence: well mixed, platform independent)."""
    words = np.random.SeedSequence([int(p) & 0xFFFFFFFFFFFFFFFF for p in parts]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


@contextlib.contextmanager
def forked_cpu_rng():
    """Run a block under its own python/numpy/torch-CPU RNG states; the previous states are put back after."""
    py, npy, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(cpu)


# ---------------------------------------------------------------------------------------------------------------
# Data order
# ---------------------------------------------------------------------------------------------------------------
class SeededSamples(DatasetWrapper):
    """``dataset[index]`` loaded with python/numpy/torch RNGs seeded from (seed, epoch, index): the sample's random
    augmentation is a function of those three, whichever process, worker or resumed run loads it. The caller's RNG
    states are restored afterwards (the model's dropout and masking keep their own stream)."""

    def __init__(self, dataset, seed: int):
        super().__init__(dataset)
        self.seed = int(seed)
        self.epoch = 0

    def __getitem__(self, index):
        seed = derive_seed(self.seed, self.epoch, index)
        with forked_cpu_rng():
            random.seed(seed)
            np.random.seed(seed % 2**32)
            torch.random.default_generator.manual_seed(seed)  # CPU only: CUDA streams are left alone
            return self.dataset[index]


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (the permutation is a function of ``seed + epoch``; each rank takes its slice) that
    can start inside an epoch: ``set_start(k)`` skips this rank's first k indices without loading them."""

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int, shuffle: bool = True):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.start = 0

    def set_start(self, start: int) -> None:
        self.start = int(start)

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self):
        return max(self.num_samples - self.start, 0)


class EpochLoader:
    """The training loader: an endless iterator (LAVIS's loops call ``next``) whose epochs are started explicitly.

    ``start_epoch(epoch, start_iter)`` fixes the order (sampler epoch), the per-sample seeds and the DataLoader's own
    generator (worker base seeds), then skips to batch ``start_iter`` at the sampler (nothing is loaded twice).
    Nothing here draws from the global RNGs. ``len()`` is the full epoch's batch count, as LAVIS's loops expect.
    """

    def __init__(self, dataset, batch_size: int, num_workers: int, collate_fn, seed: int, num_replicas: int = 1,
                 rank: int = 0, pin_memory: bool = False, wrap=None):
        self.seed = int(seed)
        self.batch_size = int(batch_size)
        self.samples = SeededSamples(dataset, self.seed)
        self.sampler = ResumableSampler(self.samples, num_replicas=num_replicas, rank=rank, seed=self.seed)
        self.generator = torch.Generator()
        self.loader = DataLoader(
            self.samples, batch_size=self.batch_size, sampler=self.sampler, num_workers=num_workers,
            collate_fn=collate_fn, pin_memory=pin_memory, drop_last=True, generator=self.generator,
            worker_init_fn=ignore_stop_signals if num_workers else None,  # the main process stops on them
        )
        self.iterable = wrap(self.loader) if wrap is not None else self.loader
        self.batches_per_epoch = self.sampler.num_samples // self.batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"the training set gives this rank {self.sampler.num_samples} samples per epoch, fewer than "
                f"run.batch_size_train={self.batch_size}: lower the batch size or add data"
            )
        self.epoch = 0
        self.position = 0  # batches of the current epoch handed out (or skipped at a resume)
        self._iterator = None

    @property
    def dataset(self):
        return self.samples.dataset

    def start_epoch(self, epoch: int, start_iter: int = 0) -> None:
        self.epoch = int(epoch)
        self.samples.epoch = self.epoch
        self.sampler.set_epoch(self.epoch)
        self.sampler.set_start(int(start_iter) * self.batch_size)
        self.generator.manual_seed(derive_seed(self.seed, self.epoch, 0x5EED))
        self.position = int(start_iter)
        self._iterator = iter(self.iterable)

    def __next__(self):
        if self._iterator is None:
            self.start_epoch(self.epoch)
        try:
            batch = next(self._iterator)
        except StopIteration:
            self.start_epoch(self.epoch + 1)
            batch = next(self._iterator)
        self.position += 1
        return batch

    def state_dict(self) -> dict:
        """Where the stream is: (epoch, batches of it handed out). An iteration-based run, whose inner epochs do not
        follow the data's epochs, saves it; ``load_state_dict`` continues from the next batch."""
        return {"epoch": int(self.epoch), "position": int(self.position)}

    def load_state_dict(self, state: dict) -> None:
        self.start_epoch(int(state["epoch"]), int(state["position"]))

    def __iter__(self):
        return self

    def __len__(self):
        return self.batches_per_epoch


class MixedLoader:
    """LAVIS's ``MultiIterLoader`` (every batch comes from one loader, drawn with the given weights) for
    ``run.train_dataset_ratios``, resumable: the k-th draw is a function of (seed, k) instead of the global RNG, and
    ``state_dict`` holds the draw count and every ``EpochLoader``'s position."""

    def __init__(self, loaders: Sequence[EpochLoader], ratios: Sequence[float], seed: int):
        if len(loaders) != len(ratios):
            raise ValueError(f"{len(loaders)} loaders but {len(ratios)} ratios")
        self.loaders = list(loaders)
        self.ratios = [float(r) / sum(ratios) for r in ratios]
        self.seed = int(seed)
        self.draws = 0

    def __next__(self):
        index = random.Random(derive_seed(self.seed, 0x313C, self.draws)).choices(range(len(self.loaders)),
                                                                                  self.ratios)[0]
        self.draws += 1
        return next(self.loaders[index])

    def __iter__(self):
        return self

    def __len__(self):
        return sum(len(loader) for loader in self.loaders)

    def state_dict(self) -> dict:
        return {"draws": self.draws, "loaders": [loader.state_dict() for loader in self.loaders]}

    def load_state_dict(self, state: dict) -> None:
        self.draws = int(state["draws"])
        for loader, loader_state in zip(self.loaders, state["loaders"]):
            loader.load_state_dict(loader_state)


# ---------------------------------------------------------------------------------------------------------------
# Non-finite losses
# ---------------------------------------------------------------------------------------------------------------
class NonFiniteLossError(RuntimeError):
    """Too many optimiser steps in a row had a NaN/inf loss: the run is diverging, not hitting one bad batch."""


def nonfinite_terms(loss: torch.Tensor, output) -> List[str]:
    """``["loss_itc=nan", "loss=nan"]``: the non-finite scalar losses of a step (the model output's ``loss*``
    entries, and the loss the task returned); one device sync."""
    terms: Dict[str, torch.Tensor] = {}
    if isinstance(output, Mapping):
        for key, value in output.items():
            if isinstance(key, str) and key.startswith("loss") and torch.is_tensor(value) and value.numel() == 1:
                terms[key] = value
    if not any(value is loss for value in terms.values()):
        terms["loss"] = loss
    terms = dict(sorted(terms.items(), key=lambda item: item[0] == "loss"))  # the named terms first, the total last
    values = torch.stack([value.detach().float().reshape(()) for value in terms.values()])
    finite = torch.isfinite(values).tolist()
    if all(finite):
        return []
    return [f"{key}={value:g}" for (key, value), ok in zip(zip(terms, values.tolist()), finite) if not ok]


def first_nonfinite_gradient(named_parameters) -> Optional[str]:
    """The name of the first parameter whose gradient holds a NaN/inf, or None (one fused norm, then a search only
    when something is wrong)."""
    named = [(name, p.grad) for name, p in named_parameters if p.grad is not None]
    if not named:
        return None
    norms = torch._foreach_norm([grad.detach() for _, grad in named], float("inf"))
    if bool(torch.isfinite(torch.stack([n.float() for n in norms])).all()):
        return None
    for (name, _), norm in zip(named, norms):
        if not math.isfinite(float(norm)):
            return name
    return "a parameter"


class StepGuard:
    """Skips optimiser steps whose loss is not finite, on every rank at once, and stops a diverging run.

    ``check`` returns the non-finite loss terms of a micro-batch, agreed between DDP ranks (any rank's NaN skips
    the step everywhere, so the ranks stay in step); ``skipped`` logs and counts a skipped step and raises
    ``NonFiniteLossError`` at ``max_consecutive`` in a row; ``stepped`` resets the streak.
    """

    def __init__(self, max_consecutive: int = 10, debug_nan_steps: Sequence[int] = (),
                 debug_nan_ranks: Optional[Sequence[int]] = None, debug_nan_loss: str = "loss_itc"):
        if int(max_consecutive) < 1:
            raise ValueError(f"run.max_consecutive_bad_steps={max_consecutive} must be >= 1")
        self.max_consecutive = int(max_consecutive)
        self.debug_nan_steps = frozenset(int(s) for s in (debug_nan_steps or ()))
        self.debug_nan_ranks = None if debug_nan_ranks is None else frozenset(int(r) for r in debug_nan_ranks)
        self.debug_nan_loss = str(debug_nan_loss)
        self.consecutive = 0
        self.skipped_total = 0
        self.skipped_epoch = 0
        self.kept_epoch = 0  # optimiser steps taken (or left to the amp scaler) this epoch
        self.amp_overflows_epoch = 0
        self.last_bad: List[str] = []

    # -- state ----------------------------------------------------------------------------------------------------
    def start_epoch(self) -> None:
        self.skipped_epoch = 0
        self.kept_epoch = 0
        self.amp_overflows_epoch = 0

    def state_dict(self) -> dict:
        return {"consecutive": self.consecutive, "skipped_total": self.skipped_total,
                "skipped_epoch": self.skipped_epoch, "kept_epoch": self.kept_epoch, "last_bad": list(self.last_bad)}

    def load_state_dict(self, state: dict) -> None:
        self.consecutive = int(state.get("consecutive", 0))
        self.skipped_total = int(state.get("skipped_total", 0))
        self.skipped_epoch = int(state.get("skipped_epoch", 0))
        self.kept_epoch = int(state.get("kept_epoch", 0))
        self.last_bad = list(state.get("last_bad", []))

    # -- test hook ------------------------------------------------------------------------------------------------
    def inject(self, output, global_step: int):
        """``run.debug_nan_steps`` (``testing.inject_nan``)."""
        if not self.debug_nan_steps:
            return output
        return testing.inject_nan(output, global_step, self.debug_nan_steps, self.debug_nan_ranks,
                                  self.debug_nan_loss)

    # -- decisions ------------------------------------------------------------------------------------------------
    def check(self, loss: torch.Tensor, output) -> List[str]:
        return self.agree(nonfinite_terms(loss, output))

    @staticmethod
    def agree(local_bad: List[str]) -> List[str]:
        """Under DDP: one flag all-reduced (MAX) per step; the names are gathered only when some rank is bad."""
        if distributed.get_world_size() == 1:
            return local_bad
        flag = torch.tensor([1 if local_bad else 0], dtype=torch.int32, device=distributed.collective_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if int(flag.item()) == 0:
            return []
        gathered = distributed.gather_objects(local_bad)
        return [f"{name} (rank {rank})" for rank, names in enumerate(gathered) for name in (names or [])]

    def skipped(self, bad: List[str], epoch, iteration: int, global_step: int) -> None:
        self.consecutive += 1
        self.skipped_epoch += 1
        self.skipped_total += 1
        self.last_bad = list(bad)
        logger.warning(
            "non-finite %s at epoch %s iteration %d (global step %d): optimiser step skipped "
            "(%d in a row, %d this epoch, limit run.max_consecutive_bad_steps=%d)",
            ", ".join(bad), epoch, iteration, global_step, self.consecutive, self.skipped_epoch, self.max_consecutive,
        )
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteLossError(
                f"{self.consecutive} consecutive optimiser steps had non-finite losses; last at epoch {epoch} "
                f"iteration {iteration}: {', '.join(bad)}. The run is diverging: lower the learning rate, check the "
                f"data and the loss named here, or raise run.max_consecutive_bad_steps."
            )

    def stepped(self) -> None:
        self.consecutive = 0
        self.kept_epoch += 1

    def end_epoch(self, epoch) -> None:
        """An epoch whose every optimiser step was skipped is a failure, however short (the streak limit cannot
        trigger in an epoch of fewer steps): ``NonFiniteLossError`` before its checkpoint is written."""
        if self.skipped_epoch and not self.kept_epoch:
            raise NonFiniteLossError(
                f"every optimiser step of epoch {epoch} ({self.skipped_epoch}) had a non-finite loss or gradient; "
                f"last: {', '.join(self.last_bad)}. No checkpoint of this epoch is written: check the weights the run "
                f"started from (a corrupt or diverged checkpoint), the data, and the learning rate.")

    def amp_overflow(self, scale_before: float, scale_after: float) -> None:
        self.amp_overflows_epoch += 1
        self.kept_epoch += 1  # the scaler's business, not a bad step
        logger.info("amp: gradients overflowed at scale %g; GradScaler skipped the step (scale now %g)",
                    scale_before, scale_after)


class OutputWatch:
    """A forward hook on the (unwrapped) model that keeps the last training output, so the step guard can name the
    loss term that broke and the runner can log the task's loss terms, and applies the NaN test hook. Inactive
    outside ``watching()`` (evaluation passes)."""

    def __init__(self, module: torch.nn.Module, guard: StepGuard, stop_requested=lambda: False):
        self.guard = guard
        self.stop_requested = stop_requested  # for ``testing.pause_at_step``: a signal handler's stop request
        self.output = None
        self.global_step: Optional[int] = None
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        if self.global_step is None:
            return None
        testing.kill_at_step(self.global_step)
        testing.pause_at_step(self.global_step, self.stop_requested)
        output = self.guard.inject(output, self.global_step)
        self.output = output
        return output

    @contextlib.contextmanager
    def watching(self, global_step: int):
        self.output, self.global_step = None, global_step
        try:
            yield self
        finally:
            self.global_step = None

    def remove(self) -> None:
        self._handle.remove()
