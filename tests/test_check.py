"""The first minute: `twist-fl check` runs in the suite and prints what the README and the
getting-started page show (the same lines; perplexities within a few percent, as CPU kinds
differ; the seconds are the machine's)."""

import re
from pathlib import Path

import pytest

from twist_fl.tools.cli import main

ROOT = Path(__file__).resolve().parents[1]
NUMBER = re.compile(r"\d[\d,]*\.?\d*")


def documented(path: Path) -> list[str]:
    """The `text` block that follows the first `twist-fl check` in a page."""
    text = path.read_text()
    block = re.search(r"twist-fl check.*?```text\n(.*?)```", text, flags=re.S)
    assert block, f"{path} shows no output of twist-fl check"
    return block.group(1).strip().splitlines()


def same_shape(got: str, want: str) -> None:
    assert NUMBER.sub("#", got) == NUMBER.sub("#", want), (got, want)
    for g, w in zip(NUMBER.findall(got), NUMBER.findall(want), strict=True):
        if got.rstrip().endswith(" s)") and g == NUMBER.findall(got)[-1]:
            continue  # the seconds
        g, w = float(g.replace(",", "")), float(w.replace(",", ""))
        assert abs(g - w) <= 0.05 * max(w, 1.0), (got, want)


@pytest.mark.slow
def test_the_check_prints_what_the_docs_show(capsys):
    assert main(["check"]) == 0
    out = [line for line in capsys.readouterr().out.strip().splitlines() if line.strip()]
    for page in (ROOT / "README.md", ROOT / "docs" / "getting-started.md"):
        want = documented(page)
        assert len(out) == len(want), (out, want)
        for g, w in zip(out, want, strict=True):
            same_shape(g, w)


def test_the_check_refuses_a_bad_rounds_count(capsys):
    assert main(["check", "--rounds", "0"]) == 2
    assert "--rounds" in capsys.readouterr().err
