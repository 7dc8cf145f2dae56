"""Paired ratios over seeds, with the sample standard deviation and a 95% Student-t interval.

A comparison of two methods on the same seeds (the same dense model, data order and draws) is
the ratio of their perplexities per seed; its mean, the sample standard deviation (n - 1), and
mean ± t(0.975, n - 1) · sd / sqrt(n). With one seed there is no spread and no interval.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

# Two-sided 95% quantiles of Student's t, t(0.975, df), for df = 1..30 (standard tables).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t975(df: int) -> float:
    """t(0.975, df): the table for df <= 30, the Cornish-Fisher expansion beyond (error < 1e-3)."""
    if df < 1:
        raise ValueError(f"a t interval needs df >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


@dataclass(frozen=True)
class Paired:
    """A ratio paired by seed: its mean, sample sd, 95% t interval (None with one seed), seeds."""

    mean: float
    sd: float | None
    lo: float | None
    hi: float | None
    seeds: tuple[int, ...]

    @property
    def n(self) -> int:
        return len(self.seeds)

    def crosses(self, value: float = 1.0) -> bool:
        """Whether the interval holds `value` (a difference within noise); True with one seed."""
        return self.lo is None or self.lo <= value <= self.hi

    def text(self) -> str:
        """'0.933 ± 0.006 [0.918, 0.948]' (mean ± sample sd [95% interval]); one seed: '0.933 (1 seed)'."""
        if self.sd is None:
            return f"{self.mean:.3f} (1 seed)"
        return f"{self.mean:.3f} ± {self.sd:.3f} [{self.lo:.3f}, {self.hi:.3f}]"

    def to_dict(self) -> dict:
        return {"mean": self.mean, "sd": self.sd, "ci95": [self.lo, self.hi] if self.lo is not None else None,
                "seeds": list(self.seeds)}


def paired_ratio(a: Mapping[int, float], b: Mapping[int, float]) -> Paired | None:
    """a[s] / b[s] over the seeds both hold; None when they share none."""
    seeds = tuple(sorted(set(a) & set(b)))
    if not seeds:
        return None
    r = [a[s] / b[s] for s in seeds]
    mean = sum(r) / len(r)
    if len(r) == 1:
        return Paired(mean, None, None, None, seeds)
    sd = math.sqrt(sum((x - mean) ** 2 for x in r) / (len(r) - 1))
    half = t975(len(r) - 1) * sd / math.sqrt(len(r))
    return Paired(mean, sd, mean - half, mean + half, seeds)


def mean_sd(values: list[float]) -> str:
    """'6.605 ± 0.014' (mean ± sample sd); one value as it is; '' for none."""
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.3f}"
    m = sum(values) / len(values)
    return f"{m:.3f} ± {math.sqrt(sum((x - m) ** 2 for x in values) / (len(values) - 1)):.3f}"
