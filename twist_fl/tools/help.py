"""The command line's help, in one place: one formatter (every default shown, examples kept as
written) and each verb's examples, so that `twist-fl <verb> --help` explains itself."""

from __future__ import annotations

import argparse
import re

from .. import __version__


class Formatter(argparse.RawDescriptionHelpFormatter):
    """argparse's defaults formatter, without the noise of empty defaults: an option's default is
    appended to its help unless it is empty (None, "", False, []), or the help already says it."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=30, width=100)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        empty = action.default is None or action.default is argparse.SUPPRESS or action.default in ("", False, [])
        if "%(default)" in text or empty or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def description(doc: str | None) -> str:
    """A module docstring's first paragraph, whole (a sentence may span lines), wrapped."""
    import textwrap

    return textwrap.fill(" ".join((doc or "").strip().split("\n\n")[0].split()), width=100)


EXAMPLES: dict[str, list[str]] = {
    "twist-fl": ["twist-fl check                               # a tiny run in under a minute: is the install sound?",
                 "twist-fl evaluate outputs/<run> --keeps 2,4,6",
                 "twist-fl prune outputs/<run> --keep 4 --out small/",
                 "twist-fl tune finetune --out runs/ft --threads 1",
                 "twist-fl <verb> --help"],
    "check": ["twist-fl check", "twist-fl check --rounds 4"],
    "ddp": ["twist-fl ddp --nproc 4",
            "twist-fl ddp --nproc 4 --run-config \"lr=1.5e-3 num-server-rounds=60 out-dir='runs' run-name='ddp'\""],
    "prune": ["twist-fl prune outputs/<run> --keep 4 --out small/",
              "twist-fl prune outputs/<run> --keep 4 --method flap --out small-flap/",
              "twist-fl prune outputs/<ordered run> --keep 4 --method prefix --out small-prefix/"],
    "evaluate": ["twist-fl evaluate outputs/<run>",
                 "twist-fl evaluate outputs/<run> --split test --keeps 2,4,6 --draws 5 --json eval.json",
                 "twist-fl evaluate small/ --split test"],
    "generate": ["twist-fl generate outputs/<run> --prompt 'ROMEO:'",
                 "twist-fl generate small/ --prompt 'ROMEO:' --temperature 0.8 --top-k 40 --max-new-tokens 400"],
    "export": ["twist-fl export small/ --format hf --out small-hf/",
               "twist-fl export small/ --format onnx --int8 --out small-onnx/"],
    "heatmap": ["twist-fl heatmap outputs/<run k2> outputs/<run k4> outputs/<run k6> --keeps 2,4,6 --out heatmap/"],
    "report": ["twist-fl report --twist runs/a/twist-s0 runs/a/twist-s1 --dense runs/a/ddp-s0 runs/a/ddp-s1 "
               "--keeps 2,4,6 --out report/"],
    "replot": ["twist-fl replot docs/results"],
    "deploy": ["twist-fl deploy local --nodes 2", "twist-fl deploy certs --out certs/ --host 10.0.0.5",
               "twist-fl deploy node-key --out keys/node-1"],
    "deploy local": ["twist-fl deploy local --nodes 2",
                     "twist-fl deploy local --nodes 3 --modes true,masked --run-config \"num-server-rounds=5\""],
    "deploy certs": ["twist-fl deploy certs --out certs/ --host 10.0.0.5 --host superlink.example.org"],
    "deploy node-key": ["twist-fl deploy node-key --out keys/node-1"],
    "sweep": ["twist-fl sweep run.keep=2 num_supernodes=4",
              "twist-fl sweep --multirun run.local-steps=1,5,15 total_local_steps=900"],
    "sweep-summary": ["twist-fl sweep-summary multirun/<time>", "twist-fl sweep-summary multirun/<time> --x run.alpha"],
    "tune": ["twist-fl tune run --out runs/tune --methods twist,fedavg,ddp --parallel 2",
             "twist-fl tune table runs/tune --out docs/results/tuned",
             "twist-fl tune finetune --out runs/ft --threads 1",
             "twist-fl tune finetune-table runs/ft --out docs/results/finetune"],
    "tune run": ["twist-fl tune run --out runs/tune --methods twist,fedavg,ddp --parallel 2",
                 "twist-fl tune run --out runs/peers --methods twist,fjord,heterofl --capacities 1,0.75,0.5,0.25"],
    "tune table": ["twist-fl tune table runs/tune --out docs/results/tuned --force"],
    "tune finetune": ["twist-fl tune finetune --out runs/ft --threads 1",
                      "twist-fl tune finetune --out runs/ft --threads 1 --reverse   # a second lane on 2 cores",
                      "twist-fl tune finetune --out runs/ft --stages levers --variants 'ls1:local-steps=1'"],
    "tune finetune-table": ["twist-fl tune finetune-table runs/ft --out docs/results/finetune --force"],
    "bench": ["twist-fl bench bytes", "twist-fl bench step --shape default --repeats 3",
              "twist-fl bench all --json bench.json", "twist-fl bench ddp --shape default",
              "twist-fl bench inference --preset gpt2 --keep 6"],
    "bench ddp": ["twist-fl bench ddp --shape default --nproc 2 --steps 20"],
    "bench export": ["twist-fl bench export --model outputs/<run> --shape default"],
    "bench inference": ["twist-fl bench inference --preset gpt2 --keep 6 --decode 32"],
}


def epilog(verb: str) -> str:
    """The examples block of a verb's --help."""
    return "examples:\n" + "\n".join(f"  {e}" for e in EXAMPLES[verb])


def parser(prog: str, doc: str | None, verb: str, cls: type[argparse.ArgumentParser] = argparse.ArgumentParser,
           **kw) -> argparse.ArgumentParser:
    """An argument parser with the shared formatter, the module's description and the verb's examples."""
    return cls(prog=prog, description=description(doc), epilog=epilog(verb), formatter_class=Formatter, **kw)


def sub(subparsers, name: str, verb: str, help: str, **kw) -> argparse.ArgumentParser:  # noqa: A002
    """A sub-verb's parser: its help line as its description, the shared formatter, its examples."""
    import textwrap

    return subparsers.add_parser(name, help=help, description=textwrap.fill(help, width=100), epilog=epilog(verb),
                                 formatter_class=Formatter, **kw)


def add_version(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--version", action="version", version=f"twist-fl {__version__}")


_ABSOLUTE = re.compile(r"(?<![\w.])/[^\s'\"]*?/((?:runs|docs)/[^\s'\"]*)")


def shown(command: str) -> str:
    """A command as the tables show it: an absolute path into a `runs/` or `docs/` folder written
    from that folder on (as from the repository root), so no machine's layout is recorded."""
    return _ABSOLUTE.sub(r"\1", command)
