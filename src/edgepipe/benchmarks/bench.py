"""Benchmark every artifact of a run on every requested target: accuracy and latency, one report."""

from __future__ import annotations

import functools
import gc
import logging
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np

from edgepipe.benchmarks.harness import LatencyStats, measure_interleaved
from edgepipe.errors import EdgepipeError
from edgepipe.runtime.backends import BACKENDS, RuntimeOptions
from edgepipe.runtime.host import host_info, versions
from edgepipe.runtime.predictor import Predictor

log = logging.getLogger(__name__)
REPORT_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class BenchItem:
    name: str
    path: Path  # artifact folder
    precision: str
    model_format: str  # "onnx" | "torch"
    options: RuntimeOptions | None = None  # per-item runtime settings (A/B runs); default: the bench's

    @property
    def size_mb(self) -> float:
        files = [self.path / "model.onnx"] if self.model_format == "onnx" else list(self.path.glob("*.safetensors"))
        return round(sum(f.stat().st_size for f in files if f.exists()) / 1e6, 2)


@dataclass(frozen=True)
class BenchSettings:
    targets: list[str]
    batch_sizes: list[int]
    seq_lens: list[int]
    runs: int
    rounds: int
    warmup_runs: int
    warmup_s: float
    threads: int | None
    denormal_as_zero: bool
    graph_optimization: str
    eval_batch_size: int
    eval_max_seq_len: int
    eval_max_examples: int | None
    cv_warn: float
    profile: bool = False
    input_shape: tuple[int, ...] | None = None  # image models: (channels, height, width); None for text

    def describe_input(self, seq_len: int) -> str:
        if self.input_shape:
            return "image " + "x".join(map(str, self.input_shape))
        return f"sequence {seq_len}"


Inputs = list[str] | np.ndarray  # texts, or float32 images (N, C, H, W)


def accuracy(predictor: Predictor, inputs: Inputs, labels: np.ndarray, batch_size: int) -> float:
    logits = predictor.logits(inputs, batch_size=batch_size)
    return float((logits.argmax(-1) == labels).mean())


def _backend_for(item: BenchItem, target: str) -> tuple[str | None, str | None]:
    """(backend name, None) or (None, reason it cannot run)."""
    reasons = []
    for backend in BACKENDS.values():
        if backend.model_format == item.model_format and backend.target == target:
            reason = backend.available()
            if reason is None:
                return backend.name, None
            reasons.append(f"{backend.name}: {reason}")
    return None, "; ".join(reasons) or f"no backend runs {item.model_format} models on {target} yet"


def _measure_target(
    usable: dict[str, BenchItem],
    target: str,
    inputs: Inputs,
    labels: np.ndarray,
    settings: BenchSettings,
) -> tuple[dict[str, float], dict[tuple[str, Hashable], LatencyStats], dict[str, dict[str, Any]]]:
    """Accuracy, latency per (artifact, shape) and runtime settings, one artifact alive at a time."""
    options = RuntimeOptions(
        threads=settings.threads,
        denormal_as_zero=settings.denormal_as_zero,
        optimization=settings.graph_optimization,
    )
    described: dict[str, dict[str, Any]] = {}

    def load(name: str) -> Predictor:
        predictor = Predictor.load(usable[name].path, options=usable[name].options or options, target=target)
        predictor.max_seq_len = settings.eval_max_seq_len
        described[name] = predictor.session.describe()
        return predictor

    acc = {}
    for name in usable:
        acc[name] = accuracy(load(name), inputs, labels, settings.eval_batch_size)
        gc.collect()

    @contextmanager
    def open_runners(name: str) -> Iterator[dict[Hashable, Callable[[], object]]]:
        predictor = load(name)
        runners: dict[Hashable, Callable[[], object]] = {}
        for batch in settings.batch_sizes:
            index = np.arange(batch) % len(inputs)
            batch_inputs = inputs[index] if isinstance(inputs, np.ndarray) else [inputs[i] for i in index]
            for seq_len in settings.seq_lens:
                feeds = predictor.encode(batch_inputs, pad_to=seq_len)
                runners[(batch, seq_len)] = functools.partial(predictor.session.run, feeds)
        yield runners
        del predictor, runners
        gc.collect()

    stats = measure_interleaved(
        list(usable),
        open_runners,
        runs=settings.runs,
        rounds=settings.rounds,
        warmup_runs=settings.warmup_runs,
        warmup_s=settings.warmup_s,
    )
    return acc, stats, described


def _profile(usable: dict[str, BenchItem], inputs: Inputs, settings: BenchSettings) -> dict[str, Any]:
    """Per-op-type kernel time of every ONNX artifact at the first shape (outside the timed runs)."""
    from edgepipe.runtime.profiling import op_type_profile

    options = RuntimeOptions(
        threads=settings.threads, denormal_as_zero=settings.denormal_as_zero, optimization=settings.graph_optimization
    )
    batch, seq_len = settings.batch_sizes[0], settings.seq_lens[0]
    index = np.arange(batch) % len(inputs)
    batch_inputs = inputs[index] if isinstance(inputs, np.ndarray) else [inputs[i] for i in index]
    profiles = {}
    for name, item in usable.items():
        if item.model_format != "onnx":
            continue
        predictor = Predictor.load(item.path, options=item.options or options)
        feeds = predictor.encode(batch_inputs, pad_to=seq_len)
        profiles[name] = op_type_profile(item.path / "model.onnx", feeds, min(settings.runs, 30), options)
        gc.collect()
    return {"batch": batch, "seq_len": seq_len, "input": settings.describe_input(seq_len), "artifacts": profiles}


def run_bench(
    items: list[BenchItem],
    inputs: Inputs,
    labels: np.ndarray,
    settings: BenchSettings,
    reference: str | None,
) -> dict[str, Any]:
    """Measure every item on every target; returns the report (schema_version 1) as a dict."""
    if settings.eval_max_examples is not None:
        inputs, labels = inputs[: settings.eval_max_examples], labels[: settings.eval_max_examples]
    results: list[dict[str, Any]] = []
    op_profile: dict[str, Any] | None = None
    skipped: list[dict[str, str]] = []
    warnings: list[str] = []
    for target in settings.targets:
        usable: dict[str, BenchItem] = {}
        engines: dict[str, str] = {}
        for item in items:
            backend, reason = _backend_for(item, target)
            if backend is None:
                skipped.append({"artifact": item.name, "target": target, "reason": reason or ""})
            else:
                usable[item.name], engines[item.name] = item, backend
        if not usable:
            continue
        acc, stats, described = _measure_target(usable, target, inputs, labels, settings)
        if settings.profile and target == "cpu":
            op_profile = _profile(usable, inputs, settings)
        order = list(usable)
        for (name, shape), s in sorted(stats.items(), key=lambda kv: (kv[0][1], order.index(kv[0][0]))):
            batch, seq_len = cast(tuple[int, int], shape)
            if s.cv > settings.cv_warn:
                warnings.append(
                    f"{name} at batch {batch}, {settings.describe_input(seq_len)}: latency std/mean = {s.cv:.2f} "
                    f"(> {settings.cv_warn}); the machine was noisy, compare with care"
                )
            results.append(
                {
                    "artifact": name,
                    "engine": engines[name],
                    "precision": usable[name].precision,
                    "target": target,
                    "size_mb": usable[name].size_mb,
                    "accuracy": round(acc[name], 5),
                    "batch": batch,
                    "seq_len": seq_len,
                    "input": settings.describe_input(seq_len),
                    "latency_ms": s.to_json(),
                    "throughput_per_s": round(batch * 1000.0 / s.mean, 2),
                    "runtime": described[name],
                }
            )
    if not results:
        raise EdgepipeError(
            "nothing could be benchmarked: "
            + "; ".join(f"{s['artifact']} on {s['target']}: {s['reason']}" for s in skipped)
        )
    return {
        "schema_version": REPORT_SCHEMA_VERSION,
        "machine": host_info(),
        "versions": versions(),
        "settings": settings.__dict__,
        "threads": RuntimeOptions(threads=settings.threads).resolved_threads,
        "eval_examples": len(inputs),
        "reference": reference,
        "results": results,
        "skipped": skipped,
        "warnings": warnings,
        "op_profile": op_profile,
    }
