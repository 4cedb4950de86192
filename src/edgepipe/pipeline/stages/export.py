"""export: ONNX (opset >= 17, dynamic batch and sequence), checked and parity-tested against PyTorch,
plus a transformer-fused fp32 model where onnxruntime's optimizer supports the architecture.

Image modules export with a dynamic batch at the data's image size; parity uses real images."""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from edgepipe.export import check_parity, export_onnx, fuse_transformer, image_feeds, spec_for, text_feeds
from edgepipe.export.onnx_export import load_for_export
from edgepipe.pipeline.artifacts import Artifact, write_meta
from edgepipe.pipeline.recipe import ArtifactKind, ExportConfig
from edgepipe.pipeline.stages import StageContext, StageResult, register
from edgepipe.tasks import Task

log = logging.getLogger(__name__)


def _finish(folder: Path, model: Any, tokenizer: Any, ctx: StageContext) -> None:
    """Make the folder self-contained: tokenizer, config (labels) and edgepipe metadata."""
    tokenizer.save_pretrained(folder)
    model.config.save_pretrained(folder)
    write_meta(folder, task=ctx.task, labels=ctx.data.label_names, precision="fp32", fmt="onnx")


@register("export", Task.IMAGE)
def run_module_export(inputs: dict[ArtifactKind, Artifact], cfg: ExportConfig, ctx: StageContext) -> StageResult:
    source = inputs[ArtifactKind.TORCH_MODEL].path
    from edgepipe.runtime.modules import load_module, read_module_meta

    model = load_module(source)
    spec = spec_for(model, ctx.task)
    feeds = image_feeds(np.asarray(ctx.data.val.inputs[:16]))
    out = ctx.stage_dir / "fp32"
    out.mkdir(parents=True)
    export_onnx(model, feeds, out / "model.onnx", opset=cfg.opset, shape=cfg.export_shape, spec=spec)
    parity = check_parity(
        model, out / "model.onnx", feeds, [(b, s) for b, s in cfg.parity_shapes], cfg.parity_atol, spec
    )
    meta = read_module_meta(source)
    write_meta(out, task=ctx.task, labels=ctx.data.label_names, precision="fp32", fmt="onnx", input=meta["input"])
    metrics = {"opset": cfg.opset, "inputs": list(spec.input_names), "parity": [asdict(p) for p in parity]}
    return StageResult([Artifact("fp32", ArtifactKind.ONNX_FP32, out, "fp32")], metrics)


@register("export", Task.TEXT, Task.TOKEN)
def run_export(inputs: dict[ArtifactKind, Artifact], cfg: ExportConfig, ctx: StageContext) -> StageResult:
    source = inputs[ArtifactKind.TORCH_MODEL].path
    from transformers import AutoTokenizer

    model = load_for_export(source)
    tokenizer = AutoTokenizer.from_pretrained(source)
    shapes = [(b, s) for b, s in cfg.parity_shapes]
    spec = spec_for(model, ctx.task)
    feeds = text_feeds(tokenizer, list(ctx.data.val.inputs[:16]), spec.input_names)

    plain = ctx.stage_dir / "fp32"
    plain.mkdir(parents=True)
    export_onnx(model, feeds, plain / "model.onnx", opset=cfg.opset, shape=cfg.export_shape, spec=spec)
    parity = check_parity(model, plain / "model.onnx", feeds, shapes, cfg.parity_atol, spec)
    _finish(plain, model, tokenizer, ctx)
    artifacts = [Artifact("fp32", ArtifactKind.ONNX_FP32, plain, "fp32")]
    metrics: dict[str, Any] = {
        "opset": cfg.opset,
        "inputs": list(spec.input_names),
        "parity": [asdict(p) for p in parity],
    }
    if cfg.fuse:
        fused = ctx.stage_dir / "fp32-fused"
        fused.mkdir()
        fused_ops = fuse_transformer(plain / "model.onnx", fused / "model.onnx", model.config)
        if fused_ops is None:
            fused.rmdir()
            metrics["fusion"] = f"not supported for model_type {model.config.model_type}"
        else:
            fused_parity = check_parity(model, fused / "model.onnx", feeds, shapes, cfg.parity_atol, spec)
            _finish(fused, model, tokenizer, ctx)
            artifacts.append(Artifact("fp32-fused", ArtifactKind.ONNX_FP32_FUSED, fused, "fp32"))
            metrics["fused_ops"] = fused_ops
            metrics["fused_parity"] = [asdict(p) for p in fused_parity]
    return StageResult(artifacts, metrics)
