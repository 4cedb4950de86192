"""Shared pieces of the training stages (finetune, distill): batches, optimizer, evaluation, saving."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgepipe.pipeline.artifacts import write_meta
from edgepipe.pipeline.data import Split
from edgepipe.pipeline.stages import StageContext


def batches(n: int, batch_size: int, steps: int, seed: int) -> list[np.ndarray]:
    """`steps` batches of indices: reshuffled epochs, every example seen once per epoch."""
    rng = np.random.default_rng(seed)
    batch_size = min(batch_size, n)
    out: list[np.ndarray] = []
    while len(out) < steps:
        order = rng.permutation(n)
        out.extend(order[i : i + batch_size] for i in range(0, n - batch_size + 1, batch_size))
    return out[:steps]


def encode(tokenizer: Any, texts: list[str], max_seq_len: int) -> Any:
    return tokenizer(texts, padding=True, truncation=True, max_length=max_seq_len, return_tensors="pt")


def encode_words(tokenizer: Any, texts: list[str], max_seq_len: int, width: int) -> tuple[Any, Any]:
    """Tokens of sentences given as words joined by spaces, and each word's first sub-word position
    (batch, width) as a tensor (-1: no token)."""
    import torch

    from edgepipe.runtime.text import word_positions

    enc = tokenizer(
        texts, padding=True, truncation=True, max_length=max_seq_len, return_tensors="pt", return_offsets_mapping=True
    )
    positions = word_positions(texts, enc.pop("offset_mapping").numpy(), width)
    return enc, torch.from_numpy(positions)


def words_of(token_logits: Any, positions: Any) -> Any:
    """Per-word logits (batch, width, labels) read at each word's first sub-word; 0 where it has none."""
    picked = token_logits.gather(1, positions.clamp_min(0)[..., None].expand(-1, -1, token_logits.shape[-1]))
    return picked * (positions[..., None] >= 0)


def token_labels(labels: np.ndarray, positions: Any, n_tokens: int) -> Any:
    """Per-token labels for a model's own loss: each word's label on its first sub-word (NER)."""
    import torch

    from edgepipe.pipeline.ner import align_labels

    return torch.from_numpy(align_labels(positions.numpy(), labels[:, : positions.shape[1]], n_tokens))


def optimizer_and_schedule(params: list[Any], lr: float, weight_decay: float, warmup_ratio: float, steps: int) -> Any:
    import torch
    from transformers import get_linear_schedule_with_warmup

    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return optimizer, get_linear_schedule_with_warmup(optimizer, int(warmup_ratio * steps), steps)


def optimizer_step(
    loss: Any, params: list[Any], optimizer: Any, schedule: Any, world: Any = None, outside: Any = ()
) -> None:
    """Backward; all-reduce the gradients of `outside` (trained parameters DDP does not wrap, e.g.
    projections) over `world`; clip at 1.0; step optimizer and schedule."""
    import torch

    loss.backward()
    if world is not None:
        world.average_gradients(outside)
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    schedule.step()
    optimizer.zero_grad(set_to_none=True)


def predict_logits(
    model: Any, tokenizer: Any, texts: list[str], max_seq_len: int, batch_size: int, words: int | None = None
) -> Any:
    """Logits of every text; with `words`, per-word logits (texts, words, labels) of a token classifier."""
    import torch

    outputs = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            chunk = texts[i : i + batch_size]
            if words is None:
                outputs.append(model(**encode(tokenizer, chunk, max_seq_len)).logits)
                continue
            enc, positions = encode_words(tokenizer, chunk, max_seq_len, words)
            outputs.append(words_of(model(**enc).logits, positions))
    return torch.cat(outputs)


def word_width(split: Split) -> int | None:
    """Words per sentence of per-word labels (token classification); None for one label per example."""
    return int(split.labels.shape[1]) if split.labels.ndim == 2 else None


def evaluate(model: Any, tokenizer: Any, split: Split, max_seq_len: int, batch_size: int) -> float:
    """The task's metric (accuracy, or entity F1 for token classification) on `split`."""
    from edgepipe.benchmarks.metrics import score

    model.eval()
    texts = list(split.inputs)
    logits = predict_logits(model, tokenizer, texts, max_seq_len, batch_size, word_width(split)).numpy()
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    return score(logits, split.labels, names)


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
        "world_size": ctx.world.size,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    return StageResult([Artifact("teacher", ArtifactKind.TORCH_MODEL, out, "fp32")], metrics)


def loss_window(losses: list[float]) -> tuple[float, float]:
    """Mean loss over the first and the last few steps."""
    window = max(1, min(20, len(losses) // 4))
    return float(np.mean(losses[:window])), float(np.mean(losses[-window:]))
