"""The results figures: each drawn from the JSON its command writes (`twist-fl replot`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_replot_draws_every_figure_from_its_json(tmp_path):
    from twist_fl.tools.cli import main

    for sub in ("peers/iid", "tuned", "default", "heatmap", "ablation-alpha"):
        src = ROOT / "docs" / "results" / sub
        shutil.copytree(src, tmp_path / sub, ignore=shutil.ignore_patterns("*.png"))
    assert main(["replot", str(tmp_path)]) == 0
    for png in ("peers/iid/tuning.png", "tuned/tuning.png", "default/comparison.png", "heatmap/heatmap.png",
                "ablation-alpha/summary.png"):
        data = (tmp_path / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, png


def test_the_tuning_figure_has_one_curve_per_method_at_its_rate(tmp_path, monkeypatch):
    from twist_fl.core import report

    tuning = json.loads((ROOT / "docs" / "results" / "peers" / "iid" / "tuning.json").read_text())
    seen = {}

    def keep(series, path, n_blocks, ylabel, lines=None, title=""):
        seen.update(series=series, n=n_blocks)
        return path

    monkeypatch.setattr(report, "keeps_plot", keep)
    report.tuning_plot(tuning, tmp_path / "t.png")
    assert seen["n"] == 8  # N from the sizes N/4, N/2, 3N/4 of an older tuning.json
    assert len(seen["series"]) == len(tuning["tuned"])
    fjord = next(r for r in tuning["tuned"] if r["method"] == "fjord")
    pts = dict((x, m) for x, m, _ in seen["series"][f"fjord (lr {fjord['lr']:g}, 3 seeds)"])
    assert abs(pts[4] - sum(fjord["test"]["keep-4"]) / 3) < 1e-12  # the deployed prefix, mean over seeds
    assert abs(pts[8] - sum(fjord["test"]["full"]) / 3) < 1e-12
