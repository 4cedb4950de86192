import time
from contextlib import contextmanager

import numpy as np
import pytest

from edgepipe.benchmarks.harness import measure_interleaved, summarize, warm_up
from edgepipe.benchmarks.report import findings, render_markdown


def test_summarize_percentiles() -> None:
    stats = summarize([float(v) for v in range(1, 101)])
    assert stats.p50 == pytest.approx(50.5) and stats.p90 == pytest.approx(90.1)
    assert stats.p99 == pytest.approx(99.01) and stats.mean == pytest.approx(50.5)
    assert stats.std == pytest.approx(np.std(np.arange(1, 101), ddof=1)) and stats.n == 100


def test_warm_up_by_count_and_by_time() -> None:
    calls = []
    assert warm_up(lambda: calls.append(1), runs=7, seconds=0.0) == 7
    started = time.perf_counter()
    count = warm_up(lambda: time.sleep(0.01), runs=1, seconds=0.05)
    assert time.perf_counter() - started >= 0.05 and count >= 4


def test_interleaved_runs_one_artifact_at_a_time_exactly_runs_times() -> None:
    calls: dict[tuple[str, int], int] = {}
    alive: list[str] = []
    opened: list[str] = []

    @contextmanager
    def open_runners(name: str):
        assert alive == [], "two artifacts open at once"
        alive.append(name)
        opened.append(name)
        seconds = {"a": 0.001, "b": 0.004}[name]

        def make(shape: int):
            def run() -> None:
                calls[(name, shape)] = calls.get((name, shape), 0) + 1
                time.sleep(seconds * shape)

            return run

        yield {1: make(1), 2: make(2)}
        alive.pop()

    stats = measure_interleaved(["a", "b"], open_runners, runs=11, rounds=3, warmup_runs=2, warmup_s=0.0)
    assert opened == ["a", "b", "b", "a", "a", "b"]  # rotating order, one block per round
    assert calls == {("a", 1): 17, ("a", 2): 17, ("b", 1): 17, ("b", 2): 17}  # 11 timed + 3 x 2 warm-up
    assert {s.n for s in stats.values()} == {11}
    assert stats[("b", 1)].p50 > stats[("a", 1)].p50 > 0.9
    assert stats[("a", 2)].p50 > stats[("a", 1)].p50


def test_warm_up_by_time_only_at_the_first_opening() -> None:
    calls: list[int] = []

    @contextmanager
    def open_runners(name: str):
        calls.append(0)

        def run() -> None:
            calls[-1] += 1
            time.sleep(0.01)

        yield {1: run}

    measure_interleaved(["a"], open_runners, runs=3, rounds=3, warmup_runs=1, warmup_s=0.05)
    assert calls[0] >= 4 + 1 and calls[1:] == [2, 2]  # >= 0.05 s of 10 ms calls + 1 timed; then 1 + 1


def _row(name: str, precision: str, p50: float, std: float = 0.1) -> dict:
    return {
        "artifact": name,
        "engine": "ort-cpu",
        "precision": precision,
        "target": "cpu",
        "size_mb": 1.0,
        "accuracy": 0.8,
        "batch": 1,
        "seq_len": 128,
        "throughput_per_s": 1000 / p50,
        "latency_ms": {"p50": p50, "p90": p50, "p99": p50, "mean": p50, "std": std},
        "runtime": {},
    }


def test_report_says_when_static_int8_is_slower() -> None:
    report = {
        "machine": {
            "cpu": "x",
            "physical_cores": 2,
            "logical_cores": 2,
            "memory_gb": 1,
            "cpu_flags": [],
            "os": "l",
        },
        "versions": {"onnxruntime": "1"},
        "threads": 2,
        "eval_examples": 10,
        "reference": "fp32",
        "settings": {"runs": 50, "rounds": 5, "warmup_runs": 5, "warmup_s": 0.5},
        "results": [
            _row("fp32", "fp32", 20),
            _row("fp32-fused", "fp32", 18),
            _row("int8-dynamic", "int8-dynamic", 12),
            _row("int8-static", "int8-static", 19),
        ],
        "warnings": ["noisy"],
        "skipped": [{"artifact": "fp32", "target": "cuda", "reason": "no GPU"}],
    }
    notes = findings(report)
    assert any("static int8 `int8-static` (19.00 ms) is slower than `int8-dynamic` (12.00 ms)" in n for n in notes)
    assert any("fastest is `int8-dynamic` at 12.00 ms p50, 1.67x ORT fp32" in n for n in notes)
    text = render_markdown(report, "t")
    assert "| int8-dynamic | 12.00 |" in text and "skipped `fp32` on cuda: no GPU" in text
