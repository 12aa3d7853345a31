"""Packaging: declared requirements (ranges for install, pins for `make`), and the wheel itself, installed into a
clean environment, builds a model and finds the project yamls by their project path."""

import ast
import importlib.metadata
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from helpers import REPO, subprocess_env

STDLIB = set(sys.stdlib_module_names)


def setup_literal(name):
    """A top-level literal assignment of setup.py (setup.py itself runs setup() on import)."""
    tree = ast.parse((REPO / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise KeyError(name)


def requirement_name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def pinned_requirements():
    lines = (REPO / "requirements.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_install_requires_gives_torch_a_range_and_python_310():
    install = setup_literal("INSTALL_REQUIRES")
    (torch_requirement,) = [r for r in install if requirement_name(r) == "torch"]
    assert "==" not in torch_requirement and ">=" in torch_requirement and "<" in torch_requirement
    assert 'python_requires=">=3.10"' in (REPO / "setup.py").read_text()
    assert "torch==2.14.1" in pinned_requirements()  # the exact pins stay where `make` reads them
    assert {requirement_name(r) for r in pinned_requirements()} == {requirement_name(r) for r in install}


def test_every_imported_package_is_declared():
    distributions = importlib.metadata.packages_distributions()
    optional = [r for extra in setup_literal("TRACKER_EXTRAS").values() for r in extra]  # imported only when asked
    declared = {requirement_name(r) for r in setup_literal("INSTALL_REQUIRES") + optional}
    imported = set()
    for path in (REPO / "lavis_xformer").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = imported - STDLIB - {"lavis_xformer"}
    missing = {}
    for module in sorted(third_party):
        names = {d.lower().replace("_", "-") for d in distributions.get(module, [module])}
        if not names & declared:
            missing[module] = sorted(names)
    assert not missing, f"imported but not in setup.py INSTALL_REQUIRES: {missing}"


def test_wheel_installs_into_a_clean_environment_and_finds_the_project_yamls(tmp_path):
    """Build the wheel from the tracked files, install it (no dependencies) into a fresh venv that sees the shared
    stack through a .pth file, and from a folder with no projects/: build the tiny model and check a demo yaml by
    its project path."""
    source = tmp_path / "src"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    for name in files:
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            (source / name).write_bytes((REPO / name).read_bytes())
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(source)], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("lavis_xformer-*.whl")

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "_shared_stack.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # torch, LAVIS, ...
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(site),
                    str(wheel)], check=True, capture_output=True, timeout=300)

    work = tmp_path / "elsewhere"
    work.mkdir()
    script = (
        "import sys, lavis_xformer; print('package', lavis_xformer.__file__)\n"
        "from lavis.models import load_model\n"
        "model = load_model('xformer', 'tiny'); print('model', type(model).__name__)\n"
        "from lavis_xformer import check\n"
        "sys.exit(check.main(['--cfg-path', 'projects/xformer/demo/pretrain_stage1_shapes.yaml', '--no-memory',\n"
        f"                    '--options', 'datasets.xformer_shapes_caption.shapes.root={tmp_path / 'shapes'}']))\n"
    )
    env = subprocess_env()
    env.pop("PYTHONPATH")  # the wheel, not this checkout
    result = subprocess.run([str(python), "-c", script], cwd=work, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0] == f"package {site / 'lavis_xformer' / '__init__.py'}"
    assert "model XFormer" in lines
    config_line = f"OK: config {site / 'lavis_xformer' / 'projects' / 'xformer' / 'demo'}/pretrain_stage1_shapes.yaml"
    assert any(line.startswith(config_line) for line in lines), lines
    for shipped in ("projects/xformer/train/pretrain_stage1.yaml", "run_scripts/xformer/torchrun.sh",
                    "configs/models/xformer/xformer_tiny.yaml"):
        assert (site / "lavis_xformer" / shipped).is_file(), shipped


@pytest.mark.parametrize("given", ["projects/xformer/train/pretrain_stage1.yaml",
                                   "projects/xformer/demo/ret_shapes_eval.yaml"])
def test_cfg_path_falls_back_to_the_package_only_when_no_such_file_is_here(given, tmp_path, monkeypatch):
    from lavis_xformer.paths import resolve_cfg_path

    monkeypatch.chdir(tmp_path)
    assert Path(resolve_cfg_path(given)).resolve() == (REPO / given).resolve()  # found beside the package
    local = tmp_path / given
    local.parent.mkdir(parents=True)
    local.write_text("model: {}\n")
    assert resolve_cfg_path(given) == given  # a file under the current folder wins, as LAVIS reads it
    assert resolve_cfg_path("nowhere.yaml") == "nowhere.yaml"
