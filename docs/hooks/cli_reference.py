"""The CLI reference, rendered from `dualproxy.cli.build_parser()` at build time.

mkdocs runs this file as a hook (mkdocs.yml `hooks:`): in a page, the line
`<!-- cli-reference -->` becomes every subcommand's usage, description and flags, with
the help text `--help` prints, so the page cannot drift from the parser. tests/test_docs.py
renders it too and checks it covers every flag of `dualproxy serve --help`.
"""

from __future__ import annotations

import argparse
import html
from typing import Any

MARKER = "<!-- cli-reference -->"


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _cell(text: str) -> str:
    """Help text as markdown, literally: HTML escaped (`<`, `&`), and the characters
    markdown would read as emphasis, links or a table's column (`*`, `[`, `|`) escaped."""
    text = html.escape(" ".join(text.split()), quote=False)
    for char in "\\*[]|":
        text = text.replace(char, "\\" + char)
    return text


def _flag(action: argparse.Action) -> str:
    names = ", ".join(f"`{name}`" for name in action.option_strings)
    if action.nargs == 0:
        return names
    if action.choices is not None:
        return f"{names} `{{{','.join(map(str, action.choices))}}}`"
    return f"{names} `{action.metavar or action.dest.upper()}`"


def _flags_table(parser: argparse.ArgumentParser) -> list[str]:
    formatter = parser._get_formatter()
    lines: list[str] = []
    for group in parser._action_groups:
        actions = [a for a in group._group_actions
                   if a.option_strings and a.help is not argparse.SUPPRESS]
        if not actions:
            continue
        if group.title not in ("options", "optional arguments"):
            lines += [f"**{group.title}**", ""]
        lines += ["| flag | what it does |", "|---|---|"]
        for action in actions:
            # %(default)s and friends, expanded as --help expands them.
            text = formatter._expand_help(action) if action.help else ""
            lines.append(f"| {_flag(action)} | {_cell(text)} |")
        lines.append("")
    return lines


def _usage(parser: argparse.ArgumentParser) -> list[str]:
    # A fixed width, not the terminal's: the page is the same wherever it is built.
    formatter = parser.formatter_class(prog=parser.prog, width=72)
    formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups)
    return ["```text", formatter.format_help().strip(), "```", ""]


def render(parser: argparse.ArgumentParser | None = None) -> str:
    """The reference as markdown: the top-level command, then each subcommand."""
    if parser is None:
        from dualproxy.cli import build_parser

        parser = build_parser()
    lines = [*_usage(parser), *_flags_table(parser)]
    if parser.epilog:
        lines += [_cell(parser.epilog), ""]
    for name, sub in _subparsers(parser).items():
        lines += [f"## `dualproxy {name}`", ""]
        if sub.description:
            lines += [_cell(sub.description), ""]
        lines += _usage(sub)
        lines += _flags_table(sub)
        if sub.epilog and sub.epilog.startswith("example: "):
            lines += ["Example:", "", "```sh", sub.epilog.removeprefix("example: "), "```", ""]
        elif sub.epilog:
            lines += [_cell(sub.epilog), ""]
    return "\n".join(lines)


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    """mkdocs hook: put the rendered reference where the marker stands."""
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, render())
