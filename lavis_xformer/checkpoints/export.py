"""Exporting a checkpoint's weights: a ``.safetensors`` file (``export_checkpoint``), or a shareable folder, as a
Hugging Face model's: ``config.json``, ``model.safetensors`` (or shards and their index) and a ``README.md`` model
card (``card``). ``save_pretrained`` writes one from a model in memory, ``export_pretrained`` from a training
checkpoint; ``from_pretrained`` builds the model from a folder or a hub repository, ``push_to_hub`` uploads one
(``huggingface_hub``); ``describe_checkpoint`` summarises a file (the ``inspect`` command)."""

import json
import os
import re
from pathlib import Path
from typing import Optional, Union

import torch

from lavis_xformer.checkpoints.files import (
    PRETRAINED_CARD,
    PRETRAINED_CONFIG,
    PRETRAINED_INDEX,
    PRETRAINED_WEIGHTS,
    CheckpointError,
    _group,
    export_safetensors,
    extract_state_dict,
    load_state_dict_checked,
    load_trainable_state_dict,
    offline,
    read_checkpoint,
    readable_by_all,
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


def urls_in(config, prefix: str) -> list:
    """``[(key path, url)]`` for every http(s) URL among the string values of a nested config."""
    if isinstance(config, str):
        return [(prefix, config)] if config.strip().lower().startswith(("http://", "https://")) else []
    if isinstance(config, dict):
        return [found for key, value in config.items() for found in urls_in(value, f"{prefix}.{key}")]
    if isinstance(config, (list, tuple)):
        return [found for index, value in enumerate(config) for found in urls_in(value, f"{prefix}[{index}]")]
    return []


def _registered_arch(model: torch.nn.Module) -> str:
    """The name ``model``'s class is registered under in LAVIS's registry (the ``arch`` of a config)."""
    from lavis.common.registry import registry

    names = [name for name, cls in registry.mapping["model_name_mapping"].items() if cls is type(model)]
    if len(names) != 1:
        raise CheckpointError(f"{type(model).__name__} is registered under {names or 'no name'}: pass arch=NAME")
    return names[0]


def shareable_state_dict(model: torch.nn.Module, trainable_only: bool = False) -> dict:
    """``model.state_dict()``, or with ``trainable_only`` without the frozen parameters and the names that alias
    them (a tied LM head): the trainable parameters and the buffers, what the frozen sources cannot give back."""
    state_dict = model.state_dict()
    if not trainable_only:
        return state_dict
    frozen = {name: param for name, param in model.named_parameters() if not param.requires_grad}
    frozen_storage = {param.data_ptr() for param in frozen.values() if param.numel()}
    return {key: value for key, value in state_dict.items()
            if key not in frozen and not (value.numel() and value.data_ptr() in frozen_storage)}


def _frozen_or_alias(model: torch.nn.Module) -> set:
    """Names of ``model``'s state dict a trainable-only folder may lack (see ``shareable_state_dict``)."""
    state_dict = model.state_dict()
    return set(state_dict) - set(shareable_state_dict(model, trainable_only=True))


def save_pretrained(model: torch.nn.Module, folder, *, arch: Optional[str] = None, model_type: Optional[str] = None,
                    trainable_only: bool = False, max_shard_size: Union[int, str, None] = None,
                    summary: Optional[dict] = None) -> dict:
    """A model in memory -> a shareable folder (as transformers' ``save_pretrained``): ``config.json`` (``arch``,
    ``model_type`` and the typed config; ``"weights": "trainable"`` for a trainable-only folder), the weights as
    ``model.safetensors`` or, past ``max_shard_size`` (``"2GB"``, bytes), shards with ``model.safetensors.index.json``
    (``huggingface_hub.save_torch_state_dict``), and ``README.md``, the model card (``card.model_card``; ``summary``
    the run's, from ``export_pretrained``). ``trainable_only`` leaves out the frozen encoders and LLM, which
    ``from_pretrained`` loads from their own sources. Every file is written 0644 (under umask 022)."""
    from huggingface_hub import save_torch_state_dict

    from lavis_xformer.checkpoints.card import model_card
    from lavis_xformer.common.atomic import atomic_write_text

    arch = arch or _registered_arch(model)
    config = _full_config(model, arch, model_type)
    if trainable_only:
        config["weights"] = "trainable"
    state_dict = shareable_state_dict(model, trainable_only)
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {key: value.detach().contiguous().clone() for key, value in state_dict.items()}  # no shared storage
    metadata = {key: str(config[key]) for key in ("arch", "model_type") if config.get(key) is not None}
    save_torch_state_dict(tensors, out, max_shard_size=max_shard_size or 2 ** 62, metadata=metadata)
    index = out / PRETRAINED_INDEX
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [PRETRAINED_WEIGHTS]
    atomic_write_text(out / PRETRAINED_CONFIG, json.dumps(config, indent=2) + "\n")
    weights = {"tensors": len(tensors), "elements": sum(v.numel() for v in tensors.values()), "shards": len(shards),
               "trainable_only": trainable_only}
    atomic_write_text(out / PRETRAINED_CARD, str(model_card(config, weights, summary)))
    files = [PRETRAINED_CONFIG, *([PRETRAINED_INDEX] if index.is_file() else []), *shards, PRETRAINED_CARD]
    for name in files:
        readable_by_all(out / name)
    return {"folder": str(out), "files": files, "tensors": weights["tensors"], "elements": weights["elements"],
            "trainable_only": trainable_only, "arch": arch, "model_type": model_type}


def export_pretrained(src: str, folder: str, allow_downloads: bool = False, trainable_only: bool = False,
                      max_shard_size: Union[int, str, None] = None) -> dict:
    """A training checkpoint (with its run config) -> a shareable folder (``save_pretrained``) with a model card
    written from the checkpoint and its job folder's logs: the trained weights from ``src``, the frozen ones as the
    run built them (left out with ``trainable_only``). A URL in the checkpoint's embedded config is refused unless
    ``allow_downloads`` (a file's content never opens a connection by itself)."""
    from lavis_xformer.checkpoints.card import run_summary

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
    return save_pretrained(model, folder, arch=model_config["arch"], model_type=model_config.get("model_type"),
                           trainable_only=trainable_only, max_shard_size=max_shard_size,
                           summary=run_summary(checkpoint, src))


_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # owner/name


def _snapshot(repo_id: str, revision: Optional[str], token, cache_dir) -> Path:
    """The hub repository's files in the local cache (``huggingface_hub.snapshot_download``); with offline mode on
    (``HF_HUB_OFFLINE`` ...) only what the cache already holds."""
    import huggingface_hub

    try:
        return Path(huggingface_hub.snapshot_download(
            repo_id, revision=revision, token=token, cache_dir=cache_dir, local_files_only=offline(),
            allow_patterns=["*.json", "*.safetensors", "*.md"]))
    except Exception as err:  # the hub client's errors: not found, gated, offline and not cached, network
        mode = " (offline mode is on: only the local cache is read)" if offline() else ""
        raise CheckpointError(f"{repo_id!r} is neither a local folder nor a hub repository that could be "
                              f"downloaded{mode}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                              ) from err


def from_pretrained(name_or_folder, *, revision: Optional[str] = None, token=None, cache_dir=None) -> torch.nn.Module:
    """The model a folder written by ``save_pretrained`` / ``export`` holds, or a hub repository's (``owner/name``,
    fetched with ``huggingface_hub.snapshot_download``, honouring ``HF_HUB_OFFLINE``), in eval mode (as LAVIS's
    ``load_model``). Built from ``config.json``: a folder of every weight switches the frozen encoders' and the
    Q-Former's initial weights off (``*_weights: None``: the folder has them); a trainable-only folder builds its
    frozen parts from their sources in the config (EVA-CLIP, MAE, the LLM), as training did. Then the weights
    (``model.safetensors``, or the shards of ``model.safetensors.index.json``) load with every check: an unknown
    key, or a missing one the folder should hold, is an error. Tokenizers (and an LLM stage's LLM, whose weights
    come with its tokenizer's name) are built from their config fields as in training."""
    from lavis_xformer.common.meta import build_without_checkpoints

    folder = Path(name_or_folder)
    if not folder.is_dir():
        if not _REPO_ID.match(str(name_or_folder)):
            raise CheckpointError(f"{str(name_or_folder)!r} is neither a folder nor a hub repository id (owner/name)")
        folder = _snapshot(str(name_or_folder), revision, token, cache_dir)
    config_path = folder / PRETRAINED_CONFIG
    if not config_path.is_file():
        raise CheckpointError(f"{folder} has no {PRETRAINED_CONFIG}: not a folder written by "
                              "`lavis-xformer export CHECKPOINT FOLDER` or save_pretrained")
    fields = read_pretrained_config(config_path)
    trainable_only = fields.pop("weights", "all") == "trainable"
    unloaded = {key: None for key in (("qformer_weights",) if trainable_only else _INITIAL_WEIGHT_FIELDS)
                if key in fields}
    urls = urls_in({k: v for k, v in fields.items() if k not in unloaded}, "config.json")
    if urls:
        raise CheckpointError(f"{config_path} names {urls[0][0]}={urls[0][1]!r}: a URL inside a file is data, and "
                              "from_pretrained does not fetch it")
    arch = fields.pop("arch", None)
    fields.pop("model_type", None)
    _model_class(arch)
    model = build_without_checkpoints(arch, None, **{**fields, **unloaded})
    result = load_state_dict_checked(model, extract_state_dict(read_checkpoint(str(folder))), str(folder),
                                     strict_unexpected=True)
    missing = set(result.missing_keys) - (_frozen_or_alias(model) if trainable_only else set())
    if missing:
        raise CheckpointError(f"{folder} lacks weights of {type(model).__name__}: {_group(sorted(missing))}")
    return model.eval()


def push_to_hub(model_or_folder, repo_id: str, *, trainable_only: bool = True,
                max_shard_size: Union[int, str, None] = None, private: Optional[bool] = None, token=None,
                commit_message: Optional[str] = None, revision: Optional[str] = None, arch: Optional[str] = None,
                model_type: Optional[str] = None):
    """Upload a shareable folder (or a model in memory, saved first with ``save_pretrained``: trainable weights only
    by default, as the frozen parts are on the hub already) to the hub repository ``repo_id``, created when absent
    (``HfApi.create_repo`` / ``upload_folder``). Returns the hub's commit info. Refused in offline mode."""
    import tempfile

    import huggingface_hub

    if offline():
        raise CheckpointError(f"push_to_hub({repo_id!r}): offline mode is on (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE / "
                              "LAVIS_XFORMER_OFFLINE); unset it to upload")
    if isinstance(model_or_folder, torch.nn.Module):
        with tempfile.TemporaryDirectory() as folder:
            save_pretrained(model_or_folder, folder, arch=arch, model_type=model_type, trainable_only=trainable_only,
                            max_shard_size=max_shard_size)
            return push_to_hub(folder, repo_id, private=private, token=token, commit_message=commit_message,
                               revision=revision)
    folder = Path(model_or_folder)
    if not (folder / PRETRAINED_CONFIG).is_file():
        raise CheckpointError(f"{folder} has no {PRETRAINED_CONFIG}: push a folder written by save_pretrained or "
                              "`lavis-xformer export`")
    api = huggingface_hub.HfApi(token=token)
    api.create_repo(repo_id=repo_id, private=private, exist_ok=True, repo_type="model")
    return api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model", revision=revision,
                             commit_message=commit_message or "Upload lavis-xformer model")


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
