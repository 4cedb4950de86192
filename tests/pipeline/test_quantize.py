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


def _qdq_placement(graph: onnx.GraphProto) -> dict[str, list[str]]:
    """Weight MatMul/Gemm nodes fed int8 on both inputs, and the violations of our QDQ placement."""
    producers = {out: node for node in graph.node for out in node.output}
    weights = {t.name for t in graph.initializer}

    def op(name: str) -> str:
        return producers[name].op_type if name in producers else "initializer" if name in weights else "input"

    gemms = [n for n in graph.node if n.op_type in ("MatMul", "Gemm")]
    return {
        "int8": [n.name for n in gemms if op(n.input[0]) == op(n.input[1]) == "DequantizeLinear"],
        "float_weight": [n.name for n in gemms if n.input[1] in weights],
        "quantized_output": [
            n.name for n in graph.node if n.op_type == "QuantizeLinear" and op(n.input[0]) in ("MatMul", "Gemm")
        ],
        "dequantized_for_float_op": [
            n.name
            for n in graph.node
            if n.op_type not in ("MatMul", "Gemm", "QuantizeLinear", "DequantizeLinear")
            and any(op(i) == "DequantizeLinear" and op(producers[i].input[0]) == "QuantizeLinear" for i in n.input)
        ],
    }


def test_static_qdq_placement_on_the_mha_fused_graph(built_run: Path) -> None:
    """Every weight MatMul int8 on both inputs, its output float (MatMulIntegerToFloat on CPU), the
    attention core in MultiHeadAttention, and residual/LayerNorm consumers reading float tensors."""
    graph = _graph(built_run / "04-quantize" / "int8-static" / "model.onnx")
    placement = _qdq_placement(graph)
    assert len(placement["int8"]) == 2 * 6 + 2  # q, k, v, out, ffn1, ffn2 per layer (2), pooler, classifier
    assert placement["float_weight"] == placement["quantized_output"] == placement["dequantized_for_float_op"] == []
    ops = [n.op_type for n in graph.node]
    assert ops.count("MultiHeadAttention") == 2 and "SkipLayerNormalization" not in ops and "Softmax" not in ops
    settings = json.loads((built_run / "04-quantize" / "quantization.json").read_text())
    assert settings["graph"] == "fused-mha" and settings["attention_core"] == []


def test_static_on_the_source_graph_keeps_the_attention_core_float(run_copy: Path) -> None:
    """graph: source (the tensorrt preset's): the plain export, Q.K^T and P.V left float."""
    recipe = run_copy / "recipe.resolved.yaml"
    assert main(["build", str(recipe), "--out", str(run_copy), "--set", "stages.3.graph=source"]) == 0
    graph = _graph(run_copy / "04-quantize" / "int8-static" / "model.onnx")
    placement = _qdq_placement(graph)
    settings = json.loads((run_copy / "04-quantize" / "quantization.json").read_text())
    core = settings["attention_core"]
    assert settings["graph"] == "source" and len(core) == 2 * 2
    assert not set(core) & set(placement["int8"]) and len(placement["int8"]) == 2 * 6 + 2
    assert placement["quantized_output"] == placement["dequantized_for_float_op"] == []


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


def test_static_with_gather_stores_the_embedding_table_in_int8(run_copy: Path) -> None:
    """op_types with Gather: the MHA-fused graph keeps the embedding Gather unfused, the word-embedding
    table is stored in 8 bits and only the gathered rows are dequantized, the file shrinks by most of the table,
    predictions hold."""
    recipe = run_copy / "recipe.resolved.yaml"
    before = run_copy / "04-quantize" / "int8-static" / "model.onnx"
    size, logits = before.stat().st_size, Predictor.load(before.parent).logits(["a fine film", "dull"])
    gather = "stages.3.op_types=[MatMul, Gemm, Gather]"
    assert main(["build", str(recipe), "--out", str(run_copy), "--set", gather]) == 0
    graph = _graph(before)
    weights = {t.name: t for t in graph.initializer}
    word = next(n for n in graph.node if n.op_type == "Gather" and "word_embeddings" in n.input[0])
    eight_bit = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)  # Gather takes the activation type (u8)
    assert weights[word.input[0]].data_type in eight_bit  # the rows are gathered in 8 bits...
    consumers = [n for n in graph.node if word.output[0] in n.input]
    assert [n.op_type for n in consumers] == ["DequantizeLinear"]  # ...and only they are dequantized
    assert "MultiHeadAttention" in [n.op_type for n in graph.node]  # the attention core still fused
    vocab_mb = 30522 * 32 * 3 / 1e6  # the tiny BERT's table: 4 bytes -> 1 byte per value
    assert before.stat().st_size < size - 0.9 * vocab_mb
    np.testing.assert_allclose(Predictor.load(before.parent).logits(["a fine film", "dull"]), logits, atol=0.1)


def test_dynamic_with_gather_stores_the_word_table_in_int8_on_the_fused_graph(run_copy: Path) -> None:
    """op_types with Gather in dynamic mode: the plain export fused without EmbedLayerNormalization (QAttention
    as before), the token ids' table in 8 bits, the position table float; the file shrinks by most of the
    table, predictions hold."""
    recipe = run_copy / "recipe.resolved.yaml"
    before = run_copy / "03-quantize" / "int8-dynamic" / "model.onnx"
    size, logits = before.stat().st_size, Predictor.load(before.parent).logits(["a fine film", "dull"])
    gather = "stages.2.op_types=[MatMul, Attention, Gemm, Gather]"
    assert main(["build", str(recipe), "--out", str(run_copy), "--set", gather]) == 0
    settings = json.loads((run_copy / "03-quantize" / "quantization.json").read_text())
    assert settings["source"] == "fp32" and settings["graph"] == "fused-attention (no EmbedLayerNormalization)"
    graph = _graph(before)
    weights = {t.name: t for t in graph.initializer}
    tables = {n.input[0]: n for n in graph.node if n.op_type == "Gather" and n.input[0] in weights}
    word = next(name for name in tables if "word_embeddings" in name)
    position = next(name for name in tables if "position_embeddings" in name)
    assert weights[word].data_type == onnx.TensorProto.UINT8  # onnxruntime's dynamic Gather: u8 with a zero point
    assert weights[position].data_type == onnx.TensorProto.FLOAT
    ops = [n.op_type for n in graph.node]
    assert ops.count("QAttention") == 2 and "EmbedLayerNormalization" not in ops
    assert before.stat().st_size < size - 0.9 * 30522 * 32 * 3 / 1e6
    np.testing.assert_allclose(Predictor.load(before.parent).logits(["a fine film", "dull"]), logits, atol=0.1)


def test_dynamic_with_4_bit_tables_and_float16_positions(run_copy: Path) -> None:
    """embedding_bits 4: the token ids' table as GatherBlockQuantized (symmetric int4, blocks along the hidden
    axis, one scale per block); float16_tables: the position table in fp16 with a Cast after its Gather. Smaller
    than the 8-bit table, predictions hold."""
    recipe = run_copy / "recipe.resolved.yaml"
    model = run_copy / "03-quantize" / "int8-dynamic" / "model.onnx"
    logits = Predictor.load(model.parent).logits(["a fine film", "dull"])
    gather = "stages.2.op_types=[MatMul, Attention, Gemm, Gather]"
    assert main(["build", str(recipe), "--out", str(run_copy), "--set", gather]) == 0
    eight_bit = model.stat().st_size
    small = ["stages.2.embedding_bits=4", "stages.2.embedding_block_size=16", "stages.2.float16_tables=true"]
    assert main(["build", str(recipe), "--out", str(run_copy), "--set", gather, *[f"--set={s}" for s in small]]) == 0
    graph = _graph(model)
    weights = {t.name: t for t in graph.initializer}
    (word,) = [n for n in graph.node if n.op_type == "GatherBlockQuantized" and "word_embeddings" in n.input[0]]
    assert weights[word.input[0]].data_type == onnx.TensorProto.INT4 and len(word.input) == 3  # no zero points
    assert {a.name: onnx.helper.get_attribute_value(a) for a in word.attribute}["block_size"] == 16
    assert list(weights[word.input[2]].dims) == [weights[word.input[0]].dims[0], 32 // 16]
    (position,) = [n for n in graph.node if n.op_type == "Gather" and "position_embeddings" in n.input[0]]
    assert weights[position.input[0]].data_type == onnx.TensorProto.FLOAT16
    cast = next(n for n in graph.node if position.output[0] in n.input)
    assert cast.op_type == "Cast" and cast.attribute[0].i == onnx.TensorProto.FLOAT
    assert model.stat().st_size < eight_bit
    np.testing.assert_allclose(Predictor.load(model.parent).logits(["a fine film", "dull"]), logits, atol=0.15)


def test_small_tables_need_dynamic_with_gather() -> None:
    from pydantic import ValidationError

    from edgepipe.pipeline.recipe import QuantizeConfig

    with pytest.raises(ValidationError, match="embedding_bits and float16_tables apply to mode: dynamic"):
        QuantizeConfig(kind="quantize", mode="static", op_types=["MatMul", "Gather"], embedding_bits=4)
    with pytest.raises(ValidationError, match="add Gather to op_types"):
        QuantizeConfig(kind="quantize", mode="dynamic", float16_tables=True)
