"""finetune: train a task head (and optionally the encoder) on the train split within a step budget.

The shipped encoders are sentence-embedding models, not classifiers: this stage gives the teacher (a
sequence classifier, or a token classifier trained on each word's first sub-word for NER).
"""

from __future__ import annotations

import logging
from typing import Any

from edgepipe.pipeline.adapters import Batch, adapter_for
from edgepipe.pipeline.artifacts import Artifact
from edgepipe.pipeline.loop import fit
from edgepipe.pipeline.recipe import ArtifactKind, FinetuneConfig
from edgepipe.pipeline.stages import StageContext, StageResult, register
from edgepipe.pipeline.stages.training import finetune_result, save_model
from edgepipe.tasks import Task

log = logging.getLogger(__name__)


@register("finetune", Task.TEXT, Task.TOKEN)
def run_finetune(inputs: dict[ArtifactKind, Artifact], cfg: FinetuneConfig, ctx: StageContext) -> StageResult:
    import torch
    from transformers import AutoTokenizer

    from edgepipe.runtime.text import load_text_model

    source = inputs[ArtifactKind.TORCH_MODEL].path
    labels = ctx.data.label_names
    torch.manual_seed(ctx.seed)
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = load_text_model(
        source,
        task=ctx.task,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
        ignore_mismatched_sizes=True,
    )
    if not cfg.train_encoder:
        for param in model.base_model.parameters():
            param.requires_grad_(False)
    task = adapter_for(ctx.task, tokenizer, cfg.max_seq_len, cfg.eval_batch_size)
    train = ctx.data.train

    def step_loss(trained: Any, step: int, index: Any) -> Any:
        batch: Batch = task.batch(train, index)
        return task.loss(task.batch_logits(trained, batch), batch)

    lengths = task.lengths(train) if cfg.group_by_length else None
    fitted = fit(model, step_loss, cfg, len(train), ctx.seed, world=ctx.world, desc="finetune", lengths=lengths)
    out = ctx.stage_dir / "model"
    if not ctx.writes:
        return StageResult([])
    val_accuracy = task.metric(model, ctx.data.val)
    log.info("finetune: %d steps in %.0f s, val accuracy %.4f", cfg.max_steps, fitted.seconds, val_accuracy)

    save_model(model, tokenizer, out, ctx)
    return finetune_result(model, out, cfg, ctx, fitted.losses, val_accuracy, fitted.seconds)
