"""Imports point down the pipeline (ARCHITECTURE.md): read with `ast`, every import of every
library module, the lazy ones inside functions too, so a crossed layer fails here at once."""

import ast
import os

import networkx as nx
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Top-level folders and the package they install as (pyproject's package-dir).
PACKAGES = {"mkcompiler": "mkcompiler", "ops": "mkcompiler.ops", "passes": "mkcompiler.passes"}

# layer (a module-name prefix) -> prefixes it must never import
FORBIDDEN = {
    "mkcompiler.ir": ["mkcompiler"],  # the IR imports nothing of ours but itself
    "mkcompiler.ops": [
        "mkcompiler.passes",
        "mkcompiler.backends",
        "mkcompiler.runtime",
        "mkcompiler.api",
        "mkcompiler.tools",
        "mkcompiler.tp",
        "mkcompiler.frontend",
    ],
    "mkcompiler.passes": ["mkcompiler.backends", "mkcompiler.runtime", "mkcompiler.api", "mkcompiler.tools"],
    "mkcompiler.vm": ["mkcompiler.runtime", "mkcompiler.backends", "mkcompiler.api", "mkcompiler.tools"],
    "mkcompiler.frontend": ["mkcompiler.backends", "mkcompiler.runtime", "mkcompiler.api", "mkcompiler.passes"],
    "mkcompiler.backends": ["mkcompiler.runtime", "mkcompiler.api", "mkcompiler.tools"],
}
ALLOWED = {"mkcompiler.ir": ["mkcompiler.ir"]}  # exceptions to a FORBIDDEN prefix, per layer


def library_modules() -> dict[str, str]:
    """module name -> file path, for every library module."""
    found = {}
    for top, package in PACKAGES.items():
        for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
            for name in files:
                if not name.endswith(".py"):
                    continue
                rel = os.path.relpath(os.path.join(dirpath, name), os.path.join(ROOT, top))[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                found[".".join([package, *rel])] = os.path.join(dirpath, name)
    return found


def imports_of(path: str) -> list[tuple[int, str]]:
    """(line, module) for every import in the file; `from a import b` counts as a.b when a.b is a
    module we have, else as a."""
    modules = library_modules()
    tree = ast.parse(open(path).read(), path)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.append((node.lineno, sub if sub in modules else node.module))
    return found


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def violations() -> list[str]:
    bad = []
    for module, path in sorted(library_modules().items()):
        for layer, forbidden in FORBIDDEN.items():
            if not _under(module, layer):
                continue
            for line, imported in imports_of(path):
                if any(_under(imported, a) for a in ALLOWED.get(layer, [])):
                    continue
                if any(_under(imported, f) for f in forbidden):
                    bad.append(f"{os.path.relpath(path, ROOT)}:{line}: {layer} imports {imported}")
    return bad


def test_imports_point_down():
    assert violations() == []


def test_the_check_can_fail(tmp_path, monkeypatch):
    """A pass importing the runtime is caught (the test is not vacuous)."""
    (tmp_path / "passes").mkdir()
    (tmp_path / "passes" / "bad.py").write_text("def f():\n    from mkcompiler.runtime import megakernel\n")
    (tmp_path / "mkcompiler" / "runtime").mkdir(parents=True)
    (tmp_path / "mkcompiler" / "runtime" / "megakernel.py").write_text("")
    (tmp_path / "ops").mkdir()
    monkeypatch.setattr(f"{__name__}.ROOT", str(tmp_path))
    assert violations() == ["passes/bad.py:2: mkcompiler.passes imports mkcompiler.runtime.megakernel"]


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_every_layer_exists(layer):
    assert any(_under(m, layer) for m in library_modules()), f"no module in layer {layer}"


def module_level_imports() -> nx.DiGraph:
    """module -> the library modules it imports when it is imported (top-level statements only:
    a function's lazy import, as ops/registry.load_all's, runs later)."""
    modules = library_modules()
    graph = nx.DiGraph()
    for module, path in modules.items():
        graph.add_node(module)
        for node in ast.parse(open(path).read(), path).body:
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [
                    f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                    for a in node.names
                ]
            else:
                continue
            for name in names:
                while name and name not in modules:
                    name = name.rpartition(".")[0]
                if name and name != module and not module.startswith(name + "."):
                    graph.add_edge(module, name)
    return graph


def test_no_import_circles():
    assert list(nx.simple_cycles(module_level_imports())) == []
