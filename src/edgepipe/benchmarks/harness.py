"""Latency measurement: warm-up by count and by time, interleaved rounds, robust statistics.

Artifacts are timed in rotating order over several rounds so that machine drift (frequency,
neighbours on a shared host) spreads over all of them instead of favouring whichever ran first.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class LatencyStats:
    p50: float
    p90: float
    p99: float
    mean: float
    std: float
    min: float
    max: float
    n: int

    @property
    def cv(self) -> float:
        return self.std / self.mean if self.mean > 0 else 0.0

    def to_json(self) -> dict[str, float]:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}


def summarize(samples_ms: list[float]) -> LatencyStats:
    if not samples_ms:
        raise ValueError("no latency samples")
    a = np.asarray(samples_ms, dtype=np.float64)
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return LatencyStats(
        p50=float(p50),
        p90=float(p90),
        p99=float(p99),
        mean=float(a.mean()),
        std=float(a.std(ddof=1) if len(a) > 1 else 0.0),
        min=float(a.min()),
        max=float(a.max()),
        n=len(a),
    )


def warm_up(fn: Callable[[], object], runs: int, seconds: float) -> int:
    """Call `fn` at least `runs` times and for at least `seconds`; return how many calls it took."""
    start, count = time.perf_counter(), 0
    while count < runs or time.perf_counter() - start < seconds:
        fn()
        count += 1
    return count


def measure_interleaved(
    runners: dict[str, Callable[[], object]], *, runs: int, rounds: int, warmup_runs: int, warmup_s: float
) -> dict[str, LatencyStats]:
    """Time each runner `runs` times in total, spread over `rounds` rounds in rotating order."""
    names = list(runners)
    for name in names:
        warm_up(runners[name], warmup_runs, warmup_s)
    samples: dict[str, list[float]] = {name: [] for name in names}
    per_round = math.ceil(runs / rounds)
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            fn = runners[name]
            for _ in range(min(per_round, runs - len(samples[name]))):
                start = time.perf_counter_ns()
                fn()
                samples[name].append((time.perf_counter_ns() - start) / 1e6)
    return {name: summarize(values) for name, values in samples.items()}
