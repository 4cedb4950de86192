"""What text and image pruning share: KD recovery of the pruned model, its ONNX latency, accuracy metrics."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgepipe.benchmarks.metrics import IGNORE
from edgepipe.pipeline.recipe import RecoverConfig
from edgepipe.pipeline.stages import StageContext
from edgepipe.pipeline.stages.training import batches, optimizer_and_schedule, optimizer_step

LATENCY_SHAPES = ((1, 128), (8, 128))


def recover(
    model: Any,
    teacher: Any,
    spec: RecoverConfig,
    ctx: StageContext,
    seed: int,
    batch_of: Callable[[Any], Any],
    logits_of: Callable[[Any, Any], Any],
) -> list[float]:
    """KD fine-tuning of the pruned model from the unpruned one; returns the loss per step.

    `batch_of(index)` makes the model input of train examples `index` (once per step, for both models);
    `logits_of(model, batch)` runs a model on it. Text and image pruning share this loop."""
    import torch

    from edgepipe.pipeline.stages.distill import logit_objective

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, schedule = optimizer_and_schedule(params, spec.lr, spec.weight_decay, spec.warmup_ratio, spec.max_steps)
    train = ctx.data.train
    losses = []
    model.train()
    for step, index in enumerate(batches(len(train), spec.batch_size, spec.max_steps, seed)):
        batch = batch_of(index)
        with torch.no_grad():
            t_logits = logits_of(teacher, batch)
        logits, labels = logits_of(model, batch), torch.from_numpy(train.labels[index])
        if labels.ndim == 2:  # NER: per-word logits; every labeled word is one sample
            words = labels != IGNORE
            logits, t_logits, labels = logits[words], t_logits[words], labels[words]
        loss, _, _, _ = logit_objective(spec, step, logits, t_logits, labels)
        optimizer_step(loss, params, optimizer, schedule)
        losses.append(loss.item())
    model.eval()
    return losses


def ort_latency(models: dict[str, Any], feeds: Callable[..., Any], spec: Any, work: Path) -> dict[str, Any]:
    """p50/p90 ms of each model exported to fp32 ONNX, timed with onnxruntime at LATENCY_SHAPES."""
    from contextlib import contextmanager

    from edgepipe.benchmarks.harness import measure_interleaved
    from edgepipe.export import export_onnx
    from edgepipe.runtime.backends import RuntimeOptions, ort_cpu_session

    work.mkdir(parents=True, exist_ok=True)
    for name, model in models.items():
        export_onnx(model, feeds, work / f"{name}.onnx", opset=17, shape=(2, 16), spec=spec)

    @contextmanager
    def open_runners(name: str) -> Any:
        session = ort_cpu_session(work / f"{name}.onnx", RuntimeOptions())
        inputs = {shape: feeds(*shape) for shape in LATENCY_SHAPES}
        yield {shape: (lambda f=f: session.run(None, f)) for shape, f in inputs.items()}

    stats = measure_interleaved(list(models), open_runners, runs=30, rounds=3, warmup_runs=5, warmup_s=0.5)
    shutil.rmtree(work)
    return {
        name: {
            f"b{b}_s{s}": {"p50": round(stats[name, (b, s)].p50, 3), "p90": round(stats[name, (b, s)].p90, 3)}
            for b, s in LATENCY_SHAPES
        }
        for name in models
    }


def accuracy_metrics(before: float, history: list[dict[str, Any]]) -> dict[str, Any]:
    """Val accuracy before, after the last pruning step and after its recovery, and every iteration."""
    last = history[-1]
    return {
        "val_accuracy_before": before,
        "val_accuracy_pruned": last["val_accuracy_pruned"],
        "val_accuracy_recovered": last.get("val_accuracy_recovered"),
        "iterations": history,
    }
