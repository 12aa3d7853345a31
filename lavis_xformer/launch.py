"""What ``python -m lavis_xformer.train`` and ``python -m lavis_xformer.evaluate`` share: LAVIS's own train.py /
evaluate.py sequence (same arguments), with the plugin imported and a process group on any device.

    Config(args) -> init_distributed_mode -> seeds -> logger -> task -> datasets -> model -> runner

Two differences from LAVIS's scripts, both because LAVIS's versions assume GPUs and a launcher:
``lavis_xformer.common.distributed.init_distributed_mode`` (gloo on CPU, a one-process group without torchrun),
and the job id (the output sub-folder) is rank 0's on every rank. A config that names no ``run.runner`` gets
``runner_xformer`` (LAVIS's default ``runner_base`` cannot run on CPU).

Before anything is built, ``lavis_xformer.check`` runs (``check_before_launch``: config, data files, checkpoints,
hub cache; every problem in one ``CheckFailed``, a ``ConfigError``). Its config part is ``validate_config``
(``run_config.py``),
on the yaml with its ``--options``: a missing or unregistered ``model.arch``, ``model.model_type``, ``run.task``,
``run.runner``, ``run.lr_sched`` or dataset name, a missing required run field, a run field of the wrong type, a
learning rate that is negative or not finite (``init_lr`` must be > 0), an unknown ``run.*`` or ``model.*`` key (with
a did-you-mean) and malformed ``--options`` are reported together, with the valid choices. (LAVIS itself fails with
``AssertionError: Model 'x' has not been registered.``, ``Unknown model type x`` or, for an arch given in
``--options``, ``AttributeError: 'NoneType' object has no attribute 'from_config'``.) The model's own fields are then
checked by its typed config (``models/config.py``), still before datasets or weights.
"""

import argparse
import logging
import random

import numpy as np
import torch
import torch.backends.cudnn as cudnn

import lavis.common.optims  # noqa: F401  (registers LAVIS's lr schedulers, as LAVIS's train.py imports them)
import lavis.tasks as tasks
from lavis.common.config import Config
from lavis.common.dist_utils import get_rank
from lavis.common.registry import registry
from lavis.common.utils import now

import lavis_xformer  # noqa: F401  (registers the plugin's models, tasks, runners, datasets; applies compat)
from lavis_xformer.common import distributed
from lavis_xformer.check import check_before_launch
from lavis_xformer.paths import resolve_cfg_path
from lavis_xformer.processors import allow_outside_image_paths
# (ConfigError and validate_config are also reached as launch.* by users and tests)
from lavis_xformer.run_config import ConfigError, dot_list, validate_config, validate_model_fields  # noqa: F401

DEFAULT_RUNNER = "runner_xformer"


def parse_args(argv=None, description="Training"):
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--cfg-path", required=True, help="path to configuration file.")
    parser.add_argument(
        "--options",
        nargs="+",
        help="override some settings in the used config, the key-value pair in xxx=yyy format will be merged "
        "into config file (e.g. run.device=cpu run.max_epoch=1).",
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of a config, path or folder error "
                        "(without it: one line each, exit status 1); also LAVIS_XFORMER_DEBUG=1")
    return parser.parse_args(argv)


def setup_seeds(cfg):
    """As LAVIS: the run's seed offset by the rank (each rank draws different augmentations), cuDNN pinned."""
    seed = cfg.run_cfg.seed + get_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    cudnn.benchmark = False
    cudnn.deterministic = True


def setup_logger():
    """LAVIS's ``setup_logger`` (INFO on rank 0, WARN elsewhere), forced. A logging call made before it (the
    process-group setup logs) makes Python install its default WARNING-level handler, after which LAVIS's
    ``basicConfig`` is a no-op and every INFO line of the run (checkpoints saved, resumes, epochs) is lost."""
    logging.basicConfig(
        level=logging.INFO if get_rank() == 0 else logging.WARN,
        format="%(asctime)s [%(levelname)s] %(message)s",
        handlers=[logging.StreamHandler()],
        force=True,
    )


# ---------------------------------------------------------------------------------------------------------------
# Config validation
# ---------------------------------------------------------------------------------------------------------------
def runner_class(cfg):
    name = cfg.run_cfg.get("runner", None) or DEFAULT_RUNNER
    runner_cls = registry.get_runner_class(name)
    if runner_cls is None:
        raise ValueError(f"run.runner={name!r} is not registered; choose one of {registry.list_runners()}")
    return runner_cls


def build_runner(argv=None, description="Training"):
    """Parse arguments and build everything up to the runner (call ``.train()`` or ``.evaluate()`` on it)."""
    job_id = now()
    args = parse_args(argv, description)
    args.cfg_path = resolve_cfg_path(args.cfg_path)  # also a project path inside an installed wheel
    check_before_launch(args.cfg_path, args.options, training=description == "Training")
    args.options = dot_list(args.options)
    cfg = Config(args)
    validate_model_fields(cfg)
    distributed.init_distributed_mode(cfg.run_cfg)
    job_id = distributed.broadcast_from_main(job_id)
    setup_seeds(cfg)
    setup_logger()  # after the process group: only rank 0 logs at INFO
    cfg.pretty_print()

    task = tasks.setup_task(cfg)
    allow_outside_image_paths(bool(cfg.run_cfg.get("allow_outside_image_paths", False)))  # before datasets
    datasets = task.build_datasets(cfg)
    model = task.build_model(cfg)
    runner = runner_class(cfg)(cfg=cfg, job_id=job_id, task=task, model=model, datasets=datasets)
    logging.info("runner %s, output folder %s", type(runner).__name__, runner.output_dir)
    return runner
