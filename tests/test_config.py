from pathlib import Path

import pytest
import yaml

from lora_ft.core.config import TASKS, RunConfig, default_recipe, load_config, task_defaults
from lora_ft.core.errors import UserError


@pytest.mark.parametrize("task", TASKS)
def test_recipe_equals_builtin_defaults(task: str):
    # An installed package without the recipes/ folder must train exactly as the recipe says.
    recipe = yaml.safe_load(default_recipe(task).read_text())
    assert recipe == task_defaults(task)
    # With a model named (else the choice between GPT-2 and the fallback model depends on the network: test_first_run)
    named = {"model": "gpt2"}
    assert load_config(task, overrides=named).to_dict() == RunConfig(**task_defaults(task) | named).to_dict()


def test_setting_of_another_task_is_refused(tmp_path: Path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("balance: false\n")
    with pytest.raises(UserError, match="'balance' belongs to task spam, not instruct"):
        load_config("instruct", recipe)
    with pytest.raises(
        UserError, match="command line: 'max_new_tokens' belongs to tasks instruct and prefer, not spam"
    ):
        load_config("spam", overrides={"max_new_tokens": 5})


def test_recipe_then_flags_override(tmp_path: Path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("lr: 0.001\nlora_r: 4\nepochs: 2\n")
    config = load_config("spam", recipe, {"lora_r": 8, "epochs": None})
    assert (config.lr, config.lora_r, config.epochs) == (0.001, 8, 2)
    assert config.batch_size == RunConfig().batch_size


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("learning_rate: 0.1\n", "unknown key 'learning_rate'"),
        ("lora_r: four\n", "'lora_r' must be int"),
        ("lr: 0\n", "'lr' must be > 0"),
        ("lora_r: 0\n", "'lora_r' must be > 0"),
        ("lora_dropout: 1.0\n", "'lora_dropout' must be in [0, 1)"),
        ("- a list\n", "a recipe is a mapping"),
        ("task: poetry\n", "must be one of"),
        ("task: instruct\n", "recipe is for task 'instruct', not 'spam'"),
    ],
)
def test_bad_recipe_names_file_and_key(tmp_path: Path, text: str, key: str):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    with pytest.raises(UserError) as error:
        load_config("spam", recipe)
    assert str(recipe) in str(error.value)
    assert key in str(error.value)


def test_bad_flag_value_is_refused():
    with pytest.raises(UserError, match="command line: 'lr' must be > 0"):
        load_config("spam", overrides={"lr": -1.0})
