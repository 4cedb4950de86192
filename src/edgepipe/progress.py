"""Progress bars on a terminal, nothing elsewhere (CI logs, pipes): training, calibration, the benchmark.

A bar is drawn on stderr only when stderr is a terminal; tqdm's monitor thread is off, so no bar wakes
up inside a timed region (the benchmark updates its bar between timed blocks only)."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any, TypeVar

T = TypeVar("T")


def shown() -> bool:
    return sys.stderr.isatty()


def bar(iterable: Iterable[T] | None = None, *, desc: str, total: int | None = None, unit: str = "it") -> Any:
    """A tqdm bar over `iterable` (or a manual one, `.update()`), disabled when stderr is not a terminal."""
    from tqdm import tqdm

    tqdm.monitor_interval = 0
    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=not shown(), leave=False, dynamic_ncols=True)
