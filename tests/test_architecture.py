"""The package's import structure: no import cycles among qpass modules, and no private name
imported from another module.

Every module of the package (qpass/, runtime/ as `qpass.runtime`, plugins/ as `qpass.plugins`)
is parsed, not imported; every import statement counts, including those inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIRS = {"qpass": "qpass", "qpass.runtime": "runtime", "qpass.plugins": "plugins"}
"""Package name -> folder, as `package-dir` in pyproject.toml maps them."""
CHECKED_DIRS = ("qpass", "runtime", "plugins", "benchmarks", "tests", "examples")
"""Folders whose imports of qpass modules must not reach private names."""


def _module_name(path: Path) -> str | None:
    """The dotted name of a package file, or None for a file outside the package."""
    for package, folder in sorted(PACKAGE_DIRS.items(), key=lambda item: -len(item[0])):
        base = ROOT / folder
        if base in path.parents:
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            return ".".join([package, *parts])
    return None


def _package_files() -> dict[str, Path]:
    files = {}
    for folder in PACKAGE_DIRS.values():
        for path in sorted((ROOT / folder).rglob("*.py")):
            name = _module_name(path)
            if name is not None:
                files[name] = path
    return files


MODULES = _package_files()


def _checked_files() -> list[Path]:
    found = []
    for folder in CHECKED_DIRS:
        found.extend(sorted((ROOT / folder).rglob("*.py")) if (ROOT / folder).is_dir() else [])
    return found


def _resolve_relative(module: str, is_package: bool, level: int, target: str | None) -> str:
    parts = module.split(".")
    base = parts if is_package else parts[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join(base + ([target] if target else []))


def _imports(path: Path):
    """(line, imported module, imported name or None) for every import in the file; a
    `from M import n` where M.n is a package module yields the module M.n with no name."""
    module = _module_name(path)
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, None
        elif isinstance(node, ast.ImportFrom):
            source = node.module or ""
            if node.level:
                if module is None:
                    continue  # relative import outside the package: not a qpass module
                package = path.name == "__init__.py"
                source = _resolve_relative(module, package, node.level, node.module)
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                if submodule in MODULES:
                    yield node.lineno, submodule, None
                else:
                    yield node.lineno, source, alias.name


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _location(path: Path, line: int) -> str:
    return f"{path.relative_to(ROOT)}:{line}"


def _import_graph() -> dict[str, dict[str, list[str]]]:
    """{module: {imported qpass module: [file:line, ...]}}."""
    graph: dict[str, dict[str, list[str]]] = {name: {} for name in MODULES}
    for name, path in MODULES.items():
        for line, target, _ in _imports(path):
            if target in MODULES and target != name:
                graph[name].setdefault(target, []).append(_location(path, line))
    return graph


def _cycles(graph: dict[str, dict[str, list[str]]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in graph[node]:
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_the_package_modules_are_found():
    assert {"qpass", "qpass.passes", "qpass.runtime", "qpass.plugins"} <= set(MODULES)


def test_no_import_cycles():
    graph = _import_graph()
    problems = []
    for component in _cycles(graph):
        members = set(component)
        problems.append("cycle among " + ", ".join(component) + ":")
        for source in component:
            for target, places in sorted(graph[source].items()):
                if target in members:
                    problems.extend(
                        f"  {place}: {source} imports {target}" for place in dict.fromkeys(places)
                    )
    assert not problems, "import cycles among qpass modules:\n" + "\n".join(problems)


def test_no_private_name_imported_from_a_qpass_module():
    problems = []
    for path in _checked_files():
        for line, target, name in _imports(path):
            if target != "qpass" and not target.startswith("qpass."):
                continue
            if any(_is_private(part) for part in target.split(".")):
                problems.append(f"{_location(path, line)}: imports private module {target}")
            elif name is not None and _is_private(name):
                problems.append(f"{_location(path, line)}: imports {name} from {target}")
    problems = list(dict.fromkeys(problems))  # one line per statement, not per name
    assert not problems, "private names imported across modules:\n" + "\n".join(problems)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from qpass.passes import graph_helpers", [(1, "qpass.passes", "graph_helpers")]),
        ("import qpass.schemes as s", [(1, "qpass.schemes", None)]),
        ("def f():\n    from qpass.schemes import _x", [(2, "qpass.schemes", "_x")]),
    ],
)
def test_imports_are_read_inside_functions_too(tmp_path, source, expected):
    path = tmp_path / "module.py"
    path.write_text(source)
    assert list(_imports(path)) == expected


def test_a_cycle_is_found():
    graph = {"a": {"b": ["a.py:1"]}, "b": {"c": ["b.py:1"]}, "c": {"a": ["c.py:3"]}, "d": {}}
    assert _cycles(graph) == [["a", "b", "c"]]
