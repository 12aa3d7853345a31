import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(2)

import lavis_xformer  # noqa: E402,F401  (registers the plugin)


@pytest.fixture(scope="session")
def process_group():
    """A one-process gloo group: LAVIS's own BLIP-2 forward calls dist.get_rank() unconditionally."""
    import torch.distributed as dist

    if not dist.is_initialized():
        store = dist.HashStore()
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
