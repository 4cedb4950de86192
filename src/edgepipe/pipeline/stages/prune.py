"""prune: remove FFN neurons (the intermediate width) of a BERT-family model, so shapes really shrink.

Each layer keeps the same number of neurons (`intermediate_size` is one number in the config, so
the pruned model reloads with a plain `from_pretrained`), chosen per layer by importance:
- `magnitude`: ||W_in[j, :]|| * ||W_out[:, j]|| (the neuron's input and output weight norms);
- `taylor`: first-order Taylor estimate of the loss change when neuron j is removed (Molchanov et al.,
  2017/2019), |sum over its weights of w * dL/dw| accumulated over labelled train batches.
Pruning a neuron equals masking it (zero output) exactly: the kept neurons' weights are copied as
they are. The kept width is rounded down to a multiple of `round_to`.

`recover` fine-tunes the pruned model with the distill stage's logit objective (CE + KD from the
unpruned model, optional anneal/wsl); `iterations: N` prunes 1/N of the way, recovers, and repeats.

Attention heads are not pruned: transformers 5 dropped `prune_heads`/`pruned_heads` and derives the
head size from hidden_size / num_attention_heads, so a head-pruned BERT would not reload plainly.
"""

from __future__ import annotations

import logging
from typing import Any

from edgepipe.errors import InputError
from edgepipe.pipeline.artifacts import Artifact
from edgepipe.pipeline.recipe import ArtifactKind, PruneConfig, RecoverConfig
from edgepipe.pipeline.stages import StageContext, StageResult, register
from edgepipe.pipeline.stages.training import (
    batches,
    encode,
    evaluate,
    loss_window,
    optimizer_and_schedule,
    optimizer_step,
    save_model,
)
from edgepipe.pipeline.students import SUBSET_MODEL_TYPES

log = logging.getLogger(__name__)


def ffn_layers(model: Any) -> list[tuple[Any, Any]]:
    """(intermediate Linear: hidden -> ffn, output Linear: ffn -> hidden) of every encoder layer."""
    return [(layer.intermediate.dense, layer.output.dense) for layer in model.base_model.encoder.layer]


def kept_width(width: int, ratio: float, round_to: int) -> int:
    keep = int(width * (1 - ratio)) // round_to * round_to
    return max(keep, round_to)


def magnitude_scores(model: Any) -> list[Any]:
    return [w_in.weight.norm(dim=1) * w_out.weight.norm(dim=0) for w_in, w_out in ffn_layers(model)]


def taylor_scores(model: Any, tokenizer: Any, cfg: PruneConfig, ctx: StageContext) -> list[Any]:
    """|sum_w w * dL/dw| per neuron over `samples` labelled train examples (CE loss)."""
    import torch

    model.train()
    layers = ffn_layers(model)
    scores = [torch.zeros(w_in.out_features) for w_in, _ in layers]
    train = ctx.data.train
    steps = max(1, cfg.samples // cfg.batch_size)
    for index in batches(len(train), cfg.batch_size, steps, ctx.seed):
        enc = encode(tokenizer, list(train.take(index)), cfg.max_seq_len)
        loss = model(**enc, labels=torch.from_numpy(train.labels[index])).loss
        model.zero_grad(set_to_none=True)
        loss.backward()
        for i, (w_in, w_out) in enumerate(layers):
            contribution = (w_in.weight * w_in.weight.grad).sum(1) + w_in.bias * w_in.bias.grad
            contribution = contribution + (w_out.weight * w_out.weight.grad).sum(0)
            scores[i] += contribution.detach().abs()
    model.zero_grad(set_to_none=True)
    model.eval()
    return scores


def prune_ffn(model: Any, keep: list[Any]) -> None:
    """Replace each layer's FFN Linears by ones holding only the `keep[i]` neurons (same order)."""
    import torch

    for layer, index in zip(model.base_model.encoder.layer, keep, strict=True):
        w_in, w_out = layer.intermediate.dense, layer.output.dense
        new_in = torch.nn.Linear(w_in.in_features, len(index))
        new_out = torch.nn.Linear(len(index), w_out.out_features)
        with torch.no_grad():
            new_in.weight.copy_(w_in.weight[index])
            new_in.bias.copy_(w_in.bias[index])
            new_out.weight.copy_(w_out.weight[:, index])
            new_out.bias.copy_(w_out.bias)
        layer.intermediate.dense, layer.output.dense = new_in, new_out
    model.config.intermediate_size = len(keep[0])


def ffn_macs_per_token(config: Any) -> int:
    """Multiply-accumulates per token of the encoder's linear layers (attention projections + FFN)."""
    hidden, ffn, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    return layers * (4 * hidden * hidden + 2 * hidden * ffn)


def recover(
    model: Any, teacher: Any, tokenizer: Any, cfg: PruneConfig, spec: RecoverConfig, ctx: StageContext, seed: int
) -> list[float]:
    """KD fine-tuning of the pruned model from the unpruned one; returns the loss per step."""
    import torch

    from edgepipe.pipeline.stages.distill import logit_objective

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, schedule = optimizer_and_schedule(params, spec.lr, spec.weight_decay, spec.warmup_ratio, spec.max_steps)
    train = ctx.data.train
    losses = []
    model.train()
    for step, index in enumerate(batches(len(train), spec.batch_size, spec.max_steps, seed)):
        enc = encode(tokenizer, list(train.take(index)), cfg.max_seq_len)
        with torch.no_grad():
            t_logits = teacher(**enc).logits
        loss, _, _, _ = logit_objective(
            spec, step, model(**enc).logits, t_logits, torch.from_numpy(train.labels[index])
        )
        optimizer_step(loss, params, optimizer, schedule)
        losses.append(loss.item())
    model.eval()
    return losses


@register("prune")
def run_prune(inputs: dict[ArtifactKind, Artifact], cfg: PruneConfig, ctx: StageContext) -> StageResult:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    source = inputs[ArtifactKind.TORCH_MODEL].path
    model = AutoModelForSequenceClassification.from_pretrained(source).eval()
    if model.config.model_type not in SUBSET_MODEL_TYPES:
        raise InputError(
            f"`prune`: model_type {model.config.model_type!r} is not supported; supported: "
            f"{', '.join(SUBSET_MODEL_TYPES)}"
        )
    width = model.config.intermediate_size
    if cfg.round_to > width:
        raise InputError(f"`round_to`: {cfg.round_to} is larger than the FFN width {width}; use a smaller multiple")
    tokenizer = AutoTokenizer.from_pretrained(source)
    teacher = AutoModelForSequenceClassification.from_pretrained(source).eval() if cfg.recover else None
    params_before = sum(p.numel() for p in model.parameters())
    macs_before = ffn_macs_per_token(model.config)
    acc_before = evaluate(model, tokenizer, ctx.data.val, cfg.max_seq_len, cfg.eval_batch_size)
    history = []
    kept_total: list[Any] = [torch.arange(width) for _ in ffn_layers(model)]
    for iteration in range(1, cfg.iterations + 1):
        torch.manual_seed(ctx.seed + iteration)
        scores = magnitude_scores(model) if cfg.importance == "magnitude" else taylor_scores(model, tokenizer, cfg, ctx)
        count = kept_width(width, cfg.ffn_ratio * iteration / cfg.iterations, cfg.round_to)
        keep = [torch.sort(torch.topk(s, count).indices).values for s in scores]
        prune_ffn(model, keep)
        kept_total = [previous[k] for previous, k in zip(kept_total, keep, strict=True)]
        entry: dict[str, Any] = {
            "ffn": count,
            "val_accuracy_pruned": evaluate(model, tokenizer, ctx.data.val, cfg.max_seq_len, cfg.eval_batch_size),
        }
        if teacher is not None and cfg.recover is not None:
            losses = recover(model, teacher, tokenizer, cfg, cfg.recover, ctx, ctx.seed + iteration)
            entry["recover_loss_start"], entry["recover_loss_end"] = loss_window(losses)
            entry["val_accuracy_recovered"] = evaluate(
                model, tokenizer, ctx.data.val, cfg.max_seq_len, cfg.eval_batch_size
            )
        history.append(entry)
        log.info("prune: iteration %d, FFN %d -> %d per layer: %s", iteration, width, count, entry)
    out = ctx.stage_dir / "model"
    save_model(model, tokenizer, out, ctx)
    metrics = {
        "importance": cfg.importance,
        "ffn_before": width,
        "ffn_after": model.config.intermediate_size,
        "kept_neurons": [k.tolist() for k in kept_total],
        "params_before": params_before,
        "params_after": sum(p.numel() for p in model.parameters()),
        "macs_per_token_before": macs_before,
        "macs_per_token_after": ffn_macs_per_token(model.config),
        "val_accuracy_before": acc_before,
        "val_accuracy_pruned": history[-1]["val_accuracy_pruned"],
        "val_accuracy_recovered": history[-1].get("val_accuracy_recovered"),
        "iterations": history,
    }
    return StageResult([Artifact("pruned", ArtifactKind.TORCH_MODEL, out, "fp32")], metrics)
