"""lavis-xformer: X-Former (arXiv 2407.13851) as a plugin for Salesforce LAVIS."""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent


# What pip resolves against when the plugin is installed into an existing environment (a cluster with its own CUDA
# build of torch keeps it). Ranges, not pins: the exact versions this project is tested with are pinned in
# requirements.txt, which `make setup` installs. LAVIS, transformers and timm stay exact: the plugin subclasses
# their internals (README "Install").
INSTALL_REQUIRES = [
    "torch>=2.3,<3",  # torch.get_default_device (2.3), SDPA, FlopCounterMode, torch.load(weights_only, mmap)
    "torchvision>=0.18",
    "salesforce-lavis==1.0.2",
    "transformers==4.26.1",
    "timm==0.4.12",
    "tokenizers>=0.13,<0.14",  # what transformers 4.26.1 accepts
    "huggingface-hub>=0.24",  # try_to_load_from_cache (check), save_torch_state_dict (sharded exports)
    "numpy>=1.21,<2",  # LAVIS's opencv-python-headless 4.5 fails against numpy 2
    "pandas<3",  # pandas 3 needs numpy 2
    "pillow>=9",
    "scipy>=1.15",  # scipy.stats.bootstrap(rng=...)
    "matplotlib>=3.7",
    "pydantic>=2",  # models/config.py: strict type checks of the model configs
    "fairscale",
    "omegaconf>=2.1",
    "pycocotools",
    "pycocoevalcap",
    "safetensors>=0.3",
    "pyyaml",  # check: reads the project yamls as plain yaml (fast)
    "scikit-learn>=1.3",  # the experiment's fixed linear probe (lavis_xformer/experiment)
]

# Trackers for run.loggers (lavis_xformer/runners/trackers.py): optional, imported only when a run asks for them
TRACKER_EXTRAS = {
    "tensorboard": ["tensorboard"],
    "wandb": ["wandb>=0.17"],
}

# The top-level configs/, projects/ and run_scripts/ folders ship inside the package as lavis_xformer/configs,
# lavis_xformer/projects and lavis_xformer/run_scripts, so model and dataset configs, the training recipes and their
# launch scripts resolve from a wheel as from an editable checkout (lavis_xformer.paths looks in both places;
# --cfg-path projects/xformer/... finds the packaged yaml when no such file is under the current folder).
SHIPPED_FOLDERS = {
    "lavis_xformer.configs": ("configs", ("*.yaml",)),
    "lavis_xformer.projects": ("projects", ("*.yaml",)),
    "lavis_xformer.run_scripts": ("run_scripts", ("*.sh",)),
}


def folder_files(folder: str, patterns) -> list:
    """Files under a top-level folder, relative to it, for package_data."""
    return sorted(str(p.relative_to(ROOT / folder)) for pattern in patterns for p in (ROOT / folder).rglob(pattern))


setup(
    name="lavis-xformer",
    version="0.1.0",
    description="X-Former (Unifying Contrastive and Reconstruction Learning for MLLMs) as a LAVIS plugin",
    long_description=(ROOT / "README.md").read_text(),
    long_description_content_type="text/markdown",
    license="BSD-3-Clause",
    python_requires=">=3.10",
    packages=find_packages(include=["lavis_xformer", "lavis_xformer.*"]) + list(SHIPPED_FOLDERS),
    package_dir={package: folder for package, (folder, _) in SHIPPED_FOLDERS.items()},
    package_data={
        "lavis_xformer": ["assets/*"],
        **{package: folder_files(folder, patterns) for package, (folder, patterns) in SHIPPED_FOLDERS.items()},
    },
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "test": (ROOT / "requirements-test.txt").read_text().split(),
        **TRACKER_EXTRAS,
    },
    entry_points={
        "console_scripts": [
            "lavis-xformer = lavis_xformer.cli:main",  # one command line: lavis-xformer {train,evaluate,check,...}
            "lavis-xformer-train = lavis_xformer.train:main",
            "lavis-xformer-evaluate = lavis_xformer.evaluate:main",
            "lavis-xformer-compare = lavis_xformer.analysis.compare:cli",
            "lavis-xformer-check = lavis_xformer.check:main",
        ]
    },
)
