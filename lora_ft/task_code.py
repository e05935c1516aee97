"""A task's code, by its name: the module `tasks.TASKS` names for it, imported when it is first asked for (the
listing and `--help` never import a task's module, nor torch with it). Every caller reaches a task's functions
through `get`; it sits above the task modules, which never use it."""

from __future__ import annotations

import importlib
from typing import Any, cast

from . import tasks
from .task_api import TaskModule


def get(name: Any, where: str = "task") -> TaskModule:
    """The module of the task called `name` (`where` names what gave it, in the error for an unknown task)."""
    return cast(TaskModule, importlib.import_module(tasks.get(name, where).module))
