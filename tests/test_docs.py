"""The README and docs/ stay a way in: every page linked, every link resolves, every documented command runs.

The commands are collected from the text (``python -m lavis_xformer...`` and ``torchrun ... -m lavis_xformer...``)
and each is asked for ``--help`` in one subprocess, so the heavy imports are paid once.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = REPO / "docs"
README_MAX_LINES = 250

_LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
_MODULE_COMMAND = re.compile(r"(?:python|torchrun)\b[^\n`]*?\s-m\s+(lavis_xformer(?:\.[A-Za-z_][A-Za-z0-9_]*)*)")


def _pages():
    return [README] + sorted(DOCS.glob("*.md"))


def documented_modules():
    modules = set()
    for page in _pages():
        modules.update(_MODULE_COMMAND.findall(page.read_text()))
    return sorted(modules)


def test_readme_is_short():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines (at most {README_MAX_LINES})"


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(README.parent / target).resolve() for target in _LINK.findall(README.read_text())}
    pages = sorted(DOCS.glob("*.md"))
    assert pages, "docs/ holds no pages"
    unlinked = [page.name for page in pages if page.resolve() not in linked]
    assert not unlinked, f"docs pages not linked from README.md: {unlinked}"


def test_every_relative_link_resolves():
    broken = []
    for page in _pages():
        for target in _LINK.findall(page.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(REPO)} -> {target}")
    assert not broken, f"links to nothing: {broken}"


def test_command_collection_finds_the_entry_points():
    # Guards the pattern itself: the README's quick start names these, so a broken regex cannot pass vacuously.
    modules = documented_modules()
    for expected in ("lavis_xformer.train", "lavis_xformer.evaluate", "lavis_xformer.check", "lavis_xformer.demo"):
        assert expected in modules


_HELP_ALL = r"""
import contextlib, io, json, runpy, sys
results = {}
for module in sys.argv[1:]:
    out = io.StringIO()
    sys.argv = [module, "--help"]
    code = None
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exit:
        code = exit.code
    except BaseException as error:  # report it, keep going with the other modules
        code = f"{type(error).__name__}: {error}"
    text = out.getvalue()
    results[module] = {"code": code, "usage": "usage:" in text.lower(), "output": text[-1500:]}
print("RESULTS" + json.dumps(results))
"""


def test_every_documented_command_answers_help():
    modules = documented_modules()
    proc = subprocess.run(
        [sys.executable, "-c", _HELP_ALL, *modules], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert "RESULTS" in proc.stdout, proc.stderr[-4000:]
    results = json.loads(proc.stdout.split("RESULTS", 1)[1])
    failed = {
        module: result
        for module, result in results.items()
        if result["code"] not in (0, None) or not result["usage"]
    }
    assert not failed, f"documented commands whose --help fails: {failed}"


def test_layout_names_every_module_and_only_modules_that_exist():
    text = README.read_text()
    layout = text[text.index("<!-- layout:begin -->") : text.index("<!-- layout:end -->")]
    listed = set(re.findall(r"^- `([\w/]+\.py)`", layout, flags=re.M))
    package = REPO / "lavis_xformer"
    modules = {
        str(path.relative_to(package))
        for path in package.rglob("*.py")
        if path.name != "__init__.py" or path.parent == package
    }
    assert not listed - modules, f"README Layout names modules that do not exist: {sorted(listed - modules)}"
    assert not modules - listed, f"modules missing from README's Layout (one line each): {sorted(modules - listed)}"


def test_every_test_file_the_docs_name_exists():
    named = set()
    for page in _pages():
        named.update(re.findall(r"(?<![.\w])(test_[a-z0-9_]+?)(?:\.py)?\b", page.read_text()))
    files = {path.stem for path in (REPO / "tests").glob("test_*.py")}
    functions = set()
    for path in (REPO / "tests").glob("test_*.py"):
        functions.update(re.findall(r"^def (test_\w+)", path.read_text(), flags=re.M))
    missing = sorted(name for name in named if name not in files and name not in functions)
    assert not missing, f"docs name test files that do not exist: {missing}"
