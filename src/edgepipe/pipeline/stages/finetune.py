"""finetune: train a task head (and optionally the encoder) on the train split within a step budget.

The shipped encoders are sentence-embedding models, not classifiers: this stage gives the teacher (a
sequence classifier, or a token classifier trained on each word's first sub-word for NER).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from edgepipe.pipeline.artifacts import Artifact
from edgepipe.pipeline.recipe import ArtifactKind, FinetuneConfig
from edgepipe.pipeline.stages import StageContext, StageResult, register
from edgepipe.pipeline.stages.training import (
    batches,
    encode,
    encode_words,
    evaluate,
    finetune_result,
    optimizer_and_schedule,
    optimizer_step,
    save_model,
    token_labels,
    word_width,
)
from edgepipe.tasks import Task

log = logging.getLogger(__name__)


@register("finetune", Task.TEXT, Task.TOKEN)
def run_finetune(inputs: dict[ArtifactKind, Artifact], cfg: FinetuneConfig, ctx: StageContext) -> StageResult:
    import torch
    from tqdm.auto import tqdm
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
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, schedule = optimizer_and_schedule(params, cfg.lr, cfg.weight_decay, cfg.warmup_ratio, cfg.max_steps)

    train = ctx.data.train
    width = word_width(train)
    losses: list[float] = []
    started = time.perf_counter()
    model.train()
    trained = ctx.world.wrap(model)  # DDP under torchrun: each rank takes its share of every batch
    for index in tqdm(
        batches(len(train), cfg.batch_size, cfg.max_steps, ctx.seed),
        desc="finetune",
        disable=not ctx.progress,
    ):
        index = ctx.world.shard(index)
        texts = list(train.take(index))
        if width is None:
            enc = encode(tokenizer, texts, cfg.max_seq_len)
            targets: Any = torch.from_numpy(train.labels[index])
        else:  # NER: each word's label on its first sub-word
            enc, positions = encode_words(tokenizer, texts, cfg.max_seq_len, width)
            targets = token_labels(train.labels[index], positions, enc["input_ids"].shape[1])
        loss = trained(**enc, labels=targets).loss
        optimizer_step(loss, params, optimizer, schedule)
        losses.append(loss.item())
    train_s = time.perf_counter() - started
    out = ctx.stage_dir / "model"
    if not ctx.writes:
        return StageResult([])
    val_accuracy = evaluate(model, tokenizer, ctx.data.val, cfg.max_seq_len, cfg.eval_batch_size)
    log.info("finetune: %d steps in %.0f s, val accuracy %.4f", cfg.max_steps, train_s, val_accuracy)

    save_model(model, tokenizer, out, ctx)
    return finetune_result(model, out, cfg, ctx, losses, val_accuracy, train_s)
