from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from transformers import AutoTokenizer

from edgepipe.errors import ExportParityError
from edgepipe.export import check_parity, export_onnx, fuse_transformer, spec_for, text_feeds
from edgepipe.export.onnx_export import load_for_export

TEXTS = [
    "a gripping, beautifully shot film",
    "dull and far too long",
    "the cast does what it can with a thin script that never quite comes together",
]


@pytest.fixture(scope="module")
def exported(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    model = load_for_export(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    path = tmp_path_factory.mktemp("export") / "model.onnx"
    spec = spec_for(model, "text-classification")
    feeds = text_feeds(tokenizer, TEXTS, spec.input_names)
    export_onnx(model, feeds, path, opset=17, shape=(2, 16), spec=spec)
    return model, feeds, path, spec


def test_export_has_dynamic_named_axes_and_opset(exported) -> None:
    _, _, path, spec = exported
    graph = onnx.load(str(path)).graph
    assert spec.input_names == ("input_ids", "attention_mask", "token_type_ids")
    for tensor in graph.input:
        dims = [d.dim_param for d in tensor.type.tensor_type.shape.dim]
        assert dims == ["batch", "sequence"]
    assert onnx.load(str(path)).opset_import[0].version == 17


def test_parity_on_shapes_other_than_the_export_shape(exported) -> None:
    model, feeds, path, spec = exported
    results = check_parity(model, path, feeds, [(1, 5), (3, 61), (5, 9)], 1e-4, spec)
    assert [(r.batch, r.seq_len) for r in results] == [(1, 5), (3, 61), (5, 9)]
    assert all(r.max_abs_diff <= 1e-4 and r.argmax_agreement == 1.0 for r in results)


def test_parity_error_names_the_output_and_difference(exported, tmp_path: Path) -> None:
    model, feeds, path, spec = exported
    broken = onnx.load(str(path))
    weight = max(broken.graph.initializer, key=lambda t: int(np.prod(t.dims)) if len(t.dims) == 2 else 0)
    values = numpy_helper.to_array(weight) * 1.5
    weight.CopyFrom(numpy_helper.from_array(values.astype(np.float32), weight.name))
    bad = tmp_path / "bad.onnx"
    onnx.save(broken, str(bad))
    with pytest.raises(ExportParityError, match=r"bad.onnx: output `logits` differs from PyTorch by .* at \(batch=1"):
        check_parity(model, bad, feeds, [(1, 7), (2, 9)], 1e-4, spec)


def test_fusion_produces_attention_ops_with_parity(exported, tmp_path: Path) -> None:
    model, feeds, path, spec = exported
    fused = tmp_path / "fused.onnx"
    stats = fuse_transformer(path, fused, model.config)
    assert stats is not None and stats.get("Attention") == 2
    ops = {n.op_type for n in onnx.load(str(fused)).graph.node}
    assert "Attention" in ops and "Softmax" not in ops
    check_parity(model, fused, feeds, [(1, 7), (3, 45)], 1e-4, spec)


def test_mha_fusion_keeps_projections_as_matmuls_and_layernorm_unfused(exported, tmp_path: Path) -> None:
    """MultiHeadAttention for static QDQ: Q/K/V stay MatMuls (quantizable); no SkipLayerNormalization
    in the file, and a CPU session does not fuse it back (its kernel is the slow one on CPU)."""
    import onnxruntime as ort

    from edgepipe.runtime.backends import RuntimeOptions, ort_cpu_session, ort_session_options

    model, feeds, path, spec = exported
    fused = tmp_path / "mha.onnx"
    stats = fuse_transformer(path, fused, model.config, attention="MultiHeadAttention")
    assert stats is not None and stats.get("MultiHeadAttention") == 2
    ops = [n.op_type for n in onnx.load(str(fused)).graph.node]
    assert ops.count("MatMul") == 2 * 6 and "SkipLayerNormalization" not in ops and "Softmax" not in ops
    check_parity(model, fused, feeds, [(1, 7), (3, 45)], 1e-4, spec)

    def session_ops(disabled: tuple[str, ...]) -> list[str]:
        so = ort_session_options(RuntimeOptions())
        so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED  # no NCHWc layouts
        ort_cpu_session(fused, RuntimeOptions(cpu_disabled_optimizers=disabled), so)
        return [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]

    assert "SkipLayerNormalization" not in session_ops(RuntimeOptions().cpu_disabled_optimizers)
    assert "SkipLayerNormalization" in session_ops(())  # what onnxruntime does by default
