"""Experiment trackers a run's metrics go to besides ``log.txt``: ``run.loggers: [tensorboard, wandb]``.

Each tracker is a thin class over its own library (``torch.utils.tensorboard.SummaryWriter``, ``wandb``) with three
methods: ``log(values, step)`` (scalars by name, step = iterations done), ``close()``, and ``state()`` (what a
resumed run needs to continue the same curves; kept in ``<job>/trackers.json``). Another tracker (MLflow, ...) is a
class with the same methods, registered in ``TRACKERS`` under the name ``run.loggers`` uses.

* ``tensorboard``: event files in ``<job>/tensorboard``. A resumed run writes into its predecessor's folder with
  ``purge_step`` = the iteration it resumes after, so TensorBoard drops what the predecessor logged past its
  checkpoint and shows one continuous curve (``tensorboard --logdir <run.output_dir>``: one run per chain of resumes).
* ``wandb``: ``wandb.init(project=run.wandb_project or "lavis-xformer", name=<first job id>, config=<run config>)``;
  every other setting (entity, mode, dir, tags) is W&B's own environment (``WANDB_ENTITY``, ``WANDB_MODE=offline``,
  ``WANDB_DIR``, ...). Values are plotted against ``iteration`` (``define_metric``); a resumed run re-opens the same
  W&B run (``id``, ``resume="allow"``). W&B cannot drop points, so values its predecessor logged past the checkpoint
  stay (TensorBoard and ``read_log`` drop them).

``run.tensorboard: True`` (the older switch) is the same as listing ``tensorboard``. Asking for a tracker whose
package is not installed is a config error, reported by ``check`` and before a run builds anything
(``logger_problems``).
"""

import importlib
import logging
from pathlib import Path
from typing import Dict, List, Optional

DEFAULT_WANDB_PROJECT = "lavis-xformer"
TENSORBOARD_FOLDER = "tensorboard"


class TrackerError(ValueError):
    """A tracker that cannot be opened: an unknown name, or its package not installed (one line, what to do)."""


class TensorBoardTracker:
    """Scalars to ``folder`` through ``torch.utils.tensorboard.SummaryWriter``."""

    package = "tensorboard"

    def __init__(self, job_dir: Path, run_name: str, config: dict, previous: Optional[dict] = None,
                 purge_step: Optional[int] = None, run_cfg=None):
        from torch.utils.tensorboard import SummaryWriter

        previous_folder = (previous or {}).get("folder")
        self.folder = Path(previous_folder) if previous_folder else Path(job_dir) / TENSORBOARD_FOLDER
        # purge_step: events the predecessor wrote at or after this step are hidden (it logged past its checkpoint)
        self.writer = SummaryWriter(log_dir=str(self.folder), purge_step=purge_step if previous_folder else None)
        if not previous_folder:
            self.writer.add_text("config", "```yaml\n" + _yaml(config) + "\n```", global_step=0)
        logging.info("TensorBoard: %s%s", self.folder, " (continuing the resumed run's curves)" if previous_folder
                     else "")

    def log(self, values: Dict[str, float], step: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, global_step=step)
        self.writer.flush()

    def state(self) -> dict:
        return {"folder": str(self.folder)}

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """One W&B run per chain of resumes, through ``wandb`` itself (offline mode: ``WANDB_MODE=offline``)."""

    package = "wandb"

    def __init__(self, job_dir: Path, run_name: str, config: dict, previous: Optional[dict] = None,
                 purge_step: Optional[int] = None, run_cfg=None):
        import wandb

        previous = previous or {}
        project = (run_cfg.get("wandb_project", None) if run_cfg is not None else None) or DEFAULT_WANDB_PROJECT
        self.run = wandb.init(project=previous.get("project", project), name=previous.get("name", run_name),
                              id=previous.get("id"), resume="allow" if previous.get("id") else None, config=config)
        self.run.define_metric("iteration")
        self.run.define_metric("*", step_metric="iteration")  # x = iterations done, also across resumes
        logging.info("W&B: run %s (project %s)%s", self.run.id, self.run.project,
                     " resumed" if previous.get("id") else "")

    def log(self, values: Dict[str, float], step: int) -> None:
        self.run.log({**values, "iteration": step})

    def state(self) -> dict:
        return {"id": self.run.id, "project": self.run.project, "name": self.run.name}

    def close(self) -> None:
        self.run.finish()


TRACKERS = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker}


def requested_loggers(run_cfg) -> List[str]:
    """The tracker names a run config asks for: ``run.loggers`` (a name or a list) and ``run.tensorboard: True``."""
    asked = run_cfg.get("loggers", None)
    names = [] if asked is None else [asked] if isinstance(asked, str) else [str(name) for name in asked]
    if run_cfg.get("tensorboard", False) is True and "tensorboard" not in names:
        names.append("tensorboard")
    return list(dict.fromkeys(name.strip().lower() for name in names))


def logger_problems(run_cfg) -> List[str]:
    """Why the trackers a run config asks for cannot be opened: an unknown name, or a package not installed."""
    asked = run_cfg.get("loggers", None)
    if asked is not None and not isinstance(asked, str) and not all(isinstance(n, str) for n in _items(asked)):
        return [f"run.loggers={asked!r} must be a tracker name or a list of them; valid: {', '.join(TRACKERS)}"]
    problems = []
    for name in requested_loggers(run_cfg):
        if name not in TRACKERS:
            problems.append(f"run.loggers: {name!r} is not a tracker; valid: {', '.join(TRACKERS)}")
            continue
        missing = _missing_package(TRACKERS[name].package)
        if missing:
            problems.append(f"run.loggers: {name} is asked for, but {missing}")
    return problems


def _items(value):
    try:
        return list(value)
    except TypeError:
        return [value]


def _missing_package(package: str) -> Optional[str]:
    """None when ``package`` imports, else what to do about it (one line)."""
    try:
        importlib.import_module(package)
    except ImportError as error:
        extra = f" (or pip install 'lavis-xformer[{package}]')" if package == "wandb" else ""
        return f"the {package} package cannot be imported ({error}): pip install {package}{extra}"
    return None


def open_trackers(run_cfg, job_dir, run_name: str, config: dict, previous: Optional[dict] = None,
                  purge_step: Optional[int] = None) -> Dict[str, object]:
    """The trackers ``run_cfg`` asks for, by name. ``previous``: the predecessor's ``trackers.json`` (a resumed
    run continues its curves); ``purge_step``: the first iteration the resumed run logs."""
    problems = logger_problems(run_cfg)
    if problems:
        raise TrackerError("; ".join(problems))
    previous = previous or {}
    return {name: TRACKERS[name](Path(job_dir), run_name, config, previous.get(name), purge_step, run_cfg)
            for name in requested_loggers(run_cfg)}


def _yaml(config: dict) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(config)).rstrip()
