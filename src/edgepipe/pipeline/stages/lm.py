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
from edgepipe.pipeline.recipe import LM_TASK, ArtifactKind, DistillConfig, ExportConfig, QuantizeConfig
from edgepipe.pipeline.stages import StageContext, StageResult, register
from edgepipe.tasks import Task

log = logging.getLogger(__name__)

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
    for name in ("hidden_size", "num_heads", "intermediate_size"):
        if getattr(spec, name) is not None:
            return [f"`{key}.student.{name}`: a causal-lm student keeps the teacher's widths (a layer subset)"]
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
        progress=ctx.progress,
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
        "divergence": cfg.divergence,
        "temperature": cfg.temperature,
        "layers": layers,
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
    from edgepipe.export.causal_lm import check_causal_parity, export_causal_lm

    model, tokenizer = load_lm(source)
    out = ctx.stage_dir / "fp32"
    out.mkdir(parents=True)
    export_causal_lm(model, out / "model.onnx", opset=cfg.opset)
    parity = check_causal_parity(model, out / "model.onnx", atol=cfg.parity_atol, seed=ctx.seed)
    tokenizer.save_pretrained(out)
    model.config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    write_meta(out, task=LM_TASK, labels=[], precision="fp32", fmt="onnx")
    metrics = {"opset": cfg.opset, "kv_cache": True, "parity": [asdict(p) for p in parity]}
    return StageResult([Artifact("fp32", ArtifactKind.ONNX_FP32, out, "fp32")], metrics)


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


@register("quantize", Task.LM)
def run_lm_quantize(inputs: dict[ArtifactKind, Artifact], cfg: QuantizeConfig, ctx: StageContext) -> StageResult:
    source = inputs[cfg.source_kind]
    from edgepipe.export.lm_quantize import quantize_int4, quantize_int8

    out = ctx.stage_dir / cfg.artifact_name
    out.mkdir(parents=True)
    for item in source.path.iterdir():  # tokenizer and configs travel with the model
        if item.is_file() and item.name not in ("model.onnx", "edgepipe.json"):
            shutil.copy2(item, out / item.name)
    src = source.path / "model.onnx"
    if cfg.mode == "int4":
        counts = quantize_int4(src, out / "model.onnx")
        precision = "int4-weights"
    else:
        counts = quantize_int8(src, out / "model.onnx", keep_float=float_matmuls(source.path))
        precision = "int8-dynamic"
    write_meta(out, task=LM_TASK, labels=[], precision=precision, fmt="onnx")
    metrics = {
        "mode": cfg.mode,
        "op_counts": dict(sorted(counts.items())),
        "size_mb_before": round(src.stat().st_size / 1e6, 2),
        "size_mb_after": round((out / "model.onnx").stat().st_size / 1e6, 2),
    }
    return StageResult([Artifact(cfg.artifact_name, ArtifactKind.ONNX_INT8, out, precision)], metrics)
