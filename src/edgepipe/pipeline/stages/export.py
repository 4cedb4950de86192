"""export: ONNX (opset >= 17, dynamic batch and sequence), checked and parity-tested against PyTorch,
plus a transformer-fused fp32 model where onnxruntime's optimizer supports the architecture."""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from edgepipe.export import check_parity, export_onnx, fuse_transformer
from edgepipe.export.onnx_export import load_for_export
from edgepipe.pipeline.artifacts import Artifact, write_meta
from edgepipe.pipeline.recipe import ArtifactKind, ExportConfig
from edgepipe.pipeline.stages import StageContext, StageResult, register

log = logging.getLogger(__name__)


def _finish(folder: Path, model: Any, tokenizer: Any, ctx: StageContext) -> None:
    """Make the folder self-contained: tokenizer, config (labels) and edgepipe metadata."""
    tokenizer.save_pretrained(folder)
    model.config.save_pretrained(folder)
    write_meta(folder, task=ctx.task, labels=ctx.data.label_names, precision="fp32", fmt="onnx")


@register("export")
def run_export(inputs: dict[ArtifactKind, Artifact], cfg: ExportConfig, ctx: StageContext) -> StageResult:
    from transformers import AutoTokenizer

    source = inputs[ArtifactKind.HF_MODEL].path
    model = load_for_export(source)
    tokenizer = AutoTokenizer.from_pretrained(source)
    texts = ctx.data.val.texts[:16]
    shapes = [(b, s) for b, s in cfg.parity_shapes]

    plain = ctx.stage_dir / "fp32"
    plain.mkdir(parents=True)
    spec = export_onnx(
        model, tokenizer, texts, plain / "model.onnx", opset=cfg.opset, shape=cfg.export_shape, task=ctx.task
    )
    parity = check_parity(model, tokenizer, plain / "model.onnx", texts, shapes, cfg.parity_atol, spec)
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
            fused_parity = check_parity(model, tokenizer, fused / "model.onnx", texts, shapes, cfg.parity_atol, spec)
            _finish(fused, model, tokenizer, ctx)
            artifacts.append(Artifact("fp32-fused", ArtifactKind.ONNX_FP32_FUSED, fused, "fp32"))
            metrics["fused_ops"] = fused_ops
            metrics["fused_parity"] = [asdict(p) for p in fused_parity]
    return StageResult(artifacts, metrics)
