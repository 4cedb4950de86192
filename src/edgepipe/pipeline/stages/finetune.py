"""finetune: train a task head (and optionally the encoder) on the train split within a step budget.

The shipped encoders are sentence-embedding models, not classifiers: this stage gives the teacher.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from edgepipe.pipeline.artifacts import Artifact, write_meta
from edgepipe.pipeline.data import Split
from edgepipe.pipeline.recipe import ArtifactKind, FinetuneConfig
from edgepipe.pipeline.stages import StageContext, StageResult, register

log = logging.getLogger(__name__)


def _batches(n: int, batch_size: int, steps: int, rng: np.random.Generator) -> list[np.ndarray]:
    """`steps` batches of indices: reshuffled epochs, every example seen once per epoch."""
    batches: list[np.ndarray] = []
    while len(batches) < steps:
        order = rng.permutation(n)
        batches.extend(order[i : i + batch_size] for i in range(0, n - batch_size + 1, batch_size))
    return batches[:steps]


def evaluate(model, tokenizer, split: Split, max_seq_len: int, batch_size: int) -> float:
    import torch

    correct = 0
    with torch.inference_mode():
        for i in range(0, len(split), batch_size):
            enc = tokenizer(
                split.texts[i : i + batch_size],
                padding=True,
                truncation=True,
                max_length=max_seq_len,
                return_tensors="pt",
            )
            pred = model(**enc).logits.argmax(-1).numpy()
            correct += int((pred == split.labels[i : i + batch_size]).sum())
    return correct / len(split)


@register("finetune")
def run_finetune(inputs: dict[ArtifactKind, Artifact], cfg: FinetuneConfig, ctx: StageContext) -> StageResult:
    import torch
    from tqdm.auto import tqdm
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        get_linear_schedule_with_warmup,
    )

    source = inputs[ArtifactKind.HF_MODEL].path
    labels = ctx.data.label_names
    torch.manual_seed(ctx.seed)
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForSequenceClassification.from_pretrained(
        source,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
        ignore_mismatched_sizes=True,
    )
    if not cfg.train_encoder:
        for param in model.base_model.parameters():
            param.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = get_linear_schedule_with_warmup(
        optimizer, int(cfg.warmup_ratio * cfg.max_steps), cfg.max_steps
    )

    train = ctx.data.train
    batches = _batches(
        len(train), min(cfg.batch_size, len(train)), cfg.max_steps, np.random.default_rng(ctx.seed)
    )
    losses: list[float] = []
    started = time.perf_counter()
    model.train()
    for index in tqdm(batches, desc="finetune", disable=not ctx.progress):
        enc = tokenizer(
            [train.texts[i] for i in index],
            padding=True,
            truncation=True,
            max_length=cfg.max_seq_len,
            return_tensors="pt",
        )
        loss = model(**enc, labels=torch.from_numpy(train.labels[index])).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    train_s = time.perf_counter() - started
    model.eval()
    val_accuracy = evaluate(model, tokenizer, ctx.data.val, cfg.max_seq_len, cfg.eval_batch_size)
    log.info("finetune: %d steps in %.0f s, val accuracy %.4f", cfg.max_steps, train_s, val_accuracy)

    out = ctx.stage_dir / "model"
    model.save_pretrained(out)  # safetensors
    tokenizer.save_pretrained(out)
    write_meta(out, task=ctx.task, labels=labels, precision="fp32", fmt="transformers")
    window = max(1, min(20, len(losses) // 4))
    metrics = {
        "steps": cfg.max_steps,
        "epochs": round(cfg.max_steps * cfg.batch_size / len(train), 3),
        "train_loss_start": float(np.mean(losses[:window])),
        "train_loss_end": float(np.mean(losses[-window:])),
        "val_accuracy": val_accuracy,
        "train_seconds": round(train_s, 2),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    return StageResult([Artifact("teacher", ArtifactKind.HF_MODEL, out, "fp32")], metrics)
