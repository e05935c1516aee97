"""The shape of the code, as tests/test_architecture.py checks it:

- **Layers.** lora_ft's modules live in one subpackage per layer, ranked bottom to top (`LAYERS`): `core`, `data`,
  `engine`, `tasks`, `export`, `serve`, `bench`, `studio`, `cli`. A module imports modules of its own layer or of
  layers below it, never above. `core` imports no torch (nor transformers, PEFT, TRL) when it is imported: the
  listing, `--help` and the settings load without them.
- **No import loop** among the modules, within a layer too. Every import counts: at the top, in a function (for
  start-up time), and under `if TYPE_CHECKING:`, which lora_ft does not have (a type that only names something from
  above is `Any`, or its dataclass moved down to where both sides import it). `importlib.import_module("lora_ft.x")`
  is an import of `x`. A name computed at run time is the task registry's: `tasks.task_code.get` loads the module
  `core.registry.TASKS` names for a task, so a computed `import_module` counts as an import of every task module the
  registry names, in the module that calls it (`task_code`, and nowhere else). The registry's names are data
  (`core/registry.py` holds them without importing them), so the registry sits in `core`, and `task_code` above the
  task modules, which never use it. Nothing else imports a task module: a task is reached only through the registry
  (`task_code.get`, or `task_code.classifier()` / `generator()` for the commands of one kind); one task module may
  build on another (prefer on instruct).
- Each registered task module provides `task_api.TaskModule` and what its kind adds (`task_api.KINDS`: `Classifier`
  or `Generator`, by what the task serves): its members, and its functions' parameters (names, kinds, which have
  defaults), checked with `inspect.signature`.
- No module outside the task modules (and the registry, which states them) compares a task's name, its Auto class's
  name, or what it serves with a literal: they ask the task (`registry.get(name)`'s fields, `task_code.get(name)`'s
  functions).
- No module over about 450 lines."""

import ast
import importlib
import inspect
import re
import subprocess
import sys

from lora_ft.core import registry
from lora_ft.tasks import task_api

from .conftest import REPO

PACKAGE = REPO / "lora_ft"
LAYERS = ["core", "data", "engine", "tasks", "export", "serve", "bench", "studio", "cli"]  # bottom to top
TOP = {"__init__", "__main__"}  # the package itself and `python -m lora_ft`, above every layer
REGISTRY = {entry.module.removeprefix("lora_ft.") for entry in registry.TASKS.values()}  # what a computed import loads
TASK_MODULES = REGISTRY


def _name(path) -> str:
    """A module's name under lora_ft: `core.files`, or `data` for a package's own `__init__.py`."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def _trees() -> dict[str, ast.Module]:
    return {_name(path): ast.parse(path.read_text()) for path in PACKAGE.rglob("*.py")}


MODULES = set(_trees())


def _package(module: str, is_package: bool) -> str:
    """The package a module's relative imports start from."""
    return module if is_package else module.rpartition(".")[0]


def _resolve(base: str, names: list[str]) -> set[str]:
    """`from BASE import NAME`: the module BASE.NAME when there is one, else BASE itself (a name defined in it)."""
    found = set()
    for name in names:
        candidate = f"{base}.{name}" if base else name
        found.add(candidate if candidate in MODULES else base)
    return found


def _imported(node: ast.AST, module: str, is_package: bool) -> set[str]:
    """The lora_ft modules that one node of `module` imports (relative or absolute, or `importlib.import_module`)."""
    if isinstance(node, ast.ImportFrom) and node.level:
        base = _package(module, is_package)
        for _ in range(node.level - 1):
            base = base.rpartition(".")[0]
        if node.module:
            base = f"{base}.{node.module}" if base else node.module
        return _resolve(base, [alias.name for alias in node.names])
    if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "lora_ft":
        return _resolve(node.module.removeprefix("lora_ft").lstrip("."), [alias.name for alias in node.names])
    if isinstance(node, ast.Import):
        return {alias.name.removeprefix("lora_ft.") for alias in node.names if alias.name.startswith("lora_ft.")}
    if isinstance(node, ast.Call) and ast.unparse(node.func).endswith("import_module") and node.args:
        name = node.args[0]
        if isinstance(name, ast.Constant) and isinstance(name.value, str):
            return {name.value.removeprefix("lora_ft.")}
        return set(REGISTRY)  # a computed name: the registry's (test_computed_imports_are_the_registrys)
    return set()


def imports() -> dict[str, set[str]]:
    """Module -> the lora_ft modules it imports anywhere in its body, by the rules in this file's docstring."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        module, tree = _name(path), ast.parse(path.read_text())
        found = set().union(*(_imported(node, module, path.name == "__init__.py") for node in ast.walk(tree)))
        graph[module] = found - {module, ""}
    return graph


def _layer(module: str) -> int:
    first = module.split(".")[0]
    return LAYERS.index(first) if first in LAYERS else len(LAYERS)


def test_every_module_is_in_a_layer():
    assert {m for m in MODULES if _layer(m) == len(LAYERS)} == TOP


def test_imports_go_down_the_layers():
    graph = imports()
    upward = {f"{m} -> {other}" for m, imported in graph.items() for other in imported if _layer(other) > _layer(m)}
    assert not upward
    assert all(other in MODULES for imported in graph.values() for other in imported)  # the graph names real modules


def test_core_loads_no_torch():
    core = sorted(m for m in MODULES if m.split(".")[0] == "core")
    script = (
        "import sys\n"
        + "".join(f"import lora_ft.{m}\n" for m in core)
        + "print(sorted(n for n in ('torch', 'transformers', 'peft', 'trl', 'datasets') if n in sys.modules))"
    )
    loaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=REPO)
    assert loaded.stdout.strip() == "[]"


def test_no_import_loop():
    graph, done, path = imports(), set(), []

    def visit(module: str) -> None:
        assert module not in path, f"import loop: {' -> '.join([*path[path.index(module) :], module])}"
        if module in done:
            return
        path.append(module)
        for other in graph.get(module, ()):
            visit(other)
        path.pop()
        done.add(module)

    for module in graph:
        visit(module)


def test_the_registry_is_the_only_way_to_a_task():
    graph = imports()
    assert graph["core.registry"] == {"core.errors"}  # the registry's facts, below everything that reads them
    assert graph["tasks.task_code"] >= REGISTRY  # the registry's code, above the tasks
    assert not {m for m in TASK_MODULES if "tasks.task_code" in graph[m]}
    assert {m for m, imported in graph.items() if imported & REGISTRY} <= TASK_MODULES | {"tasks.task_code"}


def test_the_architecture_doc_lists_every_module_bottom_to_top():
    """docs/architecture.md's table: every module, each below none that it imports (one row may hold several)."""
    graph, above = imports(), set()
    rows = re.findall(r"^\| (`[a-z_/]+\.py`[^|]*)\|", (REPO / "docs" / "architecture.md").read_text(), re.M)
    for row in rows:
        named = {_name(PACKAGE / path) for path in re.findall(r"`([a-z_/]+\.py)`", row)}
        assert not {m: graph[m] - above - named for m in named if graph[m] - above - named}, row
        above |= named
    assert MODULES - above == TOP | set(LAYERS) - {"data", "cli"}  # the layers' __init__ hold only docstrings


def test_no_type_checking_imports():
    assert not [p.name for p in PACKAGE.rglob("*.py") if "TYPE_CHECKING" in p.read_text()]


def test_computed_imports_are_the_registrys():
    computed = {
        module
        for module, tree in _trees().items()
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and ast.unparse(node.func).endswith("import_module")
        if node.args and not isinstance(node.args[0], ast.Constant)
    }
    assert computed == {"tasks.task_code"}


def test_modules_stay_short():
    lengths = {_name(p): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert not {name: n for name, n in lengths.items() if n > 450}


def _protocol(protocol: type) -> tuple[set[str], dict[str, inspect.Signature]]:
    """A protocol's attributes and its functions' signatures, its bases' included."""
    attributes: set[str] = set()
    functions: dict[str, inspect.Signature] = {}
    for cls in reversed([c for c in protocol.__mro__ if task_api.TaskModule in c.__mro__]):
        attributes |= set(vars(cls).get("__annotations__", {}))
        functions |= {
            name: inspect.signature(member)
            for name, member in vars(cls).items()
            if inspect.isfunction(member) and not name.startswith("_")
        }
    return attributes, functions


def _shape(signature: inspect.Signature, drop_self: bool) -> list[tuple[str, object, bool]]:
    parameters = list(signature.parameters.values())[1 if drop_self else 0 :]
    return [(p.name, p.kind, p.default is not inspect.Parameter.empty) for p in parameters]


def test_every_task_module_provides_the_protocol():
    """TaskModule, and what its kind adds (`task_api.KINDS`, by what the task serves)."""
    assert {entry.serves for entry in registry.TASKS.values()} <= set(task_api.KINDS)
    for entry in registry.TASKS.values():
        attributes, functions = _protocol(task_api.KINDS[entry.serves])
        assert {"train", "load", "summary", "SAMPLE_TEXTS"} <= attributes | set(functions)
        module = importlib.import_module(entry.module)
        assert not [name for name in [*attributes, *functions] if not hasattr(module, name)], entry.name
        for name, declared in functions.items():
            given = inspect.signature(getattr(module, name))
            assert _shape(given, False) == _shape(declared, True), f"{entry.module}.{name}{given} vs {declared}"


def _literals() -> set[str]:
    """What only the task modules and the registry may compare with: the tasks' names, their Auto classes' and
    what they serve."""
    found = set(registry.NAMES)
    for entry in registry.TASKS.values():
        found |= {entry.model_class, entry.serves, entry.peft_task_type}
    return found


def test_no_task_names_compared_outside_the_tasks():
    named = _literals()
    comparisons = (ast.Eq, ast.NotEq, ast.In, ast.NotIn, ast.Is, ast.IsNot)
    offenders = []
    for module, tree in _trees().items():
        if module in TASK_MODULES | {"core.registry"}:
            continue
        for node in ast.walk(tree):
            if not isinstance(node, ast.Compare) or not any(isinstance(op, comparisons) for op in node.ops):
                continue
            sides = [node.left, *node.comparators]
            values = {s.value for s in sides if isinstance(s, ast.Constant)}
            values |= {e.value for s in sides if isinstance(s, (ast.Tuple, ast.List, ast.Set)) for e in s.elts
                       if isinstance(e, ast.Constant)}  # fmt: skip
            if values & named or any(isinstance(v, str) and v.startswith("AutoModel") for v in values):
                offenders.append(f"{module}.py:{node.lineno}: {ast.unparse(node)}")
    assert not offenders
