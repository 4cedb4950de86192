"""mobile: an ONNX artifact in the ORT format for ONNX Runtime Mobile (Android, iOS), or as OpenVINO's IR,
checked against it.

The folder holds `model.ort`, the `required_operators.config` a minimal mobile build is compiled with
(README: "What to ship where"), and the source's tokenizer/config; the converted model must give the
source's logits on real validation inputs within `parity_atol`.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from edgepipe.errors import ExportParityError
from edgepipe.pipeline.artifacts import Artifact
from edgepipe.pipeline.recipe import MOBILE_SOURCES, ArtifactKind, MobileConfig
from edgepipe.pipeline.stages import StageContext, StageResult, register
from edgepipe.runtime.mobile import OPS_CONFIG, convert_to_ort, required_operators
from edgepipe.tasks import Task


@register("mobile", Task.TEXT, Task.TOKEN, Task.IMAGE)
def run_mobile(inputs: dict[ArtifactKind, Artifact], cfg: MobileConfig, ctx: StageContext) -> StageResult:

    source = inputs[MOBILE_SOURCES[cfg.source]]
    ir = cfg.format == "openvino-ir"
    out = ctx.stage_dir / f"{source.name}-{'ir' if ir else 'ort'}"
    out.mkdir(parents=True)
    for item in source.path.iterdir():
        if item.is_file() and item.name not in ("model.onnx", "model.onnx.data"):
            shutil.copy2(item, out / item.name)
    if ir:
        return _run_ir(source, cfg, ctx, out)
    model = convert_to_ort(source.path / "model.onnx", out, level=cfg.optimization, target_platform=cfg.target_platform)
    diff = _parity(source, out, cfg, ctx, None, "try optimization: basic, or raise parity_atol if expected")
    metrics = {
        "source": source.name,
        "max_abs_diff": diff,
        "onnx_mb": round((source.path / "model.onnx").stat().st_size / 1e6, 3),
        "ort_mb": round(model.stat().st_size / 1e6, 3),
        "required_operators": required_operators(out / OPS_CONFIG),
    }
    return StageResult([Artifact(f"{source.name}-ort", ArtifactKind.ORT_MOBILE, out, source.precision)], metrics)


def _parity(source: Artifact, out: Path, cfg: MobileConfig, ctx: StageContext, backend: str | None, fix: str) -> float:
    """Max abs logit difference of the converted model (on `backend`) against the source on ORT, over 32 val
    inputs; ExportParityError past `parity_atol`."""
    from edgepipe.runtime.predictor import Predictor

    sample: Any = ctx.data.val.inputs[:32]
    original, converted = Predictor.load(source.path), Predictor.load(out, backend=backend)
    diff = float(np.abs(original.logits(sample) - converted.logits(sample)).max())
    if diff > cfg.parity_atol:
        raise ExportParityError(
            f"{out.name}: logits differ from {source.name}'s by {diff:.3g} (max abs) over parity_atol="
            f"{cfg.parity_atol:g}; {fix}"
        )
    return diff


def _run_ir(source: Artifact, cfg: MobileConfig, ctx: StageContext, out: Path) -> StageResult:
    """OpenVINO's IR of the source (weights as they are), checked on OpenVINO against the source on ORT."""
    from edgepipe.runtime.backends import get_backend
    from edgepipe.runtime.openvino_backend import save_ir

    get_backend("openvino")  # BackendUnavailableError with the install hint when it is missing
    model = save_ir(source.path / "model.onnx", out)
    diff = _parity(source, out, cfg, ctx, "openvino", "raise parity_atol if expected")
    metrics = {
        "source": source.name,
        "format": "openvino-ir",
        "max_abs_diff": diff,
        "onnx_mb": round((source.path / "model.onnx").stat().st_size / 1e6, 3),
        "ir_mb": round(sum(f.stat().st_size for f in (model, model.with_suffix(".bin"))) / 1e6, 3),
    }
    return StageResult([Artifact(out.name, ArtifactKind.OPENVINO_IR, out, source.precision)], metrics)
