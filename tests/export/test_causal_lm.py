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

from edgepipe.errors import ExportParityError, InputError
from edgepipe.export.causal_lm import (
    FUSED_CASES,
    CausalParityCase,
    check_causal_parity,
    export_causal_lm,
    fused_available,
)
from edgepipe.export.lm_quantize import (
    WeightOnly,
    head_nodes,
    int4_available,
    integer_kernel,
    matmul_nodes,
    op_counts,
    quantize_int8,
    quantize_weight_only,
)
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
    from edgepipe.pipeline.presets import PRESETS, select_preset
    from edgepipe.runtime.host import host_info

    _, path = exported
    # without VNNI, u8 x s8 saturates in int16: 7-bit weights there, as the int8 presets choose
    reduce_range = PRESETS[select_preset(host_info()["cpu_flags"])].reduce_range
    ops = quantize_int8(path, tmp_path / "int8.onnx", keep_float=(), reduce_range=reduce_range)
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
    ops = quantize_weight_only(path, tmp_path / "int4.onnx", WeightOnly(bits=4, symmetric=True))
    assert ops["MatMulNBits"] == CONST_MATMULS
    assert ops["MatMul"] == ATTENTION_MATMULS
    assert np.abs(_logits(tmp_path / "int4.onnx") - _logits(path)).max() < INT4_ATOL
    assert (tmp_path / "int4.onnx").stat().st_size < 0.5 * path.stat().st_size  # the embedding Gather stays fp32
    assert op_counts(tmp_path / "int4.onnx") == ops


def _nbits(path: Path) -> dict[str, tuple[int, int]]:
    """MatMulNBits node -> (bits, zero-point element type; 0 without zero points)."""
    graph = onnx.load(str(path)).graph
    types = {i.name: i.data_type for i in graph.initializer}
    return {
        n.name: (
            next(a.i for a in n.attribute if a.name == "bits"),
            types[n.input[3]] if len(n.input) > 3 and n.input[3] else 0,
        )
        for n in graph.node
        if n.op_type == "MatMulNBits"
    }


@pytest.mark.skipif(int4_available() is not None, reason=str(int4_available()))
@pytest.mark.parametrize("algorithm", ["rtn", "hqq", "k_quant"])
def test_weight_only_keeps_the_named_matmuls_at_8_bits(
    exported: tuple[LlamaForCausalLM, Path], tmp_path: Path, algorithm: str
) -> None:
    _, path = exported
    nodes = matmul_nodes(path)
    head, down = nodes["lm_head"], nodes["model.layers.1.mlp.down_proj"]
    assert head.endswith("/lm_head/MatMul") and down.endswith("/layers.1/mlp/down_proj/MatMul")
    out = tmp_path / f"{algorithm}.onnx"
    ops = quantize_weight_only(path, out, WeightOnly(bits=4, algorithm=algorithm, eight_bit=(head, down)))
    # HQQ's 4-bit nodes read their input with its block sums appended (integer_kernel): one small MatMulNBits
    # and a Concat per distinct input, no other op
    assert ops["MatMul"] == ATTENTION_MATMULS
    appended = ops.get("Concat", 0) - op_counts(path).get("Concat", 0)
    assert ops["MatMulNBits"] == CONST_MATMULS + appended and (appended > 0) == (algorithm == "hqq")
    widths = _nbits(out)
    eight = {name for name, (bits, _) in widths.items() if bits == 8}
    assert len(eight) == 2 and all(n.startswith((head, down)) for n in eight)
    # every node on the integer kernel: uint8 zero points (HQQ's float ones rewritten)
    assert {zp for _, zp in widths.values()} == {onnx.TensorProto.UINT8}
    assert np.abs(_logits(out) - _logits(path)).max() < INT4_ATOL


@pytest.mark.skipif(int4_available() is not None, reason=str(int4_available()))
@pytest.mark.parametrize(("levels", "atol"), [(2, 1e-4), (1, 1e-2)])
def test_hqq_float_zero_points_rewrite_is_exact(
    exported: tuple[LlamaForCausalLM, Path], tmp_path: Path, levels: int, atol: float
) -> None:
    """HQQ's float zero points as rounded ones plus per-block offsets on appended input rows: the same function
    on the integer kernel (float-exact with two passes over the offsets, one pass rounds them to 4 bits)."""
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits

    _, path = exported
    quantizer = nbits.MatMulNBitsQuantizer(
        onnx.load(str(path)), algo_config=nbits.HQQWeightOnlyQuantConfig(block_size=32, bits=4)
    )
    quantizer.process()
    model = quantizer.model.model
    onnx.save_model(model, str(tmp_path / "float-zp.onnx"))
    reference = _logits(tmp_path / "float-zp.onnx")
    assert integer_kernel(model, accuracy_level=None, levels=levels) == CONST_MATMULS
    onnx.save_model(model, str(tmp_path / "integer.onnx"))
    assert {zp for _, zp in _nbits(tmp_path / "integer.onnx").values()} == {onnx.TensorProto.UINT8}
    ops = op_counts(tmp_path / "integer.onnx")
    assert ops["MatMulNBits"] == CONST_MATMULS + LAYERS * 4 + 1  # + block sums of q/k/v, o, gate/up, down; head
    assert ops["MatMul"] == ATTENTION_MATMULS and "Sub" not in ops
    error = np.abs(_logits(tmp_path / "integer.onnx") - reference).max()
    assert error < atol
    assert integer_kernel(model, accuracy_level=None) == 0  # nothing left to rewrite


@pytest.mark.skipif(int4_available() is not None, reason=str(int4_available()))
def test_a_tied_table_reads_the_8_bit_head_and_an_untied_one_stays(
    exported: tuple[LlamaForCausalLM, Path], tmp_path: Path
) -> None:
    """Tied embeddings: the token Gather becomes GatherBlockQuantized on the head's own 8-bit blocks (the fp32
    table leaves the file); an untied model's table is not the head's and stays a float Gather."""
    model = tiny_llama(layers=LAYERS, tie=True)
    export_causal_lm(model, tmp_path / "tied.onnx")
    settings = WeightOnly(bits=4, eight_bit=tuple(head_nodes(tmp_path / "tied.onnx")))
    ops = quantize_weight_only(tmp_path / "tied.onnx", tmp_path / "tied-w4.onnx", settings)
    assert ops["GatherBlockQuantized"] == 1
    graph = onnx.load(str(tmp_path / "tied-w4.onnx")).graph
    tables = [i for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT and list(i.dims) == [256, 64]]
    assert tables == []  # no float copy of the table is left
    assert np.abs(_logits(tmp_path / "tied-w4.onnx") - _logits(tmp_path / "tied.onnx")).max() < INT4_ATOL

    _, untied = exported
    ops = quantize_weight_only(untied, tmp_path / "untied-w4.onnx", WeightOnly(bits=8))
    assert "GatherBlockQuantized" not in ops


def test_fake_quantize_is_what_matmulnbits_stores(tmp_path: Path) -> None:
    """The sensitivity measurement's simulated rounding equals onnxruntime's RTN kernel (asymmetric and
    symmetric, 4 and 8 bits): the identity through a quantized MatMul reads its weight back."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from edgepipe.pipeline.lm import fake_quantize

    torch.manual_seed(0)
    weight = torch.randn(48, 64) * torch.linspace(0.1, 2.0, 64)  # (out, in) as nn.Linear
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="/proj/MatMul")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64, 48])],
        [numpy_helper.from_array(weight.T.contiguous().numpy(), "w")],
    )
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "w.onnx"))
    for bits, symmetric in [(4, False), (4, True), (8, False), (8, True)]:
        out = tmp_path / f"w{bits}{symmetric}.onnx"
        quantize_weight_only(tmp_path / "w.onnx", out, WeightOnly(bits=bits, symmetric=symmetric, accuracy_level=0))
        read_back = ort.InferenceSession(str(out)).run(None, {"x": np.eye(64, dtype=np.float32)})[0].T
        expected = fake_quantize(weight, bits, 32, symmetric).numpy()
        assert np.abs(read_back - expected).max() < 1e-5 * float(weight.abs().max()), (bits, symmetric)


@pytest.fixture(scope="module")
def fused(exported: tuple[LlamaForCausalLM, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same model through onnxruntime-genai's builder."""
    return _fused(exported[0], tmp_path_factory.mktemp("fused"))


def _fused(model: LlamaForCausalLM, folder: Path) -> Path:
    """`model`'s fused graph in `folder` (the builder reads the folder's tokenizer too)."""
    from transformers import AutoTokenizer

    from edgepipe.export.causal_lm import export_fused
    from edgepipe.pipeline.models import resolve_model

    model.save_pretrained(folder / "hf")
    AutoTokenizer.from_pretrained(resolve_model("minilm-l6")).save_pretrained(folder / "hf")
    return export_fused(folder / "hf", folder / "fp32-fused", folder / "builder.log")


@pytest.mark.skipif(fused_available() is not None, reason=str(fused_available()))
def test_fused_export_decodes_like_pytorch_and_refuses_left_padding(
    exported: tuple[LlamaForCausalLM, Path], fused: Path
) -> None:
    model, path = exported
    ops = op_counts(fused)
    assert ops["GroupQueryAttention"] == LAYERS and ops["MatMul"] == 5 * LAYERS + 1  # qkv merged
    assert sum(ops.values()) < 0.1 * sum(op_counts(path).values())
    results = check_causal_parity(model, fused, atol=1e-4, cases=FUSED_CASES)
    assert all(r.argmax_agreement == 1.0 for r in results)
    lm = OnnxCausalLM(fused)
    ids = np.array([[5, 6, 7, 8], [0, 0, 9, 10]], dtype=np.int64)
    with pytest.raises(InputError, match="right-padded or equal-length prompts"):
        lm.generate(ids, (ids > 0).astype(np.int64), 2)
    np.testing.assert_array_equal(
        lm.generate(ids[:1], np.ones_like(ids[:1]), 4).tokens,
        OnnxCausalLM(path).generate(ids[:1], np.ones_like(ids[:1]), 4).tokens,
    )


@pytest.mark.skipif(fused_available() is not None, reason=str(fused_available()))
def test_weight_only_quantizes_the_fused_graph(fused: Path, tmp_path: Path) -> None:
    import shutil

    shutil.copy2(fused.with_name("genai_config.json"), tmp_path)  # the cache's head size (a symbolic dimension)
    out = tmp_path / "w4.onnx"
    ops = quantize_weight_only(fused, out, WeightOnly(bits=4, algorithm="hqq", eight_bit=tuple(head_nodes(fused))))
    # qkv, o, gate, up, down per layer, the head; plus the block sums of each layer's 4 inputs (integer_kernel)
    assert ops["MatMulNBits"] == 5 * LAYERS + 1 + 4 * LAYERS and ops["GroupQueryAttention"] == LAYERS
    assert {zp for _, zp in _nbits(out).values()} == {onnx.TensorProto.UINT8}
    ids = np.arange(1, 21, dtype=np.int64).reshape(2, 10) % 250
    reference = OnnxCausalLM(fused).logits(ids, np.ones_like(ids))
    assert np.abs(OnnxCausalLM(out).logits(ids, np.ones_like(ids)) - reference).max() < INT4_ATOL


@pytest.mark.skipif(fused_available() is not None, reason=str(fused_available()))
def test_the_fused_graph_of_a_tied_model_reads_its_table_from_the_head(tmp_path: Path) -> None:
    """onnxruntime-genai's builder gathers from a Transpose of the head's float weight: that pair goes too."""
    import shutil

    fused = _fused(tiny_llama(layers=LAYERS, tie=True), tmp_path)
    assert op_counts(fused)["Transpose"] >= 1
    shutil.copy2(fused.with_name("genai_config.json"), tmp_path)
    out = tmp_path / "w4.onnx"
    ops = quantize_weight_only(fused, out, WeightOnly(bits=4, algorithm="hqq", eight_bit=tuple(head_nodes(fused))))
    assert ops["GatherBlockQuantized"] == 1 and ops.get("Transpose", 0) == op_counts(fused)["Transpose"] - 1
    ids = np.arange(1, 21, dtype=np.int64).reshape(2, 10) % 250
    reference = OnnxCausalLM(fused).logits(ids, np.ones_like(ids))
    assert np.abs(OnnxCausalLM(out).logits(ids, np.ones_like(ids)) - reference).max() < INT4_ATOL


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


def test_odd_blocks_per_input_are_refused_where_onnxruntime_packs_zero_points_wrongly(tmp_path: Path) -> None:
    """GPTQ and k-quant (neural-compressor's packing) pair 4-bit zero points across columns: with an odd number of
    blocks along the inputs they fail or mis-pack, so the stage names the MatMul and the way out first."""
    from onnx import TensorProto, helper, numpy_helper

    weight = np.random.default_rng(0).standard_normal((32, 16)).astype(np.float32)  # 32 inputs: one block of 32
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="/o_proj/MatMul")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 16])],
        [numpy_helper.from_array(weight, "w")],
    )
    src = tmp_path / "m.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(src))
    settings = WeightOnly(bits=4, algorithm="k_quant", head=True)
    with pytest.raises(InputError, match=r"odd number of blocks of 32: /o_proj/MatMul \(32 inputs\); set symmetric"):
        quantize_weight_only(src, tmp_path / "q.onnx", settings)
    quantize_weight_only(src, tmp_path / "q.onnx", WeightOnly(bits=4, algorithm="k_quant", head=True, block_size=16))
    assert op_counts(tmp_path / "q.onnx")["MatMulNBits"] == 1
