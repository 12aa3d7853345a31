"""Where the plugin's yaml configs live, for an editable install and for a wheel alike.

The repository keeps them in a top-level ``configs/`` folder; ``setup.py`` ships that folder inside the package as
``lavis_xformer/configs``. LAVIS accepts absolute paths in ``PRETRAINED_MODEL_CONFIG_DICT`` and dataset builders.
"""

import os
import re
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def configs_root() -> Path:
    for candidate in (_PACKAGE / "configs", _PACKAGE.parent / "configs"):
        if (candidate / "models").is_dir():
            return candidate
    raise FileNotFoundError(
        f"lavis_xformer's configs/ folder was found neither in {_PACKAGE} nor in {_PACKAGE.parent}; "
        "reinstall the package (pip install -e . from the repository, or the wheel)"
    )


def model_config_path(relative: str) -> str:
    return str(configs_root() / "models" / relative)


def dataset_config_path(relative: str) -> str:
    return str(configs_root() / "datasets" / relative)


# ---------------------------------------------------------------------------------------------------------------
# Project yamls and run scripts (shipped inside the package as lavis_xformer/projects, lavis_xformer/run_scripts)
# ---------------------------------------------------------------------------------------------------------------
def projects_root() -> Path:
    """The ``projects/`` folder: inside the package (a wheel) or beside it (a checkout)."""
    for candidate in (_PACKAGE / "projects", _PACKAGE.parent / "projects"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"lavis_xformer's projects/ folder was found neither in {_PACKAGE} nor in {_PACKAGE.parent}; reinstall the package"
    )


# A path placeholder the project yamls carry until the user sets it, such as <job_id>.
PLACEHOLDER = re.compile(r"<[^<>/]+>")


def resolve_cfg_path(cfg_path) -> str:
    """``--cfg-path`` as given when that file exists (relative to the current folder, as LAVIS reads it); else a
    project path such as ``projects/xformer/train/pretrain_stage1.yaml`` found in the installed package (a wheel
    ships ``projects/`` and ``run_scripts/`` inside ``lavis_xformer``). Unchanged when neither exists, so the
    caller's error names the path the user typed."""
    path = Path(os.path.expanduser(str(cfg_path)))
    if path.is_file() or path.is_absolute():
        return str(path)
    for base in (_PACKAGE, _PACKAGE.parent):
        candidate = base / path
        if candidate.is_file():
            return str(candidate)
    return str(cfg_path)


# ---------------------------------------------------------------------------------------------------------------
# LAVIS's cache_root
# ---------------------------------------------------------------------------------------------------------------
LAVIS_SHIPPED_CACHE_ROOT = "/export/home/.cache/lavis"  # lavis/configs/default.yaml, Salesforce's internal storage


def user_cache_root() -> Path:
    """``$LAVIS_CACHE_ROOT`` if set, else ``lavis`` in the user's cache folder (``$XDG_CACHE_HOME`` or ~/.cache)."""
    if os.environ.get("LAVIS_CACHE_ROOT"):
        return Path(os.path.expanduser(os.environ["LAVIS_CACHE_ROOT"]))
    cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache_home) / "lavis"


def apply_cache_root() -> str:
    """Point LAVIS's ``cache_root`` (where every dataset's relative paths live) away from its shipped default
    ``/export/home/.cache/lavis``, which a user cannot create: to ``$LAVIS_CACHE_ROOT`` when set (it always wins),
    else, when LAVIS still has its shipped default, to the user's cache folder. A cache_root edited in LAVIS's
    default.yaml is kept. Returns the cache_root in force."""
    from lavis.common.registry import registry

    current = os.path.normpath(registry.get_path("cache_root"))
    if os.environ.get("LAVIS_CACHE_ROOT") or current == LAVIS_SHIPPED_CACHE_ROOT:
        registry.mapping["paths"]["cache_root"] = str(user_cache_root())
    return registry.get_path("cache_root")
