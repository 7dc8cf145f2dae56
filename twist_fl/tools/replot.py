"""Draw a results folder's figures again from the JSON beside them, with no training and no
evaluation: `twist-fl replot docs/results` after a change to the plots' style.

Each figure is the one its command writes, from the same data: `comparison.png` from a report's
`results.json` (`twist-fl report`), `heatmap.png` from `heatmap.json` (`twist-fl heatmap`),
`summary.png` from a sweep's `summary.json` (`twist-fl sweep-summary`), `tuning.png` from
`tuning.json` (`twist-fl tune table`), `finetune.png` from `finetune.json` (`twist-fl tune
finetune-table`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..core.report import comparison_plot, finetune_plot, heatmap_plot, tuning_plot

log = logging.getLogger(__name__)


def replot(root: Path) -> list[Path]:
    """Every figure under `root` whose data file is there, drawn again; the paths written."""
    from .sweep_summary import _plot

    done = []
    for f in sorted(Path(root).rglob("results.json")):
        res = json.loads(f.read_text())
        if "structured" in res and "unstructured" in res:
            done.append(comparison_plot(res, f.parent / "comparison.png"))
    for f in sorted(Path(root).rglob("heatmap.json")):
        done.append(heatmap_plot(json.loads(f.read_text()), f.parent / "heatmap.png"))
    for f in sorted(Path(root).rglob("tuning.json")):
        if (p := tuning_plot(json.loads(f.read_text()), f.parent / "tuning.png")) is not None:
            done.append(p)
    for f in sorted(Path(root).rglob("finetune.json")):
        res = json.loads(f.read_text())
        if {"test", "baselines", "recipe", "best_structured"} <= set(res):
            done.append(finetune_plot(res, f.parent / "finetune.png"))
    for f in sorted(Path(root).rglob("summary.json")):
        out = json.loads(f.read_text())
        if {"x", "rows", "table"} <= set(out):
            keys = sorted({k for r in out["rows"] for k in r if k.startswith("keep-")}, key=lambda k: int(k[5:]))
            _plot(out, keys, f.parent / "summary.png")
            done.append(f.parent / "summary.png")
    for p in done:
        log.info("replot: %s", p)
    return done
