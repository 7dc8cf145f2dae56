"""One command line: every `twist-fl` verb answers --help, and every `twist-fl ...` command
written in the README and the docs pages parses (dry: no work is done)."""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest

from twist_fl.tools.cli import DELEGATED, build_parser, main

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def documented_commands() -> list[tuple[str, str]]:
    """(file, command) for every `twist-fl ...` in inline code or a fenced block; a fenced
    command may continue over lines ending in a backslash."""
    out = []
    for f in DOC_FILES:
        text = f.read_text()
        fenced = re.findall(r"^```(?!text)[^\n]*\n(.*?)^```", text, flags=re.S | re.M)  # ```text: output
        for block in fenced:
            for line in block.replace("\\\n", " ").splitlines():
                line = line.strip()
                for part in line.split(" #")[0].split(" && "):
                    part = re.sub(r"^(?:[A-Z_][A-Z0-9_]*=\S+\s+)+", "", part.strip())  # VAR=value before it
                    if part.startswith("twist-fl "):
                        out.append((f.name, part))
    return out


def documented_fragments() -> list[tuple[str, str]]:
    """(file, text) for every `twist-fl ...` in inline code: often a verb and some of its options
    rather than a whole command, so each is checked for its verb and its option names."""
    out = []
    for f in DOC_FILES:
        inline = re.sub(r"^```.*?^```", "", f.read_text(), flags=re.S | re.M)
        for cmd in re.findall(r"`(twist-fl [^`]+)`", inline):
            for part in " ".join(cmd.split()).split(" && "):
                out.append((f.name, part.strip()))
    return out


def _parser_for(words: list[str]):
    """The argparse parser of a verb path (e.g. ['tune', 'finetune']) and how many words it took."""
    if words[0] not in DELEGATED:
        parser, used = build_parser(), 0
    elif words[0] == "bench" and len(words) > 1 and words[1] in ("ddp", "export", "inference"):
        return importlib.import_module(f"twist_fl.tools.bench_{words[1]}").build_parser(), 2
    else:
        parser, used = importlib.import_module(f"twist_fl.tools.{DELEGATED[words[0]][0]}").build_parser(), 1
    while used < len(words):
        subs = [a for a in parser._actions if isinstance(getattr(a, "choices", None), dict)]
        if not subs or words[used] not in subs[0].choices:
            break
        parser, used = subs[0].choices[words[used]], used + 1
    return parser, used


def check_fragment(text: str) -> None:
    """The verb path exists and every --option written is one of its options."""
    words = shlex.split(text)[1:]
    if not words or words[0].startswith("<") or words == ["--help"]:
        return
    if words[0] not in build_parser()._subparsers._group_actions[0].choices:
        raise SystemExit(f"no verb {words[0]!r}")
    if words[0] == "sweep":
        check_sweep_overrides(words[1:])
        return
    parser, _ = _parser_for(words)
    for w in words:
        if w.startswith(("--", "[--")):
            opt = w.strip("[]").split("=")[0]
            if opt not in parser._option_string_actions:
                raise SystemExit(f"{opt} is not an option of `{parser.prog}`")


def dry_parse(command: str) -> None:
    """Parse `command` as `twist-fl` would, without running it; SystemExit on a usage error.
    Optional parts written `[--option value]` are parsed both left out and put in."""
    if re.search(r"\[--[^]]*\]", command):
        dry_parse(re.sub(r"\s*\[--[^]]*\]", "", command))
        command = re.sub(r"\[(--[^]]*)\]", r"\1", command)
    argv = shlex.split(command)[1:]
    verb, rest = argv[0], argv[1:]
    if verb not in DELEGATED:
        build_parser().parse_args(argv)
        return
    module = importlib.import_module(f"twist_fl.tools.{DELEGATED[verb][0]}")
    if verb == "sweep":
        check_sweep_overrides(rest)
    elif verb == "bench" and rest and rest[0] in module.ELSEWHERE:
        importlib.import_module(f"twist_fl.tools.bench_{rest[0]}").build_parser().parse_args(rest[1:])
    else:
        module.build_parser().parse_args(rest)


def check_sweep_overrides(args: list[str]) -> None:
    """Hydra's own parser on the overrides, and each key must be in the sweep's config."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    from twist_fl.tools.sweep import CONF_DIR, normalize_overrides

    overrides = [a for a in normalize_overrides(args) if not a.startswith("-")]
    parsed = OverridesParser.create().parse_overrides(overrides)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose("config")
    for o in parsed:
        key = o.key_or_group
        if o.is_add() or key.startswith("hydra."):
            continue
        if OmegaConf.select(cfg, key, default="<missing>") == "<missing>":
            raise SystemExit(f"{key!r} is not a key of the sweep's config")


def test_documented_commands_are_found():
    cmds = {c.split()[1] for _, c in documented_commands() + documented_fragments()}
    # the README and the pages use the one form for the tools around training, too
    assert {"sweep", "sweep-summary", "tune", "bench", "ddp", "report"} <= cmds, cmds


def _must_pass(check, where: str, text: str, what: str) -> None:
    try:
        check(text)
    except SystemExit as e:
        pytest.fail(f"{where}: `{text}` {what}: {e}")


@pytest.mark.parametrize("where,command", documented_commands())
def test_every_documented_command_parses(where, command):
    _must_pass(dry_parse, where, command, "does not parse")


@pytest.mark.parametrize("where,text", documented_fragments())
def test_every_documented_verb_and_option_exists(where, text):
    _must_pass(check_fragment, where, text, "names a verb or option that does not exist")


def _verbs() -> list[list[str]]:
    out = []
    for action in build_parser()._subparsers._group_actions:  # the verbs, as --help lists them
        for verb, sub in action.choices.items():
            if verb in DELEGATED:
                out.append([verb])
                continue
            out.append([verb])
            for a in sub._actions:
                if hasattr(a, "choices") and isinstance(a.choices, dict):
                    out += [[verb, v] for v in a.choices]
    tune = importlib.import_module("twist_fl.tools.tune").build_parser()
    out += [["tune", v] for a in tune._actions if isinstance(getattr(a, "choices", None), dict) for v in a.choices]
    out += [["bench", v] for v in ("ddp", "export", "inference")]
    return out


@pytest.mark.parametrize("verb", _verbs(), ids=" ".join)
def test_every_verb_has_help(verb, capsys):
    import logging

    handlers = logging.getLogger().handlers[:]
    assert main([*verb, "--help"]) == 0
    assert logging.getLogger().handlers == handlers  # nothing left writing to this test's streams
    out = capsys.readouterr().out
    if verb != ["sweep"]:  # Hydra writes its own help
        assert out.startswith(f"usage: twist-fl {' '.join(verb)}"), out[:200]
    else:
        assert "override" in out.lower()


def test_top_level_help_lists_every_verb_in_one_line_each(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for verb in ("sweep", "sweep-summary", "tune", "bench", "ddp", "prune", "evaluate", "generate", "export",
                 "heatmap", "report", "deploy"):
        assert re.search(rf"^\s+{verb}\s+\S", out, flags=re.M), verb


def test_a_bad_delegated_command_is_a_usage_error(capsys):
    assert main(["bench", "nonsense"]) == 2
    assert "invalid choice" in capsys.readouterr().err
    assert main(["tune", "finetune"]) == 2  # --out is required


def test_the_docs_site_builds_strictly(tmp_path):
    """`mkdocs build --strict` (the `docs` extra; .ci/run builds it too): a broken link, a missing
    page or an API name that no longer resolves fails."""
    import os
    import subprocess
    import sys

    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    home = (tmp_path / "site" / "index.html").read_text()
    assert "What the main job gives" in home and 'href="getting-started/"' in home  # README, links made relative
    assert "sample_blueprints" in (tmp_path / "site" / "api" / "index.html").read_text()


def test_every_results_page_is_in_the_nav():
    """A results page left out of mkdocs.yml's nav is built but found by nobody."""
    import yaml

    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]

    def pages(items):
        for item in items:
            for value in (item.values() if isinstance(item, dict) else [item]):
                yield from (pages(value) if isinstance(value, list) else [value])

    listed = set(pages(nav))
    docs = {str(f.relative_to(ROOT / "docs")) for f in (ROOT / "docs").rglob("*.md")}
    assert docs - listed == set(), f"pages not in the nav: {sorted(docs - listed)}"
    assert listed - docs == set(), f"nav entries with no page: {sorted(listed - docs)}"


def test_every_results_section_opens_with_its_figure_and_every_figure_is_shown():
    """Each section of results.md opens with a figure that exists and links its full table; every
    figure under docs/results is on some page."""
    text = (ROOT / "docs" / "results.md").read_text()
    for section in text.split("\n## ")[1:]:
        title, _, body = section.partition("\n")
        head = body.strip().split("\n\n")[:2]
        figs = re.findall(r"!\[[^\]]+\]\(([^)]+\.png)\)", head[0])
        assert figs, f"section {title!r} does not open with a figure"
        assert all((ROOT / "docs" / f).is_file() for f in figs), (title, figs)
        assert re.search(r"\]\(results/\S+\.md\)", head[1]), f"section {title!r} links no full table"
    shown = {m for f in (ROOT / "docs").rglob("*.md")
             for m in (str((f.parent / x).resolve()) for x in re.findall(r"\]\(([^)]+\.png)\)", f.read_text()))}
    pngs = {str(f.resolve()) for f in (ROOT / "docs" / "results").rglob("*.png")}
    assert pngs - shown == set(), f"figures on no page: {sorted(pngs - shown)}"


def test_the_docs_record_no_machine_paths():
    """Commands in the docs are written from the repository root (runs/..., docs/...), never with
    the absolute paths of the machine they ran on."""
    bad = [(f.name, m.group(0)) for f in DOC_FILES for m in re.finditer(r"(?<![\w.])/(?:work|home|root)/\S+",
                                                                         f.read_text())]
    assert not bad, bad
