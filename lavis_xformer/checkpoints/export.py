"""Exporting a checkpoint's weights: a ``.safetensors`` file (``export_checkpoint``), or a shareable folder
(``export_pretrained``: ``config.json``, ``model.safetensors`` and a ``README.md`` model card generated from the
checkpoint and its job folder's logs) that ``from_pretrained`` builds a model from without the hub;
``describe_checkpoint`` summarises a file (the ``inspect`` command)."""

import os
from pathlib import Path

import torch

from lavis_xformer.checkpoints.files import (
    PRETRAINED_CARD,
    PRETRAINED_CONFIG,
    PRETRAINED_WEIGHTS,
    CheckpointError,
    _group,
    export_safetensors,
    extract_state_dict,
    load_state_dict_checked,
    load_trainable_state_dict,
    read_checkpoint,
    trainable_parameter_names,
)
from lavis_xformer.checkpoints.model_config import read_pretrained_config


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


def urls_in(config, prefix: str) -> list:
    """``[(key path, url)]`` for every http(s) URL among the string values of a nested config."""
    if isinstance(config, str):
        return [(prefix, config)] if config.strip().lower().startswith(("http://", "https://")) else []
    if isinstance(config, dict):
        return [found for key, value in config.items() for found in urls_in(value, f"{prefix}.{key}")]
    if isinstance(config, (list, tuple)):
        return [found for index, value in enumerate(config) for found in urls_in(value, f"{prefix}[{index}]")]
    return []


def export_pretrained(src: str, folder: str, allow_downloads: bool = False) -> dict:
    """A training checkpoint (with its run config) -> a shareable folder: ``config.json``, ``model.safetensors``
    (every weight: the trained ones from ``src``, the frozen ones as the run built them) and a model card. A URL in
    the checkpoint's embedded config is refused unless ``allow_downloads`` (a file's content never opens a
    connection by itself)."""
    import json

    if Path(folder).suffix in (".pth", ".pt", ".bin", ".ckpt"):
        raise CheckpointError(f"export destination {folder!r} looks like a file, but only a .safetensors file or a "
                              "folder can be written: name OUT.safetensors, or a folder without a file suffix")
    checkpoint = read_checkpoint(src)
    model_config = ((checkpoint.get("config") or {}).get("model") if isinstance(checkpoint, dict) else None) or {}
    if not model_config.get("arch"):
        raise CheckpointError(f"{src!r} holds no run config (config.model.arch): export it as .safetensors instead")
    urls = urls_in(model_config, "config.model")
    if urls and not allow_downloads:
        where, url = urls[0]
        raise CheckpointError(
            f"{src!r}: its embedded config names {where}={url!r}; a URL inside a file is data, and export does not "
            "fetch it. Download it yourself and pass --allow-downloads only if you trust this file's source")
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
    from lavis_xformer.common.meta import build_without_checkpoints

    folder = Path(folder)
    config_path = folder / PRETRAINED_CONFIG
    if not config_path.is_file():
        raise CheckpointError(f"{folder} has no {PRETRAINED_CONFIG}: not a folder written by "
                              "`python -m lavis_xformer.checkpoints export CHECKPOINT FOLDER`")
    fields = read_pretrained_config(config_path)
    urls = urls_in({k: v for k, v in fields.items() if k not in _INITIAL_WEIGHT_FIELDS}, "config.json")
    if urls:
        raise CheckpointError(f"{config_path} names {urls[0][0]}={urls[0][1]!r}: a URL inside a file is data, and "
                              "from_pretrained does not fetch it")
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
