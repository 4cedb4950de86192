import csv
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from edgepipe.pipeline.cli import main
from edgepipe.runtime import Predictor


def _graph(path: Path) -> onnx.GraphProto:
    return onnx.load(str(path)).graph


def test_static_qdq_every_weight_matmul_is_fed_by_dequantize(built_run: Path) -> None:
    graph = _graph(built_run / "04-quantize" / "int8-static" / "model.onnx")
    producers = {out: node for node in graph.node for out in node.output}
    weights = {t.name for t in graph.initializer}
    matmuls = [n for n in graph.node if n.op_type in ("MatMul", "Gemm")]
    quantized = [
        n
        for n in matmuls
        if producers.get(n.input[1]) is not None and producers[n.input[1]].op_type == "DequantizeLinear"
    ]
    # every MatMul with a constant weight went int8 (its weight arrives through DequantizeLinear)
    float_weight_matmuls = [n.name for n in matmuls if n.input[1] in weights]
    assert float_weight_matmuls == []
    assert len(quantized) >= 2 * 6  # q, k, v, out, ffn1, ffn2 per layer; 2 layers
    for node in quantized:
        assert producers[node.input[0]].op_type == "DequantizeLinear"
    ops = [n.op_type for n in graph.node]
    assert ops.count("QuantizeLinear") > 0


def test_static_settings_and_calibration_ranges_are_recorded(built_run: Path) -> None:
    settings = json.loads((built_run / "04-quantize" / "quantization.json").read_text())
    assert settings["mode"] == "static" and settings["activation_type"] == "uint8"
    assert settings["per_channel"] is True and settings["op_types"] == ["MatMul", "Gemm"]
    assert settings["calibration"]["method"] == "minmax" and settings["calibration"]["samples"] == 32
    ranges = built_run / "cache" / settings["calibration"]["ranges_file"]
    assert ranges.is_file() and len(json.loads(ranges.read_text())) > 0


def test_dynamic_quantizes_the_fused_graph(built_run: Path) -> None:
    ops = [n.op_type for n in _graph(built_run / "03-quantize" / "int8-dynamic" / "model.onnx").node]
    assert ops.count("QAttention") == 2
    assert "Attention" not in ops
    assert ops.count("MatMulInteger") + ops.count("DynamicQuantizeMatMul") >= 2 * 2


def test_int8_agrees_with_fp32(built_run: Path, rt_csv: Path) -> None:
    with rt_csv.open(encoding="utf-8") as handle:
        texts = [row["text"] for row in csv.DictReader(handle)][-100:]
    fp32 = Predictor.load(built_run / "02-export" / "fp32").logits(texts)
    for name in ("03-quantize/int8-dynamic", "04-quantize/int8-static"):
        q = Predictor.load(built_run / name).logits(texts)
        assert np.abs(q - fp32).max() < 0.25 * np.abs(fp32).max() + 0.05, name
        assert (q.argmax(-1) == fp32.argmax(-1)).mean() >= 0.8, name


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_histogram_calibration_methods(run_copy: Path, method: str) -> None:
    recipe = run_copy / "recipe.resolved.yaml"
    assert main(["build", str(recipe), "--out", str(run_copy), "--set", f"stages.3.calibration.method={method}"]) == 0
    settings = json.loads((run_copy / "04-quantize" / "quantization.json").read_text())
    assert settings["calibration"]["method"] == method and settings["calibration"]["reused"] is False
    cached = {p.name: json.loads(p.read_text()) for p in (run_copy / "cache").glob("calibration-*.json")}
    assert len(cached) == 2  # the built run's minmax ranges and this method's
    ranges = cached.pop(settings["calibration"]["ranges_file"])
    assert ranges and ranges != next(iter(cached.values()))
    ops = [n.op_type for n in _graph(run_copy / "04-quantize" / "int8-static" / "model.onnx").node]
    assert ops.count("DequantizeLinear") > 0
