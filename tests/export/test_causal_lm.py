"""KV-cache export of a tiny seeded Llama: step-by-step ORT decoding equals PyTorch's no-cache forward,
the parity check catches a model that differs, and the int8 / int4 quantized graphs run close to fp32."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import tiny_llama
from transformers import LlamaForCausalLM

from edgepipe.errors import ExportParityError
from edgepipe.export.causal_lm import CausalParityCase, check_causal_parity, export_causal_lm
from edgepipe.export.lm_quantize import int4_available, op_counts, quantize_int4, quantize_int8
from edgepipe.runtime.generate import OnnxCausalLM

LAYERS = 2


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[LlamaForCausalLM, Path]:
    model = tiny_llama(layers=LAYERS)
    path = tmp_path_factory.mktemp("causal-lm") / "model.onnx"
    export_causal_lm(model, path)
    return model, path


def test_graph_has_the_cache_inputs_outputs_and_named_dynamic_axes(exported: tuple[LlamaForCausalLM, Path]) -> None:
    graph = onnx.load(str(exported[1])).graph
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    outputs = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in graph.output}
    assert inputs["input_ids"] == ["batch", "sequence"]
    assert inputs["attention_mask"] == ["batch", "total_sequence"]
    assert inputs["position_ids"] == ["batch", "sequence"]
    for i in range(LAYERS):
        assert inputs[f"past_key_values.{i}.key"] == ["batch", 2, "past_sequence", 16]
        assert outputs[f"present.{i}.value"] == ["batch", 2, "total_sequence", 16]
    assert outputs["logits"] == ["batch", "sequence", 256]


def test_kv_cache_decoding_equals_the_full_forward_step_by_step(exported: tuple[LlamaForCausalLM, Path]) -> None:
    model, path = exported
    cases = (
        CausalParityCase(1, 5, 4),
        CausalParityCase(2, 7, 4, left_pad=3),
        CausalParityCase(3, 1, 6, left_pad=0),  # a one-token prompt, then decode
    )
    results = check_causal_parity(model, path, atol=1e-4, cases=cases)
    assert [r.batch for r in results] == [1, 2, 3]
    assert all(r.max_abs_diff < 1e-4 and r.argmax_agreement == 1.0 for r in results)


def test_parity_error_names_the_case_when_the_model_differs(exported: tuple[LlamaForCausalLM, Path]) -> None:
    _, path = exported
    broken = tiny_llama(layers=LAYERS)
    with torch.no_grad():
        broken.model.layers[1].mlp.down_proj.weight.mul_(1.5)
    with pytest.raises(ExportParityError, match=r"model.onnx: KV-cache decoding differs .* at batch=1, prompt=5"):
        check_causal_parity(broken, path, atol=1e-3)


def test_tied_embeddings_export(tmp_path: Path) -> None:
    model = tiny_llama(seed=1, layers=LAYERS, tie=True)
    export_causal_lm(model, tmp_path / "model.onnx")
    assert check_causal_parity(model, tmp_path / "model.onnx", atol=1e-4)


def _logits(path: Path) -> np.ndarray:
    ids = np.random.default_rng(0).integers(0, 256, (2, 12))
    mask = np.ones_like(ids)
    mask[1, :4] = 0
    return OnnxCausalLM(path).logits(ids, mask)[mask.astype(bool)]


# tiny random model: logits within about +-1.5. Tolerances stated as max abs logit difference to fp32
INT8_ATOL, INT4_ATOL = 0.05, 0.3
CONST_MATMULS = 7 * LAYERS + 1  # q k v o gate up down per layer, plus the LM head
ATTENTION_MATMULS = 2 * LAYERS  # Q K^T and P V: activations on both sides


def test_int8_dynamic_quantizes_every_weight_matmul(exported: tuple[LlamaForCausalLM, Path], tmp_path: Path) -> None:
    _, path = exported
    ops = quantize_int8(path, tmp_path / "int8.onnx", keep_float=())
    assert ops["MatMulInteger"] == CONST_MATMULS
    assert ops["MatMul"] == ATTENTION_MATMULS
    assert ops["DynamicQuantizeLinear"] >= 1
    assert np.abs(_logits(tmp_path / "int8.onnx") - _logits(path)).max() < INT8_ATOL
    kept_head = quantize_int8(path, tmp_path / "int8-head-fp32.onnx", head=False, keep_float=())
    assert kept_head["MatMulInteger"] == CONST_MATMULS - 1 and kept_head["MatMul"] == ATTENTION_MATMULS + 1
    default = quantize_int8(path, tmp_path / "int8-down-fp32.onnx")  # the FFN down projections stay fp32
    assert default["MatMulInteger"] == CONST_MATMULS - LAYERS and default["MatMul"] == ATTENTION_MATMULS + LAYERS


@pytest.mark.skipif(int4_available() is not None, reason=str(int4_available()))
def test_int4_matmulnbits_quantizes_every_weight_matmul(
    exported: tuple[LlamaForCausalLM, Path], tmp_path: Path
) -> None:
    _, path = exported
    ops = quantize_int4(path, tmp_path / "int4.onnx", block_size=32, accuracy_level=4)
    assert ops["MatMulNBits"] == CONST_MATMULS
    assert ops["MatMul"] == ATTENTION_MATMULS
    assert np.abs(_logits(tmp_path / "int4.onnx") - _logits(path)).max() < INT4_ATOL
    assert (tmp_path / "int4.onnx").stat().st_size < 0.5 * path.stat().st_size  # the embedding Gather stays fp32
    assert op_counts(tmp_path / "int4.onnx") == ops


def test_export_leaves_a_model_with_dropout_in_eval_mode_and_decodes_like_it(tmp_path: Path) -> None:
    """GPT-2 has 0.1 dropout: a wrapper exported in train mode switched it on in the model afterwards, so
    PyTorch, not the ONNX graph, was off (by ~1 logit) in the parity check."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, n_inner=64, vocab_size=128)).eval()
    export_causal_lm(model, tmp_path / "model.onnx")
    assert not any(m.training for m in model.modules())
    (result, _) = check_causal_parity(model, tmp_path / "model.onnx", atol=1e-4)
    assert result.max_abs_diff < 1e-5


def test_sliding_window_decoding_matches_past_the_window(tmp_path: Path) -> None:
    """Gemma 3's sliding layers: the exported cache keeps every token and the mask applies the window, so
    decoding 18 tokens with a window of 4 equals PyTorch's full forward (a trimmed cache traced at 7 did not)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, sliding_window=4, layer_types=["sliding_attention", "full_attention"],
    )  # fmt: skip
    model = Gemma3ForCausalLM(config).eval()
    export_causal_lm(model, tmp_path / "model.onnx")
    cases = (CausalParityCase(1, 12, 6), CausalParityCase(2, 7, 6, left_pad=3))
    results = check_causal_parity(model, tmp_path / "model.onnx", atol=1e-4, cases=cases)
    assert max(r.max_abs_diff for r in results) < 1e-5
