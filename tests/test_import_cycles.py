"""No import cycle at load time in peft_engine.

The graph is read from the source (no module is imported): an edge runs from a module to
every peft_engine module whose contents it needs while it loads, that is imports at module
level or in a class body, outside `if TYPE_CHECKING:`; imports inside functions run later
and are left out. `from a.b import name` needs `a.b` complete, unless `name` is a module of
its own (`a/b/name.py`), which is then the one needed. A package that is still loading when
one of its modules is imported does not block it (that is how a package's `__init__` may
import its own modules), so importing `a.b.c` is an edge to `a.b.c` alone.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "peft_engine"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def load_time_imports(tree: ast.Module, name: str, is_package: bool) -> set[str]:
    """The absolute names this module imports while it loads (with the `from` names)."""
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.rsplit(".", node.level - 1)[0]
                    base = f"{anchor}.{base}" if base else anchor
                found.update(f"{base}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.If) and _is_type_checking(node.test):
                visit(node.orelse)
            elif isinstance(node, ast.ClassDef):
                visit(node.body)
            elif isinstance(node, (ast.If, ast.Try, ast.With)):
                for block in ("body", "orelse", "finalbody"):
                    visit(getattr(node, block, []))
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)

    visit(tree.body)
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module → the peft_engine modules (and their parent packages) it loads."""
    sources = {module_name(p, root): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in sources.items():
        tree = ast.parse(path.read_text(), str(path))
        edges: set[str] = set()
        for imported in load_time_imports(tree, name, path.name == "__init__.py"):
            # The longest prefix that is a module: `from pkg import name` names a module only
            # when pkg/name.py exists, and otherwise needs pkg itself.
            parts = imported.split(".")
            prefixes = (".".join(parts[:i]) for i in range(len(parts), 0, -1))
            needed = next((prefix for prefix in prefixes if prefix in sources), None)
            if needed is not None:
                edges.add(needed)
        edges.discard(name)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def test_the_graph_sees_a_load_time_import():
    graph = import_graph()
    assert "peft_engine.data.steps" in graph["peft_engine.training"]  # a module's names
    assert "peft_engine.methods" in graph["peft_engine.training"]  # a name from the package
    assert "peft_engine.data" not in graph["peft_engine.training"]  # only its modules' names
    assert "peft_engine.tasks.causal_lm" not in graph["peft_engine.tasks"]  # inside a function


def test_a_cycle_is_found():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [frozenset({"a", "b", "c"})]


def test_peft_engine_has_no_load_time_import_cycle():
    found = cycles(import_graph())
    assert found == [], "import cycles at load time: " + "; ".join(
        " <-> ".join(sorted(cycle)) for cycle in found
    )


def _package(root: Path, files: dict[str, str]) -> Path:
    for name, source in files.items():
        path = root / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
    return root / "pkg"


def test_a_registry_in_the_package_init_is_a_cycle_and_one_in_its_own_module_is_not(tmp_path):
    # The layout issue 13 left: methods/__init__.py held the registry and imported every
    # method at its bottom, while each method imported the registry's names from the package.
    old = _package(
        tmp_path / "old",
        {
            "__init__.py": "",
            "methods/__init__.py": "def register(m): ...\nfrom pkg.methods import lora\n",
            "methods/lora.py": "from pkg.methods import register\nregister('lora')\n",
        },
    )
    assert cycles(import_graph(old)) == [frozenset({"pkg.methods", "pkg.methods.lora"})]
    new = _package(
        tmp_path / "new",
        {
            "__init__.py": "",
            "methods/__init__.py": "from pkg.methods import lora, registry\n",
            "methods/registry.py": "def register(m): ...\n",
            "methods/lora.py": "from pkg.methods.registry import register\nregister('lora')\n",
        },
    )
    assert cycles(import_graph(new)) == []
