"""MkDocs hook: the home page is README.md (docs/index.md holds only the marker below), with its
links, which point into docs/ from the repository root, made relative to docs/ itself."""

from __future__ import annotations

import re
from pathlib import Path

MARKER = "<!-- README.md -->"


def on_page_markdown(markdown: str, page, config, files) -> str:
    if page.file.src_uri == "index.md" and MARKER in markdown:
        readme = (Path(config["config_file_path"]).parent / "README.md").read_text()
        markdown = markdown.replace(MARKER, re.sub(r"\]\(docs/", "](", readme))
    return markdown
