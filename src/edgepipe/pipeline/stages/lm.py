"""The causal-lm stages: distill a layer-subset student on next-token distributions, export it with a
KV cache (parity-checked step by step), quantize it int8 (dynamic) or int4 (weight-only MatMulNBits).

The distill, export and quantize stage functions hand a `task: causal-lm` recipe to these; the
algorithms live in `edgepipe.pipeline.lm`, `edgepipe.export.causal_lm` and `edgepipe.export.lm_quantize`.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from edgepipe.errors import InputError
from edgepipe.pipeline.artifacts import Artifact, write_meta
from edgepipe.pipeline.loop import autocast_mode
from edgepipe.pipeline.recipe import (
    LM_TASK,
    WEIGHT_ONLY_MODES,
    ArtifactKind,
    DistillConfig,
    ExportConfig,
    QuantizeConfig,
    WeightOnlyConfig,
)
from edgepipe.pipeline.stages import UNGROUPED, StageContext, StageResult, register
from edgepipe.tasks import Task

log = logging.getLogger(__name__)

WIDTH_CALIBRATION_TEXTS = (
    64  # train texts whose activations rank the FFN neurons and channels of a width-pruned student
)
AGREEMENT_PROMPTS = 16  # val texts whose first PROMPT_TOKENS tokens prompt the greedy-agreement check
PROMPT_TOKENS = 16
AGREEMENT_TOKENS = 16


def load_lm(folder: Path) -> tuple[Any, Any]:
    """A causal LM in fp32 eval mode and its tokenizer (pad = eos where the tokenizer has no pad token)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, use_safetensors=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def lm_layers(cfg: DistillConfig, total: int) -> list[int]:
    from edgepipe.pipeline.lm import evenly_spaced_layers

    if cfg.student.layers is not None:
        return list(cfg.student.layers)
    return evenly_spaced_layers(total, cfg.student.num_layers or total)


def lm_student_problems(cfg: DistillConfig, config: dict[str, Any], key: str) -> list[str]:
    """A causal-lm student spec against the teacher's config.json, each problem naming its key."""
    from edgepipe.arch import Capability, refusal
    from edgepipe.pipeline.students import teacher_shape

    refused = refusal(config, Capability.LAYER_SUBSET, f"{key}.student")
    if refused:
        return [refused]
    total = int((teacher_shape(config) or {}).get("layers", config.get("num_hidden_layers", 0)))
    spec = cfg.student
    if spec.num_layers is not None and not 1 <= spec.num_layers <= total:
        return [f"`{key}.student.num_layers`: {spec.num_layers} is not between 1 and the teacher's {total} layers"]
    bad = [i for i in spec.layers or [] if not 0 <= i < total]
    if bad:
        return [f"`{key}.student.layers`: {bad} out of range; the teacher has {total} layers (0-{total - 1})"]
    if cfg.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            return [f"`{key}.device`: cuda, but torch sees no CUDA device on this machine; use device: cpu"]
    shape = teacher_shape(config) or {}
    if spec.num_heads is not None:
        refused = refusal(config, Capability.QUERY_HEAD_PRUNING, f"{key}.student.num_heads")
        if refused:
            return [refused]
        total, kv = int(shape.get("heads", 0)), int(config.get("num_key_value_heads") or shape.get("heads", 1))
        if not 1 <= spec.num_heads <= total or spec.num_heads % kv:
            return [
                f"`{key}.student.num_heads`: {spec.num_heads} query heads must be a multiple of the teacher's {kv} "
                f"key/value heads, at most its {total} (grouped-query attention keeps its key/value heads)"
            ]
    widths = [
        ("intermediate_size", Capability.FFN_PRUNING, "ffn", "FFN width"),
        ("hidden_size", Capability.HIDDEN_PRUNING, "hidden", "hidden size"),
    ]
    for name, capability, dim, what in widths:
        asked = getattr(spec, name)
        if asked is None:
            continue
        refused = refusal(config, capability, f"{key}.student.{name}")
        if refused:
            return [refused]
        width = int(shape.get(dim, 0))
        if not 1 <= asked <= width:
            return [f"`{key}.student.{name}`: {asked} is not between 1 and the teacher's {what} {width}"]
        heads = spec.num_heads or int(shape.get("heads", 1))
        if dim == "hidden" and asked % heads:
            below, above = asked // heads * heads, -(-asked // heads) * heads
            return [
                f"`{key}.student.hidden_size`: {asked} is not a multiple of the student's {heads} attention heads "
                f"(transformers' config requires it); use {below or above} or {above}"
            ]
    return []


def prompts(tokenizer: Any, texts: list[str], count: int, length: int) -> tuple[Any, Any]:
    """`count` prompts of `length` tokens cut from the texts' token stream (eos between texts), all ones mask."""
    from edgepipe.runtime.generate import prompt_windows

    ids = prompt_windows([tokenizer(t)["input_ids"] for t in texts], count, length, tokenizer.eos_token_id)
    return ids, ids * 0 + 1


# DistillConfig keys the causal-lm distillation has no use for: refused by name, never silently ignored
LM_DISTILL_REFUSES = {
    "adaptive": "causal-lm distills every position with one temperature (no anneal or wsl weights)",
    "layer_map": "causal-lm distills next-token distributions, not hidden states, so no layer map applies",
    "hidden_projection": "causal-lm has no hidden-state loss to project for",
    **UNGROUPED,
}


@register("distill", Task.LM, refuses=LM_DISTILL_REFUSES)
def run_lm_distill(inputs: dict[ArtifactKind, Artifact], cfg: DistillConfig, ctx: StageContext) -> StageResult:
    source = inputs[ArtifactKind.TORCH_MODEL]
    from edgepipe.pipeline.adapters import CausalLM
    from edgepipe.pipeline.lm import distill_lm, greedy_agreement, layer_subset
    from edgepipe.runtime.generate import TorchCausalLM

    teacher, tokenizer = load_lm(source.path)
    problems = lm_student_problems(cfg, teacher.config.to_dict(), "distill")
    if problems:
        raise InputError("; ".join(problems))
    layers = lm_layers(cfg, teacher.config.num_hidden_layers)
    student = layer_subset(teacher, layers)
    kept_importance = None
    widths = {
        "intermediate_size": cfg.student.intermediate_size,
        "hidden_size": cfg.student.hidden_size,
        "num_heads": cfg.student.num_heads,
    }
    if any(w is not None for w in widths.values()):  # Minitron: width-prune by activation importance, then KD
        import torch

        from edgepipe.pipeline.adapters import text_batches
        from edgepipe.pipeline.lm import prune_width

        texts = list(ctx.data.train.inputs)[:WIDTH_CALIBRATION_TEXTS]
        batches = [
            (torch.from_numpy(i), torch.from_numpy(m)) for i, m in text_batches(tokenizer, texts, 8, cfg.max_seq_len)
        ]
        kept_importance = prune_width(student, batches, **widths)
    for param in teacher.parameters():
        param.requires_grad_(False)
    started = time.perf_counter()
    history = distill_lm(
        teacher,
        student,
        list(ctx.data.train.inputs),
        tokenizer,
        kind=cfg.divergence,
        temperature=cfg.temperature,
        steps=cfg.max_steps,
        batch_size=cfg.batch_size,
        seq_len=cfg.max_seq_len,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        warmup_ratio=cfg.warmup_ratio,
        kd_weight=cfg.loss.kd,
        ce_weight=cfg.loss.ce,
        seed=ctx.seed,
        device=cfg.device,
        autocast=cfg.autocast,
    )
    train_s = time.perf_counter() - started
    task, val = CausalLM(tokenizer, cfg.max_seq_len, cfg.eval_batch_size), list(ctx.data.val.inputs)
    teacher_ppl, student_ppl = task.metric(teacher, ctx.data.val), task.metric(student, ctx.data.val)
    ids, mask = prompts(tokenizer, val, AGREEMENT_PROMPTS, PROMPT_TOKENS)
    agreement = greedy_agreement(
        TorchCausalLM(teacher).generate(ids, mask, AGREEMENT_TOKENS).tokens,
        TorchCausalLM(student).generate(ids, mask, AGREEMENT_TOKENS).tokens,
    )
    log.info(
        "distill (causal-lm): %d steps in %.0f s, val perplexity %.2f (teacher %.2f), greedy agreement %.3f",
        cfg.max_steps,
        train_s,
        student_ppl,
        teacher_ppl,
        agreement,
    )
    out = ctx.stage_dir / "model"
    student.save_pretrained(out)  # safetensors
    tokenizer.save_pretrained(out)
    write_meta(out, task=LM_TASK, labels=[], precision="fp32", fmt="transformers")
    metrics = {
        "steps": cfg.max_steps,
        "train_seconds": round(train_s, 2),
        "device": cfg.device,
        "autocast": autocast_mode(cfg.autocast, cfg.device),  # what ran: auto resolved
        "divergence": cfg.divergence,
        "temperature": cfg.temperature,
        "layers": layers,
        "ffn_width": cfg.student.intermediate_size,  # None: the teacher's width
        "hidden_size": cfg.student.hidden_size,
        "num_heads": cfg.student.num_heads,  # query heads per layer; None: the teacher's
        "importance_kept": kept_importance,  # share of the activation importance the kept units hold
        "student_parameters": sum(p.numel() for p in student.parameters()),
        "teacher_parameters": sum(p.numel() for p in teacher.parameters()),
        "val_perplexity": round(student_ppl, 4),
        "teacher_val_perplexity": round(teacher_ppl, 4),
        "perplexity_ratio": round(student_ppl / teacher_ppl, 4),
        "greedy_agreement": round(agreement, 4),
        "loss_start": history["loss_first"],
        "loss_end": history["loss_last"],
        "step_s_median": history["step_s_median"],
    }
    return StageResult([Artifact(cfg.name, ArtifactKind.TORCH_MODEL, out, "fp32")], metrics)


@register("export", Task.LM)
def run_lm_export(inputs: dict[ArtifactKind, Artifact], cfg: ExportConfig, ctx: StageContext) -> StageResult:
    source = inputs[ArtifactKind.TORCH_MODEL].path
    from edgepipe.export.causal_lm import FUSED_CASES, check_causal_parity, export_causal_lm, export_fused

    model, tokenizer = load_lm(source)
    out = ctx.stage_dir / "fp32"
    out.mkdir(parents=True)
    export_causal_lm(model, out / "model.onnx", opset=cfg.opset)
    parity = check_causal_parity(model, out / "model.onnx", atol=cfg.parity_atol, seed=ctx.seed)
    artifacts = [Artifact("fp32", ArtifactKind.ONNX_FP32, out, "fp32")]
    metrics: dict[str, Any] = {"opset": cfg.opset, "kv_cache": True, "parity": [asdict(p) for p in parity]}
    folders = [out]
    if cfg.fuse:
        fused = ctx.stage_dir / "fp32-fused"
        started = time.perf_counter()
        path = export_fused(source, fused, ctx.stage_dir / "builder.log")
        fused_parity = check_causal_parity(model, path, atol=cfg.parity_atol, cases=FUSED_CASES, seed=ctx.seed)
        metrics["fused"] = {
            "producer": "onnxruntime-genai model builder",
            "export_seconds": round(time.perf_counter() - started, 1),
            "parity": [asdict(p) for p in fused_parity],
        }
        artifacts.append(Artifact("fp32-fused", ArtifactKind.ONNX_FP32_FUSED, fused, "fp32"))
        folders.append(fused)
    for folder in folders:
        tokenizer.save_pretrained(folder)
        model.config.save_pretrained(folder)
        model.generation_config.save_pretrained(folder)
        write_meta(folder, task=LM_TASK, labels=[], precision="fp32", fmt="onnx")
    return StageResult(artifacts, metrics)


def float_matmuls(folder: Path) -> tuple[str, ...]:
    """The ONNX name scope of the family's FFN down projection (`/mlp/down_proj/`, GPT-2's `/mlp/c_proj/`),
    which int8 keeps fp32 (export.lm_quantize); the default for a family without a spec."""
    import json

    from edgepipe.arch import spec_of
    from edgepipe.export.lm_quantize import FLOAT_MATMULS

    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    arch = spec_of(config)
    if arch is None or arch.ffn is None:
        return FLOAT_MATMULS
    return ("/" + arch.ffn.down.replace(".", "/") + "/",)


QUALITY_TEXTS = 64  # val texts the quantize stage measures its artifact on against its source
QUALITY_TOKENS = 64
CALIBRATION_TOKENS = 64


def weight_only_settings(cfg: QuantizeConfig, onnx_path: Path, sensitivity: dict[str, float]) -> Any:
    """The MatMulNBits settings of a weight-only stage: `int4` is 4-bit symmetric RTN; `weights.eight_bit`
    name parts and the most sensitive `weights.sensitive_8bit` of the MatMuls go to 8 bits."""
    import math

    from edgepipe.export.lm_quantize import WeightOnly, matmul_nodes

    if cfg.mode == "int4":
        return WeightOnly(bits=4, symmetric=True)
    weights = cfg.weights or WeightOnlyConfig()
    nodes = matmul_nodes(onnx_path)
    distinct = list(dict.fromkeys(nodes.values()))
    chosen = [name for name in distinct if any(part in name.replace("/", ".") for part in weights.eight_bit)]
    if weights.sensitive_8bit:  # a merged MatMul (q/k/v) ranks by its most sensitive part
        ranked = list(dict.fromkeys(n for n in (node_of(module, nodes) for module in sensitivity) if n))
        chosen += ranked[: math.ceil(weights.sensitive_8bit * len(distinct))]
    return WeightOnly(
        bits=weights.bits,
        algorithm=weights.algorithm,
        block_size=weights.block_size,
        symmetric=weights.symmetric,
        accuracy_level=weights.accuracy_level,
        eight_bit=tuple(dict.fromkeys(chosen)),
        head=weights.head,
        tied_table=weights.tied_table,
    )


def node_of(module: str, nodes: dict[str, str]) -> str | None:
    """The MatMul node computing a torch Linear: by its scope name, or in onnxruntime-genai's fused graph, where
    q, k and v are one `attn.qkv_proj` (gate and up one `mlp.gate_up_proj` in some families)."""
    import re

    merged = re.sub(r"self_attn\.[qkv]_proj$", "attn.qkv_proj", module).replace("self_attn.", "attn.")
    for name in (module, merged, re.sub(r"mlp\.(gate|up)_proj$", "mlp.gate_up_proj", merged)):
        if name in nodes:
            return nodes[name]
    return None


def _sensitivity(inputs: dict[ArtifactKind, Artifact], weights: WeightOnlyConfig, texts: list[str]) -> dict[str, float]:
    """Per-Linear KL sensitivity of the stage's torch model (`lm.matmul_sensitivity`) on calibration text."""
    import torch

    from edgepipe.pipeline.adapters import text_batches
    from edgepipe.pipeline.lm import matmul_sensitivity

    model, tokenizer = load_lm(inputs[ArtifactKind.TORCH_MODEL].path)
    batches = [
        (torch.from_numpy(ids), torch.from_numpy(mask))
        for ids, mask in text_batches(tokenizer, texts, 8, CALIBRATION_TOKENS)
    ]
    return matmul_sensitivity(model, batches, bits=4, block_size=weights.block_size, symmetric=weights.symmetric)


@register("quantize", Task.LM)
def run_lm_quantize(inputs: dict[ArtifactKind, Artifact], cfg: QuantizeConfig, ctx: StageContext) -> StageResult:
    source = inputs[cfg.source_kind]
    from edgepipe.benchmarks.bench import BenchItem
    from edgepipe.export.lm_quantize import quantize_int8, quantize_weight_only
    from edgepipe.pipeline.adapters import text_batches
    from edgepipe.runtime.generate import OnnxCausalLM

    out = ctx.stage_dir / cfg.artifact_name
    out.mkdir(parents=True)
    for item in source.path.iterdir():  # tokenizer and configs travel with the model
        if item.is_file() and item.name not in ("model.onnx", "model.onnx.data", "edgepipe.json"):
            shutil.copy2(item, out / item.name)
    src = source.path / "model.onnx"
    metrics: dict[str, Any] = {"mode": cfg.mode}
    started = time.perf_counter()
    if cfg.mode in WEIGHT_ONLY_MODES:
        weights = cfg.weights or WeightOnlyConfig()
        calibration = list(ctx.data.train.inputs)[: weights.calibration_texts]
        sensitivity = _sensitivity(inputs, weights, calibration) if weights.sensitive_8bit else {}
        settings = weight_only_settings(cfg, src, sensitivity)
        feeds = None
        if settings.algorithm == "gptq":
            from transformers import AutoTokenizer

            tokenizer, model = AutoTokenizer.from_pretrained(source.path), OnnxCausalLM(src)
            feeds = [
                model.feeds(ids, mask) for ids, mask in text_batches(tokenizer, calibration, 1, CALIBRATION_TOKENS)
            ]
        counts = quantize_weight_only(src, out / "model.onnx", settings, feeds)
        precision = f"int{settings.bits}-weights" + ("+int8" if settings.eight_bit and settings.bits != 8 else "")
        metrics |= {
            "weights": {**asdict(settings), "eight_bit": list(settings.eight_bit)},
            "sensitivity_kl": {name: round(kl, 6) for name, kl in sensitivity.items()},
        }
    else:
        counts = quantize_int8(
            src, out / "model.onnx", keep_float=float_matmuls(source.path), reduce_range=cfg.reduce_range
        )
        precision = "int8-dynamic"
    metrics["quantize_seconds"] = round(time.perf_counter() - started, 1)
    metrics |= _quality_against(source.path, out, list(ctx.data.val.inputs)[:QUALITY_TEXTS])
    write_meta(out, task=LM_TASK, labels=[], precision=precision, fmt="onnx")
    metrics |= {
        "op_counts": dict(sorted(counts.items())),
        "size_mb_before": BenchItem(source.name, source.path, source.precision, "onnx").size_mb,
        "size_mb_after": BenchItem(cfg.artifact_name, out, precision, "onnx").size_mb,
    }
    log.info(
        "quantize (causal-lm, %s): val perplexity %.3f (source %.3f), KL %.4f, top-1 %.3f, %.1f -> %.1f MB",
        cfg.artifact_name,
        metrics["val_perplexity"],
        metrics["source_val_perplexity"],
        metrics["val_kl"],
        metrics["val_top1"],
        metrics["size_mb_before"],
        metrics["size_mb_after"],
    )
    return StageResult([Artifact(cfg.artifact_name, ArtifactKind.ONNX_INT8, out, precision)], metrics)


def _quality_against(source: Path, quantized: Path, texts: list[str]) -> dict[str, Any]:
    """Teacher-forced perplexity, KL divergence and top-1 agreement of the quantized model against its source
    (`runtime.generate.token_quality`) on val texts: the stage's own check that the artifact runs and what it
    cost, before the benchmark measures it on the test split."""
    from transformers import AutoTokenizer

    from edgepipe.pipeline.adapters import text_batches
    from edgepipe.runtime.generate import OnnxCausalLM, token_quality

    tokenizer = AutoTokenizer.from_pretrained(source)
    models = {"source": OnnxCausalLM(source).logits, "quantized": OnnxCausalLM(quantized).logits}
    quality = token_quality(models, text_batches(tokenizer, texts, 16, QUALITY_TOKENS))
    return {
        "val_perplexity": round(quality["quantized"].perplexity, 4),
        "source_val_perplexity": round(quality["source"].perplexity, 4),
        "val_kl": round(quality["quantized"].kl, 6),
        "val_top1": round(quality["quantized"].top1, 4),
    }
