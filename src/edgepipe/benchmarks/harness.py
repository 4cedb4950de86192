"""Latency measurement: warm-up by count and by time, interleaved rounds, robust statistics.

Artifacts are timed in rotating order over several rounds so that machine drift (frequency,
neighbours on a shared host) spreads over all of them instead of favouring whichever ran first,
and one at a time so that they do not compete for the cores.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable
from contextlib import AbstractContextManager
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


Runner = Callable[[], object]
Opener = Callable[[str], AbstractContextManager[dict[Hashable, Runner]]]


def measure_interleaved(
    names: list[str], open_runners: Opener, *, runs: int, rounds: int, warmup_runs: int, warmup_s: float
) -> dict[tuple[str, Hashable], LatencyStats]:
    """Time every runner of every name `runs` times, spread over `rounds` rounds in rotating order.

    `open_runners(name)` loads one artifact and yields its runners (one per input shape); it is closed
    before the next artifact opens. Only one artifact is alive at a time: idle onnxruntime sessions keep
    their worker threads spinning for a while, and on a 2-core machine that once stole enough time from
    the session being timed to push std/mean to 0.3-0.4 (benchmarks/RESULTS.md). The first block of each
    runner is warmed up by count and by time; a block re-opened in a later round by count only: on the
    demo's 8 artifacts, 0.5 s more after 5 runs moved p50 by 0.96-1.04x (median 1.00), while it took a
    quarter of the benchmark's time (RESULTS.md). The progress bar moves between blocks, never inside one.
    """
    from edgepipe.progress import bar

    samples: dict[tuple[str, Hashable], list[float]] = {}
    per_round = math.ceil(runs / rounds)
    with bar(desc="benchmark", total=rounds * len(names), unit="block") as blocks:
        for r in range(rounds):
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                with open_runners(name) as runners:
                    for key, fn in runners.items():
                        taken = samples.setdefault((name, key), [])
                        warm_up(fn, warmup_runs, warmup_s if r == 0 else 0.0)
                        for _ in range(min(per_round, runs - len(taken))):
                            start = time.perf_counter_ns()
                            fn()
                            taken.append((time.perf_counter_ns() - start) / 1e6)
                blocks.update()
    return {key: summarize(values) for key, values in samples.items()}


def cuda_event_ms(fn: Callable[[], object], runs: int, warmup_runs: int = 5) -> list[float]:
    """Milliseconds of `fn` on the current CUDA stream, by CUDA events (the GPU's own clock).

    The end event is synchronised per run, so each sample is the device time of one call; host
    overhead before the kernels are queued is excluded, which is what `run_on_device` wants measured."""
    import torch

    for _ in range(warmup_runs):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(float(start.elapsed_time(end)))
    return samples
