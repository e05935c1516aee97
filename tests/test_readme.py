from .conftest import REPO


def test_ci_runs_the_readme_test_command():
    command = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert "pytest" in command
    assert f"\n{command}\n" in (REPO / "README.md").read_text()


def test_readme_names_every_cli_command_and_flag():
    from lora_ft.cli import build_parser

    readme = (REPO / "README.md").read_text()
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name, sub in commands.items():
        assert f"python -m lora_ft {name}" in readme, name
        for action in sub._actions:
            for flag in action.option_strings:
                assert flag in readme or not flag.startswith("--"), f"{name} {flag}"
