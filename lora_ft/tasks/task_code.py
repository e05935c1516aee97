"""A task's code, by its name: the module `registry.TASKS` names for it, imported when it is first asked for (the
listing and `--help` never import a task's module, nor torch with it). Every caller reaches a task's functions
through `get`; it sits above the task modules, which never use it."""

from __future__ import annotations

import importlib
from typing import Any, cast

from ..core import registry
from .task_api import Classifier, Generator, TaskModule


def get(name: Any, where: str = "task") -> TaskModule:
    """The module of the task called `name` (`where` names what gave it, in the error for an unknown task)."""
    return cast(TaskModule, importlib.import_module(registry.get(name, where).module))


def classifier(name: str | None = None) -> Classifier:
    """The module of task `name`, a classifier's (by default `predict`'s: the first task that serves "classify")."""
    return cast(Classifier, get(name or registry.serving("classify").name))


def generator(name: str | None = None) -> Generator:
    """The module of task `name`, a generator's (by default `generate`'s and `chat`'s)."""
    return cast(Generator, get(name or registry.serving("generate").name))
