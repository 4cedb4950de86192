"""Weight quantization of an exported causal LM with onnxruntime's own quantizers (no quantizer here).

- `quantize_int8`: dynamic int8 (`quantize_dynamic`): MatMul weights int8 per output channel,
  activations quantized per call (DynamicQuantizeLinear -> MatMulInteger). Only MatMuls with a
  constant weight are quantized: the attention products (Q K^T, P V) stay fp32, as their
  "weights" are activations whose ranges vary per token. Optionally the token-embedding Gather too.
  The FFN down projections stay fp32 by default: their input (after the gated activation) holds the
  outlier channels that one per-tensor activation scale cannot cover (LLM.int8(), Dettmers et al. 2022;
  SmoothQuant, Xiao et al. 2023). Measured on the distilled SmolLM2 student (RESULTS.md): held-out
  perplexity 310 fp32, 403 all-int8 (+30%), 331 with the 10 down projections fp32 (+7%).
- `quantize_int4`: 4-bit weight-only (`MatMulNBitsQuantizer`, round-to-nearest, blockwise): each
  constant MatMul becomes MatMulNBits; `accuracy_level` 4 lets the CPU kernel quantize activations
  to int8 per block and use int8 dot products (VNNI) instead of dequantizing weights to fp32.

The LM head (a MatMul on the tied embedding) is the largest single weight of a small LM (28 M of
SmolLM2-135M's 134.5 M parameters), so both quantize it by default; `head=False` keeps it fp32.
Models are written as one file (no external data): a 135 M-parameter model is far below 2 GB.
"""

from __future__ import annotations

import importlib.util
import logging
from collections import Counter
from pathlib import Path

from edgepipe.errors import BackendUnavailableError

log = logging.getLogger(__name__)

ONNX_IR_INSTALL = "pip install onnx-ir==1.1.0"


def op_counts(path: Path) -> dict[str, int]:
    import onnx

    return dict(Counter(node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node))


def _head_nodes(path: Path) -> list[str]:
    """The MatMul(s) producing `logits` (the LM head), by graph structure rather than by name."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return [n.name for n in graph.node if n.op_type == "MatMul" and "logits" in n.output]


FLOAT_MATMULS = ("down_proj",)  # name parts of the MatMuls quantize_int8 keeps fp32 (see the module doc)


def quantize_int8(
    src: Path, dst: Path, *, head: bool = True, embedding: bool = False, keep_float: tuple[str, ...] = FLOAT_MATMULS
) -> dict[str, int]:
    """Dynamic int8, per-channel MatMul weights, except MatMuls whose name contains a `keep_float` part;
    returns the op counts of the result."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(str(src), load_external_data=False).graph
    kept = [n.name for n in graph.node if n.op_type == "MatMul" and any(part in n.name for part in keep_float)]

    quantize_dynamic(
        src,
        dst,
        op_types_to_quantize=["MatMul", *(["Gather"] if embedding else [])],
        per_channel=True,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=kept + ([] if head else _head_nodes(src)),
        # activation x activation products (attention) stay fp32
        extra_options={"MatMulConstBOnly": True},
    )
    return op_counts(dst)


def int4_available() -> str | None:
    """Why MatMulNBits quantization cannot run here, or None."""
    if importlib.util.find_spec("onnx_ir") is None:
        return f"onnxruntime's MatMulNBitsQuantizer needs onnx-ir: {ONNX_IR_INSTALL}"
    return None


def quantize_int4(
    src: Path,
    dst: Path,
    *,
    block_size: int = 32,
    symmetric: bool = True,
    accuracy_level: int | None = 4,
    head: bool = True,
) -> dict[str, int]:
    """4-bit weight-only MatMulNBits (blockwise RTN); returns the op counts of the result."""
    reason = int4_available()
    if reason:
        raise BackendUnavailableError(reason)
    import onnx

    # the module configures the root logger at import (basicConfig, INFO) and logs every node
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits

    logging.getLogger(nbits.__name__).setLevel(logging.WARNING)
    quantizer = nbits.MatMulNBitsQuantizer(
        onnx.load(str(src)),
        bits=4,
        block_size=block_size,
        is_symmetric=symmetric,
        accuracy_level=accuracy_level,
        nodes_to_exclude=[] if head else _head_nodes(src),
    )
    quantizer.process()
    quantizer.model.save_model_to_file(str(dst), use_external_data_format=False)
    return op_counts(dst)
