import logging
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


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture
def checkpoint_log():
    """The records ``lavis_xformer.checkpoints`` emits during a test, each once: a handler on that logger itself, so
    that root handlers left by in-process runs of earlier tests (LAVIS's ``basicConfig(force=True)``) cannot
    duplicate or drop them as they can caplog's."""
    logger = logging.getLogger("lavis_xformer.checkpoints")
    handler, level = _Records(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.fixture(autouse=True)
def _logging_filters_restored():
    """Filters an in-process CLI run adds to the plugin's loggers (``cli.warn_once``: each warning once per process)
    are taken off after the test, so a later test that expects a warning sees it."""
    loggers = [logging.getLogger(name) for name in ("", "lavis_xformer", "lavis_xformer.checkpoints")]
    saved = [list(logger.filters) for logger in loggers]
    yield
    for logger, filters in zip(loggers, saved):
        logger.filters[:] = filters
