"""TwIST (Independent Subnetwork Training for Transformers) as a Flower app.

The stable names, importable from here wherever their modules live:

    from twist_fl import GPT, GPTConfig, Blueprint, sample_blueprints, slice_state, coverage_average

Packages, imported one way (core <- federated <- apps; evaluation and tools on top):
`core` (no Flower, Ray, subprocess or network), `federated` (Flower), `deploy` (real
processes), `evaluation` (the verbs after training), `tools` (entry points).
"""

from importlib.metadata import PackageNotFoundError, version

from .core.blocks import coverage_average, slice_state
from .core.blueprint import Blueprint, sample_blueprints
from .core.config import GPTConfig
from .core.model import GPT

try:
    __version__ = version("twist-fl")  # the installed package's; `twist-fl --version` prints it
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__", "GPT", "GPTConfig", "Blueprint", "sample_blueprints", "slice_state", "coverage_average"]
