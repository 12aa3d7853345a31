"""Safe checkpoint loading for the plugin's models.

Checkpoints are read with ``torch.load(weights_only=True)``: a file that carries pickled code is refused, never run.
Truncated files and shape mismatches raise errors naming the file and the keys. Every load logs one summary line
of missing and unexpected keys, grouped by module.
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
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as err:
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


def export_safetensors(model_or_state_dict, path: str, trainable_only: bool = False) -> str:
    """Write model weights as safetensors (shared tensors copied apart); returns the path."""
    from safetensors.torch import save_file

    if isinstance(model_or_state_dict, torch.nn.Module):
        module = model_or_state_dict
        state_dict = module.state_dict()
        if trainable_only:
            trainable = {name for name, p in module.named_parameters() if p.requires_grad}
            state_dict = {k: v for k, v in state_dict.items() if k in trainable}
    else:
        state_dict = model_or_state_dict
    save_file({k: v.detach().contiguous().clone() for k, v in state_dict.items()}, path)
    return path
