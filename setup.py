"""lavis-xformer: X-Former (arXiv 2407.13851) as a plugin for Salesforce LAVIS."""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent


def requirements():
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


# The top-level configs/ folder ships inside the package as lavis_xformer/configs, so model and dataset configs
# resolve from a wheel as from an editable checkout (lavis_xformer.paths looks in both places).
config_files = [str(p.relative_to(ROOT / "configs")) for p in (ROOT / "configs").rglob("*.yaml")]

setup(
    name="lavis-xformer",
    version="0.1.0",
    description="X-Former (Unifying Contrastive and Reconstruction Learning for MLLMs) as a LAVIS plugin",
    long_description=(ROOT / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["lavis_xformer", "lavis_xformer.*"]) + ["lavis_xformer.configs"],
    package_dir={"lavis_xformer.configs": "configs"},
    package_data={"lavis_xformer": ["assets/*"], "lavis_xformer.configs": config_files},
    install_requires=requirements(),
    extras_require={"test": (ROOT / "requirements-test.txt").read_text().split()},
    entry_points={
        "console_scripts": [
            "lavis-xformer-train = lavis_xformer.train:main",
            "lavis-xformer-evaluate = lavis_xformer.evaluate:main",
            "lavis-xformer-compare = lavis_xformer.analysis.compare:cli",
        ]
    },
)
