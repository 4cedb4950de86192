"""Weight quantization of an exported causal LM with onnxruntime's own quantizers (no quantizer here).

- `quantize_int8`: dynamic int8 (`quantize_dynamic`): MatMul weights int8 per output channel,
  activations quantized per call (DynamicQuantizeLinear -> MatMulInteger). Only MatMuls with a
  constant weight are quantized: the attention products (Q K^T, P V) stay fp32, as their
  "weights" are activations whose ranges vary per token. Optionally the token-embedding Gather too.
  The FFN down projections stay fp32 by default: their input (after the gated activation) holds the
  outlier channels that one per-tensor activation scale cannot cover (LLM.int8(), Dettmers et al. 2022;
  SmoothQuant, Xiao et al. 2023). Measured on the distilled SmolLM2 student (RESULTS.md): held-out
  perplexity 310 fp32, 403 all-int8 (+30%), 331 with the 10 down projections fp32 (+7%).
- `quantize_weight_only`: 8- or 4-bit weight-only (`MatMulNBitsQuantizer`, blockwise; RTN, HQQ, GPTQ or
  k-quant; some MatMuls at 8 bits in a 4-bit model): each constant MatMul becomes MatMulNBits;
  `accuracy_level` 4 lets the CPU kernel quantize activations to int8 per block and use int8 dot products
  (VNNI) instead of dequantizing weights to fp32. HQQ's float zero points are rewritten for that kernel
  (`integer_kernel`).

The LM head (a MatMul on the tied embedding) is the largest single weight of a small LM (28 M of
SmolLM2-135M's 134.5 M parameters), so both quantize it by default; `head=False` keeps it fp32. With tied
embeddings and an 8-bit head, the weight-only path also points the token lookup at the head's blocks
(`tie_embedding`: one 8-bit table, as llama.cpp's GGUF has; SmolLM2-135M 4-bit: 223 -> 110 MB).
Models are written as one file (no external data): a 135 M-parameter model is far below 2 GB.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepipe.errors import BackendUnavailableError, InputError

log = logging.getLogger(__name__)

ONNX_IR_INSTALL = "pip install onnx-ir==1.1.0"


def op_counts(path: Path) -> dict[str, int]:
    import onnx

    return dict(Counter(node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node))


def head_nodes(path: Path) -> list[str]:
    """The MatMul(s) producing `logits` (the LM head), by graph structure rather than by name."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return [n.name for n in graph.node if n.op_type == "MatMul" and "logits" in n.output]


def matmul_nodes(path: Path) -> dict[str, str]:
    """Module name (`model.layers.0.mlp.down_proj`, `lm_head`) -> name of its constant-weight MatMul node, from
    the scope names torch.onnx writes (`/model/model/layers.0/mlp/down_proj/MatMul`)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    constant = {i.name for i in graph.initializer}
    found: dict[str, str] = {}
    for node in graph.node:
        if node.op_type == "MatMul" and node.input[1] in constant and node.name.endswith("/MatMul"):
            scope = node.name[: -len("/MatMul")].strip("/").split("/")
            for start in range(len(scope)):  # every suffix of the scope: the wrapper's prefix is unknown
                found.setdefault(".".join(scope[start:]), node.name)
    return found


FLOAT_MATMULS = ("down_proj",)  # name parts of the MatMuls quantize_int8 keeps fp32 (see the module doc)


def quantize_int8(
    src: Path,
    dst: Path,
    *,
    head: bool = True,
    embedding: bool = False,
    keep_float: tuple[str, ...] = FLOAT_MATMULS,
    reduce_range: bool = False,
) -> dict[str, int]:
    """Dynamic int8, per-channel MatMul weights, except MatMuls whose name contains a `keep_float` part;
    returns the op counts of the result. `reduce_range` (7-bit weights) for x86 without VNNI, whose u8 x s8
    instruction sums pairs in int16 and saturates (`pipeline.presets`)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(str(src), load_external_data=False).graph
    kept = [n.name for n in graph.node if n.op_type == "MatMul" and any(part in n.name for part in keep_float)]

    quantize_dynamic(
        src,
        dst,
        op_types_to_quantize=["MatMul", *(["Gather"] if embedding else [])],
        per_channel=True,
        reduce_range=reduce_range,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=kept + ([] if head else head_nodes(src)),
        # activation x activation products (attention) stay fp32
        extra_options={"MatMulConstBOnly": True},
    )
    return op_counts(dst)


def int4_available() -> str | None:
    """Why MatMulNBits quantization cannot run here, or None."""
    if importlib.util.find_spec("onnx_ir") is None:
        return f"onnxruntime's MatMulNBitsQuantizer needs onnx-ir: {ONNX_IR_INSTALL}"
    return None


WEIGHT_ONLY_ALGORITHMS = ("rtn", "hqq", "gptq", "k_quant")


@dataclass(frozen=True)
class WeightOnly:
    """Weight-only MatMulNBits settings (onnxruntime's `matmul_nbits_quantizer`).

    `bits` for every constant MatMul, except `eight_bit` (node names) at 8 bits: the per-node widths of a
    mixed recipe such as llama.cpp's Q4_K_M. `block_size` weights share one scale (and zero point unless
    `symmetric`). `accuracy_level` 4 lets the CPU kernel quantize activations to int8 per block and use
    int8 dot products; it needs integer zero points, which HQQ does not write (`integer_kernel`).
    `tied_table`: a tied token table read from the 8-bit head's blocks (`tie_embedding`)."""

    bits: int = 4
    algorithm: str = "rtn"
    block_size: int = 32
    symmetric: bool = False
    accuracy_level: int | None = 4
    eight_bit: tuple[str, ...] = ()
    head: bool = True
    tied_table: bool = True


def quantize_weight_only(
    src: Path, dst: Path, settings: WeightOnly, calibration: list[dict[str, Any]] | None = None
) -> dict[str, int]:
    """`src` with its constant MatMuls as MatMulNBits per `settings`; `calibration` (model feeds) for GPTQ.
    Returns the op counts of the result."""
    reason = int4_available()
    if reason:
        raise BackendUnavailableError(reason)
    import onnx

    # the module configures the root logger at import (basicConfig, INFO) and logs every node
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits

    logging.getLogger(nbits.__name__).setLevel(logging.WARNING)
    logging.getLogger("neural_compressor").setLevel(logging.WARNING)  # k-quant and GPTQ log every node
    excluded = [] if settings.head else head_nodes(src)
    model = onnx.load(str(src))
    config = _algorithm(nbits, settings, calibration)
    per_node = settings.algorithm in ("k_quant", "gptq")  # neural-compressor's path: widths per node, one pass
    if per_node:
        _refuse_odd_blocks(model, settings, excluded)
        matmuls = [n.name for n in model.graph.node if n.op_type == "MatMul"]
        config.customized_weight_config = {
            name: {"bits": 8 if name in settings.eight_bit else settings.bits} for name in matmuls
        }
    quantizer = nbits.MatMulNBitsQuantizer(
        model,
        bits=settings.bits,
        block_size=settings.block_size,
        is_symmetric=settings.symmetric,
        accuracy_level=settings.accuracy_level,
        nodes_to_exclude=excluded + ([] if per_node else list(settings.eight_bit)),
        algo_config=config,
    )
    with contextlib.redirect_stdout(io.StringIO()):  # neural-compressor's progress bar prints to stdout
        quantizer.process()
    model = quantizer.model.model
    if settings.algorithm == "hqq":
        integer_kernel(model, settings.accuracy_level)
    if settings.eight_bit and settings.bits != 8 and not per_node:  # second pass: the eight_bit nodes alone
        others = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in settings.eight_bit]
        quantizer = nbits.MatMulNBitsQuantizer(
            model,
            bits=8,
            block_size=settings.block_size,
            is_symmetric=settings.symmetric,
            accuracy_level=settings.accuracy_level,
            nodes_to_exclude=others + excluded,
        )
        quantizer.process()
        model = quantizer.model.model
    if settings.head and settings.tied_table:
        table = tie_embedding(model)
        log.info("token table %s", f"{table} -> the LM head's 8-bit blocks" if table else "kept (no tied 8-bit head)")
    onnx.save_model(model, str(dst))
    return op_counts(dst)


def _refuse_odd_blocks(model: Any, settings: WeightOnly, excluded: list[str]) -> None:
    """neural-compressor's packing (onnxruntime 1.32's GPTQ and k-quant) pairs 4-bit zero points across columns
    and fails where a MatMul's input width holds an odd number of blocks: refused first, naming the way out."""
    if settings.bits != 4 or settings.symmetric:
        return
    weights = {i.name: i.dims for i in model.graph.initializer}
    odd = [
        f"{n.name} ({weights[n.input[1]][0]} inputs)"
        for n in model.graph.node
        if n.op_type == "MatMul"
        and n.name not in excluded
        and n.name not in settings.eight_bit
        and n.input[1] in weights
        and -(-weights[n.input[1]][0] // settings.block_size) % 2
    ]
    if odd:
        raise InputError(
            f"weight-only {settings.algorithm}: onnxruntime packs 4-bit zero points wrongly where a MatMul's inputs "
            f"hold an odd number of blocks of {settings.block_size}: {', '.join(odd[:3])}"
            f"{f' and {len(odd) - 3} more' if len(odd) > 3 else ''}; set symmetric: true, another block_size, "
            "or algorithm rtn or hqq"
        )


def _algorithm(nbits: Any, settings: WeightOnly, calibration: list[dict[str, Any]] | None) -> Any:
    """onnxruntime's algorithm config for `settings.algorithm`; None is its default (RTN, C++ kernels)."""
    if settings.algorithm == "rtn":
        return None
    if settings.algorithm == "hqq":
        return nbits.HQQWeightOnlyQuantConfig(block_size=settings.block_size, bits=settings.bits)
    if settings.algorithm == "k_quant":
        return nbits.KQuantWeightOnlyQuantConfig()
    if settings.algorithm == "gptq":
        if not calibration:
            raise InputError("weight-only GPTQ needs calibration feeds (the recipe's calibration texts)")
        return nbits.GPTQWeightOnlyQuantConfig(calibration_data_reader=_Feeds(calibration))
    raise InputError(f"weight-only algorithm {settings.algorithm!r}: use one of {WEIGHT_ONLY_ALGORITHMS}")


class _Feeds:
    """onnxruntime's CalibrationDataReader protocol over a list of model feeds (GPTQ deep-copies and iterates it)."""

    def __init__(self, feeds: list[dict[str, Any]]) -> None:
        self.feeds = feeds
        self._next = iter(feeds)

    def get_next(self) -> dict[str, Any] | None:
        return next(self._next, None)

    def __iter__(self) -> Any:
        return iter(self.feeds)


def integer_kernel(model: Any, accuracy_level: int | None, levels: int = 1) -> int:
    """Rewrite every MatMulNBits with float zero points (what HQQ writes) for the integer kernel; returns how many.

    onnxruntime's CPU MatMulNBits runs its blocked int8/int4 kernels (and `accuracy_level`) only with integer
    zero points; float ones fall back to dequantizing the whole weight on every call (SmolLM2-135M int4 HQQ:
    5 tok/s against 83 for RTN). Rounding the zero points would undo what HQQ optimized. Instead, with z' the
    rounded zero point, W = s (q - z) = s (q - z') + r, r[b, n] = s (z' - z) one float per block and column:
    y = x W = x (q, s, z') + blocksum(x) r. The second term joins the first as extra input rows: the input
    gets its block sums appended (one small MatMulNBits with 0/1 weights, then Concat; once for every MatMul
    reading it, as q, k, v do), the weight gets r as rows, quantized at the same width in `levels` passes (a
    second holds what the first rounded off: float-exact, 3% slower), so each MatMul stays one MatMulNBits.
    Centred weights (q - z') also keep the kernel's int8 rounding of x from being multiplied by q's offset:
    SmolLM2-135M KL 0.008 against 0.027 for MatMulNBits(q, zero point 0) - blocksum(x) s z, at 1.10x its
    decode speed (RESULTS.md). Inputs are (..., K); nodes whose K is not a multiple of the block size
    keep their float zero points."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    graph = model.graph
    init = {i.name: i for i in graph.initializer}
    nodes: list[Any] = []
    widened: dict[tuple[str, int, int], str] = {}  # (input, K, block) -> the input with its block sums appended
    rewritten = 0
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        zp = init.get(node.input[3]) if node.op_type == "MatMulNBits" and len(node.input) > 3 else None
        if zp is None or zp.data_type == onnx.TensorProto.UINT8 or attrs["K"] % attrs["block_size"]:
            nodes.append(node)
            continue
        k, n, bits, block = attrs["K"], attrs["N"], attrs["bits"], attrs["block_size"]
        blocks, base = k // block, node.name or node.output[0]
        per_level = -(-blocks // block)  # blocks of appended rows per pass over the offsets
        extra = levels * per_level
        kernel = {name: value for name, value in attrs.items() if name not in ("accuracy_level", "K", "N")}
        if accuracy_level:
            kernel["accuracy_level"] = accuracy_level
        given = numpy_helper.to_array(init[node.input[2]])  # the model's float type (fp32 or fp16)
        scales = given.astype(np.float32).reshape(n, blocks)
        zeros = numpy_helper.to_array(zp).astype(np.float32).reshape(n, blocks)
        whole = np.clip(np.round(zeros), 0, 2**bits - 1)
        rows, row_scales, row_zeros = _offset_rows(scales * (whole - zeros), block, bits, levels)
        weight = numpy_helper.to_array(init[node.input[1]]).reshape(n, blocks, -1)
        key = (node.input[0], k, block)
        if key not in widened:
            prefix = f"{node.input[0]}/blocksum{block}"
            ones = np.zeros((extra * block, blocks), dtype=np.uint8)  # (output, k-block): which sum goes where
            for level in range(levels):
                ones[level * per_level * block + np.arange(blocks), np.arange(blocks)] = 1
            indicator = np.repeat(ones[:, :, None], block, axis=2).reshape(extra * block, blocks, block)
            graph.initializer.extend(
                [
                    numpy_helper.from_array(_pack(indicator, bits), f"{prefix}/ones"),
                    numpy_helper.from_array(np.ones(extra * block * blocks, dtype=given.dtype), f"{prefix}/scales"),
                    numpy_helper.from_array(np.zeros(extra * block * -(-blocks * bits // 8), np.uint8), f"{prefix}/zp"),
                ]
            )
            nodes += [
                helper.make_node(
                    "MatMulNBits",
                    [node.input[0], f"{prefix}/ones", f"{prefix}/scales", f"{prefix}/zp"],
                    [prefix],
                    name=prefix,
                    domain="com.microsoft",
                    K=k,
                    N=extra * block,
                    **kernel,
                ),
                helper.make_node("Concat", [node.input[0], prefix], [f"{prefix}/wide"], name=f"{prefix}/wide", axis=-1),
            ]
            widened[key] = f"{prefix}/wide"
        graph.initializer.extend(
            [
                numpy_helper.from_array(np.concatenate([weight, rows], axis=1), f"{base}/wide_b"),
                numpy_helper.from_array(
                    np.concatenate([scales, row_scales], axis=1).astype(given.dtype).ravel(), f"{base}/wide_scales"
                ),
                numpy_helper.from_array(
                    _pack(np.concatenate([whole.astype(np.uint8), row_zeros], axis=1), bits).ravel(), f"{base}/wide_zp"
                ),
            ]
        )
        nodes.append(
            helper.make_node(
                "MatMulNBits",
                [widened[key], f"{base}/wide_b", f"{base}/wide_scales", f"{base}/wide_zp"],
                list(node.output),
                name=base,
                domain="com.microsoft",
                K=k + extra * block,
                N=n,
                **kernel,
            )
        )
        rewritten += 1
    graph.ClearField("node")
    graph.node.extend(nodes)
    _drop_unread_initializers(graph)
    return rewritten


def _drop_unread_initializers(graph: Any) -> None:
    used = {name for node in graph.node for name in node.input}
    kept = [i for i in graph.initializer if i.name in used]
    graph.ClearField("initializer")
    graph.initializer.extend(kept)


def _offset_rows(offsets: Any, block: int, bits: int, levels: int) -> tuple[Any, Any, Any]:
    """`offsets` (N, blocks) as weight rows under the appended block sums: `levels` groups of blocks of
    `block` rows, each group quantizing what the ones before left (asymmetric RTN per block and column).
    Returns packed rows (N, extra, block * bits / 8), their scales (N, extra) and zero points (N, extra)."""
    import numpy as np

    n, blocks = offsets.shape
    per_level = -(-blocks // block)
    top = 2**bits - 1
    left = np.zeros((n, per_level * block), dtype=np.float32)
    left[:, :blocks] = offsets
    packed, scales, zeros = [], [], []
    for _ in range(levels):
        grouped = left.reshape(n, per_level, block)
        low, high = np.minimum(grouped.min(-1), 0.0), np.maximum(grouped.max(-1), 0.0)
        scale = np.where(high > low, (high - low) / top, 1.0).astype(np.float32)
        zero = np.clip(np.round(-low / scale), 0, top)
        q = np.clip(np.round(grouped / scale[..., None] + zero[..., None]), 0, top)
        left = (grouped - scale[..., None] * (q - zero[..., None])).reshape(n, -1)
        packed.append(_pack(q.astype(np.uint8), bits))
        scales.append(scale)
        zeros.append(zero.astype(np.uint8))
    return np.concatenate(packed, axis=1), np.concatenate(scales, axis=1), np.concatenate(zeros, axis=1)


def _pack(values: Any, bits: int) -> Any:
    """Unsigned `bits`-wide integers packed along the last axis as MatMulNBits stores them (first in the low bits)."""
    import numpy as np

    per_byte = 8 // bits
    padded = np.zeros((*values.shape[:-1], -(-values.shape[-1] // per_byte) * per_byte), dtype=np.uint8)
    padded[..., : values.shape[-1]] = values
    grouped = padded.reshape(*values.shape[:-1], -1, per_byte)
    return np.bitwise_or.reduce([grouped[..., j] << (bits * j) for j in range(per_byte)], axis=0).astype(np.uint8)


def tie_embedding(model: Any) -> str | None:
    """Point the token-embedding Gather at the 8-bit LM head's own blocks (GatherBlockQuantized), as llama.cpp's
    GGUF keeps one table for both; returns the name of the float table that left, or None.

    A tied small LM's table is most of its file after weight-only quantization (SmolLM2-135M: 113 MB fp32 of
    223 MB, the head's 8-bit copy 28 MB). The head's MatMulNBits stores the table's rows (its N axis) in blocks
    along the hidden axis, which is the layout GatherBlockQuantized reads (gather axis 0, quantize axis 1).
    Applies where the Gather reads `input_ids` from a float table, or from a Transpose of one, that the head's
    blocks reproduce within half a step (so a model with an untied head keeps its table)."""
    import numpy as np
    from onnx import helper, numpy_helper

    graph = model.graph
    init = {i.name: i for i in graph.initializer}
    head = next((n for n in graph.node if n.op_type == "MatMulNBits" and "logits" in n.output), None)
    if head is None or len(head.input) < 4 or not head.input[3]:
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in head.attribute}
    k, n, block = attrs["K"], attrs["N"], attrs["block_size"]
    if attrs["bits"] != 8 or k % block or head.input[3] not in init:
        return None
    nodes = list(graph.node)
    producer = {out: node for node in nodes for out in node.output}
    at = next((i for i, g in enumerate(nodes) if g.op_type == "Gather" and g.input[1] == "input_ids"), None)
    if at is None:
        return None
    gather = nodes[at]
    transpose = producer.get(gather.input[0])
    transpose = transpose if transpose is not None and transpose.op_type == "Transpose" else None
    source = transpose.input[0] if transpose is not None else gather.input[0]
    if source not in init:
        return None
    table = numpy_helper.to_array(init[source])
    table = table.T if transpose is not None else table
    if table.shape != (n, k):
        return None
    q = numpy_helper.to_array(init[head.input[1]]).reshape(n, k // block, block).astype(np.float32)
    scales = numpy_helper.to_array(init[head.input[2]]).astype(np.float32).reshape(n, k // block, 1)
    zeros = numpy_helper.to_array(init[head.input[3]]).astype(np.float32).reshape(n, k // block, 1)
    error = np.abs((q - zeros) * scales - table.reshape(n, k // block, block))
    if not (error <= scales * 0.5 + 1e-6).all():
        return None  # an untied head: its blocks are not this table
    inputs, reshapes = [], []  # the head's initializers in GatherBlockQuantized's 2-D shapes
    for name, shape in ((head.input[1], (n, k)), (head.input[2], (n, k // block)), (head.input[3], (n, k // block))):
        if list(init[name].dims) == list(shape):
            inputs.append(name)
            continue
        graph.initializer.append(numpy_helper.from_array(np.asarray(shape, dtype=np.int64), f"{name}/table_shape"))
        reshapes.append(helper.make_node("Reshape", [name, f"{name}/table_shape"], [f"{name}/table"]))
        inputs.append(f"{name}/table")
    nodes[at] = helper.make_node(
        "GatherBlockQuantized",
        [inputs[0], gather.input[1], inputs[1], inputs[2]],
        list(gather.output),
        name=f"{gather.name}/tied",
        domain="com.microsoft",
        bits=8,
        block_size=block,
        gather_axis=0,
        quantize_axis=1,
    )
    used = {name for node in nodes for name in node.input} | {o.name for o in graph.output}
    if transpose is not None and transpose.output[0] not in used:  # it only fed the table's Gather
        nodes = [node for node in nodes if node is not transpose]
    graph.ClearField("node")
    graph.node.extend(reshapes + nodes)  # the Reshapes read initializers only: first
    _drop_unread_initializers(graph)
    return source
