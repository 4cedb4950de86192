"""Recipe schema v1 (pydantic) and loading: YAML -> validated, frozen `Recipe`.

Nothing here imports torch: `edgepipe validate` must answer in well under a second.
"""

from __future__ import annotations

import codecs
import enum
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edgepipe.errors import InputError, RecipeError
from edgepipe.files import read_text
from edgepipe.tasks import Task

SCHEMA_VERSION = 1


class ArtifactKind(str, enum.Enum):
    """What a stage consumes and produces; the runner checks the chain before running anything."""

    TORCH_MODEL = "torch-model"  # a transformers folder, or a module folder (runtime/modules.py)
    ONNX_FP32 = "onnx-fp32"
    ONNX_FP32_FUSED = "onnx-fp32-fused"
    ONNX_INT8 = "onnx-int8"
    ONNX_FP16 = "onnx-fp16"  # float16 weights and activations, inputs and outputs kept as they were
    ORT_MOBILE = "ort-mobile"  # the ORT format (model.ort) of an ONNX artifact, for ONNX Runtime Mobile
    OPENVINO_IR = "openvino-ir"  # OpenVINO's model.xml/.bin of an ONNX artifact

    @classmethod
    def _missing_(cls, value: object) -> ArtifactKind | None:
        return cls.TORCH_MODEL if value == "hf-model" else None  # manifests written before image models


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _positive_seq_len(value: int) -> int:
    if value <= 0:
        raise ValueError("sequence length must be > 0")
    return value


class DataConfig(_Strict):
    source: str = Field(
        "rotten-tomatoes",
        description="built-in dataset name, a .csv/.jsonl file (text) or an .npz file with `images` and `labels`",
    )
    text_column: str = "text"
    label_column: str = "label"
    val_fraction: float = Field(0.1, gt=0, lt=0.5)
    test_fraction: float = Field(0.1, gt=0, lt=0.5)
    calibration_size: int = Field(256, ge=1, description="examples held out for int8 calibration")
    max_examples: int | None = Field(None, ge=20, description="subsample after deduplication (tests)")
    encoding: str | None = Field(None, description="text encoding of a CSV/JSONL/BIO file (default UTF-8)")
    layout: Literal["nchw", "nhwc"] = Field("nchw", description="axis order of an .npz file's 4-d `images`")

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                codecs.lookup(value)
            except LookupError:
                raise ValueError(f"unknown encoding {value!r}; e.g. utf-8, cp1252, latin-1, utf-16") from None
        return value


Autocast = Annotated[
    Literal["none", "bf16", "auto"],
    Field(
        description="bf16: the training forward passes in bfloat16 (torch.autocast) over fp32 weights; auto: bf16 "
        "where the device computes it natively (AVX512-BF16 or AMX CPUs, CUDA), fp32 elsewhere"
    ),
]


class _TrainingConfig(_Strict):
    """Budget and optimizer settings shared by the training stages; torch-model in, torch-model out."""

    max_steps: int = Field(400, ge=1)
    batch_size: int = Field(32, ge=1)
    max_seq_len: int = Field(64, description="tokens per training example (text tasks)")
    lr: float = Field(5e-5, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    eval_batch_size: int = Field(64, ge=1)
    group_by_length: bool = Field(False, description="batches of texts of similar length: less padding")
    autocast: Autocast = "none"
    seed: int | None = Field(
        None,
        description="this stage's training seed (batch order, dropout, init); default: the recipe's seed, "
        "which also draws the data split",
    )

    _check_len = field_validator("max_seq_len")(_positive_seq_len)

    def consumes(self) -> tuple[ArtifactKind, ...]:
        return (ArtifactKind.TORCH_MODEL,)

    def produces(self) -> tuple[ArtifactKind, ...]:
        return (ArtifactKind.TORCH_MODEL,)


class FinetuneConfig(_TrainingConfig):
    kind: Literal["finetune"]
    max_steps: int = Field(300, ge=1)
    train_encoder: bool = Field(True, description="false trains only the task head")


class StudentConfig(_Strict):
    init: Literal["subset", "fresh", "folder"] = Field(
        "subset", description="subset: keep teacher layers (weights copied); fresh: narrower config; folder"
    )
    layers: list[int] | None = Field(None, min_length=1, description="teacher layers to keep (subset)")
    num_layers: int | None = Field(None, ge=1, description="evenly spaced subset, or the depth of a fresh student")
    hidden_size: int | None = Field(None, ge=8)
    num_heads: int | None = Field(None, ge=1)
    intermediate_size: int | None = Field(None, ge=8)
    init_from: str | None = Field(None, description="folder of a student to start from (init: folder)")
    model: str | None = Field(None, description="image students (init: fresh): built-in CNN or package.module:factory")
    model_args: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of that factory")

    @model_validator(mode="after")
    def _consistent(self) -> StudentConfig:
        if self.layers is not None and self.num_layers is not None:
            raise ValueError("give either layers or num_layers, not both")
        if self.layers is not None and self.init != "subset":
            raise ValueError("layers applies to init: subset; use num_layers for a fresh student")
        if self.layers is not None and sorted(set(self.layers)) != self.layers:
            raise ValueError(f"layers must be increasing and distinct, got {self.layers}")
        if self.init == "subset" and self.layers is None and self.num_layers is None:
            raise ValueError("a subset student needs layers: [...] or num_layers: N")
        if (self.init == "folder") != (self.init_from is not None):
            raise ValueError("init_from is required with init: folder, and only there")
        if self.model is not None and self.init != "fresh":
            raise ValueError("model applies to init: fresh (a new image student of that architecture)")
        return self


class LossWeights(_Strict):
    """The seed's formula lambda * KD + (1 - lambda) * CE + beta * hidden is {kd: lambda, ce: 1 - lambda,
    hidden: beta}."""

    ce: float = Field(0.5, ge=0)
    kd: float = Field(0.5, ge=0)
    hidden: float = Field(0.0, ge=0)
    attention: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _some(self) -> LossWeights:
        if self.ce + self.kd + self.hidden + self.attention == 0:
            raise ValueError("every loss weight is 0; give at least one of ce, kd, hidden, attention")
        return self


class TransferConfig(_Strict):
    """Unlabeled texts on which the student also matches the teacher (a KD transfer set): the teacher's
    outputs on text it was not trained on carry more than its near one-hot outputs on its own train set."""

    source: str = Field(
        description="built-in text dataset name, a .csv/.jsonl file (keep your test texts out), or `train`: the "
        "train split's own texts, worth it with `mask`/`ngram` augmentation"
    )
    text_column: str = "text"
    weight: float = Field(1.0, gt=0, description="multiplies the transfer batch's kd (and hidden) loss terms")
    mask: float = Field(0.0, ge=0, lt=1, description="each word becomes the mask token with this probability")
    ngram: float = Field(
        0.0, ge=0, le=1, description="with this probability a text is cut to one of its n-grams, n in 1..5"
    )


class DistillConfig(_TrainingConfig):
    kind: Literal["distill"]
    name: str = Field("student", pattern=r"^[A-Za-z0-9_.-]+$")
    student: StudentConfig
    loss: LossWeights = Field(default_factory=LossWeights)
    temperature: float = Field(2.0, gt=0, description="softmax temperature of the KD term")
    adaptive: Literal["none", "anneal", "wsl"] = Field(
        "none", description="anneal: temperature -> 1 over training; wsl: per-sample KD weights"
    )
    layer_map: dict[int, int] | None = Field(None, description="student layer -> teacher layer (hidden loss)")
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = Field(
        "forward_kl",
        description="causal-lm: the next-token divergence distilled (forward KL, reverse KL as in MiniLLM, or JSD)",
    )
    hidden_projection: bool = Field(True, description="learn a linear map when widths differ")
    transfer: TransferConfig | None = Field(
        None, description="text tasks: a batch of unlabeled texts per step, KD (and hidden) terms only"
    )
    lr: float = Field(1e-4, gt=0)
    device: Literal["cpu", "cuda"] = Field(
        "cpu", description="causal-lm: where the distillation runs; the student comes back to the CPU"
    )


class RecoverConfig(_Strict):
    """Fine-tuning after pruning with KD from the unpruned model (the distill stage's logit objective)."""

    max_steps: int = Field(200, ge=1, description="steps per pruning iteration")
    batch_size: int = Field(32, ge=1)
    lr: float = Field(5e-5, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    group_by_length: bool = Field(False, description="batches of texts of similar length: less padding")
    autocast: Autocast = "none"
    temperature: float = Field(2.0, gt=0)
    adaptive: Literal["none", "anneal", "wsl"] = "none"
    loss: LossWeights = Field(default_factory=LossWeights)


class PruneConfig(_Strict):
    """Structured pruning: attention heads, FFN neurons and whole layers of a BERT-family text model;
    conv channels of an image model. Every knob removes whole rows/columns, so shapes really shrink."""

    kind: Literal["prune"]
    ratio: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="fraction of the prunable parameters removed (text: heads and FFN neurons each by this "
        "ratio, so encoder-layer params and FLOPs drop by it; image: conv channels, searched to hit it)",
    )
    head_ratio: float | None = Field(
        None, gt=0, lt=1, description="fraction of all attention heads removed, ranked across layers"
    )
    ffn_ratio: float | None = Field(None, gt=0, lt=1, description="fraction of each layer's FFN neurons removed")
    heads: dict[int, list[int]] | None = Field(None, description="heads removed per layer, e.g. {0: [1, 5]}")
    drop_layers: list[int] = Field(default_factory=list, description="encoder layers removed whole")
    importance: Literal["magnitude", "taylor"] = Field(
        "taylor", description="magnitude: weight norms; taylor: |w * dL/dw| summed over train batches"
    )
    round_to: int = Field(8, ge=1, description="kept width is a multiple of this (odd widths run slowly)")
    samples: int = Field(256, ge=8, description="train examples for the taylor importance")
    batch_size: int = Field(32, ge=1)
    max_seq_len: int = Field(64, description="tokens per example for the taylor importance")
    eval_batch_size: int = Field(64, ge=1)
    recover: RecoverConfig | None = Field(None, description="KD fine-tuning from the unpruned model after pruning")
    iterations: int = Field(1, ge=1, le=10, description="prune part of the way, recover, repeat")
    latency: bool = Field(True, description="measure ORT fp32 latency before and after (b1 and b8, s128)")
    seed: int | None = Field(None, description="importance batches and recovery; default: the recipe's seed")

    @model_validator(mode="after")
    def _knobs(self) -> PruneConfig:
        if not (self.ratio or self.head_ratio or self.ffn_ratio or self.heads or self.drop_layers):
            raise ValueError("nothing to prune: set ratio, or head_ratio / ffn_ratio / heads / drop_layers")
        if self.ratio is not None and (self.head_ratio or self.ffn_ratio or self.heads):
            raise ValueError("ratio sets every component; give either ratio or head_ratio/ffn_ratio/heads")
        if self.heads and self.head_ratio:
            raise ValueError("heads lists the heads to remove; give either heads or head_ratio")
        for layer, ids in (self.heads or {}).items():
            if layer < 0 or not ids or min(ids) < 0 or len(set(ids)) != len(ids):
                raise ValueError(f"heads.{layer}: {ids} must be distinct head indices >= 0 of a layer >= 0")
        if min(self.drop_layers, default=0) < 0 or len(set(self.drop_layers)) != len(self.drop_layers):
            raise ValueError(f"drop_layers: {self.drop_layers} must be distinct layer indices >= 0")
        if self.iterations > 1 and self.heads:
            raise ValueError("iterations prune a ratio part of the way at a time; explicit heads apply at once")
        return self

    @property
    def head_fraction(self) -> float | None:
        return self.ratio if self.ratio is not None else self.head_ratio

    @property
    def ffn_fraction(self) -> float | None:
        return self.ratio if self.ratio is not None else self.ffn_ratio

    _check_len = field_validator("max_seq_len")(_positive_seq_len)

    def consumes(self) -> tuple[ArtifactKind, ...]:
        return (ArtifactKind.TORCH_MODEL,)

    def produces(self) -> tuple[ArtifactKind, ...]:
        return (ArtifactKind.TORCH_MODEL,)


class VocabConfig(_Strict):
    """Vocabulary pruning of a WordPiece text model: keep the tokens the train split uses, so the
    word-embedding table (most of a small student's size) shrinks; the tokenizer is rewritten to match."""

    kind: Literal["vocab"]
    min_count: int = Field(1, ge=1, description="a token is kept when the train split uses it this many times")
    keep_chars: bool = Field(
        True,
        description="keep every single-character token (and its ## form): an unseen word then splits into "
        "characters instead of becoming [UNK]",
    )
    max_seq_len: int = Field(128, description="tokens per train text counted, as the model reads them")
    eval_batch_size: int = Field(64, ge=1)

    _check_len = field_validator("max_seq_len")(_positive_seq_len)

    def consumes(self) -> tuple[ArtifactKind, ...]:
        return (ArtifactKind.TORCH_MODEL,)

    def produces(self) -> tuple[ArtifactKind, ...]:
        return (ArtifactKind.TORCH_MODEL,)


class ExportConfig(_Strict):
    kind: Literal["export"]
    opset: int = Field(17, ge=17, le=21)
    export_shape: tuple[int, int] = Field((2, 16), description="(batch, seq_len) traced at export")
    parity_shapes: list[tuple[int, int]] = Field(
        default_factory=lambda: [(1, 7), (3, 45)], min_length=2, description="(batch, seq_len) checked"
    )
    parity_atol: float = Field(1e-4, gt=0)
    fuse: bool = Field(
        True,
        description="also write a fused fp32 model: onnxruntime's transformer fusion for encoders; for causal-lm "
        "(default off) onnxruntime-genai's GroupQueryAttention graph, which weight-only quantization then takes",
    )

    @model_validator(mode="after")
    def _shapes(self) -> ExportConfig:
        for batch, seq_len in [self.export_shape, *self.parity_shapes]:
            if batch <= 0 or seq_len <= 0:
                raise ValueError(f"shapes need batch > 0 and seq_len > 0, got ({batch}, {seq_len})")
        if len({s for s in self.parity_shapes if s != tuple(self.export_shape)}) < 2:
            raise ValueError("parity_shapes needs at least two shapes other than export_shape")
        return self

    def consumes(self) -> tuple[ArtifactKind, ...]:
        return (ArtifactKind.TORCH_MODEL,)

    def produces(self) -> tuple[ArtifactKind, ...]:
        if self.fuse:
            return (ArtifactKind.ONNX_FP32, ArtifactKind.ONNX_FP32_FUSED)
        return (ArtifactKind.ONNX_FP32,)


class CalibrationConfig(_Strict):
    method: Literal["minmax", "entropy", "percentile"] = "minmax"
    samples: int = Field(256, ge=1, description="taken from the calibration split")
    batch_size: int = Field(16, ge=1)
    max_seq_len: int = 128
    percentile: float = Field(99.999, gt=90, le=100)
    num_bins: int = Field(2048, ge=128, description="histogram bins for entropy/percentile")

    _check_len = field_validator("max_seq_len")(_positive_seq_len)


class WeightOnlyConfig(_Strict):
    """Weight-only MatMulNBits (causal-lm): onnxruntime's matmul_nbits_quantizer with its algorithms."""

    bits: Literal[4, 8] = 4
    algorithm: Literal["rtn", "hqq", "gptq", "k_quant"] = Field(
        "rtn", description="rtn (round to nearest), hqq (half-quadratic), gptq (calibrated), k_quant"
    )
    block_size: int = Field(32, ge=16, le=256, description="weights per scale, along the input dimension")
    symmetric: bool = Field(False, description="no zero points; asymmetric blocks fit skewed weights better")
    accuracy_level: Literal[0, 1, 2, 3, 4] = Field(
        4, description="MatMulNBits compute: 4 quantizes activations to int8 (int8 dot products), 0 lets ORT choose"
    )
    sensitive_8bit: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="fraction of the MatMuls kept at 8 bits (bits: 4): the most sensitive, by measured KL "
        "divergence on calibration text with each quantized alone (a mixed recipe like Q4_K_M)",
    )
    eight_bit: list[str] = Field(
        default_factory=list, description="MatMuls at 8 bits by name part (e.g. lm_head, down_proj), beside those"
    )
    head: bool = Field(True, description="quantize the LM head (the tied embedding's MatMul)")
    tied_table: bool = Field(
        True,
        description="with tied embeddings and an 8-bit head: the token lookup reads the head's 8-bit blocks "
        "(GatherBlockQuantized) and the float table leaves the file, as in llama.cpp's GGUF",
    )
    calibration_texts: int = Field(32, ge=1, description="train texts for GPTQ and the sensitivity measurement")

    @model_validator(mode="after")
    def _widths(self) -> WeightOnlyConfig:
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two (16-256), got {self.block_size}")
        if self.bits == 8 and (self.sensitive_8bit or self.eight_bit):
            raise ValueError("sensitive_8bit and eight_bit choose 8-bit MatMuls in a 4-bit model; set bits: 4")
        return self


WEIGHT_ONLY_MODES = ("int4", "weight-only")


class QuantizeConfig(_Strict):
    kind: Literal["quantize"]
    mode: Literal["dynamic", "static", "int4", "weight-only", "fp16"] = Field(
        description="dynamic/static int8; weight-only: MatMulNBits per `weights` (causal-lm; int4 is its 4-bit "
        "symmetric RTN); fp16: float16 weights and compute for GPUs, NPUs and ARM (numerically sensitive ops "
        "kept fp32, parity-gated)"
    )
    weights: WeightOnlyConfig | None = Field(None, description="mode: weight-only settings")
    source: Literal["fp32", "fp32-fused"] | None = Field(
        None,
        description="which fp32 export to quantize; default: fused for dynamic (plain for causal-lm, and where "
        "op_types has Gather: the stage fuses it without EmbedLayerNormalization) and weight-only, plain for static",
    )
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$", description="artifact name")
    per_channel: bool = True
    reduce_range: bool = False
    weight_type: Literal["int8", "uint8"] = "int8"
    activation_type: Literal["uint8", "int8"] = "uint8"
    op_types: list[str] | None = Field(None, description="op types to quantize; default per mode")
    nodes_to_exclude: list[str] = Field(default_factory=list)
    preprocess: bool = Field(True, description="onnxruntime quant_pre_process before static quantization")
    graph: Literal["fused-mha", "source"] | None = Field(
        None,
        description="static, transformers: quantize onnxruntime's MultiHeadAttention-fused graph (default; "
        "tensorrt preset: source) or the source export as is",
    )
    calibration: CalibrationConfig | None = None
    preset: Literal["auto", "ort-cpu-vnni", "ort-cpu-avx2", "ort-arm64", "tensorrt"] | None = Field(
        None, description="target preset filling the settings left unset (auto: from this CPU's flags)"
    )
    sensitivity: bool = Field(False, description="measure each quantizable node alone against fp32 (report table)")
    max_accuracy_drop: float | None = Field(
        None, gt=0, le=1, description="fall back the most sensitive nodes to float until the val drop is met"
    )
    eval_examples: int = Field(500, ge=10, description="val examples for sensitivity and fallback")
    embedding_bits: Literal[8, 4] = Field(
        8,
        description="dynamic, op_types Gather: the token-id tables in int8 (one scale) or 4 bits (onnxruntime's "
        "GatherBlockQuantized, symmetric, blocks of embedding_block_size along the hidden axis)",
    )
    embedding_block_size: Literal[16, 32, 64, 128, 256] = 64
    float16_tables: bool = Field(
        False, description="dynamic, op_types Gather: the tables left float (positions) stored in float16 + Cast"
    )

    @model_validator(mode="after")
    def _static_only_keys(self) -> QuantizeConfig:
        if self.mode == "dynamic" and self.calibration is not None:
            raise ValueError("calibration applies to mode: static only; remove it or set mode: static")
        if self.mode == "dynamic" and self.graph is not None:
            raise ValueError("graph applies to mode: static only; dynamic quantizes its `source` as is")
        if self.mode == "fp16" and (self.calibration or self.graph or self.sensitivity or self.max_accuracy_drop):
            raise ValueError("fp16 converts every float op; calibration, graph, sensitivity and fallback are int8 keys")
        if self.weights is not None and self.mode != "weight-only":
            raise ValueError(f"weights applies to mode: weight-only, not {self.mode}; remove it or set the mode")
        small_tables = self.embedding_bits != 8 or self.float16_tables
        if small_tables and not (self.mode == "dynamic" and self._gather):
            raise ValueError(
                "embedding_bits and float16_tables apply to mode: dynamic with Gather in op_types (static QDQ has "
                "no 4-bit Gather); add Gather to op_types or remove them"
            )
        if self.mode == "dynamic" and self._gather and self.source == "fp32-fused":
            raise ValueError(
                "op_types Gather with source fp32-fused: the fused export hides the embedding table's Gather in "
                "EmbedLayerNormalization; leave source unset (the stage fuses the plain export without it)"
            )
        return self

    @property
    def _gather(self) -> bool:
        return "Gather" in (self.op_types or [])

    @property
    def source_kind(self) -> ArtifactKind:
        fused_default = self.mode == "dynamic" and not self._gather  # a Gather to quantize: fused here without ELN
        source = self.source or ("fp32-fused" if fused_default else "fp32")
        return ArtifactKind.ONNX_FP32_FUSED if source == "fp32-fused" else ArtifactKind.ONNX_FP32

    @property
    def artifact_name(self) -> str:
        if self.name or self.mode in ("int4", "fp16"):
            return self.name or self.mode
        if self.mode == "weight-only":
            weights = self.weights or WeightOnlyConfig()
            return f"w{weights.bits}-{weights.algorithm.replace('_', '')}" + (
                "-mixed" if weights.sensitive_8bit else ""
            )
        return f"int8-{self.mode}"

    def consumes(self) -> tuple[ArtifactKind, ...]:
        if self.mode == "weight-only" and self.weights is not None and self.weights.sensitive_8bit:
            return (self.source_kind, ArtifactKind.TORCH_MODEL)  # sensitivity is measured in PyTorch
        return (self.source_kind,)

    def produces(self) -> tuple[ArtifactKind, ...]:
        return (ArtifactKind.ONNX_FP16 if self.mode == "fp16" else ArtifactKind.ONNX_INT8,)


MOBILE_SOURCES = {
    "fp32": ArtifactKind.ONNX_FP32,
    "fp32-fused": ArtifactKind.ONNX_FP32_FUSED,
    "int8": ArtifactKind.ONNX_INT8,
    "fp16": ArtifactKind.ONNX_FP16,
}


class MobileConfig(_Strict):
    """Convert an ONNX artifact to the ORT format for ONNX Runtime Mobile (with the reduced-build op config),
    or to OpenVINO's IR."""

    kind: Literal["mobile"]
    source: Literal["fp32", "fp32-fused", "int8", "fp16"] = Field(
        "int8", description="which ONNX artifact to convert (int8: the last quantize stage's)"
    )
    format: Literal["ort", "openvino-ir"] = Field(
        "ort", description="ort: model.ort for ONNX Runtime Mobile; openvino-ir: model.xml/.bin for OpenVINO"
    )
    optimization: Literal["basic", "extended"] = Field(
        "extended", description="graph optimizations baked in (not `all`: its x86 layout kernels do not exist on ARM)"
    )
    target_platform: Literal["arm", "amd64"] = Field("arm", description="where the model will run")
    parity_atol: float = Field(1e-4, gt=0, description="max abs logit difference against the source model")

    def consumes(self) -> tuple[ArtifactKind, ...]:
        return (MOBILE_SOURCES[self.source],)

    def produces(self) -> tuple[ArtifactKind, ...]:
        return (ArtifactKind.OPENVINO_IR if self.format == "openvino-ir" else ArtifactKind.ORT_MOBILE,)


StageConfig = Annotated[
    FinetuneConfig | DistillConfig | PruneConfig | VocabConfig | ExportConfig | QuantizeConfig | MobileConfig,
    Field(discriminator="kind"),
]


class BenchConfig(_Strict):
    targets: list[Literal["cpu", "cuda"]] = Field(default=["cpu"], min_length=1)
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 8], min_length=1)
    seq_lens: list[int] | None = Field(
        None, min_length=1, description="text: sequence lengths timed (default [128]); images use their own size"
    )
    runs: int = Field(50, ge=5, description="timed runs per artifact and shape")
    rounds: int = Field(5, ge=1, description="artifacts are interleaved over this many rounds")
    warmup_runs: int = Field(5, ge=0)
    warmup_s: float = Field(0.5, ge=0, description="keep warming up until this much time has passed")
    threads: int | None = Field(None, ge=1, description="intra-op threads; default: physical cores")
    denormal_as_zero: bool = Field(True, description="ORT session.set_denormal_as_zero (see README)")
    graph_optimization: Literal["all", "extended", "basic", "disable"] = Field(
        "all", description="ORT graph optimization level of every ONNX session"
    )
    eval_batch_size: int = Field(32, ge=1)
    eval_max_seq_len: int = 128
    eval_max_examples: int | None = Field(None, ge=1)
    cv_warn: float = Field(0.15, gt=0, description="warn when std/mean of a latency exceeds this")
    include_torch: bool = Field(True, description="also measure the PyTorch fp32 model")
    engines: list[str] | None = Field(
        None,
        description="backends every artifact runs on where its format fits (`edgepipe engines` lists them); "
        "default: the first available per format and target. Unavailable ones are skipped with the reason",
    )
    profile: bool = Field(False, description="ORT per-op-type kernel time of each ONNX artifact (first shape)")
    new_tokens: int = Field(32, ge=1, description="causal-lm: tokens generated per timed run (seq_lens: prompts)")

    _check_len = field_validator("eval_max_seq_len")(_positive_seq_len)

    @field_validator("batch_sizes", "seq_lens")
    @classmethod
    def _positive(cls, values: list[int] | None) -> list[int] | None:
        bad = [v for v in values or [] if v <= 0]
        if bad:
            raise ValueError(f"every value must be > 0, got {bad}")
        return values


Int8Choice = Literal["none", "dynamic", "static"]
INT8_CHOICES: tuple[Int8Choice, ...] = ("none", "dynamic", "static")


class SearchConfig(_Strict):
    """The knobs `edgepipe search` explores and how it measures each candidate."""

    student_layers: list[int] = Field(
        default_factory=list, description="depths tried for the recipe's distill stage (student.num_layers)"
    )
    prune_ratios: list[float] = Field(
        default_factory=list,
        description="ratios tried for the recipe's prune stage (0: no pruning), e.g. [0, 0.3, 0.5]",
    )
    presets: list[Literal["ort-cpu-vnni", "ort-cpu-avx2", "ort-arm64", "tensorrt"]] = Field(
        default_factory=list, description="int8 presets tried for the static quantize stage"
    )
    fallback_drops: list[float] = Field(
        default_factory=list,
        description="max_accuracy_drop values tried for the static quantize stage (sensitive nodes go float)",
    )
    int8: list[Int8Choice] = Field(
        default_factory=lambda: list(INT8_CHOICES),
        description="which artifact of each build is a candidate: fp32 (none) or the int8 models",
    )
    batch_size: int = Field(1, ge=1)
    seq_len: int = Field(128, ge=1, description="text: tokens per example timed (images use their size)")
    runs: int = Field(30, ge=5, description="timed runs per candidate; the budget applies to their p90")
    eval_examples: int | None = Field(None, ge=10, description="val examples for accuracy (default all)")

    @field_validator("student_layers")
    @classmethod
    def _depths(cls, values: list[int]) -> list[int]:
        if any(v < 1 for v in values) or len(set(values)) != len(values):
            raise ValueError(f"depths must be distinct and >= 1, got {values}")
        return values

    @field_validator("prune_ratios", "fallback_drops")
    @classmethod
    def _ratios(cls, values: list[float]) -> list[float]:
        if any(not 0 <= v < 1 for v in values) or len(set(values)) != len(values):
            raise ValueError(f"values must be distinct and in [0, 1), got {values}")
        return values


class GatesConfig(_Strict):
    max_accuracy_drop: float | None = Field(
        None, ge=0, le=1, description="largest allowed accuracy drop (0.01 = 1 point) of the gated artifacts"
    )
    artifacts: list[str] | None = Field(None, description="artifacts the gate applies to; default all")
    min_argmax_agreement: float | None = Field(
        None, ge=0, le=1, description="every engine's predictions vs the fp32 ONNX reference's, same inputs"
    )
    max_abs_diff: float | None = Field(
        None, gt=0, description="largest logit difference of an fp32 engine from the fp32 ONNX reference"
    )
    max_perplexity_increase: float | None = Field(
        None, gt=0, description="causal-lm: largest relative perplexity increase over the teacher (0.15 = 15%)"
    )
    max_kl_divergence: float | None = Field(
        None, gt=0, description="causal-lm: largest mean KL divergence from the teacher, nats per token (0.01)"
    )


class Recipe(_Strict):
    schema_version: Literal[1]
    name: str = Field("run", pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = 0
    model: str = Field(
        description="built-in model name, a local transformers or edgepipe module folder, or package.module:factory"
    )
    model_args: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of a module factory")
    model_weights: str | None = Field(None, description="safetensors weights for a built-in CNN or a factory")
    task: Literal["text-classification", "token-classification", "image-classification", "causal-lm"] = (
        "text-classification"
    )
    data: DataConfig = Field(default_factory=DataConfig)
    stages: list[StageConfig] = Field(min_length=1)
    bench: BenchConfig = Field(default_factory=BenchConfig)
    gates: GatesConfig = Field(default_factory=GatesConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)

    @model_validator(mode="after")
    def _dynamic_source(self) -> Recipe:
        # dynamic int8 defaults to the fused export; without one (fuse: false, image models) to the plain one
        fused = False
        for i, stage in enumerate(self.stages):
            if isinstance(stage, ExportConfig) and self.task == LM_TASK and "fuse" not in stage.model_fields_set:
                # a causal LM's fused graph comes from onnxruntime-genai's builder: only when asked for
                self.stages[i] = stage = stage.model_copy(update={"fuse": False})
            if isinstance(stage, QuantizeConfig) and stage.mode in WEIGHT_ONLY_MODES and stage.source is None:
                self.stages[i] = stage.model_copy(update={"source": "fp32-fused" if fused else "fp32"})
            if isinstance(stage, ExportConfig):
                fused = stage.fuse
            elif (
                isinstance(stage, QuantizeConfig)
                and stage.source is None
                and stage.mode == "dynamic"
                and (not fused or self.task == LM_TASK)  # a causal LM's dynamic int8 is measured on the plain graph
            ):
                self.stages[i] = stage.model_copy(update={"source": "fp32"})
        return self

    @model_validator(mode="after")
    def _unique_artifact_names(self) -> Recipe:
        names = [s.artifact_name for s in self.stages if isinstance(s, QuantizeConfig)]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"two quantize stages produce the same artifact name {dupes}; set `name:` on one")
        return self


STAGE_KINDS = ("finetune", "distill", "prune", "export", "quantize", "mobile")
IMAGE_TASK, TOKEN_TASK, LM_TASK = Task.IMAGE.value, Task.TOKEN.value, Task.LM.value


def _lm_problems(recipe: Recipe) -> list[str]:
    """What a causal-lm recipe cannot do (yet), each naming its key."""
    problems = []
    for i, stage in enumerate(recipe.stages):
        if isinstance(stage, QuantizeConfig) and stage.mode in ("static", "fp16"):
            problems.append(
                f"`stages.{i}.mode`: causal-lm quantizes `weight-only` (MatMulNBits), `int4` or `dynamic` (int8)"
            )
        if isinstance(stage, QuantizeConfig) and (stage.sensitivity or stage.max_accuracy_drop):
            problems.append(f"`stages.{i}`: sensitivity and max_accuracy_drop apply to classifiers; remove them")
        if isinstance(stage, DistillConfig):
            if stage.loss.hidden or stage.loss.attention:
                problems.append(
                    f"`stages.{i}.loss`: causal-lm distills next-token distributions; set hidden/attention 0"
                )
            if stage.student.init != "subset":
                problems.append(f"`stages.{i}.student.init`: a causal-lm student is a layer `subset` of the teacher")
            if stage.transfer is not None:
                problems.append(f"`stages.{i}.transfer`: causal-lm distills on its own text; remove it")

    if recipe.gates.max_accuracy_drop is not None:
        problems.append(
            "`gates.max_accuracy_drop`: causal-lm is gated on perplexity: use gates.max_perplexity_increase"
        )
    return problems


def task_problems(recipe: Recipe) -> list[str]:
    """Settings that do not apply to the recipe's task, each naming its key."""
    if recipe.task == LM_TASK:
        return _lm_problems(recipe)
    problems = []
    image = recipe.task == IMAGE_TASK
    for i, stage in enumerate(recipe.stages):
        if image and isinstance(stage, ExportConfig) and stage.fuse:
            problems.append(f"`stages.{i}.fuse`: transformer fusion applies to text models; set fuse: false")
        if image and isinstance(stage, PruneConfig):
            for key in ("head_ratio", "ffn_ratio", "heads", "drop_layers"):
                if getattr(stage, key):
                    problems.append(
                        f"`stages.{i}.{key}`: applies to transformers; an image model is pruned by conv "
                        "channels: use `ratio`"
                    )
        if isinstance(stage, QuantizeConfig) and stage.mode in WEIGHT_ONLY_MODES:
            problems.append(
                f"`stages.{i}.mode`: int4 (weight-only MatMulNBits) applies to causal-lm; use dynamic/static"
            )
        if isinstance(stage, DistillConfig) and stage.divergence != "forward_kl":
            problems.append(f"`stages.{i}.divergence`: applies to causal-lm; classifiers distill with forward KL")
        if recipe.task == TOKEN_TASK and isinstance(stage, QuantizeConfig):
            for key in ("sensitivity", "max_accuracy_drop"):
                if getattr(stage, key):
                    problems.append(
                        f"`stages.{i}.{key}`: per-node sensitivity and float fallback measure sentence-level "
                        "accuracy; remove it for token-classification (gate int8 with gates.max_accuracy_drop)"
                    )
        if image and isinstance(stage, FinetuneConfig) and not stage.train_encoder:
            problems.append(f"`stages.{i}.train_encoder`: applies to text models; image models train whole")
        if isinstance(stage, DistillConfig):
            if image and stage.transfer is not None:
                problems.append(f"`stages.{i}.transfer`: a transfer set of texts applies to text tasks; remove it")
            if image and stage.loss.attention > 0:
                problems.append(f"`stages.{i}.loss.attention`: attention maps exist in transformers only; set it to 0")
            if image and stage.student.init == "subset":
                problems.append(
                    f"`stages.{i}.student.init`: an image student is `fresh` (with `model:`, e.g. cnn-small) or "
                    "`folder`; a layer subset applies to transformers"
                )
            if not image and stage.student.model is not None:
                problems.append(
                    f"`stages.{i}.student.model`: applies to image-classification; text students are "
                    "shaped by layers, num_layers, hidden_size, num_heads, intermediate_size"
                )
    for key in ("max_perplexity_increase", "max_kl_divergence"):
        if getattr(recipe.gates, key) is not None:
            problems.append(f"`gates.{key}`: applies to causal-lm; use gates.max_accuracy_drop")
    if image and recipe.bench.seq_lens is not None:
        problems.append("`bench.seq_lens`: applies to text tasks; image models are timed at their input size")
    return problems


def _format_loc(loc: tuple[Any, ...]) -> str:
    # Drop the discriminator tag pydantic inserts after a list index (stages.0.finetune.lr -> stages.0.lr).
    parts: list[str] = []
    for i, item in enumerate(loc):
        if isinstance(item, str) and item in STAGE_KINDS and i > 0 and isinstance(loc[i - 1], int):
            continue
        parts.append(str(item))
    return ".".join(parts) or "(top level)"


def _problems(error: ValidationError) -> list[str]:
    problems = []
    for err in error.errors():
        key = _format_loc(err["loc"])
        if err["type"] == "extra_forbidden":
            problems.append(f"`{key}`: unknown key; remove it or check its spelling")
        elif err["type"] == "missing":
            problems.append(f"`{key}`: required key is missing")
        else:
            got = err.get("input")
            shown = "" if isinstance(got, dict | list) else f" (got {got!r})"
            message = err["msg"].removeprefix("Value error, ")
            problems.append(f"`{key}`: {message}{shown}")
    return problems


def parse_recipe(raw: Any, source: str = "recipe") -> Recipe:
    """Validate a raw mapping; every problem is reported at once in one `RecipeError`."""
    if not isinstance(raw, dict):
        raise RecipeError([f"the top level must be a mapping of keys, got {type(raw).__name__}"], source)
    try:
        return Recipe.model_validate(raw)
    except ValidationError as error:
        raise RecipeError(_problems(error), source) from None


def read_recipe_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise RecipeError([f"recipe file not found: {path}; pass the path of a YAML recipe"], str(path))
    try:
        raw = yaml.safe_load(read_text(path, "recipe"))
    except InputError as error:
        raise RecipeError([str(error)], str(path)) from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).replace("\n", " ")
        raise RecipeError([f"not valid YAML{where}: {problem}"], str(path)) from None
    if not isinstance(raw, dict):
        raise RecipeError(["the top level must be a mapping of keys"], str(path))
    return raw


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `--set a.b.0.c=VALUE` overrides (VALUE parsed as YAML) to a raw recipe mapping."""
    problems = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            problems.append(f"override {item!r}: expected KEY=VALUE, e.g. stages.0.max_steps=100")
            continue
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        node: Any = raw
        parts = key.split(".")
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            where = ".".join(parts[: depth + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    problems.append(f"override `{key}`: `{where}` is not an index of a {len(node)}-item list")
                    break
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    node = node.setdefault(part, {})
            else:
                problems.append(f"override `{key}`: `{where}` is inside a value, not a mapping")
                break
    if problems:
        raise RecipeError(problems, "--set")
    return raw


def load_recipe(path: Path, overrides: list[str] | None = None) -> Recipe:
    raw = apply_overrides(read_recipe_file(path), overrides or [])
    return parse_recipe(raw, str(path))


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


def default_recipe_path() -> Path:
    return Path(__file__).resolve().parent.parent / "recipes" / "default.yaml"
