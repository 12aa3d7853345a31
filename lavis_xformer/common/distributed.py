"""Everything distributed, in one place: process-group setup on GPUs and CPUs, and the rank / world size /
gather / broadcast helpers, which also work in one process with no process group.

Helpers: LAVIS's BLIP-2 calls ``torch.distributed.get_rank()`` and ``get_world_size()`` unconditionally; the
plugin's models, losses, runner and analysis tools use ``get_rank``, ``get_world_size``, ``gather_objects``,
``broadcast_from_main``, ``concat_all_gather`` and ``all_gather_with_grad`` here instead, so that they run on one
CPU process without ``init_process_group``.

Process groups:

LAVIS's ``init_distributed_mode`` (lavis/common/dist_utils.py:57-90) reads the launcher's environment, then pins a
GPU (``torch.cuda.set_device``, line 72) and always uses nccl (line 73): under ``torchrun`` on a CPU machine it dies.
Without a launcher it creates no process group at all, yet LAVIS's BLIP-2 forward calls ``dist.get_rank()``
unconditionally and ``RunnerBase.train`` calls ``dist.barrier()`` after every epoch.

``init_distributed_mode`` here is a drop-in for LAVIS's (same arguments, same fields written into ``run_cfg``):

* launched by torchrun (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``) or SLURM (``SLURM_PROCID``/``SLURM_NTASKS``/
  ``SLURM_LOCALID``): a real process group, nccl for ``device: cuda``, gloo otherwise, ``run_cfg.distributed=True``;
* a plain ``python`` process: a one-process group in an in-process ``HashStore`` (no port, no file, nothing to
  clean up), ``run_cfg.distributed=False`` so the runner neither wraps DDP nor shards the data.

Both register ``shutdown_process_group`` with ``atexit``: the group is destroyed, and its gloo worker threads
joined, after the program's last statement and before Python tears itself down (see its docstring for why a gloo
group must not outlive that point).
"""

import atexit
import datetime
import gc
import logging
import os
import sys
import traceback
from dataclasses import dataclass
from typing import Any, List, Mapping, Optional

import torch
import torch.distributed as dist

# torch.distributed.nn's functions take ``group=group.WORLD`` as a default argument, which Python evaluates when the
# module is first imported: imported after a process group exists (DDP imports it), they hold that group for good,
# and shutdown_process_group could never end its worker threads. Imported here, before any group exists.
import torch.distributed.nn  # noqa: F401
from lavis.models.base_model import all_gather_with_grad as _lavis_all_gather_with_grad
from lavis.models.base_model import concat_all_gather as _lavis_concat_all_gather

# LAVIS waits this long at its barriers so that rank 0 can download (here: generate) data while the others wait.
DEFAULT_TIMEOUT = datetime.timedelta(days=365)


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in a multi-process launch, as the launcher's environment variables say."""

    rank: int
    world_size: int
    local_rank: int
    launcher: str  # "torchrun" or "slurm"


def launch_env(environ: Mapping[str, str] = os.environ) -> Optional[LaunchEnv]:
    """The launch this process belongs to, or None for a plain single process."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return LaunchEnv(
            rank=int(environ["RANK"]),
            world_size=int(environ["WORLD_SIZE"]),
            local_rank=int(environ.get("LOCAL_RANK", 0)),
            launcher="torchrun",
        )
    if "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ:
        return LaunchEnv(
            rank=int(environ["SLURM_PROCID"]),
            world_size=int(environ["SLURM_NTASKS"]),
            local_rank=int(environ.get("SLURM_LOCALID", 0)),
            launcher="slurm",
        )
    return None


def backend_for(device) -> str:
    """nccl for CUDA devices, gloo for everything else (CPU)."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def check_device(device) -> torch.device:
    """``torch.device(device)``, refusing a CUDA device on a machine without one with an actionable message."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            "run.device is 'cuda' but this machine has no usable CUDA device; "
            "run on CPU with `--options run.device=cpu`"
        )
    return device


def init_single_process_group(backend: str = "gloo") -> None:
    """A world of one: LAVIS's BLIP-2 code and runner call ``get_rank()``/``barrier()`` even in one process."""
    if dist.is_initialized():
        return
    # An in-process store: no free port to find, no file to remove, nothing another process could join.
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    _shutdown_at_exit()


def _setting(run_cfg, key, default):
    """``run_cfg[key]`` for a LAVIS run config (OmegaConf) or any object with attributes (LAVIS's ``args``)."""
    return run_cfg.get(key, default) if hasattr(run_cfg, "get") else getattr(run_cfg, key, default)


def init_distributed_mode(run_cfg) -> None:
    """Drop-in for LAVIS's ``init_distributed_mode(cfg.run_cfg)`` that works on any device (see module docstring).

    Writes ``rank``, ``world_size``, ``gpu``, ``distributed`` and ``dist_backend`` into ``run_cfg`` as LAVIS does.
    """
    device = check_device(_setting(run_cfg, "device", "cuda"))
    backend = backend_for(device)
    launch = launch_env()

    if launch is None:
        run_cfg.rank, run_cfg.world_size, run_cfg.gpu = 0, 1, 0
        run_cfg.distributed = False
        run_cfg.dist_backend = backend
        init_single_process_group(backend)
        logging.info("single process: %s process group of world size 1", backend)
        return

    run_cfg.rank, run_cfg.world_size, run_cfg.gpu = launch.rank, launch.world_size, launch.local_rank
    run_cfg.distributed = True
    run_cfg.dist_backend = backend
    if device.type == "cuda":
        torch.cuda.set_device(launch.local_rank)
    dist_url = _setting(run_cfg, "dist_url", "env://")
    print(
        f"| distributed init ({launch.launcher}, {backend}, rank {launch.rank}, world {launch.world_size}): {dist_url}",
        flush=True,
    )
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            world_size=launch.world_size,
            rank=launch.rank,
            timeout=DEFAULT_TIMEOUT,
            **_store_or_url(dist_url, launch),
        )
        _shutdown_at_exit()
    dist.barrier()
    # LAVIS silences print() on every rank but 0.
    from lavis.common.dist_utils import setup_for_distributed

    setup_for_distributed(launch.rank == 0)


def _store_or_url(dist_url: str, launch: LaunchEnv) -> dict:
    """``init_process_group``'s rendezvous: the ``dist_url``, except under torchrun with ``env://``, where the
    store is wrapped in a prefix naming the restart attempt (``TORCHELASTIC_RESTART_COUNT``). torchrun's agent keeps
    one store across ``--max-restarts`` attempts, so a restarted process group would read the dead workers' gloo
    addresses from the first attempt and fail with ``Gloo connectFullMesh failed ... Connection refused``."""
    if launch.launcher != "torchrun" or dist_url != "env://":
        return {"init_method": dist_url}
    store, _, _ = next(dist.rendezvous(dist_url, launch.rank, launch.world_size, timeout=DEFAULT_TIMEOUT))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or "0"
    return {"store": dist.PrefixStore(f"lavis_xformer/attempt_{attempt}", store)}


# ---------------------------------------------------------------------------------------------------------------
# Shutdown
# ---------------------------------------------------------------------------------------------------------------
GLOO_WORKER_THREAD = "pt_gloo_runloop"  # the name torch gives ProcessGroupGloo's worker threads


def _shutdown_at_exit() -> None:
    atexit.unregister(shutdown_process_group)  # once, however many groups a process creates
    atexit.register(shutdown_process_group)


def gloo_worker_threads() -> Optional[int]:
    """How many gloo worker threads this process has; None where the system does not list thread names (Linux's
    /proc does)."""
    try:
        threads = os.listdir("/proc/self/task")
    except OSError:
        return None
    count = 0
    for thread in threads:
        try:
            with open(f"/proc/self/task/{thread}/comm") as name:
                count += name.read().strip() == GLOO_WORKER_THREAD
        except OSError:  # the thread ended meanwhile
            pass
    return count


def shutdown_process_group() -> None:
    """Destroy every process group and join its gloo worker threads while the interpreter is fully alive (the
    ``init_*`` functions here register it with ``atexit``; calling it earlier is fine, it does nothing twice).

    Why: a gloo collective runs on one of the group's worker threads, and the thread drops its reference to the
    finished work (and, through a barrier, to the works before it) only after the caller has been woken. When that
    reference is the last one, the work's tensors and thread-local state release Python objects, so the thread takes
    the GIL. If the main thread has meanwhile reached interpreter shutdown, CPython (3.11) ends a thread that asks
    for the GIL with ``pthread_exit``; the unwind meets torch's ``noexcept`` destructor and the process aborts
    ("terminate called without an active exception", SIGABRT, exit code -6) after a run that did everything right
    (pytorch/pytorch#190489). A rank that ends right after its last collective (rank 1 at the end of a torchrun job)
    is the usual victim.

    Destroying the groups first ends the worker threads (the group's destructor waits for its queue, then joins
    them, letting them take the GIL), so nothing is left to ask for the GIL during shutdown. This needs every
    reference to the group gone: ``gc`` frees a model (DDP holds its group) kept only by reference cycles, and after
    an uncaught exception the frames of its printed traceback (``sys.last_traceback``) are cleared, as they hold the
    runner. A group something else still holds keeps its threads, and a WARNING says so."""
    if not is_initialized():
        return
    if getattr(sys, "last_traceback", None) is not None:
        traceback.clear_frames(sys.last_traceback)
    dist.destroy_process_group()
    gc.collect()
    left = gloo_worker_threads()
    if left:
        logging.warning(
            "%d gloo worker threads outlived destroy_process_group: an object still holds the process group; the "
            "process may abort at exit (SIGABRT) if one of them frees a collective's tensors after Python started "
            "shutting down. Drop models wrapped in DistributedDataParallel before the program ends.",
            left,
        )


# ---------------------------------------------------------------------------------------------------------------
# Rank, world size and collectives (the identity in a single process)
# ---------------------------------------------------------------------------------------------------------------
def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def gather_objects(value: Any) -> List[Any]:
    """Every rank's ``value`` (any picklable object), in rank order, on every rank; ``[value]`` in one process."""
    if get_world_size() == 1:
        return [value]
    gathered = [None] * get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def broadcast_from_main(value):
    """``value`` as rank 0 has it, on every rank (e.g. the job id, which each rank would otherwise compute from
    its own clock); the value itself in a single process."""
    if get_world_size() == 1:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def collective_device() -> torch.device:
    """The device collective tensors must live on for the current backend (nccl: the current GPU; gloo: CPU)."""
    if is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over every rank, in place (the tensor must be on ``collective_device()``)."""
    if get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def concat_all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank along dim 0, without gradient (the identity in one process).

    In one process no collective runs, even where a one-process group exists (LAVIS's runs one), and not only to
    save a copy. Gloo copies a large tensor on its worker thread, where torch's ``parallel_for`` starts an OpenMP team
    of its own (its thread inherits the worker's name, ``pt_gloo_runloop``). From then on libgomp manages more
    threads than there are cores and throttles its spin-wait, so every multi-threaded op of the process, in every
    model, puts its team to sleep and wakes it through a futex: a small op went from 5.9 us to 24-39 us on the
    development machine. X-Former's M (330 kB at bench size) was the first gather that large; after one X-Former
    training step, both models' steps in the same process ran about 30% slower (bench: BLIP-2 385 -> 288 ms,
    X-Former 543 -> 403 ms with this fix). tests/test_process_groups.py checks no team is started.
    Across processes the gather is real; torchrun gives each worker ``OMP_NUM_THREADS=1`` unless told otherwise."""
    if get_world_size() == 1:
        return tensor.detach()
    return _lavis_concat_all_gather(tensor)


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank along dim 0, keeping the graph (the identity in one process)."""
    if get_world_size() == 1:
        return tensor
    return _lavis_all_gather_with_grad(tensor)
