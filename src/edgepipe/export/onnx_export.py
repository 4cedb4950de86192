"""torch -> ONNX for transformers classifiers and image modules, with a parity check on shapes other
than the traced one.

Inputs come from a `Feeds` function, (batch, seq_len) -> real inputs of that shape: tokenized
sentences for text (`text_feeds`), real images for image models (`image_feeds`, seq_len unused).

The legacy TorchScript exporter is used on purpose: it takes ~2 s instead of ~15 s, needs no
onnxscript, and its graph is the one onnxruntime's BERT optimizer knows how to fuse (Attention or
MultiHeadAttention, EmbedLayerNormalization, BiasGelu). The model is loaded with eager attention for the same reason.
"""

from __future__ import annotations

import inspect
import logging
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgepipe.arch import Capability, spec_of, supported
from edgepipe.errors import ExportParityError, InputError

FUSION = Capability.FUSION

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportSpec:
    """What is exported for a task: inputs, outputs and their named dynamic axes."""

    input_names: tuple[str, ...]
    output_names: tuple[str, ...] = ("logits",)
    dynamic_axes: dict[str, dict[int, str]] = field(default_factory=dict)
    positional: bool = False  # modules take their tensor positionally; transformers take keywords

    def call(self, model: Any, inputs: dict[str, np.ndarray]) -> Any:
        """The model's logits for numpy inputs, called the way the model expects."""
        import torch

        tensors = {n: torch.from_numpy(inputs[n]) for n in self.input_names}
        output = model(*tensors.values()) if self.positional else model(**tensors)
        return output.logits if hasattr(output, "logits") else output


Feeds = Callable[[int, int], dict[str, np.ndarray]]


def spec_for(model: Any, task: str) -> ExportSpec:
    if task == "image-classification":
        return ExportSpec(
            input_names=("pixel_values",),
            dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}},
            positional=True,
        )
    if task not in ("text-classification", "token-classification"):
        raise InputError(f"`task`: export supports text-, token- and image-classification, got {task!r}")
    forward_args = inspect.signature(model.forward).parameters
    # a model without token types (DeBERTa-v2/v3: type_vocab_size 0) ignores them: the export drops the input
    names: tuple[str, ...] = ("input_ids", "attention_mask", "token_type_ids")
    if getattr(model.config, "type_vocab_size", None) == 0:
        names = names[:2]
    inputs = tuple(n for n in names if n in forward_args)
    axes = {name: {0: "batch", 1: "sequence"} for name in inputs}
    axes["logits"] = {0: "batch", 1: "sequence"} if task == "token-classification" else {0: "batch"}
    return ExportSpec(input_names=inputs, dynamic_axes=axes)


def load_for_export(model_dir: Path) -> Any:
    from edgepipe.runtime.text import load_text_model

    model = load_text_model(model_dir, attn_implementation="eager")
    model.config.use_cache = False  # a decoder's classifier would otherwise return its KV cache as well
    return model


def text_feeds(tokenizer: Any, texts: list[str], names: tuple[str, ...]) -> Feeds:
    """Real sentences tokenized to exactly (batch, seq_len): padding and truncation both exercised."""

    def feeds(batch: int, seq_len: int) -> dict[str, np.ndarray]:
        chosen = [texts[i % len(texts)] for i in range(batch)]
        encoded = tokenizer(chosen, padding="max_length", truncation=True, max_length=seq_len, return_tensors="np")
        return {n: np.asarray(encoded[n], dtype=np.int64) for n in names}

    return feeds


def image_feeds(images: np.ndarray) -> Feeds:
    """Real images, repeated to fill the batch; seq_len does not apply."""

    def feeds(batch: int, seq_len: int) -> dict[str, np.ndarray]:
        return {"pixel_values": np.ascontiguousarray(images[np.arange(batch) % len(images)], dtype=np.float32)}

    return feeds


# Above this many bytes of weights a model is written with its tensors in `model.onnx.data` beside it: one
# protobuf file cannot exceed 2 GiB. Below it, one self-contained file (what ORT Mobile and most tools expect).
EXTERNAL_DATA_BYTES = 1_800_000_000


def weight_bytes(model: Any) -> int:
    """Bytes of a ModelProto's initializers, counted without serializing it (which fails past 2 GiB)."""
    import numpy as np
    from onnx import helper

    total = 0
    for tensor in model.graph.initializer:
        count = int(np.prod(tensor.dims)) if tensor.dims else 1
        total += count * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return total


def needs_external_data(path: Path) -> bool:
    """Whether the model at `path` is (or, written again, must be) stored with external data."""
    import onnx

    return (path.parent / f"{path.name}.data").exists() or weight_bytes(
        onnx.load(str(path), load_external_data=False)
    ) > EXTERNAL_DATA_BYTES


def save_onnx(model: Any, path: Path) -> None:
    """Write a ModelProto to `path`: one file, or past EXTERNAL_DATA_BYTES its tensors in `path.data`."""
    import onnx

    (path.parent / f"{path.name}.data").unlink(missing_ok=True)  # save appends to an existing data file
    if weight_bytes(model) <= EXTERNAL_DATA_BYTES:
        onnx.save_model(model, str(path))
        return
    onnx.save_model(
        model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=f"{path.name}.data"
    )


def export_onnx(
    model: Any, feeds: Feeds, out_path: Path, *, opset: int, shape: tuple[int, int], spec: ExportSpec
) -> None:
    import onnx
    import torch

    example = feeds(*shape)
    tensors = {n: torch.from_numpy(example[n]) for n in spec.input_names}
    args, kwargs = (tuple(tensors.values()), None) if spec.positional else ((), tensors)
    # torch writes a model past 2 GiB as one file per tensor: exported apart, then saved as model.onnx
    # (+ model.onnx.data past EXTERNAL_DATA_BYTES)
    scratch = out_path.parent / f".{out_path.name}.export"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    # The tracer warns about Python control flow in transformers' mask helpers; parity checks the result.
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                args,
                str(scratch / out_path.name),
                input_names=list(spec.input_names),
                output_names=list(spec.output_names),
                dynamic_axes=spec.dynamic_axes,
                opset_version=opset,
                kwargs=kwargs,
                do_constant_folding=True,
                dynamo=False,
            )
        save_onnx(onnx.load(str(scratch / out_path.name)), out_path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    onnx.checker.check_model(str(out_path), full_check=True)


@dataclass(frozen=True)
class ParityResult:
    batch: int
    seq_len: int
    output: str
    max_abs_diff: float
    argmax_agreement: float


def check_parity(
    model: Any,
    onnx_path: Path,
    feeds: Feeds,
    shapes: list[tuple[int, int]],
    atol: float,
    spec: ExportSpec,
) -> list[ParityResult]:
    """Compare ORT with PyTorch on each (batch, seq_len); raise `ExportParityError` over `atol`."""
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    results = []
    for batch, seq_len in shapes:
        inputs = feeds(batch, seq_len)
        with torch.no_grad():
            expected = spec.call(model, inputs).numpy()
        got = session.run(None, inputs)[0]
        if got.shape != expected.shape:
            raise ExportParityError(
                f"{onnx_path.name}: output `logits` has shape {got.shape} at "
                f"(batch={batch}, seq_len={seq_len}), PyTorch gives {expected.shape}; "
                "the dynamic axes are wrong"
            )
        diff = float(np.abs(got - expected).max())
        agree = float((got.argmax(-1) == expected.argmax(-1)).mean())
        results.append(ParityResult(batch, seq_len, "logits", diff, agree))
        if diff > atol:
            raise ExportParityError(
                f"{onnx_path.name}: output `logits` differs from PyTorch by {diff:.3g} (max abs) at "
                f"(batch={batch}, seq_len={seq_len}), over parity_atol={atol:g}; check the opset or raise "
                f"`parity_atol` if the difference is expected"
            )
    return results


def fuse_transformer(
    onnx_path: Path, out_path: Path, config: Any, attention: str = "Attention", embed_layer_norm: bool = True
) -> dict[str, int] | None:
    """Fuse attention/layernorm/gelu with onnxruntime's transformer optimizer.

    `attention`: "Attention" packs Q/K/V and the attention core into one node (what dynamic int8 turns
    into QAttention); "MultiHeadAttention" leaves the Q/K/V projections as MatMuls, which static QDQ
    quantizes, and fuses only the attention core. Residual Add + LayerNormalization stay unfused:
    onnxruntime's CPU SkipLayerNormalization kernel is the slow one (`runtime.backends`), and the CUDA
    provider fuses the pair itself when a session is created. `embed_layer_norm=False` keeps the embedding
    Gather + LayerNormalization unfused.
    Returns the fused-operator counts, or None when the architecture is not supported.
    """
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    arch = spec_of(config)
    model_type = arch.fusion if arch is not None else None
    if model_type is None:
        log.info("no transformer fusion for model_type %s (supported: %s)", config.model_type, supported(FUSION))
        return None
    options = FusionOptions(model_type)
    options.use_multi_head_attention = attention == "MultiHeadAttention"
    options.enable_skip_layer_norm = options.enable_bias_skip_layer_norm = False
    # EmbedLayerNormalization hides the word-embedding Gather inside an op no quantizer reaches; left unfused,
    # the static path can store the table in int8 (the largest tensor of a small encoder)
    options.enable_embed_layer_norm = embed_layer_norm
    # a pruned BERT's layers differ in heads: 0 lets the optimizer read each layer's from its Reshape
    pruned = hasattr(config, "layer_heads")
    optimized = optimize_model(
        str(onnx_path),
        model_type=model_type,
        num_heads=0 if pruned else config.num_attention_heads,
        hidden_size=0 if pruned else config.hidden_size,
        optimization_options=options,
    )
    large = weight_bytes(optimized.model) > EXTERNAL_DATA_BYTES
    optimized.save_model_to_file(str(out_path), use_external_data_format=large, all_tensors_to_one_file=True)
    stats = optimized.get_fused_operator_statistics()
    return {k: int(v) for k, v in stats.items() if v}
