"""The shape of the code: no import loop among lora_ft's modules (function-level imports included), no module over
about 450 lines, and no comparison with a task's name outside the task modules."""

import ast
import re

from lora_ft import tasks

from .conftest import REPO

PACKAGE = REPO / "lora_ft"
TASK_MODULES = {entry.module.rsplit(".", 1)[1] for entry in tasks.TASKS.values()} | {"spam"}  # spam: the old name


def imports() -> dict[str, set[str]]:
    """Module -> the lora_ft modules it imports anywhere in its body (`from . import x`, `from .x import y`), except
    under `if TYPE_CHECKING:` (annotations only, never run)."""
    graph = {}
    for path in PACKAGE.glob("*.py"):
        found = set()
        tree = ast.parse(path.read_text())
        for block in [n for n in ast.walk(tree) if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING"]:
            block.body = []
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                found |= {node.module} if node.module else {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lora_ft."):
                found.add(node.module.split(".")[1])
        graph[path.stem] = found - {path.stem}
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


def test_modules_stay_short():
    lengths = {p.name: len(p.read_text().splitlines()) for p in PACKAGE.glob("*.py")}
    assert not {name: n for name, n in lengths.items() if n > 450}


def test_no_task_names_compared_outside_the_tasks():
    names = "|".join(tasks.NAMES)
    pattern = re.compile(rf"""task\b[^\n]*[!=]=\s*["']({names})["']""")
    offenders = [
        f"{p.name}:{number}"
        for p in PACKAGE.glob("*.py")
        if p.stem not in TASK_MODULES
        for number, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not offenders
