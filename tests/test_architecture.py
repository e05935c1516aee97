"""The shape of the code, as tests/test_architecture.py checks it:

- No import loop among lora_ft's modules. Every import counts: at the top, in a function (for start-up time), and
  under `if TYPE_CHECKING:`, which lora_ft no longer has (a type that only names something from above is `Any`, or its
  dataclass moved down to where both sides import it). `importlib.import_module("lora_ft.x")` is an import of `x`.
  A name computed at run time is the task registry's: `task_code.get` loads the module `tasks.TASKS` names for a task,
  so a computed `import_module` counts as an import of every task module the registry names, in the module that calls
  it (`task_code`, and nowhere else). The registry's names are data (`tasks.py` holds them without importing them), so
  `tasks` sits at the bottom, below the config and the listing, and `task_code` above the task modules, which never
  use it; a task module that needs itself as a `TaskModule` passes its own module (`classify.evaluate`). Nothing else
  imports a task module: a task is reached only through the registry (`task_code.get`, or `task_code.classifier()` /
  `generator()` for the commands of one kind); one task module may build on another (prefer on instruct).
- Each registered task module provides `task_api.TaskModule` and what its kind adds (`task_api.KINDS`: `Classifier`
  or `Generator`, by what the task serves): its members, and its functions' parameters (names, kinds, which have
  defaults), checked with `inspect.signature`.
- No module outside the task modules (and the registry, which states them) compares a task's name, its Auto class's
  name, or what it serves with a literal: they ask the task (`tasks.get(name)`'s fields, `task_code.get(name)`'s
  functions).
- No module over about 450 lines."""

import ast
import importlib
import inspect
import re

from lora_ft import task_api, tasks

from .conftest import REPO

PACKAGE = REPO / "lora_ft"
TASK_MODULES = {entry.module.rsplit(".", 1)[1] for entry in tasks.TASKS.values()} | {"spam"}  # spam: the old name
REGISTRY = {entry.module.rsplit(".", 1)[1] for entry in tasks.TASKS.values()}  # what a computed import may load


def _trees() -> dict[str, ast.Module]:
    return {path.stem: ast.parse(path.read_text()) for path in PACKAGE.glob("*.py")}


def _imported(node: ast.AST) -> set[str]:
    """The lora_ft modules that one node imports (`from . import x`, `from .x import y`, `from lora_ft.x import y`,
    `import lora_ft.x`, `importlib.import_module(...)`)."""
    if isinstance(node, ast.ImportFrom) and node.level == 1:
        return {node.module.split(".")[0]} if node.module else {alias.name for alias in node.names}
    if isinstance(node, ast.ImportFrom) and node.module == "lora_ft":
        return {alias.name for alias in node.names}
    if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lora_ft."):
        return {node.module.split(".")[1]}
    if isinstance(node, ast.Import):
        return {alias.name.split(".")[1] for alias in node.names if alias.name.startswith("lora_ft.")}
    if isinstance(node, ast.Call) and ast.unparse(node.func).endswith("import_module") and node.args:
        name = node.args[0]
        if isinstance(name, ast.Constant) and isinstance(name.value, str):
            return {name.value.removeprefix("lora_ft.").lstrip(".").split(".")[0]}
        return set(REGISTRY)  # a computed name: the registry's (test_computed_imports_are_the_registrys)
    return set()


def imports() -> dict[str, set[str]]:
    """Module -> the lora_ft modules it imports anywhere in its body, by the rules in this file's docstring."""
    graph = {}
    for module, tree in _trees().items():
        found = set().union(*(_imported(node) for node in ast.walk(tree)))
        graph[module] = found - {module, "lora_ft"}
    return graph


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


def test_the_graph_has_the_layers_the_docs_name():
    graph = imports()
    assert graph["tasks"] == {"errors"}  # the registry's facts, below everything that reads them
    assert graph["task_code"] >= REGISTRY  # the registry's code, above the tasks
    assert not {m for m in TASK_MODULES if "task_code" in graph[m]}
    assert {m for m, imported in graph.items() if imported & REGISTRY} <= TASK_MODULES | {"task_code"}
    assert not {m for m, imported in graph.items() if imported & {"cli", "parser"} and m not in {"__main__", "cli"}}


def test_the_architecture_doc_lists_every_module_bottom_to_top():
    """docs/architecture.md's table: every module, each below none that it imports (one row may hold several)."""
    graph, above = imports(), set()
    rows = re.findall(r"^\| (`[a-z_]+\.py`[^|]*)\|", (REPO / "docs" / "architecture.md").read_text(), re.M)
    for row in rows:
        named = set(re.findall(r"`([a-z_]+)\.py`", row))
        assert not {m: graph[m] - above - named for m in named if graph[m] - above - named}, row
        above |= named
    assert set(graph) - above == {"__init__", "__main__", "spam"}  # the package, `python -m`, an old name


def test_no_type_checking_imports():
    assert not [p.name for p in PACKAGE.glob("*.py") if "TYPE_CHECKING" in p.read_text()]


def test_computed_imports_are_the_registrys():
    computed = {
        module
        for module, tree in _trees().items()
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and ast.unparse(node.func).endswith("import_module")
        if node.args and not isinstance(node.args[0], ast.Constant)
    }
    assert computed == {"task_code"}


def test_modules_stay_short():
    lengths = {p.name: len(p.read_text().splitlines()) for p in PACKAGE.glob("*.py")}
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
    assert {entry.serves for entry in tasks.TASKS.values()} <= set(task_api.KINDS)
    for entry in tasks.TASKS.values():
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
    found = set(tasks.NAMES)
    for entry in tasks.TASKS.values():
        found |= {entry.model_class, entry.serves, entry.peft_task_type}
    return found


def test_no_task_names_compared_outside_the_tasks():
    named = _literals()
    comparisons = (ast.Eq, ast.NotEq, ast.In, ast.NotIn, ast.Is, ast.IsNot)
    offenders = []
    for module, tree in _trees().items():
        if module in TASK_MODULES | {"tasks"}:
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
