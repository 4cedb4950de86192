"""quantize: int8 through onnxruntime.quantization, dynamic or static QDQ with calibration.

Static quantization runs as visible steps: pre-process (shape inference, auto_merge) -> collect
activation ranges on the calibration split -> save them (a cached artifact keyed by model and
calibration data) -> write the QDQ model from the saved ranges.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from edgepipe.pipeline.artifacts import Artifact, config_hash, sha256_file, write_json, write_meta
from edgepipe.pipeline.calibration import CalibrationSet, ImageCalibrationSet, ort_reader
from edgepipe.pipeline.recipe import ArtifactKind, CalibrationConfig, QuantizeConfig
from edgepipe.pipeline.stages import StageContext, StageResult, register

log = logging.getLogger(__name__)

# Defaults chosen from measurements on MiniLM (see benchmarks/RESULTS.md and TOOLCHAIN.md):
# dynamic: the weight-bearing ops; on the fused graph that includes Attention (QAttention kernel).
DYNAMIC_OP_TYPES = ["MatMul", "Attention", "Gemm"]
# static: MatMul/Gemm only. Quantizing every op (ORT's default) puts Q/DQ on the additive attention
# mask (float32 min), whose scale explodes and wipes out attention: argmax agreement fell to ~0.6.
STATIC_OP_TYPES = ["MatMul", "Gemm"]
# CNNs: convolutions carry the work. Static quantizes every op ORT can (Conv, Add, pooling, ...):
# int8 tensors then flow from one conv to the next without a dequantize between them.
IMAGE_DYNAMIC_OP_TYPES = ["Conv", "MatMul", "Gemm"]
IMAGE_STATIC_OP_TYPES: list[str] = []  # empty: onnxruntime's full list


def _default_op_types(mode: str, task: str) -> list[str]:
    if task == "image-classification":
        return IMAGE_DYNAMIC_OP_TYPES if mode == "dynamic" else IMAGE_STATIC_OP_TYPES
    return DYNAMIC_OP_TYPES if mode == "dynamic" else STATIC_OP_TYPES


def _qtype(name: str) -> Any:
    from onnxruntime.quantization import QuantType

    return {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}[name]


def op_counts(path: Path) -> dict[str, int]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return dict(sorted(Counter(node.op_type for node in model.graph.node).items()))


def _copy_companions(source: Path, dest: Path) -> None:
    """Tokenizer and config files travel with the model; the model itself is rewritten."""
    for item in source.iterdir():
        if item.is_file() and item.name not in ("model.onnx", "edgepipe.json"):
            shutil.copy2(item, dest / item.name)


def _calibration_set(
    source: Path, cfg: CalibrationConfig, ctx: StageContext, input_names: tuple[str, ...]
) -> CalibrationSet | ImageCalibrationSet:
    samples = ctx.data.calibration.inputs[: cfg.samples]
    if isinstance(samples, np.ndarray):
        return ImageCalibrationSet(samples, input_names[0], cfg.batch_size)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    histogram = cfg.method != "minmax"
    return CalibrationSet(samples, tokenizer, input_names, cfg.batch_size, cfg.max_seq_len, fixed_length=histogram)


def _calibrate(
    model: Path,
    cfg: CalibrationConfig,
    op_types: list[str],
    ctx: StageContext,
    calib: CalibrationSet | ImageCalibrationSet,
) -> tuple[Path, dict[str, Any]]:
    """Collect activation ranges; reuse them from the run cache when model and data are unchanged."""
    from onnxruntime.quantization import create_calibrator
    from onnxruntime.quantization.calibrate import save_tensors_data

    key = config_hash([sha256_file(model), calib.fingerprint, cfg.model_dump(), sorted(op_types)])
    cached = ctx.cache_dir / f"calibration-{key}.json"
    info = {"batches": len(calib), "fingerprint": calib.fingerprint, "ranges_file": cached.name}
    if cached.is_file():
        log.info("calibration ranges reused from %s", cached)
        return cached, {**info, "reused": True}
    # quantize_static's own calibrator fixes the histogram at 128 bins, which makes entropy equal
    # minmax; creating the calibrator here lets the bin count and percentile be set.
    extra: dict[str, Any] = {}
    if cfg.method == "entropy":
        extra = {"num_bins": cfg.num_bins, "num_quantized_bins": 128}
    elif cfg.method == "percentile":
        extra = {"num_bins": cfg.num_bins, "percentile": cfg.percentile}
    ranges_dir = ctx.stage_dir / ".calibration"
    ranges_dir.mkdir()
    calibrator = create_calibrator(
        model,
        op_types or [],
        augmented_model_path=str(ranges_dir / "augmented.onnx"),
        calibrate_method=_method(cfg.method),
        extra_options=extra,
    )
    calibrator.collect_data(ort_reader(calib))
    ranges = calibrator.compute_data()
    del calibrator
    tmp = ranges_dir / "ranges.json"
    save_tensors_data(ranges, tmp)
    ctx.cache_dir.mkdir(parents=True, exist_ok=True)
    shutil.move(tmp, cached)
    shutil.rmtree(ranges_dir)
    return cached, {**info, "reused": False}


@register("quantize")
def run_quantize(inputs: dict[ArtifactKind, Artifact], cfg: QuantizeConfig, ctx: StageContext) -> StageResult:
    import onnx
    from onnxruntime.quantization import QuantFormat, quant_pre_process, quantize_dynamic, quantize_static

    source = inputs[cfg.source_kind]
    out = ctx.stage_dir / cfg.artifact_name
    out.mkdir(parents=True)
    _copy_companions(source.path, out)
    src_model = source.path / "model.onnx"
    settings: dict[str, Any] = {
        "mode": cfg.mode,
        "source": source.name,
        "per_channel": cfg.per_channel,
        "reduce_range": cfg.reduce_range,
        "weight_type": cfg.weight_type,
        "nodes_to_exclude": cfg.nodes_to_exclude,
    }
    op_types = cfg.op_types or _default_op_types(cfg.mode, ctx.task)
    if cfg.mode == "dynamic":
        quantize_dynamic(
            src_model,
            out / "model.onnx",
            op_types_to_quantize=op_types,
            per_channel=cfg.per_channel,
            reduce_range=cfg.reduce_range,
            weight_type=_qtype(cfg.weight_type),
            nodes_to_exclude=cfg.nodes_to_exclude,
            # fused graphs carry tensors without type info; onnxruntime needs a default to proceed
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    else:
        calibration = cfg.calibration or CalibrationConfig()
        model = src_model
        if cfg.preprocess:
            model = ctx.stage_dir / ".preprocessed.onnx"
            # auto_merge: symbolic shape inference otherwise stops on the BERT export's dynamic axes
            quant_pre_process(str(src_model), str(model), auto_merge=True)
        input_names = tuple(i.name for i in onnx.load(str(model), load_external_data=False).graph.input)
        calib = _calibration_set(source.path, calibration, ctx, input_names)
        ranges, calib_info = _calibrate(model, calibration, op_types, ctx, calib)
        quantize_static(
            model,
            out / "model.onnx",
            calibration_data_reader=None,
            calibration_cache_path=ranges,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=op_types or None,
            per_channel=cfg.per_channel,
            reduce_range=cfg.reduce_range,
            activation_type=_qtype(cfg.activation_type),
            weight_type=_qtype(cfg.weight_type),
            nodes_to_exclude=cfg.nodes_to_exclude,
            calibrate_method=_method(calibration.method),
        )
        model.unlink(missing_ok=True)
        settings.update(
            activation_type=cfg.activation_type,
            calibration={**calibration.model_dump(), **calib_info},
            preprocess=cfg.preprocess,
        )
    settings["op_types"] = op_types or "all (onnxruntime default)"
    precision = f"int8-{cfg.mode}"
    source_meta = json.loads((source.path / "edgepipe.json").read_text(encoding="utf-8"))
    carried = {k: source_meta[k] for k in ("input",) if k in source_meta}
    write_meta(out, task=ctx.task, labels=ctx.data.label_names, precision=precision, fmt="onnx", **carried)
    write_json(ctx.stage_dir / "quantization.json", settings)
    metrics = {
        "settings": settings,
        "op_counts": op_counts(out / "model.onnx"),
        "size_mb_before": round(src_model.stat().st_size / 1e6, 2),
        "size_mb_after": round((out / "model.onnx").stat().st_size / 1e6, 2),
    }
    return StageResult([Artifact(cfg.artifact_name, ArtifactKind.ONNX_INT8, out, precision)], metrics)


def _method(name: str) -> Any:
    from onnxruntime.quantization import CalibrationMethod

    return {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[name]
