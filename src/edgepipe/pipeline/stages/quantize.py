"""quantize: int8 through onnxruntime.quantization, dynamic or static QDQ with calibration.

Static quantization runs as visible steps: pre-process (shape inference, auto_merge) -> collect
activation ranges on the calibration split -> save them (a cached artifact keyed by model and
calibration data) -> write the QDQ model from the saved ranges. A `preset` fills the settings the
recipe leaves unset (`edgepipe.pipeline.presets`). With `sensitivity` each quantizable node is
measured alone; with `max_accuracy_drop` the most sensitive nodes fall back to float until the
validation accuracy is within budget (`edgepipe.pipeline.accuracy_aware`).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from edgepipe.export.onnx_export import needs_external_data, save_onnx
from edgepipe.pipeline import accuracy_aware
from edgepipe.pipeline.artifacts import Artifact, config_hash, sha256_file, write_atomic, write_json, write_meta
from edgepipe.pipeline.calibration import CalibrationSet, ImageCalibrationSet, ort_reader
from edgepipe.pipeline.presets import PRESETS, select_preset
from edgepipe.pipeline.recipe import ArtifactKind, CalibrationConfig, QuantizeConfig
from edgepipe.pipeline.stages import StageContext, StageResult, register
from edgepipe.tasks import Task

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


WEIGHT_OPS = ("MatMul", "Gemm", "Conv", "Attention")  # sensitivity candidates when op_types is "all"

# Static QDQ of a transformer, placed for onnxruntime's CPU kernels (RESULTS.md, issue 6: the demo
# student went from 1.30x to 1.54x fused fp32 in bench_int8, test accuracy -0.63 pt -> unchanged):
# - MatMul/Gemm outputs stay float: DQ -> MatMul then runs as one MatMulIntegerToFloat kernel, where a
#   quantized output costs QLinearMatMul + a standalone DequantizeLinear before the float bias/GELU/norm;
# - MatMuls of two activations (the attention core, Q.K^T and P.V) stay float: quantizing them put Q/DQ
#   around the softmax for little work, and cost accuracy;
# - the residual path reads the float tensor, not the quantize-dequantize copy the MatMul reads.
STATIC_FLOAT_OUTPUTS = ["MatMul", "Gemm"]


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
        if item.is_file() and item.name not in ("model.onnx", "model.onnx.data", "edgepipe.json"):
            shutil.copy2(item, dest / item.name)


def _calibration_set(
    source: Path, cfg: CalibrationConfig, ctx: StageContext, input_names: tuple[str, ...]
) -> CalibrationSet | ImageCalibrationSet:
    """The task adapter's calibration feeds of the calibration split; histogram calibrators (entropy,
    percentile) stack activations across batches, so their text batches are padded to one length."""
    from transformers import AutoTokenizer

    from edgepipe.pipeline.adapters import adapter_for

    samples = ctx.data.calibration.inputs[: cfg.samples]
    tokenizer = None if isinstance(samples, np.ndarray) else AutoTokenizer.from_pretrained(source)
    task = adapter_for(ctx.task, tokenizer, cfg.max_seq_len)
    calibration: CalibrationSet | ImageCalibrationSet = task.calibration(
        samples, input_names, cfg.batch_size, fixed_length=cfg.method != "minmax"
    )
    return calibration


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


def resolve_settings(cfg: QuantizeConfig, task: str, cpu_flags: list[str]) -> dict[str, Any]:
    """The settings actually used: the recipe's explicit keys, else the preset's, else the defaults."""
    explicit = cfg.model_fields_set
    preset_name = select_preset(cpu_flags) if cfg.preset == "auto" else cfg.preset
    preset = PRESETS[preset_name] if preset_name else None

    def pick(key: str) -> Any:
        return getattr(preset, key) if preset is not None and key not in explicit else getattr(cfg, key)

    text_static = cfg.mode == "static" and task != "image-classification"
    tables = {k: getattr(cfg, k) for k in ("embedding_bits", "embedding_block_size", "float16_tables")}
    fusible = text_static and cfg.source_kind == ArtifactKind.ONNX_FP32  # a fused source is taken as is
    return {
        "mode": cfg.mode,
        "preset": preset_name,
        "graph": (cfg.graph or (preset.graph if preset else "fused-mha")) if fusible else "source",
        "float_outputs": STATIC_FLOAT_OUTPUTS if text_static else [],
        "float_residuals": text_static,
        "per_channel": pick("per_channel"),
        "reduce_range": pick("reduce_range"),
        "weight_type": pick("weight_type"),
        "activation_type": pick("activation_type"),
        "symmetric": bool(preset and preset.symmetric_activations),
        "op_types": cfg.op_types or _default_op_types(cfg.mode, task),
        "nodes_to_exclude": list(cfg.nodes_to_exclude),
        **(tables if cfg.mode == "dynamic" and "Gather" in (cfg.op_types or []) else {}),
    }


def _quantizer(model: Path, settings: dict[str, Any], ranges: Path | None) -> accuracy_aware.Quantizer:
    """Writes `model` quantized with `settings`, extra nodes kept float, or only `include` quantized."""
    import onnx
    from onnxruntime.quantization import QuantFormat, quantize_dynamic, quantize_static

    large = needs_external_data(model)

    def write(exclude: list[str], include: list[str] | None, out: Path) -> None:
        common = {
            "op_types_to_quantize": settings["op_types"] or None,
            "per_channel": settings["per_channel"],
            "reduce_range": settings["reduce_range"],
            "weight_type": _qtype(settings["weight_type"]),
            "nodes_to_exclude": settings["nodes_to_exclude"] + settings.get("attention_core", []) + exclude,
            "nodes_to_quantize": include,
            "use_external_data_format": large,
        }
        if settings["mode"] == "dynamic":
            four_bit = settings.get("embedding_bits") == 4
            if four_bit:  # the tables go to GatherBlockQuantized below, not to quantize_dynamic's int8
                common["op_types_to_quantize"] = [op for op in settings["op_types"] if op != "Gather"]
            # fused graphs carry tensors without type info; onnxruntime needs a default to proceed
            quantize_dynamic(model, out, extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT}, **common)
            if four_bit:
                gather_blocks_4bit(out, settings["embedding_block_size"], common["nodes_to_exclude"])
            if settings.get("float16_tables"):
                float16_tables(out)
            return
        extra: dict[str, Any] = {"OpTypesToExcludeOutputQuantization": settings["float_outputs"]}
        if settings["symmetric"]:
            extra.update(ActivationSymmetric=True, WeightSymmetric=True)
        quantize_static(
            model,
            out,
            calibration_data_reader=None,
            calibration_cache_path=ranges,
            quant_format=QuantFormat.QDQ,
            activation_type=_qtype(settings["activation_type"]),
            calibrate_method=_method(settings.get("calibration", {}).get("method", "minmax")),
            extra_options=extra,
            **common,
        )
        if "Gather" in (settings["op_types"] or []):
            gather_before_dequantize(out)
        if settings["float_residuals"]:
            float_residuals(out)

    return write


def attention_core(model: Path) -> list[str]:
    """MatMuls whose inputs are both activations (no weight initializer): Q.K^T and P.V."""
    import onnx

    graph = onnx.load(str(model), load_external_data=False).graph
    weights = {i.name for i in graph.initializer}
    return [n.name for n in graph.node if n.op_type == "MatMul" and not weights.intersection(n.input)]


def gather_before_dequantize(path: Path) -> int:
    """Gather(DQ(table)) -> DQ(Gather(table)) for 8-bit tables with one scale: the rows a batch reads are
    dequantized, not the whole table on every call (30522 x 384 values: +2.9 ms at b1 on the demo student,
    RESULTS.md). Exact: with a per-tensor scale and zero point both orders give the same values."""
    import onnx
    from onnx import helper

    model = onnx.load(str(path))
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    sizes = {t.name: len(t.dims) for t in graph.initializer}
    moved = 0
    for node in list(graph.node):
        dq = producer.get(node.input[0]) if node.op_type == "Gather" else None
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in sizes:
            continue
        if any(sizes.get(name, 1) != 0 for name in dq.input[1:]):  # a per-channel scale or zero point
            continue
        rows = f"{node.output[0]}_8bit"
        gather = helper.make_node("Gather", [dq.input[0], node.input[1]], [rows], name=f"{node.name}_8bit",
                                  **{a.name: helper.get_attribute_value(a) for a in node.attribute})  # fmt: skip
        after = helper.make_node("DequantizeLinear", [rows, *dq.input[1:]], list(node.output), name=f"{dq.name}_rows")
        index = list(graph.node).index(node)
        graph.node.remove(node)
        graph.node.insert(index, after)
        graph.node.insert(index, gather)
        moved += 1
    if moved:
        used = {name for n in graph.node for name in n.input}
        for orphan in [n for n in graph.node if n.op_type == "DequantizeLinear" and n.output[0] not in used]:
            graph.node.remove(orphan)
        save_onnx(model, path)
    return moved


def gather_blocks_4bit(path: Path, block_size: int, exclude: list[str]) -> None:
    """The constant tables of the Gathers not in `exclude` as symmetric 4-bit blocks along the hidden axis
    (onnxruntime's `matmul_nbits_quantizer`: GatherBlockQuantized, opset 21). Symmetric: the asymmetric
    tables of the demo student agreed less with fp32 on val + test (95.8% against 98.0% at block 64)."""
    import onnx

    # the module configures the root logger at import (basicConfig, INFO) and logs every node
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits

    logging.getLogger(nbits.__name__).setLevel(logging.WARNING)
    config = nbits.DefaultWeightOnlyQuantConfig(
        block_size=block_size, is_symmetric=True, bits=4, op_types_to_quantize=("Gather",), quant_axes=(("Gather", 1),)
    )
    quantizer = nbits.MatMulNBitsQuantizer(
        onnx.load(str(path)), block_size=block_size, is_symmetric=True, nodes_to_exclude=exclude, algo_config=config
    )
    quantizer.process()
    save_onnx(quantizer.model.model, path)


def float16_tables(path: Path, min_elements: int = 4096) -> int:
    """Float tables that still feed a Gather (positions; what quantization left float) stored in float16, a
    Cast back to float32 after the Gather (rows read, not the table, are cast); returns how many. fp16 keeps 11
    bits of mantissa: the table changes by < 5e-4 relative, where int8 with one scale cost 0.55 pt (RESULTS.md)."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    tables = {i.name: i for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    readers = Counter(name for node in graph.node for name in node.input)
    changed = 0
    for node in list(graph.node):
        table = tables.get(node.input[0]) if node.op_type == "Gather" else None
        if table is None or readers[table.name] != 1 or np.prod(table.dims) < min_elements:
            continue
        half = numpy_helper.from_array(numpy_helper.to_array(table).astype(np.float16), f"{table.name}_fp16")
        graph.initializer.remove(table)
        graph.initializer.append(half)
        rows = f"{node.output[0]}_fp16"
        cast = helper.make_node("Cast", [rows], [node.output[0]], name=f"{node.name}_fp32", to=onnx.TensorProto.FLOAT)
        node.input[0], node.output[0] = half.name, rows
        graph.node.insert(list(graph.node).index(node) + 1, cast)
        changed += 1
    if changed:
        save_onnx(model, path)
    return changed


def float_residuals(path: Path) -> int:
    """Point every consumer of a Q -> DQ pair that is not a weight op back at the float tensor; returns
    how many inputs moved. The Q/DQ stays for the MatMul/Gemm that reads it (MatMulIntegerToFloat),
    while the residual Add / LayerNormalization / Shape no longer pay for a dequantize, or its error."""
    import onnx

    model = onnx.load(str(path))
    producer = {out: node for node in model.graph.node for out in node.output}
    moved = 0
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm", "Conv", "QuantizeLinear", "DequantizeLinear"):
            continue
        for k, name in enumerate(node.input):
            dq = producer.get(name)
            q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            if q is not None and q.op_type == "QuantizeLinear":
                node.input[k] = q.input[0]
                moved += 1
    if moved:
        save_onnx(model, path)
    return moved


def _prepare_static_graph(src: Path, source_dir: Path, settings: dict[str, Any], work: Path) -> Path:
    """The graph to calibrate and quantize: the MultiHeadAttention-fused export, or the source as is."""
    if settings["graph"] != "fused-mha":
        return src
    from transformers import AutoConfig

    from edgepipe.export import fuse_transformer

    fused = work / ".fused-mha.onnx"
    config = AutoConfig.from_pretrained(source_dir)
    gather = "Gather" in (settings["op_types"] or [])  # the embedding table in int8: keep its Gather visible
    if fuse_transformer(src, fused, config, attention="MultiHeadAttention", embed_layer_norm=not gather) is None:
        settings["graph"] = f"source (no fusion for model_type {config.model_type})"
        return src
    return fused


def _prepare_dynamic_gather_graph(src: Path, source_dir: Path, settings: dict[str, Any], work: Path) -> Path:
    """Dynamic int8 with the embedding table in 8 bits: the plain export fused as the fused export is (Attention)
    but without EmbedLayerNormalization, which hides the table's Gather. Only the tables the token ids index are
    quantized: the position table in int8 cost 0.55 pt on the demo (RESULTS.md), for 0.6 MB."""
    import onnx
    from transformers import AutoConfig

    from edgepipe.export import fuse_transformer

    fused = work / ".fused-attention.onnx"
    config = AutoConfig.from_pretrained(source_dir)
    if fuse_transformer(src, fused, config, attention="Attention", embed_layer_norm=False) is None:
        settings["graph"] = f"source (no fusion for model_type {config.model_type})"
        fused = src
    else:
        settings["graph"] = "fused-attention (no EmbedLayerNormalization)"
    graph = onnx.load(str(fused), load_external_data=False).graph
    inputs = {i.name for i in graph.input}
    positions = [n.name for n in graph.node if n.op_type == "Gather" and n.input[1] not in inputs]
    settings["nodes_to_exclude"] = settings["nodes_to_exclude"] + positions
    return fused


def _eval_feeds(source: Path, cfg: QuantizeConfig, ctx: StageContext, input_names: tuple[str, ...]) -> list[Any]:
    """Validation batches for sensitivity and fallback (every example, none dropped)."""
    inputs = ctx.data.val.inputs[: cfg.eval_examples]
    if isinstance(inputs, np.ndarray):
        return [{input_names[0]: inputs[i : i + 32]} for i in range(0, len(inputs), 32)]
    from transformers import AutoTokenizer

    return list(CalibrationSet(list(inputs), AutoTokenizer.from_pretrained(source), input_names, 32, 128))


def _candidates(model: Path, settings: dict[str, Any]) -> list[tuple[str, str]]:
    import onnx

    kinds = set(settings["op_types"] or WEIGHT_OPS)
    graph = onnx.load(str(model), load_external_data=False).graph
    kept = set(settings["nodes_to_exclude"]) | set(settings.get("attention_core", []))
    return [(n.name, n.op_type) for n in graph.node if n.op_type in kinds and n.name and n.name not in kept]


def _sensitivity_png(rows: list[accuracy_aware.NodeSensitivity], path: Path, limit: int = 40) -> None:
    """Horizontal bars of SQNR per node, most sensitive at the top (the `limit` most sensitive)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = rows[:limit][::-1]
    fig, ax = plt.subplots(figsize=(9, 0.28 * len(shown) + 1.2))
    ax.barh([r.node[-60:] for r in shown], [r.sqnr_db for r in shown], color="#4c72b0")
    ax.set_xlabel("SQNR of the model output with only this node in int8 (dB, higher is safer)")
    ax.tick_params(axis="y", labelsize=7)
    ax.set_title("int8 sensitivity per node")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _sensitivity_markdown(rows: list[accuracy_aware.NodeSensitivity], fp32_accuracy: float) -> str:
    lines = [
        f"# Sensitivity: each node quantized alone (val, fp32 accuracy {100 * fp32_accuracy:.2f}%)",
        "",
        "| node | op | SQNR dB | MSE | argmax agreement | accuracy |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.node} | {r.op_type} | {r.sqnr_db:.1f} | {r.mse:.3g} | {r.argmax_agreement:.4f} | "
            f"{100 * r.accuracy:.2f}% |"
        )
    return "\n".join(lines) + "\n"


@register("quantize", Task.TEXT, Task.TOKEN, Task.IMAGE)
def run_quantize(inputs: dict[ArtifactKind, Artifact], cfg: QuantizeConfig, ctx: StageContext) -> StageResult:
    import onnx
    from onnxruntime.quantization import quant_pre_process

    from edgepipe.runtime.host import host_info

    source = inputs[cfg.source_kind]
    out = ctx.stage_dir / cfg.artifact_name
    out.mkdir(parents=True)
    _copy_companions(source.path, out)
    src_model = source.path / "model.onnx"
    if cfg.mode == "fp16":
        return _run_fp16(source, cfg, ctx, out)
    settings = resolve_settings(cfg, ctx.task, host_info()["cpu_flags"])
    settings["source"] = source.name
    model, ranges = src_model, None
    if cfg.mode == "dynamic" and "Gather" in settings["op_types"] and cfg.source_kind == ArtifactKind.ONNX_FP32:
        model = _prepare_dynamic_gather_graph(src_model, source.path, settings, ctx.stage_dir)
    if cfg.mode == "static":
        calibration = cfg.calibration or CalibrationConfig()
        model = _prepare_static_graph(src_model, source.path, settings, ctx.stage_dir)
        if cfg.preprocess:
            preprocessed = ctx.stage_dir / ".preprocessed.onnx"
            # auto_merge: symbolic shape inference otherwise stops on the BERT export's dynamic axes
            large = needs_external_data(model)
            quant_pre_process(
                str(model),
                str(preprocessed),
                auto_merge=True,
                save_as_external_data=large,
                all_tensors_to_one_file=True,
                external_data_location=f"{preprocessed.name}.data",
            )
            model = preprocessed
        if ctx.task != "image-classification":
            settings["attention_core"] = attention_core(model)  # kept float
        input_names = tuple(i.name for i in onnx.load(str(model), load_external_data=False).graph.input)
        calib = _calibration_set(source.path, calibration, ctx, input_names)
        ranges, calib_info = _calibrate(model, calibration, settings["op_types"], ctx, calib)
        settings.update(calibration={**calibration.model_dump(), **calib_info}, preprocess=cfg.preprocess)
    quantize = _quantizer(model, settings, ranges)
    metrics: dict[str, Any] = {}
    gate_failure = None
    if cfg.sensitivity or cfg.max_accuracy_drop is not None:
        input_names = tuple(i.name for i in onnx.load(str(src_model), load_external_data=False).graph.input)
        feeds = _eval_feeds(source.path, cfg, ctx, input_names)
        labels = ctx.data.val.labels[: cfg.eval_examples]
        reference = accuracy_aware.run_model(src_model, feeds)
        fp32_accuracy = float(np.mean(reference.argmax(-1) == labels))
        rows = accuracy_aware.sensitivity(
            quantize, _candidates(model, settings), feeds, labels, reference, ctx.stage_dir
        )
        write_json(ctx.stage_dir / "sensitivity.json", [r.__dict__ for r in rows])
        write_atomic(ctx.stage_dir / "sensitivity.md", _sensitivity_markdown(rows, fp32_accuracy))
        _sensitivity_png(rows, ctx.stage_dir / "sensitivity.png")
        metrics["most_sensitive"] = [r.__dict__ for r in rows[:5]]
        if cfg.max_accuracy_drop is not None:
            result = accuracy_aware.fallback(
                quantize,
                [r.node for r in rows],
                feeds,
                labels,
                fp32_accuracy,
                cfg.max_accuracy_drop,
                out / "model.onnx",
                ctx.stage_dir,
            )
            metrics["fallback"] = result.to_json()
            settings["nodes_to_exclude"] = settings["nodes_to_exclude"] + result.excluded
            if not result.met:
                gate_failure = (
                    f"`{cfg.artifact_name}`: no int8 model within max_accuracy_drop {cfg.max_accuracy_drop:g} on "
                    f"val; the closest ({len(result.excluded)} node(s) in float) drops "
                    f"{fp32_accuracy - result.accuracy:.4f} and is kept at {out / 'model.onnx'}"
                )
    if cfg.max_accuracy_drop is None:
        quantize([], None, out / "model.onnx")
    for temporary in (".fused-mha.onnx", ".fused-attention.onnx", ".preprocessed.onnx"):
        (ctx.stage_dir / temporary).unlink(missing_ok=True)
        (ctx.stage_dir / f"{temporary}.data").unlink(missing_ok=True)
    settings["op_types"] = settings["op_types"] or "all (onnxruntime default)"
    precision = f"int8-{cfg.mode}"
    source_meta = json.loads((source.path / "edgepipe.json").read_text(encoding="utf-8"))
    carried = {k: source_meta[k] for k in ("input",) if k in source_meta}
    write_meta(out, task=ctx.task, labels=ctx.data.label_names, precision=precision, fmt="onnx", **carried)
    write_json(ctx.stage_dir / "quantization.json", settings)
    metrics.update(
        settings=settings,
        op_counts=op_counts(out / "model.onnx"),
        size_mb_before=round(src_model.stat().st_size / 1e6, 2),
        size_mb_after=round((out / "model.onnx").stat().st_size / 1e6, 2),
    )
    artifact = Artifact(cfg.artifact_name, ArtifactKind.ONNX_INT8, out, precision)
    return StageResult([artifact], metrics, gate_failure=gate_failure)


# Kept fp32 in fp16 models: normalizations and the reductions inside them (a variance of activations above
# ~256 overflows fp16's 65504), and Softmax's exponent sums; onnxruntime's converter keeps its own list of ops
# without fp16 kernels on top (float16.DEFAULT_OP_BLOCK_LIST).
FP16_KEEP_FP32 = ("LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization", "ReduceMean",
                  "Pow", "Sqrt", "Softmax", "BatchNormalization")  # fmt: skip
FP16_MIN_AGREEMENT = 0.99  # val argmax agreement with fp32 below which the fp16 model is refused


def _run_fp16(source: Artifact, cfg: QuantizeConfig, ctx: StageContext, out: Path) -> StageResult:
    """float16 weights and compute (onnxruntime's converter), inputs/outputs kept, parity-gated on val."""
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    from edgepipe.errors import ExportParityError

    src_model = source.path / "model.onnx"
    keep = sorted({*DEFAULT_OP_BLOCK_LIST, *FP16_KEEP_FP32})
    converted = convert_float_to_float16(
        onnx.load(str(src_model)), keep_io_types=True, op_block_list=keep, node_block_list=cfg.nodes_to_exclude
    )
    save_onnx(converted, out / "model.onnx")
    input_names = tuple(i.name for i in converted.graph.input)
    feeds = _eval_feeds(source.path, cfg, ctx, input_names)
    reference = accuracy_aware.run_model(src_model, feeds)
    got = accuracy_aware.run_model(out / "model.onnx", feeds)
    agreement = float(np.mean(reference.argmax(-1) == got.argmax(-1)))
    parity = {"val_examples": len(reference), "argmax_agreement": round(agreement, 5),
              "max_abs_diff": float(np.abs(reference - got).max()), "min_agreement": FP16_MIN_AGREEMENT}  # fmt: skip
    if agreement < FP16_MIN_AGREEMENT:
        raise ExportParityError(
            f"`{cfg.artifact_name}`: the fp16 model agrees with fp32 on {100 * agreement:.2f}% of val examples "
            f"(< {100 * FP16_MIN_AGREEMENT:.0f}%, max diff {parity['max_abs_diff']:.3g}); add the ops that "
            "overflow to nodes_to_exclude or ship fp32"
        )
    source_meta = json.loads((source.path / "edgepipe.json").read_text(encoding="utf-8"))
    carried = {k: source_meta[k] for k in ("input",) if k in source_meta}
    write_meta(out, task=ctx.task, labels=ctx.data.label_names, precision="fp16", fmt="onnx", **carried)
    settings = {
        "source": source.name,
        "keep_io_types": True,
        "op_block_list": keep,
        "nodes_to_exclude": cfg.nodes_to_exclude,
    }
    write_json(ctx.stage_dir / "quantization.json", settings)
    metrics = {
        "settings": settings,
        "parity": parity,
        "op_counts": op_counts(out / "model.onnx"),
        "size_mb_before": round(src_model.stat().st_size / 1e6, 2),
        "size_mb_after": round((out / "model.onnx").stat().st_size / 1e6, 2),
    }
    return StageResult([Artifact(cfg.artifact_name, ArtifactKind.ONNX_FP16, out, "fp16")], metrics)


def _method(name: str) -> Any:
    from onnxruntime.quantization import CalibrationMethod

    return {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[name]
