"""The package architecture: import-linter's contracts, and no import cycle between modules.

The contracts (`[tool.importlinter]` in pyproject.toml) give the layers of `engine` and keep
`kernels` below it. Layers do not exclude cycles inside one package, so the second test looks
at every module of `engine` and `kernels`: no two modules may depend on each other, directly or
through others. grimp's graph counts every import that runs, also those inside functions (a
deferred import still ties the two modules together; deferring it only hides the circle), but
not those under ``if TYPE_CHECKING:``, which never run: two modules may name each other's types
in annotations (the layers contract still counts those imports).

One kind of edge is not a dependency: a submodule that imports a name *through* its own
package (``from engine.pkg import f`` in ``engine/pkg/b.py``) while ``engine/pkg/__init__.py``
re-exports ``f`` from ``engine/pkg/a.py`` depends on ``engine.pkg.a``, not on the package, whose
``__init__`` is only a facade; counting the package would close a trivial circle
``engine.pkg -> engine.pkg.b -> engine.pkg`` whenever the package also re-exports from ``b``.
Such imports are resolved to the module that defines the name (`_resolve_package_imports`); a
name the ``__init__`` defines itself stays a dependency on the package. (grimp adds no edge from
a submodule to its parent for the implicit import of the parent that Python performs first.)
"""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import grimp

from tests.paths import REPO

PACKAGES = ("engine", "kernels")


def test_import_linter_contracts_are_kept():
    result = subprocess.run(
        [sys.executable, "-c", "from importlinter.cli import lint_imports_command as c; c()",
         "--no-logo", "--no-cache"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0, (
        f"lint-imports failed (contracts in pyproject.toml):\n{result.stdout}{result.stderr}"
    )


def _module_file(module: str) -> Path:
    """The source of ``module`` (a package's ``__init__.py``), without importing anything."""
    root, *rest = module.split(".")
    spec = importlib.util.find_spec(root)
    assert spec is not None and spec.origin is not None, root
    base = Path(spec.origin).parent.joinpath(*rest)
    return base / "__init__.py" if (base / "__init__.py").is_file() else base.with_suffix(".py")


def _absolute(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    """The module an ``from X import ...`` in ``module`` names, relative imports resolved."""
    if node.level == 0:
        return node.module or ""
    parts = module.split(".")
    base = parts if is_package else parts[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _reexports(graph: grimp.ImportGraph, package: str) -> dict[str, str]:
    """Names the package's ``__init__`` binds by importing them from its own submodules."""
    path = _module_file(package)
    if not path.is_file():
        return {}
    exported = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            source = _absolute(package, node, is_package=True)
            if source.startswith(package + "."):
                for alias in node.names:
                    submodule = f"{source}.{alias.name}"
                    exported[alias.asname or alias.name] = (
                        submodule if submodule in graph.modules else source
                    )
    return exported


def _resolve_package_imports(graph: grimp.ImportGraph, importer: str, package: str) -> set[str]:
    """What ``importer`` (inside ``package``) really depends on when it imports ``package``."""
    path = _module_file(importer)
    if not path.is_file():
        return {package}
    exported = _reexports(graph, package)
    # The statements grimp counted (so none under ``if TYPE_CHECKING:``).
    lines = {
        d["line_number"] for d in graph.get_import_details(importer=importer, imported=package)
    }
    targets = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        if getattr(node, "lineno", None) not in lines:
            continue
        if isinstance(node, ast.Import) and any(a.name == package for a in node.names):
            targets.add(package)  # ``import engine.pkg``: attributes of the package itself
        elif isinstance(node, ast.ImportFrom):
            if _absolute(importer, node, is_package) != package:
                continue
            for alias in node.names:
                name = alias.name
                if f"{package}.{name}" in graph.modules:
                    targets.add(f"{package}.{name}")
                elif name in exported:
                    targets.add(exported[name])
                elif _is_compiled_submodule(package, name):
                    pass  # an extension module (no Python imports of ours inside)
                else:
                    targets.add(package)  # defined in the __init__ itself
    targets.discard(importer)
    return targets


def _is_compiled_submodule(package: str, name: str) -> bool:
    """``package.name`` is an extension module (grimp sees only Python sources)."""
    folder = _module_file(package).parent
    return any(folder.glob(f"{name}.*.so")) or any(folder.glob(f"{name}.*.pyd"))


def import_graph(packages: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    """Module -> the modules it imports at run time, within ``packages``."""
    graph = grimp.build_graph(*packages, exclude_type_checking_imports=True, cache_dir=None)
    edges: dict[str, set[str]] = {}
    for module in graph.modules:
        edges[module] = set()
        for imported in graph.find_modules_directly_imported_by(module):
            if module.startswith(imported + "."):  # a submodule importing its own package
                edges[module] |= _resolve_package_imports(graph, module, imported)
            else:
                edges[module].add(imported)
    return edges


def strongly_connected_components(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative): the components of the graph, each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            for successor in successors:
                if successor not in index:
                    index[successor] = low[successor] = len(index)
                    stack.append(successor)
                    on_stack.add(successor)
                    work.append((successor, iter(sorted(edges.get(successor, ())))))
                    break
                if successor in on_stack:
                    low[node] = min(low[node], index[successor])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    components.append(sorted(component))
    return components


def _a_cycle(edges: dict[str, set[str]], component: list[str]) -> list[str]:
    """One concrete circle through the component's first module (a shortest one)."""
    members, start = set(component), component[0]
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for successor in sorted(edges[node] & members):
                if successor == start:
                    return paths[node] + [start]
                if successor not in paths:
                    paths[successor] = paths[node] + [successor]
                    following.append(successor)
        frontier = following
    return component


def test_no_import_cycles():
    edges = import_graph()
    cycles = [c for c in strongly_connected_components(edges) if len(c) > 1]
    report = "\n".join(
        f"- {', '.join(c)}\n  e.g. {' -> '.join(_a_cycle(edges, c))}" for c in cycles
    )
    assert not cycles, f"modules that import each other (directly or through others):\n{report}"


def test_cycle_detection_sees_a_circle():
    """The check itself: a circle of three, a module importing into it, a lone module."""
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    cycles = [c for c in strongly_connected_components(edges) if len(c) > 1]
    assert cycles == [["a", "b", "c"]]
    assert _a_cycle(edges, cycles[0]) == ["a", "b", "c", "a"]


def test_a_circle_through_a_package_is_found_and_a_facade_is_not(tmp_path, monkeypatch):
    """A scratch package. ``__init__`` re-exports from ``a``, ``b`` and ``e``; ``b`` takes ``a``'s
    function through the package (a facade: no circle) and names ``e``'s class through it for
    type checking only (``e`` imports ``b``: no circle either); ``c`` and ``d`` import each
    other, ``d`` only inside a function (a circle)."""
    pkg = tmp_path / "archcheck_scratch"
    pkg.mkdir()
    files = {
        "__init__.py": (
            "from .a import f\n"
            "from archcheck_scratch.b import g\n"
            "from archcheck_scratch.e import Thing\n"
        ),
        "a.py": "def f():\n    return 1\n",
        "b.py": (
            "from typing import TYPE_CHECKING\n"
            "from archcheck_scratch import f\n"
            "if TYPE_CHECKING:\n"
            "    from archcheck_scratch import Thing\n"
            "def g() -> Thing:\n"
            "    return f()\n"
        ),
        "c.py": "import archcheck_scratch.d\n",
        "d.py": "def h():\n    from archcheck_scratch import c\n    return c\n",
        "e.py": "import archcheck_scratch.b\nclass Thing:\n    pass\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    edges = import_graph(("archcheck_scratch",))
    assert edges["archcheck_scratch.b"] == {"archcheck_scratch.a"}
    cycles = [c for c in strongly_connected_components(edges) if len(c) > 1]
    assert cycles == [["archcheck_scratch.c", "archcheck_scratch.d"]]
