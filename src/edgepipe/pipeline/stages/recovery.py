"""What text and image pruning share: KD recovery of the pruned model, its ONNX latency, accuracy metrics."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgepipe.pipeline.adapters import Classifier, TextClassification
from edgepipe.pipeline.loop import fit
from edgepipe.pipeline.recipe import RecoverConfig
from edgepipe.pipeline.stages import StageContext

LATENCY_SHAPES = ((1, 128), (8, 128))


def recover(
    model: Any, teacher: Any, spec: RecoverConfig, ctx: StageContext, seed: int, task: Classifier
) -> list[float]:
    """KD fine-tuning of the pruned model from the unpruned one (text and image pruning alike); returns
    the loss per step."""
    import torch

    from edgepipe.pipeline.stages.distill import logit_objective

    train = ctx.data.train

    def step_loss(trained: Any, step: int, index: Any) -> Any:
        batch = task.batch(train, index)
        with torch.no_grad():
            t_logits = task.batch_logits(teacher, batch)
        logits = task.batch_logits(trained, batch)
        logits, t_logits, labels = task.samples(batch, logits, t_logits)
        return logit_objective(spec, step, logits, t_logits, labels)[0]

    # images are all one size
    lengths = task.lengths(train) if spec.group_by_length and isinstance(task, TextClassification) else None
    return fit(model, step_loss, spec, len(train), seed, desc="recover", lengths=lengths).losses


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
