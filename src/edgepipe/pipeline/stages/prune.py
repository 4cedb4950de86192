"""prune: remove attention heads, FFN neurons and whole layers of a BERT-family model, so shapes shrink.

What goes, by importance computed on the model as it is:
- `magnitude`: weight norms (a head: its q/k/v rows and output columns; an FFN neuron:
  ||W_in[j, :]|| * ||W_out[:, j]||);
- `taylor`: first-order Taylor estimate of the loss change when the unit is removed (Molchanov et al.
  2017/2019), |sum of w * dL/dw| accumulated over labelled train batches. For a head the sum runs over
  its columns of the attention output projection, which equals the gradient of a mask on that head
  (Michel et al. 2019).
Heads are ranked across layers after normalising each layer's scores (Michel et al.), so layers keep
different head counts; every layer keeps at least one head unless `drop_layers` removes it. FFN
neurons keep the same count in every layer, rounded down to a multiple of `round_to`. `ratio` prunes
heads and FFN neurons by the same fraction, which removes that fraction of the encoder layers'
parameters and FLOPs. Pruning a unit equals masking it: the kept weights are copied as they are.

A head-pruned model is saved as a pruned BERT (`edgepipe.runtime.pruned_bert`: per-layer head and FFN
counts in config.json, the modeling file copied alongside), which reloads with
`from_pretrained(folder, trust_remote_code=True)`; an FFN- or layer-pruned one stays a plain BERT.

`recover` fine-tunes with the distill stage's logit objective from the unpruned model;
`iterations: N` prunes 1/N of the way, recovers, and repeats. With `latency: true` the stage exports
the model before and after to ONNX and times both with onnxruntime (b1 and b8, s128).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgepipe.benchmarks.metrics import IGNORE
from edgepipe.errors import InputError
from edgepipe.pipeline.artifacts import Artifact
from edgepipe.pipeline.recipe import TOKEN_TASK, ArtifactKind, PruneConfig, RecoverConfig
from edgepipe.pipeline.stages import StageContext, StageResult, register
from edgepipe.pipeline.stages.training import (
    batches,
    encode,
    encode_words,
    evaluate,
    loss_window,
    optimizer_and_schedule,
    optimizer_step,
    save_model,
    token_labels,
    word_width,
    words_of,
)
from edgepipe.pipeline.students import SUBSET_MODEL_TYPES

log = logging.getLogger(__name__)

HEAD_MODEL_TYPES = ("bert",)
LATENCY_SHAPES = ((1, 128), (8, 128))


def prune_problems(cfg: PruneConfig, config: dict[str, Any], key: str) -> list[str]:
    """What a prune spec asks that the model (its config.json as a dict) cannot give, naming the key."""
    model_type = config.get("model_type")
    if model_type not in SUBSET_MODEL_TYPES:
        return [
            f"`{key}` (prune): model_type {model_type!r} is not supported; supported: {', '.join(SUBSET_MODEL_TYPES)}"
        ]
    problems = []
    layers, heads = int(config["num_hidden_layers"]), int(config["num_attention_heads"])
    layer_heads = list(config.get("layer_heads") or [heads] * layers)
    if (cfg.head_fraction or cfg.heads) and model_type not in HEAD_MODEL_TYPES:
        problems.append(
            f"`{key}`: head pruning supports model_type {', '.join(HEAD_MODEL_TYPES)}, not {model_type!r}; "
            "use ffn_ratio / drop_layers"
        )
    ffn = min(config.get("layer_ffn") or [int(config["intermediate_size"])])
    if cfg.ffn_fraction and cfg.round_to > ffn:
        problems.append(f"`{key}.round_to`: {cfg.round_to} is larger than the FFN width {ffn}; use a smaller multiple")
    bad_layers = [i for i in [*cfg.drop_layers, *(cfg.heads or {})] if i >= layers]
    if bad_layers:
        problems.append(
            f"`{key}`: layer {sorted(set(bad_layers))} out of range; the model has {layers} (0-{layers - 1})"
        )
    if len(cfg.drop_layers) >= layers:
        problems.append(f"`{key}.drop_layers`: would remove all {layers} layers; keep at least one")
    for layer, ids in (cfg.heads or {}).items():
        if layer >= layers:
            continue
        if max(ids) >= layer_heads[layer]:
            problems.append(
                f"`{key}.heads.{layer}`: head {max(ids)} out of range; layer {layer} has {layer_heads[layer]}"
            )
        elif len(ids) == layer_heads[layer] and layer not in cfg.drop_layers:
            problems.append(
                f"`{key}.heads.{layer}`: removes every head of layer {layer}; to remove the layer, add it to "
                "`drop_layers` instead"
            )
    return problems


def encoder_layers(model: Any) -> Any:
    return model.base_model.encoder.layer


def keep_rows(linear: Any, index: Any) -> Any:
    """A Linear with only the output units `index` of `linear`."""
    import torch

    new = torch.nn.Linear(linear.in_features, len(index))
    with torch.no_grad():
        new.weight.copy_(linear.weight[index])
        new.bias.copy_(linear.bias[index])
    return new


def keep_columns(linear: Any, index: Any) -> Any:
    """A Linear reading only the input units `index` of `linear` (same outputs)."""
    import torch

    new = torch.nn.Linear(len(index), linear.out_features)
    with torch.no_grad():
        new.weight.copy_(linear.weight[:, index])
        new.bias.copy_(linear.bias)
    return new


def head_units(attention: Any, heads: Any) -> Any:
    """Row indices of the q/k/v projections (columns of the output projection) that belong to `heads`."""
    import torch

    size = attention.attention_head_size
    return (heads[:, None] * size + torch.arange(size)).flatten()


def layer_heads(model: Any) -> list[int]:
    return [layer.attention.self.num_attention_heads for layer in encoder_layers(model)]


def layer_ffn(model: Any) -> list[int]:
    return [layer.intermediate.dense.out_features for layer in encoder_layers(model)]


def magnitude_scores(model: Any) -> tuple[list[Any], list[Any]]:
    """(per-layer head scores, per-layer FFN neuron scores) from weight norms."""
    import torch

    heads, ffn = [], []
    for layer in encoder_layers(model):
        attention, out = layer.attention.self, layer.attention.output.dense
        size = attention.attention_head_size
        rows = torch.cat([p.weight for p in (attention.query, attention.key, attention.value)], dim=1)
        per_unit = rows.pow(2).sum(1) + out.weight.pow(2).sum(0)
        heads.append(per_unit.view(-1, size).sum(1).sqrt().detach())
        w_in, w_out = layer.intermediate.dense, layer.output.dense
        ffn.append((w_in.weight.norm(dim=1) * w_out.weight.norm(dim=0)).detach())
    return heads, ffn


def taylor_scores(model: Any, tokenizer: Any, cfg: PruneConfig, ctx: StageContext) -> tuple[list[Any], list[Any]]:
    """|sum_w w * dL/dw| per head and per FFN neuron over `samples` labelled train examples (CE loss)."""
    import torch

    model.train()
    layers = list(encoder_layers(model))
    heads = [torch.zeros(n) for n in layer_heads(model)]
    ffn = [torch.zeros(n) for n in layer_ffn(model)]
    train = ctx.data.train
    width = word_width(train)
    for index in batches(len(train), cfg.batch_size, max(1, cfg.samples // cfg.batch_size), ctx.seed):
        texts = list(train.take(index))
        if width is None:
            enc = encode(tokenizer, texts, cfg.max_seq_len)
            targets = torch.from_numpy(train.labels[index])
        else:  # NER: each word's label on its first sub-word
            enc, positions = encode_words(tokenizer, texts, cfg.max_seq_len, width)
            targets = token_labels(train.labels[index], positions, enc["input_ids"].shape[1])
        loss = model(**enc, labels=targets).loss
        model.zero_grad(set_to_none=True)
        loss.backward()
        for i, layer in enumerate(layers):
            out = layer.attention.output.dense
            per_column = (out.weight * out.weight.grad).sum(0)
            heads[i] += per_column.view(heads[i].numel(), -1).sum(1).detach().abs()
            w_in, w_out = layer.intermediate.dense, layer.output.dense
            neuron = (w_in.weight * w_in.weight.grad).sum(1) + w_in.bias * w_in.bias.grad
            ffn[i] += (neuron + (w_out.weight * w_out.weight.grad).sum(0)).detach().abs()
    model.zero_grad(set_to_none=True)
    model.eval()
    return heads, ffn


def select_heads(scores: list[Any], keep: int) -> list[Any]:
    """The `keep` best heads over all layers (scores normalised per layer), at least one per layer."""
    import torch

    normed = [s / (s.norm() + 1e-12) for s in scores]
    chosen = [{int(s.argmax())} for s in normed]
    ranked = sorted(((float(v), i, h) for i, s in enumerate(normed) for h, v in enumerate(s)), reverse=True)
    for _, i, h in ranked:
        if sum(map(len, chosen)) >= keep:
            break
        chosen[i].add(h)
    return [torch.tensor(sorted(c)) for c in chosen]


def prune_heads(model: Any, keep: list[Any]) -> None:
    """Keep only heads `keep[i]` (indices into layer i's current heads) of every layer."""
    for layer, heads in zip(encoder_layers(model), keep, strict=True):
        attention = layer.attention.self
        units = head_units(attention, heads)
        attention.query, attention.key, attention.value = (
            keep_rows(p, units) for p in (attention.query, attention.key, attention.value)
        )
        attention.num_attention_heads, attention.all_head_size = len(heads), len(units)
        layer.attention.output.dense = keep_columns(layer.attention.output.dense, units)


def prune_ffn(model: Any, keep: list[Any]) -> None:
    """Keep only FFN neurons `keep[i]` of every layer (same order)."""
    for layer, index in zip(encoder_layers(model), keep, strict=True):
        layer.intermediate.dense = keep_rows(layer.intermediate.dense, index)
        layer.output.dense = keep_columns(layer.output.dense, index)
    model.config.intermediate_size = max(len(k) for k in keep)


def drop_layers(model: Any, drop: list[int]) -> None:
    import torch

    kept = [layer for i, layer in enumerate(encoder_layers(model)) if i not in drop]
    model.base_model.encoder.layer = torch.nn.ModuleList(kept)
    model.config.num_hidden_layers = len(kept)


def kept_width(width: int, ratio: float, round_to: int) -> int:
    keep = int(width * (1 - ratio)) // round_to * round_to
    return max(keep, round_to)


def encoder_params(model: Any) -> int:
    return sum(p.numel() for p in encoder_layers(model).parameters())


def encoder_macs(model: Any, seq_len: int = 128) -> int:
    """Multiply-accumulates of the encoder layers for one sequence of `seq_len` tokens."""
    hidden, total = model.config.hidden_size, 0
    for heads, ffn, layer in zip(layer_heads(model), layer_ffn(model), encoder_layers(model), strict=True):
        width = heads * layer.attention.self.attention_head_size
        total += seq_len * (4 * hidden * width + 2 * hidden * ffn) + 2 * seq_len * seq_len * width
    return total


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


def save_pruned(model: Any, tokenizer: Any, out: Path, ctx: StageContext) -> None:
    """Save as a plain config when every layer keeps all heads, else as `pruned_bert` (see module doc)."""
    from edgepipe.runtime import pruned_bert

    heads = layer_heads(model)
    if not hasattr(model.config, "layer_heads") and set(heads) == {model.config.num_attention_heads}:
        save_model(model, tokenizer, out, ctx)
        return
    values = {**model.config.to_dict(), "layer_heads": heads, "layer_ffn": layer_ffn(model)}
    values["num_hidden_layers"] = len(heads)
    head = "TokenClassification" if ctx.task == TOKEN_TASK else "SequenceClassification"
    values["auto_map"] = {f"AutoModelFor{head}": f"modeling_pruned_bert.PrunedBertFor{head}"}
    values.pop("architectures", None)
    pruned = getattr(pruned_bert, f"PrunedBertFor{head}")(pruned_bert.PrunedBertConfig(**values))
    pruned.load_state_dict(model.state_dict())
    save_model(pruned.eval(), tokenizer, out, ctx)
    shutil.copyfile(pruned_bert.__file__, out / "modeling_pruned_bert.py")


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


def _prune_step(
    model: Any, scores: tuple[list[Any], list[Any]], cfg: PruneConfig, fraction: float, start: dict[str, Any]
) -> tuple[list[Any] | None, list[Any] | None]:
    """Prune heads and FFN neurons to `fraction` of the way; the kept indices per layer (None: not pruned)."""
    import torch

    kept_heads = kept_ffn = None
    if cfg.head_fraction:
        total = round(start["heads"] * (1 - cfg.head_fraction * fraction))
        kept_heads = select_heads(scores[0], max(total, len(scores[0])))
        prune_heads(model, kept_heads)
    if cfg.ffn_fraction:
        count = kept_width(start["ffn"], cfg.ffn_fraction * fraction, cfg.round_to)
        kept_ffn = [torch.sort(torch.topk(s, min(count, len(s))).indices).values for s in scores[1]]
        prune_ffn(model, kept_ffn)
    return kept_heads, kept_ffn


@register("prune")
def run_prune(inputs: dict[ArtifactKind, Artifact], cfg: PruneConfig, ctx: StageContext) -> StageResult:
    if ctx.task == "image-classification":
        from edgepipe.pipeline.stages.prune_cnn import run_cnn_prune

        return run_cnn_prune(inputs[ArtifactKind.TORCH_MODEL], cfg, ctx)
    import torch
    from transformers import AutoTokenizer

    from edgepipe.export import spec_for, text_feeds
    from edgepipe.runtime.text import load_text_model

    source = inputs[ArtifactKind.TORCH_MODEL].path
    model = load_text_model(source, attn_implementation="eager")
    problems = prune_problems(cfg, model.config.to_dict(), "prune")
    if problems:
        raise InputError("; ".join(problems))
    tokenizer = AutoTokenizer.from_pretrained(source)
    original = load_text_model(source, attn_implementation="eager")

    def evaluate_val(m: Any) -> float:
        return evaluate(m, tokenizer, ctx.data.val, cfg.max_seq_len, cfg.eval_batch_size)

    before = {
        "layers": len(encoder_layers(model)),
        "heads": layer_heads(model),
        "ffn": layer_ffn(model),
        "params": sum(p.numel() for p in model.parameters()),
        "encoder_params": encoder_params(model),
        "macs": encoder_macs(model),
        "val_accuracy": evaluate_val(model),
    }
    # original indices of what each layer keeps, updated by every step
    kept_layers = [i for i in range(before["layers"]) if i not in cfg.drop_layers]
    kept_heads = [torch.arange(before["heads"][i]) for i in kept_layers]
    kept_ffn = [torch.arange(before["ffn"][i]) for i in kept_layers]
    if cfg.heads:
        removed = {i: ids for i, ids in cfg.heads.items() if i not in cfg.drop_layers}
        keep = [
            torch.tensor([h for h in range(n) if h not in removed.get(i, [])]) for i, n in enumerate(before["heads"])
        ]
        prune_heads(model, keep)
    drop_layers(model, cfg.drop_layers)
    if cfg.heads:
        kept_heads = [keep[i] for i in kept_layers]
    start = {"heads": sum(layer_heads(model)), "ffn": max(layer_ffn(model))}
    width = word_width(ctx.data.train)

    def batch_of(index: Any) -> Any:
        texts = list(ctx.data.train.take(index))
        if width is None:
            return encode(tokenizer, texts, cfg.max_seq_len), None
        return encode_words(tokenizer, texts, cfg.max_seq_len, width)

    def logits_of(m: Any, batch: Any) -> Any:
        logits = m(**batch[0]).logits
        return logits if batch[1] is None else words_of(logits, batch[1])

    history = []
    for iteration in range(1, cfg.iterations + 1):
        torch.manual_seed(ctx.seed + iteration)
        scores = magnitude_scores(model) if cfg.importance == "magnitude" else taylor_scores(model, tokenizer, cfg, ctx)
        heads_step, ffn_step = _prune_step(model, scores, cfg, iteration / cfg.iterations, start)
        if heads_step is not None:
            kept_heads = [previous[k] for previous, k in zip(kept_heads, heads_step, strict=True)]
        if ffn_step is not None:
            kept_ffn = [previous[k] for previous, k in zip(kept_ffn, ffn_step, strict=True)]
        entry: dict[str, Any] = {
            "heads": layer_heads(model),
            "ffn": max(layer_ffn(model)),
            "val_accuracy_pruned": evaluate_val(model),
        }
        if cfg.recover is not None:
            losses = recover(
                model,
                original,
                cfg.recover,
                ctx,
                ctx.seed + iteration,
                batch_of,
                logits_of,
            )
            entry["recover_loss_start"], entry["recover_loss_end"] = loss_window(losses)
            entry["val_accuracy_recovered"] = evaluate_val(model)
        history.append(entry)
        log.info("prune: iteration %d: %s", iteration, entry)
    out = ctx.stage_dir / "model"
    save_pruned(model, tokenizer, out, ctx)
    metrics: dict[str, Any] = {
        "importance": cfg.importance,
        "layers_before": before["layers"],
        "layers_after": len(encoder_layers(model)),
        "dropped_layers": sorted(cfg.drop_layers),
        "heads_before": before["heads"],
        "heads_after": layer_heads(model),
        "kept_heads": {str(layer): k.tolist() for layer, k in zip(kept_layers, kept_heads, strict=True)},
        "ffn_before": max(before["ffn"]),
        "ffn_after": max(layer_ffn(model)),
        "kept_neurons": [k.tolist() for k in kept_ffn],
        "params_before": before["params"],
        "params_after": sum(p.numel() for p in model.parameters()),
        "encoder_params_before": before["encoder_params"],
        "encoder_params_after": encoder_params(model),
        "macs_per_seq128_before": before["macs"],
        "macs_per_seq128_after": encoder_macs(model),
        **accuracy_metrics(before["val_accuracy"], history),
    }
    if cfg.latency:
        spec = spec_for(model, ctx.task)
        feeds = text_feeds(tokenizer, list(ctx.data.val.inputs[:16]), spec.input_names)
        metrics["ort_latency_ms"] = ort_latency(
            {"before": original, "after": model}, feeds, spec, ctx.stage_dir / "latency"
        )
    return StageResult([Artifact("pruned", ArtifactKind.TORCH_MODEL, out, "fp32")], metrics)
