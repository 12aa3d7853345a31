"""Checkpoints, in one place: reading them safely, writing them atomically, finding where to resume, and
selecting a model's trainable weights (what a checkpoint holds: frozen encoders are not saved, as in LAVIS).

* Reading -- ``torch.load(weights_only=True)``: a file that carries pickled code is refused, never run. Truncated
  files and shape mismatches raise errors naming the file and the keys; a file that matches no tensor of the model
  is refused; ``check_required_keys`` refuses a file lacking tensors the caller requires (the models' strict
  ``pretrained`` / ``finetuned`` loads). Every load logs one summary line of missing and unexpected keys, grouped by
  module.
* Writing -- ``save_checkpoint_atomically``: temporary file ``NAME.tmp-HOST-PID``, fsync, ``os.replace``; a process
  killed mid-save leaves the previous file intact.
* Resuming -- ``find_resume_checkpoint``: in the run (job folder) that saved last, the furthest-progressed readable
  training checkpoint (``checkpoint_{epoch}.pth``, ``checkpoint_{epoch}_iter{k}.pth``); ``remove_interrupted_saves``
  clears the temporary files of killed saves, never those of a live writer.
* Trainable weights -- ``trainable_state_dict`` of a model, ``trainable_parameter_names`` of a model config.

This module imports nothing of the plugin's models (they import it to load their weights); a model is found by
its registered ``arch`` name.

Command line (weights for sharing, and a check of a file before trusting it)::

    python -m lavis_xformer.checkpoints export IN.pth OUT.safetensors [--trainable-only]
    python -m lavis_xformer.checkpoints export IN.pth OUT_FOLDER      # the shareable folder, see below
    python -m lavis_xformer.checkpoints inspect IN.pth

Shareable folders -- ``export_pretrained(checkpoint, folder)`` (the ``export`` command when OUT is not a
``.safetensors`` file) writes ``config.json`` (``arch``, ``model_type`` and every field of the model's typed config),
``model.safetensors`` (every weight, frozen ones included: the folder needs nothing else) and ``README.md``, a model
card generated from the checkpoint and its job folder's logs (stage, data, steps, metrics). ``from_pretrained(folder)``
builds the model from ``config.json`` without the hub and loads every weight, bit for bit; a yaml's
``model.pretrained: FOLDER`` (or ``finetuned:``) loads the folder's weights into the model the yaml describes.
"""

import io
import logging
import os
import pickle
import re
import time
import zipfile
from collections import Counter
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch

from lavis_xformer.common import jobs
from lavis_xformer.common.atomic import atomic_write

logger = logging.getLogger(__name__)

TEST_SAVE_DELAY_ENV = "LAVIS_XFORMER_TEST_SAVE_DELAY"
_CHECKPOINT_NAME = re.compile(r"^checkpoint_(\d+)(?:_iter(\d+))?\.pth$")
PRETRAINED_CONFIG, PRETRAINED_WEIGHTS, PRETRAINED_CARD = "config.json", "model.safetensors", "README.md"
# ``checkpoint_3.pth.tmp-HOST-PID`` (and the older ``.tmp-PID``, which names no host)
_TEMP_NAME = re.compile(r"^checkpoint_.*\.pth\.tmp-(?:(?P<host>.+)-)?(?P<pid>\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used: unsafe, corrupt, or not matching the model."""


# ---------------------------------------------------------------------------------------------------------------
# Reading, and loading into a model
# ---------------------------------------------------------------------------------------------------------------
def _is_url(path: str) -> bool:
    return path.startswith(("http://", "https://"))


def read_checkpoint(path: str) -> dict:
    """Load a checkpoint dict from a path or URL with ``weights_only=True``.

    Raises ``CheckpointError`` naming the file when it is missing, truncated or carries pickled code.
    """
    if _is_url(path):
        from lavis.common.dist_utils import download_cached_file

        path = download_cached_file(path, check_hash=False, progress=True)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, PRETRAINED_WEIGHTS)):
        path = os.path.join(path, PRETRAINED_WEIGHTS)  # a folder written by ``export_pretrained``
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist (give a file path, an exported folder or an "
                              "http(s) URL)")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return {"model": load_file(path, device="cpu")}
        except Exception as err:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"checkpoint {path!r} is not a readable safetensors file: {err}") from err
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"checkpoint {path!r} was refused: it holds objects other than tensors and plain containers, "
            f"which could run code when loaded ({err}). Re-save it as a state dict, or as safetensors."
        ) from err
    except PermissionError as err:
        raise CheckpointError(f"checkpoint {path!r} cannot be opened: {err}") from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as err:
        # a zip cut short fails in torch's reader with RuntimeError or OSError (EINVAL), depending on where
        raise CheckpointError(f"checkpoint {path!r} is truncated or corrupt and cannot be read: {err}") from err


def extract_state_dict(checkpoint: dict) -> Dict[str, torch.Tensor]:
    state_dict = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state_dict, dict):
        raise CheckpointError("checkpoint holds no state dict (expected a dict, or a dict with a 'model' key)")
    return state_dict


def _group(keys: Iterable[str]) -> str:
    counts = Counter(key.split(".")[0] for key in keys)
    return ", ".join(f"{prefix} ({n})" for prefix, n in sorted(counts.items())) or "none"


def load_state_dict_checked(model, state_dict, source: str, strict_unexpected: bool,
                            required: Optional[Iterable[str]] = None, allow_partial: bool = False):
    """``load_state_dict(strict=False)`` with shape checks and a one-line summary; returns the keys result. Every
    check runs before anything is loaded, so a refused file leaves the model as it was: shapes, a file matching no
    tensor, unknown keys (``strict_unexpected``), then the ``required`` keys (``check_required_keys``)."""
    own = model.state_dict()
    mismatched = [
        f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(own[key].shape)}"
        for key, value in state_dict.items()
        if key in own and tuple(value.shape) != tuple(own[key].shape)
    ]
    if mismatched:
        shown = "; ".join(mismatched[:10]) + (f"; ... {len(mismatched) - 10} more" if len(mismatched) > 10 else "")
        raise CheckpointError(f"checkpoint {source!r} does not fit {type(model).__name__}: shape mismatch in {shown}")
    unexpected = [key for key in state_dict if key not in own]
    if len(state_dict) == len(unexpected):
        raise CheckpointError(
            f"checkpoint {source!r} matches no tensor of {type(model).__name__} ({len(state_dict)} tensors: "
            f"{_group(state_dict)}; the model's: {_group(own)}): it is not a checkpoint of this model"
        )
    if strict_unexpected and unexpected:
        raise CheckpointError(
            f"checkpoint {source!r} has keys {type(model).__name__} does not know: {_group_detail(unexpected)}"
        )
    if required is not None:
        check_required_keys(state_dict, required, source, type(model).__name__, allow_partial)
    result = model.load_state_dict(state_dict, strict=False)
    logger.info(
        "loaded %s into %s: %d tensors; missing: %s; unexpected: %s",
        source,
        type(model).__name__,
        len(state_dict) - len(result.unexpected_keys),
        _group(result.missing_keys),
        _group(result.unexpected_keys),
    )
    return result


def load_model_weights(model, path: str, strict_unexpected: bool = False,
                       required: Optional[Callable[[dict], Iterable[str]]] = None, allow_partial: bool = False):
    """Read ``path`` safely and load its weights into ``model`` (see ``load_state_dict_checked``). ``required``: a
    function of the file's state dict giving the keys it must supply (see ``check_required_keys``)."""
    state_dict = extract_state_dict(read_checkpoint(path))
    return load_state_dict_checked(model, state_dict, path, strict_unexpected,
                                   required=None if required is None else required(state_dict),
                                   allow_partial=allow_partial)


def check_required_keys(state_dict, required: Iterable[str], source: str, model_name: str,
                        allow_partial: bool) -> None:
    """The keys of ``required`` that ``state_dict`` lacks are an error naming their modules, or with
    ``allow_partial`` a WARNING listing them (they keep their initial values)."""
    missing = sorted(set(required) - set(state_dict))
    if not missing:
        return
    modules = _group([".".join(key.split(".")[:2]) for key in missing])
    if allow_partial:
        logger.warning("partial load (allow_partial_load): %s lacks %d trainable tensors of %s, which keep their "
                       "initial values: %s", source, len(missing), model_name, _group_detail(missing))
        return
    raise CheckpointError(
        f"checkpoint {source!r} lacks {len(missing)} trainable tensors of {model_name} in {modules}: "
        f"{_group_detail(missing)}. It is not a checkpoint of this model and stage; to start these modules from "
        f"their initial values on purpose (e.g. BLIP-2 weights into X-Former), set `model.allow_partial_load: True`."
    )


def _group_detail(keys: List[str]) -> str:
    """Keys grouped by their first two name parts, with counts (``dual_block.layers (24), query_tokens (1)``)."""
    counts = Counter(".".join(key.split(".")[:2]) if key.count(".") >= 2 else key.split(".")[0] for key in keys)
    return ", ".join(f"{prefix} ({n})" for prefix, n in sorted(counts.items()))


def load_trainable_state_dict(model, state_dict, source: str) -> None:
    """Load a training checkpoint's (trainable-only) state dict: unknown keys and missing trainable weights are
    errors; frozen parameters may be absent (LAVIS does not save them, and its strict load then fails on its own
    files)."""
    result = load_state_dict_checked(model, state_dict, source, strict_unexpected=True)
    frozen = _parameter_names(model, trainable=False)
    missing = [key for key in result.missing_keys if key not in frozen]
    if missing:
        raise CheckpointError(f"checkpoint {source!r} lacks trainable weights of the model: {missing[:10]}")


# ---------------------------------------------------------------------------------------------------------------
# Trainable weights
# ---------------------------------------------------------------------------------------------------------------
def _parameter_names(model: torch.nn.Module, trainable: bool) -> set:
    return {name for name, param in model.named_parameters() if param.requires_grad == trainable}


def trainable_state_dict(model: torch.nn.Module) -> dict:
    """The model's state dict without its frozen parameters (what LAVIS saves: frozen encoders are not copied;
    buffers are kept)."""
    frozen = _parameter_names(model, trainable=False)
    return {key: value for key, value in model.state_dict().items() if key not in frozen}


def trainable_parameter_names(model_config: dict) -> set:
    """Names of the trainable parameters of the model a checkpoint's ``config["model"]`` describes, found by
    building it on the meta device without the hub (no memory, no download, no weights read). The architecture is
    looked up in LAVIS's registry (``import lavis_xformer`` registers the plugin's)."""
    from lavis.common.registry import registry

    from lavis_xformer.common.meta import build_on_meta

    arch = (model_config or {}).get("arch")
    if not arch or registry.get_model_class(str(arch)) is None:
        raise CheckpointError(f"the checkpoint's model config names no registered architecture (arch={arch!r})")
    return _parameter_names(build_on_meta(**dict(model_config)), trainable=True)


# ---------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------
def _test_save_delay(path: str) -> float:
    """``LAVIS_XFORMER_TEST_SAVE_DELAY=SECONDS[@NAME]``: seconds to stall in the middle of writing ``path`` (only
    when its file name contains NAME). A test hook for killing a process mid-save; unset in real runs."""
    value = os.environ.get(TEST_SAVE_DELAY_ENV, "")
    if not value:
        return 0.0
    seconds, _, name = value.partition("@")
    if name and name not in os.path.basename(path):
        return 0.0
    return float(seconds)


def save_checkpoint_atomically(obj, path) -> str:
    """``torch.save`` to ``path`` so that a reader sees the old file or the complete new one, never a torn one
    (``common.atomic.atomic_write``; the temporary file names its writer, for ``remove_interrupted_saves``)."""
    path = os.fspath(path)
    delay = _test_save_delay(path)

    def write(handle):
        if delay:
            buffer = io.BytesIO()
            torch.save(obj, buffer)
            data = buffer.getvalue()
            handle.write(data[: len(data) // 2])
            handle.flush()
            os.fsync(handle.fileno())
            time.sleep(delay)
            handle.write(data[len(data) // 2 :])
        else:
            torch.save(obj, handle)

    atomic_write(path, write, tmp_path=f"{path}.tmp-{jobs.this_host()}-{os.getpid()}")
    return path


def export_safetensors(model_or_state_dict, path: str, trainable_only: bool = False,
                       metadata: Optional[Dict[str, str]] = None) -> str:
    """Write model weights as safetensors (shared tensors copied apart); returns the path. ``metadata`` (strings)
    goes into the file's header."""
    from safetensors.torch import save_file

    if isinstance(model_or_state_dict, torch.nn.Module):
        module = model_or_state_dict
        state_dict = module.state_dict()
        if trainable_only:  # trainable parameters only (no buffers), as ``export_checkpoint --trainable-only``
            trainable = _parameter_names(module, trainable=True)
            state_dict = {k: v for k, v in state_dict.items() if k in trainable}
    else:
        state_dict = model_or_state_dict
    tensors = {k: v.detach().contiguous().clone() for k, v in state_dict.items() if torch.is_tensor(v)}
    save_file(tensors, path, metadata={str(k): str(v) for k, v in (metadata or {}).items()} or None)
    return path


# ---------------------------------------------------------------------------------------------------------------
# Finding the checkpoint to resume from
# ---------------------------------------------------------------------------------------------------------------
def checkpoint_progress(path) -> Optional[Tuple[int, int]]:
    """(epoch, next iteration) a checkpoint file resumes at, from its name; None for ``checkpoint_best.pth`` and
    other files. ``checkpoint_3.pth`` -> (4, 0); ``checkpoint_3_iter200.pth`` -> (3, 200)."""
    match = _CHECKPOINT_NAME.match(os.path.basename(os.fspath(path)))
    if match is None:
        return None
    epoch = int(match.group(1))
    return (epoch + 1, 0) if match.group(2) is None else (epoch, int(match.group(2)))


def _checkpoint_candidates(folder: Path) -> List[Path]:
    """The resumable checkpoints directly in ``folder``, furthest progress first."""
    found = [p for p in folder.glob("checkpoint_*.pth") if p.is_file() and checkpoint_progress(p) is not None]
    return sorted(found, key=lambda p: (checkpoint_progress(p), p.stat().st_mtime), reverse=True)


def remove_interrupted_saves(folder) -> List[str]:
    """Delete the ``checkpoint_*.pth.tmp-HOST-PID`` files (in ``folder`` and its job folders) whose writer is provably
    gone (``jobs.writer_is_gone``: on this host, no process with that pid; on another host, untouched for
    ``jobs.STALE_SECONDS``): the leftovers of saves killed before their rename, which is a save's commit point, so
    they can never be valid checkpoints. A live writer's file is never touched."""
    folder = Path(folder)
    removed = []
    for pattern in ("checkpoint_*.pth.tmp-*", "*/checkpoint_*.pth.tmp-*"):
        for path in folder.glob(pattern):
            match = _TEMP_NAME.match(path.name)
            try:
                mtime = path.stat().st_mtime
            except FileNotFoundError:  # its writer renamed or removed it meanwhile
                continue
            host, pid = (match.group("host"), int(match.group("pid"))) if match else (None, None)
            if not jobs.writer_is_gone(host, pid, mtime):
                logger.info("leaving %s: its writer (host %s, pid %s) may still be saving", path, host, pid)
                continue
            logger.warning("removing %s: the temporary file of a save that was interrupted", path)
            path.unlink(missing_ok=True)
            removed.append(str(path))
    return removed


def _read_training_checkpoint(path: Path) -> Optional[dict]:
    try:
        checkpoint = read_checkpoint(str(path))
    except CheckpointError as err:
        logger.warning("resume: skipping %s: %s", path, err)
        return None
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "optimizer" not in checkpoint:
        logger.warning("resume: skipping %s: not a training checkpoint (no 'model' and 'optimizer')", path)
        return None
    return checkpoint


def find_resume_checkpoint(folder, skip_folder: Optional[Callable[[Path], bool]] = None
                           ) -> Tuple[Optional[str], Optional[dict]]:
    """The checkpoint to resume from under ``folder``: ``(path, checkpoint)``, or ``(None, None)`` when there is none.

    ``folder`` itself and each job folder in it is one run. The run chosen is the one whose newest checkpoint file
    was written last (the run a requeued job continues; a neighbour that went further but stopped earlier is not
    taken), skipping the folders ``skip_folder`` rejects (e.g. those a live run holds); in it, the furthest-progressed
    checkpoint that reads back (safely) and holds weights and optimizer. Unreadable files (truncated, corrupt,
    unsafe) are skipped with a warning naming them; when none of a run's checkpoints reads back, the next-newest run
    is taken, with a warning."""
    folder = Path(folder)
    runs = [f for f in [folder, *sorted(p for p in folder.glob("*") if p.is_dir())]
            if not (skip_folder and skip_folder(f))]
    runs = [(f, found) for f in runs if (found := _checkpoint_candidates(f))]
    runs.sort(key=lambda run: max(p.stat().st_mtime for p in run[1]), reverse=True)
    for index, (run, candidates) in enumerate(runs):
        for path in candidates:
            checkpoint = _read_training_checkpoint(path)
            if checkpoint is not None:
                if index:
                    logger.warning("resume: no readable checkpoint in the newest run(s) %s; taking %s",
                                   [str(r) for r, _ in runs[:index]], path)
                return str(path), checkpoint
    return None, None


# ---------------------------------------------------------------------------------------------------------------
# Export and inspection (the command line)
# ---------------------------------------------------------------------------------------------------------------
def export_checkpoint(src: str, dst: str, trainable_only: bool = False) -> dict:
    """``src`` (a training checkpoint, a state dict, or safetensors) -> ``dst`` (safetensors). The model's weights
    only: no optimizer, no RNG, nothing executable. Returns a summary."""
    checkpoint = read_checkpoint(src)
    state_dict = extract_state_dict(checkpoint)
    config = checkpoint.get("config") if isinstance(checkpoint, dict) else None
    model_config = (config or {}).get("model") or {}
    if trainable_only:
        if not model_config:
            raise CheckpointError(f"{src!r} holds no model config: --trainable-only cannot tell trainable weights")
        names = trainable_parameter_names(model_config)
        state_dict = {k: v for k, v in state_dict.items() if k in names}
    metadata = {"format": "pt", "source": os.path.basename(src)}
    for key in ("arch", "model_type"):
        if model_config.get(key) is not None:
            metadata[key] = model_config[key]
    if isinstance(checkpoint, dict) and checkpoint.get("epoch") is not None:
        metadata["epoch"] = checkpoint["epoch"]
    export_safetensors(state_dict, dst, metadata=metadata)
    tensors = [v for v in state_dict.values() if torch.is_tensor(v)]
    return {"file": dst, "tensors": len(tensors), "elements": sum(v.numel() for v in tensors), **metadata}


# ---------------------------------------------------------------------------------------------------------------
# Shareable folders: config.json + model.safetensors + a model card
# ---------------------------------------------------------------------------------------------------------------
_INITIAL_WEIGHT_FIELDS = ("vit_weights", "qformer_weights", "mae_weights")  # config fields naming weights to fetch


def _model_class(arch):
    from lavis.common.registry import registry

    cls = registry.get_model_class(str(arch)) if arch else None
    if cls is None:
        raise CheckpointError(f"model architecture {arch!r} is not registered (import lavis_xformer first)")
    return cls


def _build_as_trained(model_config: dict) -> torch.nn.Module:
    """The model a run's ``config["model"]`` describes, built as LAVIS's ``task.build_model`` builds it (its
    model_type's yaml under the run's node; frozen weights from their sources, ``pretrained`` loaded), without the
    ``finetuned`` checkpoint (the caller loads the trained weights)."""
    from omegaconf import OmegaConf

    node = OmegaConf.create(dict(model_config))
    cls = _model_class(node.get("arch"))
    if node.get("model_type") is not None:
        node = OmegaConf.merge(OmegaConf.load(cls.default_config_path(node.model_type)).model, node)
    node.load_finetuned = False
    return cls.from_config(node)


def _full_config(model: torch.nn.Module, arch: str, model_type) -> dict:
    typed = getattr(model, "_build_cfg", None)
    if typed is None or not hasattr(typed, "to_dict"):
        raise CheckpointError(f"{type(model).__name__} has no typed config to write into {PRETRAINED_CONFIG}")
    return {"arch": arch, "model_type": model_type, **typed.to_dict()}


def _run_summary(checkpoint: dict, source: str) -> dict:
    """What the model card says, from the checkpoint and the log.txt / evaluate.txt beside it."""
    import json

    config = checkpoint.get("config") or {}
    run, model = config.get("run") or {}, config.get("model") or {}
    trainer = checkpoint.get("trainer") or {}
    llm = str(model.get("arch", "")).endswith(("_opt", "_t5"))
    task = run.get("task")
    stage = {"xformer_pretrain": "stage 2, vision-to-language generative learning with a frozen LLM" if llm
             else "stage 1, vision-language representation learning"}.get(task, f"trained with the {task!r} task")
    steps = None
    if trainer:
        iters = int(trainer.get("iters_per_epoch", 0))
        steps = int(trainer.get("epoch", 0)) * iters + int(trainer.get("iteration", 0))
    job = Path(source).parent
    train_lines, eval_lines = [], []
    for name, target in (("log.txt", train_lines), ("evaluate.txt", eval_lines)):
        path = job / name
        if path.is_file():
            for line in path.read_text().splitlines():
                if line.startswith("{") and line.endswith("}") and not line.startswith('{"kind"'):
                    try:
                        record = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(record, dict) and "run" not in record:
                        target.append(record)
    metrics = [r for r in train_lines if not any(k.startswith("train_") for k in r)] + eval_lines
    return {"stage": stage, "task": task, "datasets": config.get("datasets") or {}, "steps": steps,
            "epoch": trainer.get("epoch", checkpoint.get("epoch")), "run": run,
            "train": [r for r in train_lines if any(k.startswith("train_") for k in r)], "metrics": metrics}


def _model_card(config: dict, summary: dict, source: str, tensors: int, elements: int) -> str:
    import json

    lines = [
        f"# {config['arch']} ({config.get('model_type')}): {summary['stage']}",
        "",
        "Exported with `python -m lavis_xformer.checkpoints export` from "
        f"`{os.path.basename(source)}`. No X-Former weights were released with the paper: this is a model trained "
        "with this plugin, described below from its run's own files.",
        "",
        "## Use",
        "",
        "```python",
        "from lavis_xformer.checkpoints import from_pretrained",
        "model = from_pretrained(\"<this folder>\")  # every weight from this folder, in eval mode",
        "```",
        "",
        "or in a LAVIS yaml: `model: {arch: " + f"{config['arch']}, model_type: {config.get('model_type')}, "
        "pretrained: <this folder>}`.",
        "",
        f"Files: `{PRETRAINED_CONFIG}` (the model's full config), `{PRETRAINED_WEIGHTS}` ({tensors} tensors, "
        f"{elements:,} values, frozen weights included).",
        "",
        "## Training",
        "",
        f"- Task: `{summary['task']}`",
        f"- Training iterations done: {summary['steps'] if summary['steps'] is not None else 'unknown'} "
        f"(epoch {summary['epoch']}), batch size {summary['run'].get('batch_size_train')} per rank, "
        f"{summary['run'].get('world_size', 1)} rank(s), lr schedule `{summary['run'].get('lr_sched')}` "
        f"(init_lr {summary['run'].get('init_lr')})",
        "- Data:",
    ]
    for name, dataset in summary["datasets"].items():
        settings = {k: v for k, v in (dataset or {}).items()
                    if k not in ("vis_processor", "text_processor", "build_info")}
        lines.append(f"  - `{name}`" + (f": `{json.dumps(settings, default=str)}`" if settings else ""))
    if summary["train"]:
        keys = [k for k in summary["train"][-1] if k.startswith("train_loss")]
        lines += ["", "## Training losses (per-epoch averages, from log.txt)", "",
                  "| epoch | " + " | ".join(k[len("train_"):] for k in keys) + " |",
                  "|---" * (len(keys) + 1) + "|"]
        lines += [f"| {i} | " + " | ".join(str(r.get(k, "")) for k in keys) + " |"
                  for i, r in enumerate(summary["train"])]
    lines += ["", "## Evaluation metrics (from log.txt / evaluate.txt)", ""]
    if summary["metrics"]:
        lines += [f"- `{json.dumps(record, default=str)}`" for record in summary["metrics"]]
    else:
        lines.append("None were logged in the run's folder.")
    return "\n".join(lines) + "\n"


def export_pretrained(src: str, folder: str) -> dict:
    """A training checkpoint (with its run config) -> a shareable folder: ``config.json``, ``model.safetensors``
    (every weight: the trained ones from ``src``, the frozen ones as the run built them) and a model card."""
    import json

    checkpoint = read_checkpoint(src)
    model_config = ((checkpoint.get("config") or {}).get("model") if isinstance(checkpoint, dict) else None) or {}
    if not model_config.get("arch"):
        raise CheckpointError(f"{src!r} holds no run config (config.model.arch): export it as .safetensors instead")
    model = _build_as_trained(model_config)
    load_trainable_state_dict(model, extract_state_dict(checkpoint), src)
    config = _full_config(model, model_config["arch"], model_config.get("model_type"))
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    state_dict = model.state_dict()
    export_safetensors(state_dict, str(out / PRETRAINED_WEIGHTS),
                       metadata={"format": "pt", "arch": config["arch"], "model_type": config["model_type"]})
    (out / PRETRAINED_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    tensors = len(state_dict)
    elements = sum(v.numel() for v in state_dict.values())
    (out / PRETRAINED_CARD).write_text(_model_card(config, _run_summary(checkpoint, src), src, tensors, elements))
    return {"folder": str(out), "files": [PRETRAINED_CONFIG, PRETRAINED_WEIGHTS, PRETRAINED_CARD],
            "tensors": tensors, "elements": elements, "arch": config["arch"], "model_type": config["model_type"]}


def from_pretrained(folder) -> torch.nn.Module:
    """The model an ``export_pretrained`` folder holds, in eval mode (as LAVIS's ``load_model``): built from
    ``config.json`` with the frozen encoders' and the Q-Former's initial weights switched off (``*_weights: None``,
    so they are not downloaded: the folder has them), then every weight loaded from ``model.safetensors``; a missing
    or unexpected key is an error. Tokenizers (and an LLM stage's LLM, whose weights come with its tokenizer's
    name) are built from their config fields as in training."""
    import json

    from lavis_xformer.common.meta import build_without_checkpoints

    folder = Path(folder)
    config_path = folder / PRETRAINED_CONFIG
    if not config_path.is_file():
        raise CheckpointError(f"{folder} has no {PRETRAINED_CONFIG}: not a folder written by "
                              "`python -m lavis_xformer.checkpoints export CHECKPOINT FOLDER`")
    fields = json.loads(config_path.read_text())
    arch = fields.pop("arch", None)
    fields.pop("model_type", None)
    _model_class(arch)
    unloaded = {key: None for key in _INITIAL_WEIGHT_FIELDS if key in fields}
    model = build_without_checkpoints(arch, None, **{**fields, **unloaded})
    source = str(folder / PRETRAINED_WEIGHTS)
    result = load_state_dict_checked(model, extract_state_dict(read_checkpoint(source)), source,
                                     strict_unexpected=True)
    if result.missing_keys:
        raise CheckpointError(f"{source} lacks weights of {type(model).__name__}: {_group(result.missing_keys)}")
    return model.eval()


def describe_checkpoint(path: str) -> dict:
    """What a checkpoint holds (read safely): its keys, weights, epoch and the resume position."""
    checkpoint = read_checkpoint(path)
    state_dict = extract_state_dict(checkpoint)
    tensors = [v for v in state_dict.values() if torch.is_tensor(v)]
    summary = {
        "file": path,
        "keys": sorted(checkpoint) if isinstance(checkpoint, dict) else [],
        "tensors": len(tensors),
        "elements": sum(v.numel() for v in tensors),
        "modules": _group(state_dict),
        "epoch": checkpoint.get("epoch") if isinstance(checkpoint, dict) else None,
    }
    trainer = checkpoint.get("trainer") if isinstance(checkpoint, dict) else None
    if trainer:
        summary["resume"] = {key: trainer.get(key) for key in ("epoch", "iteration", "iters_per_epoch", "complete",
                                                               "world_size")}
    return summary


def main(argv=None) -> int:
    import argparse
    import json
    import sys

    parser = argparse.ArgumentParser(prog="python -m lavis_xformer.checkpoints", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="write a checkpoint's model weights as safetensors")
    export.add_argument("src", help="a .pth checkpoint (read with weights_only=True) or .safetensors file")
    export.add_argument("dst", help="the .safetensors file to write, or a folder: the shareable format "
                                    "(config.json, model.safetensors, README.md model card)")
    export.add_argument("--trainable-only", action="store_true",
                        help="keep only trainable parameters (found from the checkpoint's model config)")
    inspect = commands.add_parser("inspect", help="read a checkpoint safely and summarise it")
    inspect.add_argument("src")
    args = parser.parse_args(argv)
    try:
        if args.command == "export":
            # (``python -m lavis_xformer.checkpoints`` has imported the package first, which registers its models)
            if args.dst.endswith(".safetensors"):
                summary = export_checkpoint(args.src, args.dst, trainable_only=args.trainable_only)
            elif args.trainable_only:
                parser.error("--trainable-only applies to a .safetensors file; a folder holds every weight")
            else:
                summary = export_pretrained(args.src, args.dst)
        else:
            summary = describe_checkpoint(args.src)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
