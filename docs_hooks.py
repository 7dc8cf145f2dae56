"""MkDocs hook: the home page is README.md (docs/index.md holds only the marker below), with its
links, which point into docs/ from the repository root, made relative to docs/ itself; the
changelog page is CHANGELOG.md (docs/changelog.md holds only its marker)."""

from __future__ import annotations

import re
from pathlib import Path

MARKER = "<!-- README.md -->"
CHANGELOG = "<!-- CHANGELOG.md -->"


def on_page_markdown(markdown: str, page, config, files) -> str:
    root = Path(config["config_file_path"]).parent
    if page.file.src_uri == "index.md" and MARKER in markdown:
        readme = (root / "README.md").read_text()
        markdown = markdown.replace(MARKER, re.sub(r"\]\(docs/", "](", readme))
    if page.file.src_uri == "changelog.md" and CHANGELOG in markdown:
        markdown = markdown.replace(CHANGELOG, (root / "CHANGELOG.md").read_text())
    return markdown
