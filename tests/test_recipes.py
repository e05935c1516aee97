"""The recipes ship inside the package (lora_ft/recipes/; the checkout's recipes/ is the same folder), resolve by
name wherever lora_ft runs, are listed by `recipes` and copied out by `recipes cp`; the wheel holds every one."""

import importlib.metadata
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from lora_ft import cli
from lora_ft.bench import compare
from lora_ft.cli.parser import build_parser
from lora_ft.core import catalog
from lora_ft.core.config import load_config
from lora_ft.core.errors import UserError

from .conftest import REPO, run_cli

SHIPPED = sorted(p for p in catalog.RECIPES_DIR.rglob("*") if p.is_file())
NAMED = {"model": "gpt2"}  # a model named: no look for GPT-2 on the network


def test_top_level_recipes_is_the_package_folder():
    # One folder, two ways to reach it: no second copy to drift from the one the package ships.
    assert catalog.RECIPES_DIR == REPO / "lora_ft" / "recipes"
    assert (REPO / "recipes").is_symlink()
    assert (REPO / "recipes").resolve() == catalog.RECIPES_DIR
    assert len(SHIPPED) >= 14 and all(p.suffix == catalog.SUFFIX for p in SHIPPED)  # package data: *.yaml
    assert catalog.names() == sorted(
        (p.relative_to(catalog.RECIPES_DIR).with_suffix("").as_posix() for p in SHIPPED),
        key=lambda name: (name.count("/"), name),
    )


def test_config_by_name_is_the_shipped_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)  # outside the checkout: no recipes/ here
    args = build_parser().parse_args(["spam", "--config", "spam-qlora", "--model", "gpt2"])
    config, _ = cli._train_config("spam", args)
    shipped = yaml.safe_load((catalog.RECIPES_DIR / "spam-qlora.yaml").read_text())
    assert config.quantize == "4bit" and shipped["quantize"] == "4bit"
    assert {k: getattr(config, k) for k in shipped if k != "model"} == {
        k: v for k, v in shipped.items() if k != "model"
    }
    assert config == load_config("spam", catalog.RECIPES_DIR / "spam-qlora.yaml", NAMED)
    # A runs file in a subfolder, by name, for compare --runs
    runs = compare.plan("spam", runs_file="compare/spam-smollm2", shared=NAMED)
    assert [run.name for run in runs][:2] == ["lora-r4", "lora-r16"] and len(runs) == 8


def test_a_file_wins_over_a_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    Path("spam-qlora").write_text("lr: 0.01\n")
    config = load_config("spam", "spam-qlora", NAMED)
    assert (config.lr, config.quantize) == (0.01, None)
    Path("spam").mkdir()  # a folder of that name is not a recipe: the shipped one is
    assert load_config("spam", "spam", NAMED).lr == load_config("spam", None, NAMED).lr


def test_unknown_name_is_one_line_exit_2():
    result = run_cli("spam", "--config", "spam-qlor", "--max-steps", "1")
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: --config spam-qlor: recipe not found (not a file, nor a shipped recipe's name: ")
    assert all(name in line for name in catalog.names()) and "Traceback" not in result.stderr
    with pytest.raises(UserError, match=r"`runs` compare/nope: .*compare/spam-smollm2"):
        compare.plan("spam", runs_file="compare/nope", shared=NAMED)
    with pytest.raises(UserError, match=r"did you mean spam-qlora\?"):  # a checkout's path, outside the checkout
        catalog.find(Path("/nonexistent") / "recipes" / "spam-qlora.yaml")


def test_recipes_lists_every_shipped_one(capsys: pytest.CaptureFixture[str]):
    assert cli.main(["recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split(maxsplit=2)[1:] for line in lines[1:-1]}
    assert lines[0].split() == ["name", "task", "description"]
    assert (
        sorted(rows)
        == sorted(catalog.names())
        == sorted(p.relative_to(catalog.RECIPES_DIR).with_suffix("").as_posix() for p in SHIPPED)
    )
    first = (catalog.RECIPES_DIR / "spam-qlora.yaml").read_text().splitlines()[0]
    assert rows["spam-qlora"] == ["spam", first.removeprefix("# ")]
    assert rows["instruct-smollm2"][0] == "instruct" and rows["prefer"][0] == "prefer"
    assert rows["compare/spam-smollm2"][0] == "compare" and rows["accelerate/ddp"][0] == "accelerate"
    assert all(len(row) == 2 and row[1] for row in rows.values())  # every shipped one has its description
    assert cli.main(["recipes", "ls"]) == 0
    assert capsys.readouterr().out.splitlines() == lines


def test_recipes_cp_copies_and_never_overwrites(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    dest = tmp_path / "my.yaml"
    assert cli.main(["recipes", "cp", "spam-qlora", str(dest)]) == 0
    assert dest.read_bytes() == (catalog.RECIPES_DIR / "spam-qlora.yaml").read_bytes()
    assert load_config("spam", dest, NAMED) == load_config("spam", "spam-qlora", NAMED)
    capsys.readouterr()
    dest.write_text("lr: 0.01\n")  # edited: a second copy must not replace it
    assert cli.main(["recipes", "cp", "spam", str(dest)]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line == f"error: {dest}: already exists; choose another destination, or remove it first"
    assert dest.read_text() == "lr: 0.01\n"
    # Into a folder, under the recipe's own file name; `copy` is `cp`
    assert cli.main(["recipes", "copy", "compare/spam-smollm2", str(tmp_path)]) == 0
    copied = tmp_path / "spam-smollm2.yaml"
    assert copied.read_bytes() == (catalog.RECIPES_DIR / "compare" / "spam-smollm2.yaml").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my.yaml", "spam-smollm2.yaml"]  # no temp file left
    for argv in (["cp", "nope", str(tmp_path / "x.yaml")], ["cp", "spam"], ["ls", "spam"]):
        capsys.readouterr()
        assert cli.main(["recipes", *argv]) == 2
        assert len(capsys.readouterr().err.splitlines()) == 1
    assert not (tmp_path / "x.yaml").exists()


def test_docs_name_only_recipes_that_exist():
    # Every recipes/<file>.yaml and every --config NAME the pages and the recipes mention is shipped.
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *SHIPPED]
    text = "\n".join(page.read_text(encoding="utf-8") for page in pages)
    paths = set(re.findall(r"(?<![\w/.])recipes/([\w/-]+\.yaml)", text))
    assert paths and not {p for p in paths if not (catalog.RECIPES_DIR / p).is_file()}
    found = re.findall(r"--(?:config|runs) ([\w-]+(?:/[\w-]+)?)(?![\w./-])", text)
    names = {name for name in found if not name.isupper()}  # FILE, NAME: placeholders
    assert "spam-qlora" in names and not names - set(catalog.names())


def test_the_wheel_holds_every_recipe(tmp_path: Path):
    # Built from a copy of the tree (no build/ of an earlier build to bring back files since removed).
    source = tmp_path / "src"
    skip = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "adapters", "__pycache__")
    shutil.copytree(REPO, source, symlinks=True, ignore=skip)
    command = [sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "-w", str(tmp_path / "dist"), "-q"]
    if _setuptools_major() >= 77:  # the one here builds it (SPDX `license`: 77 on): no package index needed
        command.append("--no-build-isolation")
    subprocess.run(command, cwd=source, check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("lora_ft-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        held = {n: archive.read(n) for n in archive.namelist() if n.startswith("lora_ft/recipes/")}
    assert held == {f"lora_ft/{p.relative_to(catalog.RECIPES_DIR.parent).as_posix()}": p.read_bytes() for p in SHIPPED}
    assert "lora_ft/core/catalog.py" in archive.namelist()


def _setuptools_major() -> int:
    try:
        return int(importlib.metadata.version("setuptools").split(".")[0])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return 0
