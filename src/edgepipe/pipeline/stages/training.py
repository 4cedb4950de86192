"""What the training stages (finetune, distill) share once their loop (`edgepipe.pipeline.loop`) is done:
saving the model and the finetune result."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgepipe.pipeline.artifacts import write_meta
from edgepipe.pipeline.loop import autocast_mode, loss_window
from edgepipe.pipeline.stages import StageContext


def save_model(model: Any, tokenizer: Any, out: Path, ctx: StageContext) -> None:
    model.save_pretrained(out)  # safetensors
    tokenizer.save_pretrained(out)
    write_meta(out, task=ctx.task, labels=ctx.data.label_names, precision="fp32", fmt="transformers")


def finetune_result(
    model: Any, out: Path, cfg: Any, ctx: StageContext, losses: list[float], val_accuracy: float, train_s: float
) -> Any:
    """The `teacher` artifact of a finetune stage and its metrics (text and image alike)."""
    from edgepipe.pipeline.artifacts import Artifact
    from edgepipe.pipeline.recipe import ArtifactKind
    from edgepipe.pipeline.stages import StageResult

    start, end = loss_window(losses)
    metrics = {
        "steps": cfg.max_steps,
        "epochs": round(cfg.max_steps * cfg.batch_size / len(ctx.data.train), 3),
        "train_loss_start": start,
        "train_loss_end": end,
        "val_accuracy": val_accuracy,
        "train_seconds": round(train_s, 2),
        "autocast": autocast_mode(cfg.autocast, "cpu"),
        "world_size": ctx.world.size,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    return StageResult([Artifact("teacher", ArtifactKind.TORCH_MODEL, out, "fp32")], metrics)
