"""Where the plugin's yaml configs live, for an editable install and for a wheel alike.

The repository keeps them in a top-level ``configs/`` folder; ``setup.py`` ships that folder inside the package as
``lavis_xformer/configs``. LAVIS accepts absolute paths in ``PRETRAINED_MODEL_CONFIG_DICT`` and dataset builders.
"""

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
