"""The site's home page is the README, so the two cannot disagree.

mkdocs runs this file as a hook (mkdocs.yml `hooks:`): in a page, the line
`<!-- readme -->` becomes README.md with its links made relative to the site
(`docs/x.md` is `x.md` here, `CHANGELOG.md` the changelog page).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

MARKER = "<!-- readme -->"
README = Path(__file__).resolve().parents[2] / "README.md"


def site_markdown(text: str) -> str:
    """README.md's markdown with its repository links turned into site links."""
    return text.replace("](docs/", "](").replace("](CHANGELOG.md)", "](changelog.md)")


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, site_markdown(README.read_text(encoding="utf-8")))
