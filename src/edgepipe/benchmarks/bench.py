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

from edgepipe.benchmarks.harness import LatencyStats, cuda_event_ms, measure_interleaved, summarize
from edgepipe.benchmarks.metrics import argmax_agreement, metric_name, score
from edgepipe.errors import EdgepipeError
from edgepipe.progress import bar
from edgepipe.runtime.backends import BACKENDS, DEFAULT_BACKENDS, RuntimeOptions, default_backend, model_file
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
        if self.model_format == "onnx":  # the model with its external data, or OpenVINO's IR
            model = model_file(self.path)
            files = [model, model.with_name(f"{model.name}.data"), self.path / "model.xml", self.path / "model.bin"]
        else:
            files = list(self.path.glob("*.safetensors"))
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
    label_names: tuple[str, ...] = ()  # the data's labels in id order (NER: BIO tags, for entity spans)
    engines: list[str] | None = None  # backends to run every artifact on; None: the default per target

    def describe_input(self, seq_len: int) -> str:
        if self.input_shape:
            return "image " + "x".join(map(str, self.input_shape))
        return f"sequence {seq_len}"


Inputs = list[str] | np.ndarray  # texts, or float32 images (N, C, H, W)


def predict_logits(predictor: Predictor, inputs: Inputs, batch_size: int) -> np.ndarray:
    return predictor.logits(inputs, batch_size=batch_size)


def _backends_for(item: BenchItem, target: str, engines: list[str] | None) -> list[tuple[str | None, str]]:
    """[(backend name, label)] to run `item` on, or [(None, reason)] for each that cannot run here.

    A run on the target's default backend keeps the artifact's name; any other engine adds `@engine`."""
    names = [n for n in engines or [] if n in BACKENDS] if engines is not None else []
    if engines is None:
        default = default_backend(item.model_format, target, item.path)  # an IR: OpenVINO
        names = [default] if default else []
    chosen: list[tuple[str | None, str]] = []
    for name in names:
        backend = BACKENDS[name]
        if backend.model_format != item.model_format or backend.target != target:
            continue
        reason = backend.available() or backend.refuses(item.path)
        label = item.name if name == DEFAULT_BACKENDS.get((item.model_format, target)) else f"{item.name}@{name}"
        chosen.append((None, f"{name}: {reason}") if reason else (name, label))
    return chosen or [(None, f"no backend runs {item.model_format} models on {target} here")]


def _measure_target(
    usable: dict[str, tuple[BenchItem, str]],
    target: str,
    inputs: Inputs,
    settings: BenchSettings,
) -> tuple[dict[str, np.ndarray], dict[tuple[str, Hashable], LatencyStats], dict[str, dict[str, Any]]]:
    """Logits on the eval inputs, latency per (label, shape) and runtime settings, one model alive at a time."""
    options = RuntimeOptions(
        threads=settings.threads,
        denormal_as_zero=settings.denormal_as_zero,
        optimization=settings.graph_optimization,
    )
    described: dict[str, dict[str, Any]] = {}

    def load(label: str) -> Predictor:
        item, backend = usable[label]
        predictor = Predictor.load(item.path, options=item.options or options, target=target, backend=backend)
        predictor.max_seq_len = settings.eval_max_seq_len
        described[label] = predictor.session.describe()
        return predictor

    logits = {}
    for label in bar(usable, desc="evaluate", unit="artifact"):
        logits[label] = predict_logits(load(label), inputs, settings.eval_batch_size)
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
    return logits, stats, described


def _device_times(
    usable: dict[str, tuple[BenchItem, str]], inputs: Inputs, settings: BenchSettings
) -> dict[tuple[str, Hashable], dict[str, Any]]:
    """On CUDA: the model alone on inputs already on the GPU (CUDA events), and the host-to-device copy."""
    times: dict[tuple[str, Hashable], dict[str, Any]] = {}
    for label, (item, backend) in usable.items():
        predictor = Predictor.load(item.path, target="cuda", backend=backend)
        session: Any = predictor.session
        if not hasattr(session, "run_on_device"):
            continue
        for batch in settings.batch_sizes:
            index = np.arange(batch) % len(inputs)
            batch_inputs = inputs[index] if isinstance(inputs, np.ndarray) else [inputs[i] for i in index]
            for seq_len in settings.seq_lens:
                feeds = predictor.encode(batch_inputs, pad_to=seq_len)
                tensors = session.to_device(feeds)
                compute = functools.partial(session.run_on_device, tensors)
                device = summarize(cuda_event_ms(compute, settings.runs))
                copy = summarize(
                    cuda_event_ms(functools.partial(session.to_device, feeds), max(10, settings.runs // 5))
                )
                times[(label, (batch, seq_len))] = {"device_ms": device.to_json(), "h2d_ms": copy.to_json()}
        del predictor
        gc.collect()
    return times


def _reference_logits(
    items: list[BenchItem], measured: dict[tuple[str, str], np.ndarray], inputs: Inputs, settings: BenchSettings
) -> tuple[str, np.ndarray] | None:
    """The fp32 ONNX model's logits on ONNX Runtime's CPU provider: what every engine is compared with.

    Taken from the cpu target's own measurement when it ran there; computed only otherwise."""
    reference = next((i for i in items if i.model_format == "onnx" and i.precision == "fp32"), None)
    if reference is None:
        return None
    if ("cpu", reference.name) in measured:  # the cpu target runs it on its default backend, ort-cpu
        return reference.name, measured[("cpu", reference.name)]
    if BACKENDS["ort-cpu"].available() is not None:
        return None
    predictor = Predictor.load(reference.path, backend="ort-cpu")
    predictor.max_seq_len = settings.eval_max_seq_len
    return reference.name, predict_logits(predictor, inputs, settings.eval_batch_size)


def agreement(logits: np.ndarray, reference: np.ndarray, labels: np.ndarray | None = None) -> dict[str, float]:
    return {
        "max_abs_diff": round(float(np.abs(logits.astype(np.float32) - reference).max()), 6),
        "argmax_agreement": round(argmax_agreement(logits, reference, labels), 5),
    }


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
        profiles[name] = op_type_profile(model_file(item.path), feeds, min(settings.runs, 30), options)
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
    measured: dict[tuple[str, str], np.ndarray] = {}  # (target, label) -> logits on the eval inputs
    for name in settings.engines or []:  # named, but for a target this bench does not measure
        target = BACKENDS[name].target if name in BACKENDS else "?"
        if name in BACKENDS and target not in settings.targets:
            reason = f"{name}: runs on {target}, which bench.targets ({', '.join(settings.targets)}) does not list"
            skipped.append({"artifact": "*", "target": target, "reason": reason})
    for target in settings.targets:
        usable: dict[str, tuple[BenchItem, str]] = {}
        for item in items:
            for backend, label in _backends_for(item, target, settings.engines):
                if backend is None:
                    skipped.append({"artifact": item.name, "target": target, "reason": label})
                else:
                    usable[label] = (item, backend)
        if not usable:
            continue
        logits, stats, described = _measure_target(usable, target, inputs, settings)
        measured.update({(target, label): value for label, value in logits.items()})
        device_times = _device_times(usable, inputs, settings) if target == "cuda" else {}
        if settings.profile and target == "cpu":
            op_profile = _profile({label: item for label, (item, _) in usable.items()}, inputs, settings)
        order = list(usable)
        for (name, shape), s in sorted(stats.items(), key=lambda kv: (kv[0][1], order.index(kv[0][0]))):
            batch, seq_len = cast(tuple[int, int], shape)
            item, backend = usable[name]
            if s.cv > settings.cv_warn:
                warnings.append(
                    f"{name} at batch {batch}, {settings.describe_input(seq_len)}: latency std/mean = {s.cv:.2f} "
                    f"(> {settings.cv_warn}); the machine was noisy, compare with care"
                )
            row = {
                "artifact": name,
                "engine": backend,
                "precision": item.precision,
                "target": target,
                "size_mb": item.size_mb,
                "accuracy": round(score(logits[name], labels, list(settings.label_names)), 5),
                "batch": batch,
                "seq_len": seq_len,
                "input": settings.describe_input(seq_len),
                "latency_ms": s.to_json(),
                "throughput_per_s": round(batch * 1000.0 / s.mean, 2),
                "runtime": described[name],
            }
            row.update(device_times.get((name, shape), {}))
            results.append(row)
    baseline = _reference_logits(items, measured, inputs, settings)
    if baseline is not None:
        ref_name, ref_logits = baseline
        for row in results:
            found = agreement(measured[(str(row["target"]), str(row["artifact"]))], ref_logits, labels)
            row["agreement"] = {"reference": ref_name, **found}
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
        "metric": metric_name(labels),
        "reference": reference,
        "results": results,
        "skipped": skipped,
        "warnings": warnings,
        "op_profile": op_profile,
    }
