"""Checkpoint files: reading them safely, loading them into a model with checks, writing them atomically, and
selecting a model's trainable weights (what a training checkpoint holds: frozen encoders are not saved, as in LAVIS).

* Reading -- ``torch.load(weights_only=True)``: a file that carries pickled code is refused, never run. Truncated
  files and shape mismatches raise errors naming the file and the keys; a file that matches no tensor of the model
  is refused; ``check_required_keys`` refuses a file lacking tensors the caller requires (the models' strict
  ``pretrained`` / ``finetuned`` loads). Every load logs one summary line of missing and unexpected keys, grouped by
  module.
* Writing -- ``save_checkpoint_atomically``: temporary file ``NAME.tmp-HOST-PID``, fsync, ``os.replace``; a process
  killed mid-save leaves the previous file intact.
* Trainable weights -- ``trainable_state_dict`` of a model, ``trainable_parameter_names`` of a model config.
"""

import io
import logging
import os
import pickle
import time
import zipfile
import zlib
from collections import Counter
from typing import Callable, Dict, Iterable, List, Optional

import torch

from lavis_xformer import testing
from lavis_xformer.common import jobs
from lavis_xformer.checkpoints.model_config import check_model_config
from lavis_xformer.checkpoints.names import (  # noqa: F401
    PRETRAINED_CARD, PRETRAINED_CONFIG, PRETRAINED_INDEX, PRETRAINED_WEIGHTS, CheckpointError)
from lavis_xformer.common.atomic import atomic_write
from lavis_xformer.testing import TEST_SAVE_DELAY_ENV  # noqa: F401  (re-exported by the package)

logger = logging.getLogger("lavis_xformer.checkpoints")

# ---------------------------------------------------------------------------------------------------------------
# Reading, and loading into a model
# ---------------------------------------------------------------------------------------------------------------
def _is_url(path: str) -> bool:
    return path.startswith(("http://", "https://"))


def read_checkpoint(path: str) -> dict:
    """Load a checkpoint dict from a path or URL with ``weights_only=True``.

    Raises ``CheckpointError`` naming the file when it is missing, truncated, carries pickled code, fails its tensor
    checksums, or is a URL in offline mode.
    """
    if _is_url(path):
        if offline():
            raise CheckpointError(f"checkpoint {path!r} is a URL and offline mode is on (HF_HUB_OFFLINE / "
                                  "TRANSFORMERS_OFFLINE / LAVIS_XFORMER_OFFLINE): download it and give the file path")
        from lavis.common.dist_utils import download_cached_file

        path = download_cached_file(path, check_hash=False, progress=True)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, PRETRAINED_INDEX)):
        return {"model": read_sharded_weights(path)}  # a sharded folder written by ``save_pretrained``
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
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
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
    verify_checksums(checkpoint, path)
    return checkpoint


def read_sharded_weights(folder: str) -> Dict[str, torch.Tensor]:
    """The state dict of a sharded folder: ``model.safetensors.index.json``'s ``weight_map`` (name -> shard file,
    as transformers writes it) read shard by shard; a shard that is missing, or lacks a tensor the index names, or a
    path that leaves the folder is a ``CheckpointError``."""
    import json

    from safetensors.torch import load_file

    index_path = os.path.join(folder, PRETRAINED_INDEX)
    try:
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{index_path} is not a safetensors index (a JSON object with a weight_map): {err}") from err
    state_dict: Dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        if os.path.basename(shard) != shard:
            raise CheckpointError(f"{index_path} names a shard outside its folder: {shard!r}")
        shard_path = os.path.join(folder, shard)
        if not os.path.isfile(shard_path):
            raise CheckpointError(f"{index_path} names the shard {shard!r}, which is missing from {folder}")
        try:
            state_dict.update(load_file(shard_path, device="cpu"))
        except Exception as err:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"shard {shard_path!r} is not a readable safetensors file: {err}") from err
    absent = sorted(set(weight_map) - set(state_dict))
    if absent:
        raise CheckpointError(f"the shards of {folder} lack {len(absent)} tensor(s) its index names: {absent[:5]}")
    return state_dict


def offline() -> bool:
    """Offline mode: ``HF_HUB_OFFLINE``, ``TRANSFORMERS_OFFLINE`` or ``LAVIS_XFORMER_OFFLINE`` set to 1/true/yes."""
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
               for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "LAVIS_XFORMER_OFFLINE"))


# ---------------------------------------------------------------------------------------------------------------
# Integrity: tensor checksums written with a checkpoint, verified when it is read; finite trainable weights
# ---------------------------------------------------------------------------------------------------------------
CHECKSUM_KEY = "checksums"  # {"algorithm": "crc32", "tensors": {"model/w": "1a2b3c4d", ...}}


def _tensors(obj, prefix=""):
    """``(path, tensor)`` for every tensor in nested dicts / lists / tuples (paths like ``optimizer/state/0/exp_avg``)."""
    if torch.is_tensor(obj):
        yield prefix, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            if not (prefix == "" and key == CHECKSUM_KEY):
                yield from _tensors(value, f"{prefix}/{key}" if prefix else str(key))
    elif isinstance(obj, (list, tuple)):
        for index, value in enumerate(obj):
            yield from _tensors(value, f"{prefix}/{index}")


def _crc32(tensor: torch.Tensor) -> str:
    data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return f"{zlib.crc32(memoryview(data)) & 0xFFFFFFFF:08x}"


def tensor_checksums(checkpoint: dict) -> dict:
    """A CRC-32 of every tensor's bytes (torch does not check its zip's CRCs: flipped bytes load silently)."""
    return {"algorithm": "crc32", "tensors": {path: _crc32(t) for path, t in _tensors(checkpoint)}}


def verify_checksums(checkpoint, source: str) -> None:
    """A checkpoint that carries ``checksums`` must match them: a differing or missing tensor is a
    ``CheckpointError`` naming the file and the tensor. Files without checksums (older, LAVIS's) pass."""
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get(CHECKSUM_KEY), dict):
        return
    expected = checkpoint[CHECKSUM_KEY].get("tensors") or {}
    actual = dict(_tensors(checkpoint))
    bad = [path for path, digest in expected.items() if path not in actual or _crc32(actual[path]) != digest]
    if bad:
        raise CheckpointError(
            f"checkpoint {source!r} is corrupt: {len(bad)} tensor(s) do not match the checksums written with it "
            f"({', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''}); the file was damaged after it was saved. "
            "Resume from an earlier checkpoint (run.resume_ckpt_path=auto skips this one)")


def check_finite_trainable(model, state_dict, source: str) -> None:
    """Refuse NaN/inf in the tensors of ``state_dict`` that are trainable parameters of ``model``."""
    trainable = _parameter_names(model, trainable=True)
    bad = [key for key, value in state_dict.items()
           if key in trainable and torch.is_tensor(value) and value.is_floating_point()
           and not bool(torch.isfinite(value).all())]
    if bad:
        raise CheckpointError(
            f"checkpoint {source!r} holds non-finite (NaN/inf) values in {len(bad)} trainable tensor(s) of "
            f"{type(model).__name__}: {', '.join(bad[:5])}. It came from a diverged run or a damaged file: use an "
            "earlier checkpoint")


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
    check_finite_trainable(model, state_dict, source)
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

    checkpoint = read_checkpoint(path)
    check_model_config(checkpoint, model, path)  # its stored model config against this model's, field by field
    state_dict = extract_state_dict(checkpoint)
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
def save_checkpoint_atomically(obj, path) -> str:
    """``torch.save`` to ``path`` so that a reader sees the old file or the complete new one, never a torn one
    (``common.atomic.atomic_write``; the temporary file names its writer, for ``remove_interrupted_saves``); a dict
    gets the ``checksums`` of its tensors (``tensor_checksums``), which ``read_checkpoint`` verifies."""
    path = os.fspath(path)
    if isinstance(obj, dict):  # verified by ``read_checkpoint``
        obj = {**{k: v for k, v in obj.items() if k != CHECKSUM_KEY}, CHECKSUM_KEY: tensor_checksums(obj)}
    delay = testing.save_delay(path)  # a test hook; 0 in real runs

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
    return readable_by_all(path)


def readable_by_all(path):
    """Give ``path`` the mode a plain ``open`` gives (0644 under the usual umask 022): safetensors writes through a
    temporary file, which is created 0600. Returns ``path``."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)
    return path
