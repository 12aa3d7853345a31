"""The package's modules import each other without a circle.

Every ``import`` / ``from ... import`` statement counts, wherever it stands: at module level, inside a function or
under an ``if``. A function-level import that closes a circle hides the circle, it does not remove it (the circle
this test was written for, ``checkpoints`` <-> ``models.builders``, was made of function-level imports only). An
edge goes to the module named in the statement (``from a.b import c`` -> ``a.b.c`` if that is a module, else
``a.b``); the parent packages that Python initialises on the way are not counted as edges.
"""

import ast
from pathlib import Path
from typing import Dict, List, Set

import lavis_xformer

PACKAGE_DIR = Path(lavis_xformer.__file__).resolve().parent


def module_files(package_dir: Path) -> Dict[str, Path]:
    """``{"pkg.sub.mod": path}`` for every .py file of the package (a package's ``__init__`` is ``"pkg.sub"``)."""
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def import_graph(package_dir: Path) -> Dict[str, Set[str]]:
    """Module -> the package's modules it imports (anywhere in its file)."""
    modules = module_files(package_dir)
    root = package_dir.name
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: up (level - 1) packages from this module's package
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in node.names:
                    candidate = f"{base}.{alias.name}"
                    targets.add(candidate if candidate in modules else base)
        graph[name] = {t for t in targets if t in modules and t.split(".")[0] == root and t != name}
    return graph


def find_cycle(graph: Dict[str, Set[str]]) -> List[str]:
    """One import circle as ``[a, b, ..., a]``, or ``[]`` (depth-first search)."""
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    path: List[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return []


def test_the_package_has_no_import_circle():
    graph = import_graph(PACKAGE_DIR)
    # the walker sees the package: the edges the layering rests on are there
    assert "lavis_xformer.checkpoints" in graph["lavis_xformer.models.builders"]
    assert "lavis_xformer.common.distributed" in graph["lavis_xformer.models.xformer"]
    assert "lavis_xformer.checkpoints" in graph["lavis_xformer.runners.resume"]
    cycle = find_cycle(graph)
    assert cycle == [], "import circle: " + " -> ".join(cycle)


def test_checkpoints_and_distributed_sit_below_the_models():
    """``checkpoints`` (the package), ``testing`` and ``common.*`` import nothing of the models, runners or tasks
    (the models import them)."""
    graph = import_graph(PACKAGE_DIR)
    low_prefixes = ("lavis_xformer.checkpoints", "lavis_xformer.common", "lavis_xformer.testing")
    low = [name for name in graph if name.startswith(low_prefixes)]
    assert "lavis_xformer.checkpoints.files" in low and "lavis_xformer.checkpoints" in low
    for name in low:
        assert all(t.startswith(low_prefixes) for t in graph[name]), (name, graph[name])


def test_a_circle_through_a_function_level_import_is_found(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg.sub import b\n")
    (package / "sub" / "b.py").write_text("def load():\n    from ..c import thing\n    return thing\n")
    (package / "c.py").write_text("import os\n\n\ndef thing():\n    import pkg.a\n")
    graph = import_graph(package)
    assert graph["pkg.a"] == {"pkg.sub.b"} and graph["pkg.sub.b"] == {"pkg.c"} and graph["pkg.c"] == {"pkg.a"}
    assert find_cycle(graph) == ["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]
    (package / "c.py").write_text("import os\n")
    assert find_cycle(import_graph(package)) == []
