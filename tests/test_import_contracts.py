"""DESIGN §1's layer rules, read from the source: who may import whom.

- peft_engine imports none of tuneq, api, worker;
- tuneq (the shared package) imports neither api nor worker;
- api never imports torch (nor the libraries that load it), directly or through what it imports.

Every import counts: at module level, inside a function, under TYPE_CHECKING, and a
string that names one of our modules ("worker.main", "api.app:create_app") counts as an
import of it. The one way tuneq starts the parts above it is the documented exception:
the "module:function" constants of tuneq/cli.py listed in NAMED_TARGETS, imported by
`_call_named` only when their command runs. A call that imports a computed name is
allowed only in the functions of DYNAMIC_IMPORTERS, whose names all come from such strings.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections import deque
from dataclasses import dataclass
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("peft_engine", "tuneq", "api", "worker")
TORCH_STACK = {"torch", "torchvision", "transformers", "peft", "accelerate"}

# tuneq/cli.py names what `tuneq api|worker|beat` start; nothing else in tuneq names api/worker.
NAMED_TARGETS = {
    ("tuneq.cli", "api.app:create_app"),
    ("tuneq.cli", "worker.main:run_worker"),
    ("tuneq.cli", "worker.main:run_beat"),
}
# The functions that import a module whose name is a variable (module, function).
DYNAMIC_IMPORTERS = {
    ("tuneq.cli", "_call_named"),
    ("peft_engine.models", "__getattr__"),  # its lazy loaders, named in _LOADERS
}
IMPORT_CALLS = {"import_module", "__import__"}
# "worker.main", "api.app:create_app"; a bare "api" is a word, not a module's name
OUR_MODULE_NAME = re.compile(rf"^(?:{'|'.join(PACKAGES)})(?:(?:\.\w+)+(?::\w+)?|:\w+)$")


@dataclass(frozen=True)
class Import:
    importer: str  # the module that imports
    line: int
    target: str  # the dotted module name imported
    at_load: bool  # runs when the importer is imported (module level, not TYPE_CHECKING)
    by_name: str | None = None  # the string that names it, for a module named by a string

    def __str__(self) -> str:
        how = f" (named by {self.by_name!r})" if self.by_name else ""
        return f"{self.importer}:{self.line} imports {self.target}{how}"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def module_files() -> dict[str, Path]:
    return {
        module_name(path): path
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
    }


class _ImportCollector(ast.NodeVisitor):
    def __init__(self, module: str, is_package: bool) -> None:
        self.module = module
        self.package = module if is_package else module.rpartition(".")[0]
        self.imports: list[Import] = []
        self.dynamic_calls: list[tuple[int, str]] = []  # (line, enclosing function)
        self._functions: list[str] = []
        self._type_checking = 0

    def _add(self, node: ast.AST, target: str, by_name: str | None = None) -> None:
        at_load = not self._functions and not self._type_checking and by_name is None
        self.imports.append(Import(self.module, node.lineno, target, at_load, by_name))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(node, alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:
            anchor = self.package.split(".")[: len(self.package.split(".")) - node.level + 1]
            base = ".".join([*anchor, base] if base else anchor)
        self._add(node, base)
        for alias in node.names:  # `from package import module` imports the module too
            self._add(node, f"{base}.{alias.name}")

    def _visit_function(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self._functions.append(node.name)
        self.generic_visit(node)
        self._functions.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = _visit_function

    def visit_If(self, node: ast.If) -> None:
        test = ast.unparse(node.test)
        if test in {"TYPE_CHECKING", "typing.TYPE_CHECKING"}:
            self._type_checking += 1
            for child in node.body:
                self.visit(child)
            self._type_checking -= 1
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if name in IMPORT_CALLS and node.args:
            argument = node.args[0]
            if isinstance(argument, ast.Constant) and isinstance(argument.value, str):
                self._add(node, argument.value, by_name=argument.value)
            else:
                self.dynamic_calls.append((node.lineno, ".".join(self._functions)))
        self.generic_visit(node)

    def visit_Constant(self, node: ast.Constant) -> None:
        if isinstance(node.value, str) and OUR_MODULE_NAME.match(node.value):
            self._add(node, node.value.partition(":")[0], by_name=node.value)


@cache
def collected(module: str) -> _ImportCollector:
    path = module_files()[module]
    collector = _ImportCollector(module, path.name == "__init__.py")
    collector.visit(ast.parse(path.read_text(), str(path)))
    return collector


def imports_of(package: str) -> list[Import]:
    return [
        found
        for module in module_files()
        if module.partition(".")[0] == package
        for found in collected(module).imports
    ]


def top(name: str) -> str:
    return name.partition(".")[0]


def loaded_with(target: str) -> list[str]:
    """The modules of ours that importing `target` runs: its parent packages, then itself."""
    parts = target.split(".")
    names = [".".join(parts[: i + 1]) for i in range(len(parts))]
    return [name for name in names if name in module_files()]


def torch_chain(start: Import) -> list[Import] | None:
    """The imports, at load time, by which `start` reaches the torch stack; None if it doesn't."""
    if top(start.target) in TORCH_STACK:
        return [start]
    parents: dict[str, list[Import]] = {}
    queue: deque[str] = deque()
    for module in loaded_with(start.target):
        parents.setdefault(module, [start])
        queue.append(module)
    while queue:
        module = queue.popleft()
        for found in collected(module).imports:
            if not found.at_load:
                continue
            chain = [*parents[module], found]
            if top(found.target) in TORCH_STACK:
                return chain
            for reached in loaded_with(found.target):
                if reached not in parents:
                    parents[reached] = chain
                    queue.append(reached)
    return None


def test_every_package_has_modules_to_check():
    for package in PACKAGES:
        assert imports_of(package), f"no imports found in {package}/: is the scan broken?"


def test_peft_engine_imports_none_of_the_service():
    broken = [
        str(i) for i in imports_of("peft_engine") if top(i.target) in {"tuneq", "api", "worker"}
    ]
    assert not broken, "peft_engine must not import tuneq, api or worker:\n" + "\n".join(broken)


def test_tuneq_imports_neither_api_nor_worker():
    broken = [
        str(i)
        for i in imports_of("tuneq")
        if top(i.target) in {"api", "worker"} and (i.importer, i.by_name) not in NAMED_TARGETS
    ]
    assert not broken, "tuneq must not import api or worker:\n" + "\n".join(broken)


def test_the_named_targets_exist():
    # A stale name would pass the rule above and fail only when its command runs.
    for importer, target in NAMED_TARGETS:
        module, _, function = target.partition(":")
        assert module in module_files(), f"{importer} names {target}: no module {module}"
        tree = ast.parse(module_files()[module].read_text())
        defined = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
        assert function in defined, f"{importer} names {target}: {module} defines no {function}"


def test_modules_are_imported_by_computed_name_only_where_documented():
    broken = [
        f"{module}:{line} in {function or '<module>'}"
        for module in module_files()
        for line, function in collected(module).dynamic_calls
        if (module, function) not in DYNAMIC_IMPORTERS
    ]
    assert not broken, "an import of a computed name outside DYNAMIC_IMPORTERS:\n" + "\n".join(
        broken
    )


def test_api_never_imports_torch_in_its_source():
    chains = [chain for i in imports_of("api") if (chain := torch_chain(i))]
    # one line, the shortest chain, for each import by which api/ leaves its package for torch
    leaving: dict[str, list[Import]] = {}
    for chain in sorted(chains, key=len):
        leaving.setdefault(next(str(s) for s in chain if top(s.target) != "api"), chain)
    assert not leaving, "api/ reaches the torch stack:\n" + "\n".join(
        " -> ".join(str(step) for step in chain) for chain in leaving.values()
    )


BUILD_THE_API = r"""
import sys
from pathlib import Path
from fastapi.testclient import TestClient
from api.app import create_app
from tuneq.settings import Settings

app = create_app(Settings(home=Path(sys.argv[1])))
with TestClient(app) as client:  # the lifespan opens the database, store, registry, broker
    assert client.get("/healthz").status_code == 200
heavy = sorted({"torch", "torchvision", "transformers", "peft", "accelerate"} & set(sys.modules))
assert not heavy, f"building and starting the API imported {heavy}"
"""


def test_building_and_starting_the_api_imports_no_torch(tmp_path):
    # A fresh interpreter: this one may have torch loaded by other tests.
    result = subprocess.run(
        [sys.executable, "-c", BUILD_THE_API, str(tmp_path / "home")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
