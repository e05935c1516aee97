import importlib.util
import re

from .conftest import REPO

README_LIMIT = 15_000  # bytes: README.md is the front page; the details live in docs/


def test_ci_runs_the_readme_test_command():
    command = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert "pytest" in command
    assert f"\n{command}\n" in (REPO / "README.md").read_text()


def test_cli_reference_is_generated_from_the_parser():
    # docs/cli.md is what docs/gen_cli.py makes of the current parser, so no command or flag goes undocumented.
    spec = importlib.util.spec_from_file_location("gen_cli", REPO / "docs" / "gen_cli.py")
    gen_cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen_cli)
    from lora_ft.cli.parser import build_parser

    rendered = gen_cli.render(build_parser())
    assert (REPO / "docs" / "cli.md").read_text(encoding="utf-8") == rendered, "run: python docs/gen_cli.py"
    commands = build_parser()._subparsers._group_actions[0].choices
    for name, sub in commands.items():
        assert f"## {name}\n" in rendered, name
        for action in sub._actions:
            for flag in action.option_strings:
                assert f"`{flag}`" in rendered or not flag.startswith("--"), f"{name} {flag}"


def test_readme_is_a_front_page_linking_existing_docs():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(readme.encode("utf-8")) <= README_LIMIT
    linked = set(re.findall(r"\]\((docs/[^)#\s]+\.md)(?:#[^)\s]*)?\)", readme))
    assert "docs/cli.md" in linked
    missing = sorted(page for page in linked if not (REPO / page).is_file())
    assert not missing, missing
