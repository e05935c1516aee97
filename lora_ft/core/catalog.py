"""The recipes shipped inside the package (lora_ft/recipes/, which a checkout's top-level recipes/ links to): each
found by its name (`spam-qlora`, `compare/spam-smollm2`: its path there without `.yaml`), listed with what it is
for, and copied out to edit. Prints nothing; imports nothing of lora_ft's but its files and errors."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from . import files
from .errors import UserError

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
SUFFIX = ".yaml"


@dataclass(frozen=True)
class Recipe:
    name: str  # its path under RECIPES_DIR without the suffix, with / between folders
    path: Path
    task: str  # the task it trains; for the others what reads them: compare (--runs), accelerate (--config_file)
    description: str  # the first line of its leading comment ('' without one)


def names() -> list[str]:
    """Every shipped recipe's name, sorted (those at the top first, then each folder's)."""
    found = [p.relative_to(RECIPES_DIR).with_suffix("").as_posix() for p in RECIPES_DIR.rglob(f"*{SUFFIX}")]
    return sorted(found, key=lambda name: (name.count("/"), name))


def path_of(name: str) -> Path | None:
    """The shipped recipe called `name`, or None when none is."""
    return RECIPES_DIR / f"{name}{SUFFIX}" if name in names() else None


def find(value: str | Path, what: str = "config") -> Path:
    """What a recipe argument (`what`: its name, for errors) names: a file when one is there (a path wins), else
    the shipped recipe of that name; neither is refused, naming the shipped ones."""
    given = Path(value)
    if given.exists() and not given.is_dir():
        return given
    shipped = path_of(str(value))
    if shipped is None:
        parts = given.parts  # a checkout's recipes/X.yaml, outside the checkout: the name is X
        after = parts[len(parts) - parts[::-1].index("recipes") :] if "recipes" in parts else parts
        guess = "/".join(after).removesuffix(SUFFIX)
        hint = f"; did you mean {guess}?" if guess != str(value) and path_of(guess) else ""
        raise UserError(
            f"`{what}` {value}: recipe not found (not a file, nor a shipped recipe's name: {', '.join(names())}; "
            f"`python -m lora_ft recipes` lists them){hint}"
        )
    return shipped


def describe(name: str) -> Recipe:
    """The shipped recipe `name` with its task (or what reads it) and its description."""
    path = path_of(name)
    if path is None:
        raise UserError(f"{name}: no shipped recipe of that name (shipped: {', '.join(names())})")
    text = path.read_text(encoding="utf-8")
    comment = next(iter(text.splitlines()), "")
    description = comment.lstrip("#").strip() if comment.startswith("#") else ""
    values = yaml.safe_load(text)
    if isinstance(values, dict) and "task" in values:
        task = str(values["task"])
    elif isinstance(values, list):
        task = "compare"  # a runs file, for `compare TASK --runs`
    elif isinstance(values, dict) and "compute_environment" in values:
        task = "accelerate"  # a launcher config, for `accelerate launch --config_file`
    else:
        task = "-"
    return Recipe(name, path, task, description)


def shipped() -> list[Recipe]:
    """Every shipped recipe, described."""
    return [describe(name) for name in names()]


def copy(name: str, dest: str | Path) -> Path:
    """The shipped recipe `name` copied, byte for byte, to `dest` (into it, under the recipe's own file name, when
    `dest` is a folder); written beside it first and linked into place, and never over a file already there."""
    source = describe(name).path
    target = Path(dest)
    if target.is_dir() or str(dest).endswith(("/", os.sep)):
        target = target / source.name
    try:
        files.write_bytes_new(target, source.read_bytes())
    except FileExistsError:
        raise UserError(f"{target}: already exists; choose another destination, or remove it first") from None
    return target
