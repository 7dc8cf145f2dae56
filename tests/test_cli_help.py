"""A command line that explains itself: every option of every verb has a help line, defaults are
shown, each verb has examples, and `twist-fl --version` is the package's version."""

import argparse
import importlib
from importlib.metadata import version

import pytest

import twist_fl
from twist_fl.tools import cli

DELEGATED_PARSERS = ("tune", "bench", "sweep_summary", "bench_ddp", "bench_export", "bench_inference")


def parsers():
    """(name, parser) of every verb and sub-verb, the delegated modules' included."""
    def walk(p, name):
        yield name, p
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for sub, sp in a.choices.items():
                    if sp.add_help:  # the delegated verbs' placeholders have their own parsers, below
                        yield from walk(sp, f"{name} {sub}")
    yield from walk(cli.build_parser(), "twist-fl")
    for m in DELEGATED_PARSERS:
        yield from walk(importlib.import_module(f"twist_fl.tools.{m}").build_parser(), m)


def test_every_option_of_every_verb_has_a_help_line():
    missing = [(name, a.option_strings or a.dest) for name, p in parsers() for a in p._actions
               if not isinstance(a, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction))
               and not (a.help or "").strip()]
    assert not missing, missing
    assert len(list(parsers())) > 20


def test_every_verb_shows_its_defaults_and_examples():
    for name, p in parsers():
        text = p.format_help()
        assert "examples:\n  " in text, name
        for a in p._actions:
            if a.option_strings and a.default not in (None, "", False, [], argparse.SUPPRESS) and \
                    not isinstance(a, (argparse._HelpAction, argparse._VersionAction)):
                assert f"(default: {a.default})" in " ".join(text.split()) or "%(default)" in (a.help or ""), \
                    (name, a.option_strings)


def test_version_is_the_package_metadata(capsys):
    assert twist_fl.__version__ == version("twist-fl")
    with pytest.raises(SystemExit) as e:
        cli.build_parser().parse_args(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"twist-fl {version('twist-fl')}"
    assert cli.main(["--version"]) == 0


def test_descriptions_are_whole():
    from twist_fl.tools import bench_ddp

    text = bench_ddp.build_parser().format_help()
    assert "(−31.7% latency, −30.4% bytes for TwIST vs DDP)." in " ".join(text.split())


def test_the_changelog_has_this_version():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "CHANGELOG.md").read_text()
    assert f"## [{version('twist-fl')}]" in text and "Keep a Changelog" in text
