"""Distributed helpers that also work in one process with no process group.

LAVIS's BLIP-2 calls ``torch.distributed.get_rank()`` and ``get_world_size()`` unconditionally; X-Former's losses
use these wrappers instead so that a model runs on one CPU process without ``init_process_group``.
"""

import torch
import torch.distributed as dist
from lavis.models.base_model import all_gather_with_grad as _lavis_all_gather_with_grad
from lavis.models.base_model import concat_all_gather as _lavis_concat_all_gather


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def concat_all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank along dim 0, without gradient (the identity in one process)."""
    return _lavis_concat_all_gather(tensor)


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank along dim 0, keeping the graph (the identity in one process)."""
    if get_world_size() == 1:
        return tensor
    return _lavis_all_gather_with_grad(tensor)
