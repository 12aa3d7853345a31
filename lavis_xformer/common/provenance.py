"""What produced a set of numbers: the resolved config, the checkpoints with their sha256 and stored config, the
package versions and the git commit, written as ``provenance.json`` into an evaluation's output folder.

    write_for_runner(runner)       -> <output_dir>/provenance.json   (python -m lavis_xformer.evaluate)
    checkpoint_identity(path)      -> {"path", "sha256", "size"}     (also part of compare's cache keys)
    environment()                  -> {"packages": {...}, "python", "git": {"commit", "dirty"} | None}

The checkpoints are the files the model section names (``pretrained`` / ``finetuned`` when loaded, and the other
weight fields that name a local file: ``qformer_text_init``, ``vit_weights``, ``mae_weights``, ``qformer_weights``,
``opt_model`` / ``t5_model`` folders are recorded by path only). A LAVIS checkpoint stores the run config that
trained it (``"config"``); it is copied in, so an evaluation folder says what trained the weights it scored.
"""

import hashlib
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Optional

PACKAGES = ("torch", "torchvision", "transformers", "salesforce-lavis", "timm", "numpy", "pycocoevalcap", "omegaconf")
WEIGHT_FIELDS = ("qformer_text_init", "vit_weights", "mae_weights", "qformer_weights", "opt_model", "t5_model")
FILENAME = "provenance.json"

_SHA256 = {}  # (path, size, mtime_ns) -> digest: a checkpoint is hashed once per process


def sha256(path) -> str:
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA256:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
        _SHA256[key] = digest.hexdigest()
    return _SHA256[key]


def checkpoint_identity(path) -> Optional[dict]:
    """{"path", "sha256", "size"} of a checkpoint file; a folder (a hub-format LLM) or a missing path by path only."""
    if not path:
        return None
    resolved = Path(os.path.expanduser(str(path))).resolve()
    if resolved.is_file():
        return {"path": str(resolved), "sha256": sha256(resolved), "size": resolved.stat().st_size}
    return {"path": str(resolved), "sha256": None, "exists": resolved.exists()}


def stored_config(path) -> Optional[dict]:
    """The run config a LAVIS checkpoint stores (``"config"``), or None."""
    import torch

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception:  # not a torch file (e.g. a hub folder): nothing stored to report
        return None
    return checkpoint.get("config") if isinstance(checkpoint, dict) else None


def git_state(start=None) -> Optional[dict]:
    """{"commit", "dirty"} of the git work tree holding ``start`` (default: this package), or None outside one."""
    folder = Path(start or Path(__file__).resolve().parent)
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return None
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=folder,
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


def environment() -> dict:
    packages = {}
    for name in PACKAGES:
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = None
    packages["lavis-xformer"] = getattr(sys.modules.get("lavis_xformer"), "__version__", None)
    return {"packages": packages, "python": sys.version.split()[0], "platform": platform.platform(), "git": git_state()}


def model_checkpoints(model_cfg) -> dict:
    """The weight files a model section loads: field -> identity (+ the checkpoint's stored config)."""
    fields = []
    if model_cfg.get("load_finetuned", False):
        fields.append("finetuned")
    if model_cfg.get("load_pretrained", False):
        fields.append("pretrained")
    fields += [name for name in WEIGHT_FIELDS if model_cfg.get(name, None)]
    checkpoints = {}
    for name in fields:
        value = model_cfg.get(name, None)
        if not value:
            continue
        identity = checkpoint_identity(value)
        if identity["sha256"] is None and not identity.get("exists"):
            identity = {"name": str(value)}  # a hub name or URL, not a local file
        elif identity["sha256"] is not None and name in ("finetuned", "pretrained", "qformer_text_init"):
            identity["stored_config"] = stored_config(identity["path"])
        checkpoints[name] = identity
    return checkpoints


def provenance(config: dict) -> dict:
    """The provenance record of a run whose resolved config is ``config`` ({"model", "datasets", "run"})."""
    return {
        "config": config,
        "checkpoints": model_checkpoints(config.get("model", {})),
        **environment(),
        "command": sys.argv,
    }


def write(config: dict, output_dir) -> Path:
    """``provenance.json`` in ``output_dir`` (written atomically)."""
    path = Path(output_dir) / FILENAME
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{FILENAME}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(provenance(config), indent=1, default=str) + "\n")
    os.replace(tmp, path)
    return path


def write_for_runner(runner) -> Optional[Path]:
    """The runner's resolved config and checkpoints into its output folder (rank 0 only)."""
    from lavis.common.dist_utils import is_main_process

    if not is_main_process():
        return None
    return write(runner.config.to_dict(), runner.output_dir)
