"""Progress of long work: a tqdm bar on a terminal, a log line every few seconds otherwise.

Library loops that can take long (evaluation batches, calibration passes, best-of-K draws)
wrap their iterables in `progress(...)`. It shows nothing until a command-line tool turns it on
with `enable()`, so nodes, the ServerApp and tests stay quiet.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)

LOG_EVERY_S = 5.0  # without a terminal: one line at most this often
_enabled = False


def enable(on: bool = True) -> None:
    """Show progress in this process (the `twist-fl` verbs call it)."""
    global _enabled
    _enabled = on


def progress(items: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
    """`items`, with progress shown while they are consumed (when enabled)."""
    if not _enabled:
        yield from items
        return
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    if sys.stderr.isatty():
        from tqdm import tqdm

        yield from tqdm(items, desc=desc, total=total, leave=False, dynamic_ncols=True)
        return
    start = last = time.monotonic()
    i = 0
    for i, item in enumerate(items, 1):
        yield item
        now = time.monotonic()
        if now - last >= LOG_EVERY_S:
            last = now
            log.info("%s: %d/%s (%.0f s)", desc, i, total if total is not None else "?", now - start)
    if last != start:  # it took long enough to log once: say that it ended
        log.info("%s: %d/%s done (%.0f s)", desc, i, total if total is not None else "?", time.monotonic() - start)
