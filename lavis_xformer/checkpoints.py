"""Safe checkpoint loading for the plugin's models.

Checkpoints are read with ``torch.load(weights_only=True)``: a file that carries pickled code is refused, never run.
Truncated files and shape mismatches raise errors naming the file and the keys. Every load logs one summary line
of missing and unexpected keys, grouped by module.

Command line (weights for sharing, and a check of a file before trusting it)::

    python -m lavis_xformer.checkpoints export IN.pth OUT.safetensors [--trainable-only]
    python -m lavis_xformer.checkpoints inspect IN.pth
"""

import logging
import os
import pickle
import zipfile
from collections import Counter
from typing import Dict, Iterable, Optional

import torch

logger = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used: unsafe, corrupt, or not matching the model."""


def _is_url(path: str) -> bool:
    return path.startswith(("http://", "https://"))


def read_checkpoint(path: str) -> dict:
    """Load a checkpoint dict from a path or URL with ``weights_only=True``.

    Raises ``CheckpointError`` naming the file when it is missing, truncated or carries pickled code.
    """
    if _is_url(path):
        from lavis.common.dist_utils import download_cached_file

        path = download_cached_file(path, check_hash=False, progress=True)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist (give a file path or an http(s) URL)")
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


def load_state_dict_checked(model, state_dict, source: str, strict_unexpected: bool):
    """``load_state_dict(strict=False)`` with shape checks and a one-line summary; returns the keys result."""
    own = model.state_dict()
    mismatched = [
        f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(own[key].shape)}"
        for key, value in state_dict.items()
        if key in own and tuple(value.shape) != tuple(own[key].shape)
    ]
    if mismatched:
        shown = "; ".join(mismatched[:10]) + (f"; ... {len(mismatched) - 10} more" if len(mismatched) > 10 else "")
        raise CheckpointError(f"checkpoint {source!r} does not fit {type(model).__name__}: shape mismatch in {shown}")
    result = model.load_state_dict(state_dict, strict=False)
    if strict_unexpected and result.unexpected_keys:
        raise CheckpointError(
            f"checkpoint {source!r} has keys {type(model).__name__} does not know: {result.unexpected_keys[:10]}"
        )
    logger.info(
        "loaded %s into %s: %d tensors; missing: %s; unexpected: %s",
        source,
        type(model).__name__,
        len(state_dict) - len(result.unexpected_keys),
        _group(result.missing_keys),
        _group(result.unexpected_keys),
    )
    return result


def load_model_weights(model, path: str, strict_unexpected: bool = False):
    """Read ``path`` safely and load its weights into ``model`` (see ``load_state_dict_checked``)."""
    state_dict = extract_state_dict(read_checkpoint(path))
    return load_state_dict_checked(model, state_dict, path, strict_unexpected)


def export_safetensors(model_or_state_dict, path: str, trainable_only: bool = False,
                       metadata: Optional[Dict[str, str]] = None) -> str:
    """Write model weights as safetensors (shared tensors copied apart); returns the path. ``metadata`` (strings)
    goes into the file's header."""
    from safetensors.torch import save_file

    if isinstance(model_or_state_dict, torch.nn.Module):
        module = model_or_state_dict
        state_dict = module.state_dict()
        if trainable_only:
            trainable = {name for name, p in module.named_parameters() if p.requires_grad}
            state_dict = {k: v for k, v in state_dict.items() if k in trainable}
    else:
        state_dict = model_or_state_dict
    tensors = {k: v.detach().contiguous().clone() for k, v in state_dict.items() if torch.is_tensor(v)}
    save_file(tensors, path, metadata={str(k): str(v) for k, v in (metadata or {}).items()} or None)
    return path


def trainable_parameter_names(model_config: dict) -> set:
    """Names of the trainable parameters of the model a checkpoint's ``config["model"]`` describes, found by
    building it on the meta device without the hub (no memory, no download, no weights read)."""
    from lavis.common.registry import registry

    from lavis_xformer.models.meta import build_on_meta

    arch = (model_config or {}).get("arch")
    model_cls = registry.get_model_class(str(arch)) if arch else None
    if model_cls is None:
        raise CheckpointError(f"the checkpoint's model config names no registered architecture (arch={arch!r})")
    model = build_on_meta(**dict(model_config))
    return {name for name, param in model.named_parameters() if param.requires_grad}


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
    export.add_argument("dst", help="the .safetensors file to write")
    export.add_argument("--trainable-only", action="store_true",
                        help="keep only trainable parameters (found from the checkpoint's model config)")
    inspect = commands.add_parser("inspect", help="read a checkpoint safely and summarise it")
    inspect.add_argument("src")
    args = parser.parse_args(argv)
    try:
        if args.command == "export":
            if args.trainable_only:
                import lavis_xformer  # noqa: F401  (registers the plugin's models)
            summary = export_checkpoint(args.src, args.dst, trainable_only=args.trainable_only)
        else:
            summary = describe_checkpoint(args.src)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
