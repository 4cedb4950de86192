"""prune: remove attention heads, FFN neurons and whole layers of a transformers model, so shapes shrink.

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

The family's architecture spec (`edgepipe.arch`) says where its heads, FFN and layers are. A head-pruned
model is saved through `edgepipe.runtime.pruned_bert` (per-layer head and FFN counts in config.json, the
modeling file copied alongside), which reloads with `from_pretrained(folder, trust_remote_code=True)`; an
FFN- or layer-pruned one stays a plain folder of its family.

`recover` fine-tunes with the distill stage's logit objective from the unpruned model;
`iterations: N` prunes 1/N of the way, recovers, and repeats. With `latency: true` the stage exports
the model before and after to ONNX and times both with onnxruntime (b1 and b8, s128).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from edgepipe.arch import ArchSpec, Capability, refusal, spec_of
from edgepipe.arch.ops import (
    blocks,
    ffn_unit_views,
    ffn_widths,
    head_count,
    head_output_taylor,
    head_projections,
    head_size,
    head_weight_sq,
    keep_layers,
    layer_list,
    linear_macs,
    prune_ffn,
    prune_heads,
)
from edgepipe.errors import InputError
from edgepipe.pipeline.adapters import adapter_for
from edgepipe.pipeline.artifacts import Artifact
from edgepipe.pipeline.loop import batches, loss_window
from edgepipe.pipeline.recipe import TOKEN_TASK, ArtifactKind, PruneConfig
from edgepipe.pipeline.stages import StageContext, StageResult, register
from edgepipe.pipeline.stages.recovery import accuracy_metrics, ort_latency, recover
from edgepipe.pipeline.stages.training import save_model
from edgepipe.tasks import Task

log = logging.getLogger(__name__)


def prune_problems(cfg: PruneConfig, config: dict[str, Any], key: str) -> list[str]:
    """What a prune spec asks that the model (its config.json as a dict) cannot give, naming the key."""
    arch = spec_of(config)
    asked = [
        (Capability.HEAD_PRUNING, bool(cfg.head_fraction or cfg.heads), "use ffn_ratio / drop_layers"),
        (Capability.FFN_PRUNING, bool(cfg.ffn_fraction), "use drop_layers"),
        (Capability.LAYER_PRUNING, bool(cfg.drop_layers), "use ffn_ratio"),
    ]
    refused = [(refusal(config, capability, key), instead) for capability, wanted, instead in asked if wanted]
    problems = [f"{why}; {instead}" for why, instead in refused if why]
    keys = arch.keys if arch is not None else None
    if problems or arch is None or keys is None or config.get(keys.layers) is None:
        return problems  # config.json leaves the shape out: the stage checks the loaded config
    layers, heads = int(config[keys.layers]), int(config.get(keys.heads) or 0)
    per_layer_heads = list(config.get("layer_heads") or [heads] * layers)
    ffn = min(config.get("layer_ffn") or [int(config.get(keys.ffn) or 4 * int(config.get(keys.hidden) or 0))])
    if cfg.ffn_fraction and cfg.round_to > ffn:
        problems.append(f"`{key}.round_to`: {cfg.round_to} is larger than the FFN width {ffn}; use a smaller multiple")
    bad_layers = [i for i in [*cfg.drop_layers, *(cfg.heads or {})] if i >= layers]
    if bad_layers:
        problems.append(
            f"`{key}`: layer {sorted(set(bad_layers))} out of range; the model has {layers} (0-{layers - 1})"
        )
    if len(cfg.drop_layers) >= layers:
        problems.append(f"`{key}.drop_layers`: would remove all {layers} layers; keep at least one")
    if arch.first_layer_fixed and 0 in cfg.drop_layers:
        problems.append(f"`{key}.drop_layers`: {arch.family}'s first layer is built unlike the others; keep layer 0")
    for layer, ids in (cfg.heads or {}).items():
        if layer >= layers:
            continue
        if max(ids) >= per_layer_heads[layer]:
            problems.append(
                f"`{key}.heads.{layer}`: head {max(ids)} out of range; layer {layer} has {per_layer_heads[layer]}"
            )
        elif len(ids) == per_layer_heads[layer] and layer not in cfg.drop_layers:
            problems.append(
                f"`{key}.heads.{layer}`: removes every head of layer {layer}; to remove the layer, add it to "
                "`drop_layers` instead"
            )
    return problems


def layer_heads(model: Any, arch: ArchSpec) -> list[int]:
    """Each layer's attention heads (per layer only where the family prunes heads)."""
    if arch.can(Capability.HEAD_PRUNING):
        return [head_count(layer, arch) for layer in layer_list(model, arch)]
    return [int(model.config.num_attention_heads)] * int(model.config.num_hidden_layers)


def _norms(views: list[tuple[Any, bool]]) -> Any:
    """A neuron's weight magnitude: the product of its row norms in every weight it touches."""
    import math

    return math.prod(rows.norm(dim=1) for rows, is_weight in views if is_weight)


def magnitude_scores(model: Any, arch: ArchSpec) -> tuple[list[Any], list[Any]]:
    """(per-layer head scores, per-block FFN neuron scores) from weight norms (heads: families that prune them)."""
    layers = layer_list(model, arch) if arch.can(Capability.HEAD_PRUNING) else []
    heads = [head_weight_sq(layer, arch).sqrt() for layer in layers]
    ffn = [_norms(ffn_unit_views(b, arch)).detach() for b in blocks(model, arch)] if arch.ffn else []
    return heads, ffn


def taylor_scores(
    model: Any, arch: ArchSpec, tokenizer: Any, cfg: PruneConfig, ctx: StageContext
) -> tuple[list[Any], list[Any]]:
    """|sum_w w * dL/dw| per head and per FFN neuron over `samples` labelled train examples (CE loss)."""
    import torch

    model.train()
    heads = [torch.zeros(n) for n in layer_heads(model, arch)] if arch.can(Capability.HEAD_PRUNING) else []
    ffn = [torch.zeros(n) for n in ffn_widths(model, arch)] if arch.ffn else []
    task, train = adapter_for(ctx.task, tokenizer, cfg.max_seq_len, cfg.eval_batch_size), ctx.data.train
    for index in batches(len(train), cfg.batch_size, max(1, cfg.samples // cfg.batch_size), ctx.seed):
        batch = task.batch(train, index)
        loss = task.loss(task.logits(task.forward(model, batch), batch), batch)
        model.zero_grad(set_to_none=True)
        loss.backward()
        for i, layer in enumerate(layer_list(model, arch) if heads else []):
            heads[i] += head_output_taylor(layer, arch)
        for i, block in enumerate(blocks(model, arch) if ffn else []):
            pairs = zip(ffn_unit_views(block, arch), ffn_unit_views(block, arch, grad=True), strict=True)
            ffn[i] += sum((w * g).sum(1) for (w, _), (g, _) in pairs if g is not None).abs()
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


def kept_width(width: int, ratio: float, round_to: int) -> int:
    keep = int(width * (1 - ratio)) // round_to * round_to
    return max(keep, round_to)


def encoder_params(model: Any, arch: ArchSpec) -> int:
    return sum(p.numel() for block in blocks(model, arch) for p in block.parameters())


def encoder_macs(model: Any, arch: ArchSpec, seq_len: int = 128) -> int:
    """Multiply-accumulates of the layers for one sequence: their weight matmuls plus the attention
    scores and weighted sum (2 * seq_len^2 per unit of attention width)."""
    head_size = int(model.config.hidden_size) // int(model.config.num_attention_heads)
    attention = sum(2 * seq_len * seq_len * heads * head_size for heads in layer_heads(model, arch))
    return linear_macs(model, arch, seq_len) + attention


def save_pruned(model: Any, arch: ArchSpec, tokenizer: Any, out: Path, ctx: StageContext) -> None:
    """Save as a plain config when every layer keeps all heads, else as `pruned_bert` (see module doc)."""
    from edgepipe.runtime import pruned_bert

    heads = layer_heads(model, arch)
    if not hasattr(model.config, "layer_heads") and set(heads) == {model.config.num_attention_heads}:
        save_model(model, tokenizer, out, ctx)
        return
    values = {**model.config.to_dict(), "layer_heads": heads, "layer_ffn": ffn_widths(model, arch)}
    values[arch.keys.layers] = len(heads)
    values["pruned_layout"] = pruned_layout(model, arch)  # what a family without BERT's layout resizes on load
    head = "TokenClassification" if ctx.task == TOKEN_TASK else "SequenceClassification"
    cls = pruned_bert.pruned_class(model.config.model_type, head)
    values["auto_map"] = {f"AutoModelFor{head}": f"modeling_pruned_bert.{cls.__name__}"}
    values.pop("architectures", None)
    pruned = cls(cls.config_class(**values))
    pruned.load_state_dict(model.state_dict())
    save_model(pruned.eval(), tokenizer, out, ctx)
    shutil.copyfile(pruned_bert.__file__, out / "modeling_pruned_bert.py")


def pruned_layout(model: Any, arch: ArchSpec) -> dict[str, Any]:
    """Where a pruned model keeps what `layer_heads` and `layer_ffn` resize, for
    `pruned_bert.resize_by_layout` (which cannot import edgepipe; BERT's own layout needs no paths)."""
    att, ffn = arch.attention, arch.ffn
    if att is None or ffn is None or arch.layers is None:
        raise InputError(f"{arch.family}: a head-pruned model needs attention, FFN and layer specs")
    first = layer_list(model, arch)[0]
    return {
        "layers": arch.layers,
        "module": att.module,
        "heads": att.heads,
        "width": att.width,
        "head_size": head_size(first, arch),
        "projections": {path: copies for path, copies in head_projections(first, att)},
        "out": att.out,
        "up": [p for p in (ffn.up, ffn.gate) if p is not None],
        "down": ffn.down,
        "glu": 2 if ffn.fused_glu else 1,
    }


def _prune_step(
    model: Any,
    arch: ArchSpec,
    scores: tuple[list[Any], list[Any]],
    cfg: PruneConfig,
    fraction: float,
    start: dict[str, Any],
) -> tuple[list[Any] | None, list[Any] | None]:
    """Prune heads and FFN neurons to `fraction` of the way; the kept indices per layer (None: not pruned)."""
    import torch

    kept_heads = kept_ffn = None
    if cfg.head_fraction:
        total = round(start["heads"] * (1 - cfg.head_fraction * fraction))
        kept_heads = select_heads(scores[0], max(total, len(scores[0])))
        prune_heads(model, arch, kept_heads)
    if cfg.ffn_fraction:
        count = kept_width(start["ffn"], cfg.ffn_fraction * fraction, cfg.round_to)
        kept_ffn = [torch.sort(torch.topk(s, min(count, len(s))).indices).values for s in scores[1]]
        prune_ffn(model, arch, kept_ffn)
    return kept_heads, kept_ffn


@register("prune", Task.TEXT, Task.TOKEN)
def run_prune(inputs: dict[ArtifactKind, Artifact], cfg: PruneConfig, ctx: StageContext) -> StageResult:
    import torch
    from transformers import AutoTokenizer

    from edgepipe.runtime.text import load_text_model

    source = inputs[ArtifactKind.TORCH_MODEL].path
    model = load_text_model(source, attn_implementation="eager")
    problems = prune_problems(cfg, model.config.to_dict(), "prune")
    arch = spec_of(model.config)
    if problems or arch is None:
        raise InputError("; ".join(problems) or f"no architecture spec for {model.config.model_type!r}")
    tokenizer = AutoTokenizer.from_pretrained(source)
    original = load_text_model(source, attn_implementation="eager")

    task = adapter_for(ctx.task, tokenizer, cfg.max_seq_len, cfg.eval_batch_size)

    def evaluate_val(m: Any) -> float:
        return float(task.metric(m, ctx.data.val))

    before = {
        "layers": int(model.config.num_hidden_layers),
        "heads": layer_heads(model, arch),
        "ffn": ffn_widths(model, arch) if arch.ffn else [],
        "params": sum(p.numel() for p in model.parameters()),
        "encoder_params": encoder_params(model, arch),
        "macs": encoder_macs(model, arch),
        "val_accuracy": evaluate_val(model),
    }
    # original indices of what each layer keeps, updated by every step
    kept_layers = [i for i in range(before["layers"]) if i not in cfg.drop_layers]
    kept_heads = [torch.arange(before["heads"][i]) for i in kept_layers]
    if cfg.heads:
        removed = {i: ids for i, ids in cfg.heads.items() if i not in cfg.drop_layers}
        keep = [
            torch.tensor([h for h in range(n) if h not in removed.get(i, [])]) for i, n in enumerate(before["heads"])
        ]
        prune_heads(model, arch, keep)
    if cfg.drop_layers:
        keep_layers(model, arch, kept_layers)
    if cfg.heads:
        kept_heads = [keep[i] for i in kept_layers]
    kept_ffn = [torch.arange(w) for w in ffn_widths(model, arch)] if arch.ffn else []
    start = {"heads": sum(layer_heads(model, arch)), "ffn": max((len(k) for k in kept_ffn), default=0)}

    history = []
    for iteration in range(1, cfg.iterations + 1):
        torch.manual_seed(ctx.seed + iteration)
        if cfg.importance == "magnitude":
            scores = magnitude_scores(model, arch)
        else:
            scores = taylor_scores(model, arch, tokenizer, cfg, ctx)
        heads_step, ffn_step = _prune_step(model, arch, scores, cfg, iteration / cfg.iterations, start)
        if heads_step is not None:
            kept_heads = [previous[k] for previous, k in zip(kept_heads, heads_step, strict=True)]
        if ffn_step is not None:
            kept_ffn = [previous[k] for previous, k in zip(kept_ffn, ffn_step, strict=True)]
        entry: dict[str, Any] = {
            "heads": layer_heads(model, arch),
            "ffn": max(ffn_widths(model, arch), default=None),
            "val_accuracy_pruned": evaluate_val(model),
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
            entry["val_accuracy_recovered"] = evaluate_val(model)
        history.append(entry)
        log.info("prune: iteration %d: %s", iteration, entry)
    out = ctx.stage_dir / "model"
    save_pruned(model, arch, tokenizer, out, ctx)
    metrics: dict[str, Any] = {
        "importance": cfg.importance,
        "layers_before": before["layers"],
        "layers_after": int(model.config.num_hidden_layers),
        "dropped_layers": sorted(cfg.drop_layers),
        "heads_before": before["heads"],
        "heads_after": layer_heads(model, arch),
        "kept_heads": {str(layer): k.tolist() for layer, k in zip(kept_layers, kept_heads, strict=True)},
        "ffn_before": max(before["ffn"], default=None),
        "ffn_after": max(ffn_widths(model, arch), default=None),
        "kept_neurons": [k.tolist() for k in kept_ffn],
        "params_before": before["params"],
        "params_after": sum(p.numel() for p in model.parameters()),
        "encoder_params_before": before["encoder_params"],
        "encoder_params_after": encoder_params(model, arch),
        "macs_per_seq128_before": before["macs"],
        "macs_per_seq128_after": encoder_macs(model, arch),
        **accuracy_metrics(before["val_accuracy"], history),
    }
    if cfg.latency:
        spec = task.export_spec(model)
        feeds = task.feeds(ctx.data.val.inputs[:16], spec.input_names)
        metrics["ort_latency_ms"] = ort_latency(
            {"before": original, "after": model}, feeds, spec, ctx.stage_dir / "latency"
        )
    return StageResult([Artifact("pruned", ArtifactKind.TORCH_MODEL, out, "fp32")], metrics)
