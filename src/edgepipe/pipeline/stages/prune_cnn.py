"""prune for image models: remove conv channels, with Torch-Pruning's dependency graph.

Channels that must go together (a conv's outputs, its batch norm, the next layer's inputs, every
branch of a residual add, the members of a concatenation) form one group in Torch-Pruning's
`DependencyGraph`, traced from a real image; each group is pruned as one, so the module stays
valid and its shapes really shrink. The classifier's outputs are never pruned. Channels are ranked
across layers (global pruning), so layers keep different fractions. `ratio` is the fraction of
parameters removed: the channel fraction that gives it is found by bisection on copies (parameters
fall roughly with its square), then the model is pruned with the chosen importance (`magnitude`: L2
norm of each group's weights; `taylor`: |w * dL/dw| over train batches). On AVX-512 CPUs `round_to:
16` (16 fp32 lanes) ran pruned convs closer to their FLOP count than 8 (benchmarks/RESULTS.md).

The pruned module is saved with `"pruned": true`, so `load_module` rebuilds it at the original widths
and resizes each layer to the stored weights. Recovery and iterations work as for text.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import numpy as np

from edgepipe.errors import InputError
from edgepipe.pipeline.adapters import ImageClassification
from edgepipe.pipeline.artifacts import Artifact
from edgepipe.pipeline.loop import batches, loss_window
from edgepipe.pipeline.recipe import ArtifactKind, PruneConfig
from edgepipe.pipeline.stages import StageContext, StageResult, register
from edgepipe.runtime.modules import load_module, read_module_meta, save_module
from edgepipe.tasks import Task

log = logging.getLogger(__name__)


def _params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def _macs(model: Any, example: Any) -> int:
    import torch_pruning as tp

    macs, _ = tp.utils.count_ops_and_params(model, example)
    return int(macs)


def _pruner(model: Any, example: Any, importance: Any, fraction: float, cfg: PruneConfig, classes: int) -> Any:
    import torch
    import torch_pruning as tp

    heads = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == classes]
    # global: channels ranked across layers (finer control of the parameter count than one fraction per
    # layer, whose rounding moves the count in steps of ~10%); isomorphic: only like groups compete
    return tp.pruner.MetaPruner(
        model,
        example,
        importance=importance,
        pruning_ratio=fraction,
        ignored_layers=heads,
        round_to=cfg.round_to,
        global_pruning=True,
        isomorphic=True,
        max_pruning_ratio=0.9,
    )


def channel_fraction(model: Any, example: Any, target: int, cfg: PruneConfig, classes: int) -> float:
    """The channel fraction whose pruning leaves closest to `target` parameters (bisection on copies).

    The count falls in steps (widths move by `round_to`), so both ends of the last bracket are tried."""
    import torch_pruning as tp

    def left(fraction: float) -> int:
        trial = copy.deepcopy(model)
        _pruner(trial, example, tp.importance.GroupMagnitudeImportance(p=2), fraction, cfg, classes).step()
        return _params(trial)

    low, high = 0.0, 0.9
    for _ in range(12):
        middle = (low + high) / 2
        low, high = (middle, high) if left(middle) > target else (low, middle)
    return min((low, high), key=lambda fraction: abs(left(fraction) - target))


def _importance(model: Any, cfg: PruneConfig, ctx: StageContext) -> Any:
    """Torch-Pruning importance; for taylor, gradients of the CE loss accumulated over train batches."""
    import torch_pruning as tp

    if cfg.importance == "magnitude":
        return tp.importance.GroupMagnitudeImportance(p=2)
    model.eval()  # gradients only: train mode would move the batch-norm running statistics
    model.zero_grad(set_to_none=True)
    task, train = ImageClassification(cfg.eval_batch_size), ctx.data.train
    for index in batches(len(train), cfg.batch_size, max(1, cfg.samples // cfg.batch_size), ctx.seed):
        batch = task.batch(train, index)
        task.loss(task.logits(task.forward(model, batch), batch), batch).backward()
    return tp.importance.GroupTaylorImportance()


def conv_widths(model: Any) -> dict[str, int]:
    import torch

    return {name: m.out_channels for name, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}


@register("prune", Task.IMAGE)
def run_cnn_prune(inputs: dict[ArtifactKind, Artifact], cfg: PruneConfig, ctx: StageContext) -> StageResult:
    source = inputs[ArtifactKind.TORCH_MODEL]
    import torch

    from edgepipe.pipeline.stages.recovery import accuracy_metrics, ort_latency, recover

    if cfg.ratio is None:
        raise InputError("`ratio`: an image model is pruned by conv channels; set ratio (fraction of parameters)")
    meta = read_module_meta(source.path)
    task = ImageClassification(cfg.eval_batch_size)
    model, original = load_module(source.path), load_module(source.path)
    for param in original.parameters():
        param.requires_grad_(False)
    classes = len(meta["labels"])
    example = torch.from_numpy(np.asarray(ctx.data.val.inputs[:2]))
    before: dict[str, Any] = {
        "params": _params(model),
        "macs": _macs(model, example),
        "widths": conv_widths(model),
        "val_accuracy": task.metric(model, ctx.data.val),
    }
    history = []
    for iteration in range(1, cfg.iterations + 1):
        torch.manual_seed(ctx.seed + iteration)
        target = round(before["params"] * (1 - cfg.ratio * iteration / cfg.iterations))
        fraction = channel_fraction(model, example, target, cfg, classes)
        _pruner(model, example, _importance(model, cfg, ctx), fraction, cfg, classes).step()
        model.zero_grad(set_to_none=True)
        entry: dict[str, Any] = {
            "channel_fraction": round(fraction, 4),
            "params": _params(model),
            "val_accuracy_pruned": task.metric(model, ctx.data.val),
        }
        if cfg.recover is not None:
            losses = recover(
                model,
                original,
                cfg.recover,
                ctx,
                ctx.seed + iteration,
                task,
            )
            entry["recover_loss_start"], entry["recover_loss_end"] = loss_window(losses)
            entry["val_accuracy_recovered"] = task.metric(model, ctx.data.val)
        history.append(entry)
        log.info("prune: iteration %d: %s", iteration, entry)
    out = ctx.stage_dir / "model"
    module = meta["module"]
    save_module(
        model,
        out,
        factory=module["factory"],
        kwargs=module["kwargs"],
        input_shape=tuple(meta["input"]["shape"]),
        labels=meta["labels"],
        pruned=True,
    )
    after = conv_widths(model)
    metrics: dict[str, Any] = {
        "importance": cfg.importance,
        "channels": {name: [width, after[name]] for name, width in before["widths"].items()},
        "params_before": before["params"],
        "params_after": _params(model),
        "macs_before": before["macs"],
        "macs_after": _macs(model, example),
        **accuracy_metrics(before["val_accuracy"], history),
    }
    if cfg.latency:
        spec = task.export_spec(model)
        feeds = task.feeds(ctx.data.val.inputs[:16], spec.input_names)
        metrics["ort_latency_ms"] = ort_latency(
            {"before": original, "after": model}, feeds, spec, ctx.stage_dir / "latency"
        )
    return StageResult([Artifact("pruned", ArtifactKind.TORCH_MODEL, out, "fp32")], metrics)
