"""The docs: the CLI reference page covers the real parser, the README stays short.

The site itself is built by `nox -s docs` (mkdocs --strict: broken links fail); these
checks run with the suite, without mkdocs installed.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

from dualproxy.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
README_MAX_LINES = 200
# The README's two set-up commands, exactly (CI and new users run them as written).
DEMO_COMMAND = ("python3 -m venv .venv && . .venv/bin/activate && pip install '.[all]' "
                "&& dualproxy demo")
SUITE_COMMAND = "python3 -m venv .venv && . .venv/bin/activate && pip install nox && nox"


def load_hook(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "docs" / "hooks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def help_flags(*command: str) -> set[str]:
    """Every long flag `dualproxy COMMAND --help` prints."""
    # Wide: argparse wraps help text at hyphens ("--max-" / "fails") on a narrow terminal.
    out = subprocess.run([sys.executable, "-m", "dualproxy", *command, "--help"], cwd=ROOT,
                         capture_output=True, text=True, check=True,
                         env={**os.environ, "COLUMNS": "10000"}).stdout
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", out))


def test_cli_reference_covers_every_flag_of_help() -> None:
    page = load_hook("cli_reference").render()
    for command in ("serve", "demo"):
        flags = help_flags(command)
        assert "--upstream" in flags or command == "demo"
        missing = sorted(flag for flag in flags if f"`{flag}`" not in page)
        assert not missing, f"dualproxy {command} --help has flags the CLI page lacks: {missing}"
        assert f"## `dualproxy {command}`" in page


def test_cli_reference_shows_each_flags_help_text() -> None:
    page = load_hook("cli_reference").render()
    serve = next(a for a in build_parser()._actions if a.dest == "command").choices["serve"]
    for action in serve._actions:
        if action.option_strings and action.help:
            words = re.sub(r"[\\`]", "", " ".join(action.help.split()))
            assert words.split("(default")[0].strip() in re.sub(r"[\\`]", "", page), \
                action.option_strings


def test_cli_reference_picks_up_a_new_flag() -> None:
    """Rendered from the parser it is given: a flag added there is on the page."""
    parser = build_parser()
    serve = next(a for a in parser._actions if a.dest == "command").choices["serve"]
    serve.add_argument("--brand-new", metavar="N", help="a flag added after the docs were written")
    page = load_hook("cli_reference").render(parser)
    assert "| `--brand-new` `N` | a flag added after the docs were written |" in page


def test_cli_page_and_site_config_use_the_generator() -> None:
    marker = load_hook("cli_reference").MARKER
    assert (ROOT / "docs" / "cli.md").read_text().count(marker) == 1
    config = (ROOT / "mkdocs.yml").read_text()
    assert "docs/hooks/cli_reference.py" in config and "docs/hooks/readme.py" in config
    assert "docs" in re.search(r"nox\.options\.sessions = \[(.*)\]",
                               (ROOT / "noxfile.py").read_text())[1]


def test_readme_is_short_and_keeps_its_two_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= README_MAX_LINES
    for command in (DEMO_COMMAND, SUITE_COMMAND):
        assert f"```sh\n{command}\n```" in readme, command


def test_readme_links_into_the_docs_resolve() -> None:
    readme = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\(((?:docs/)?[\w./-]+\.(?:md|png))(?:#[\w-]+)?\)", readme)
    assert any(t.startswith("docs/") for t in targets)
    missing = [t for t in targets if not (ROOT / t).is_file()]
    assert not missing, missing
