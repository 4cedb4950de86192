"""Architecture specs: where each transformers family keeps what the structural stages change.

One `ArchSpec` per family (like Optimum's per-model export configs) says where the decoder/encoder
layers live, which projections make up attention and the FFN, the config.json keys of the shape, and
which onnxruntime fusion applies. Stages ask `spec_of(config)` and the helpers below; nothing else
in edgepipe compares `model_type`. A model without a spec still goes through every stage that needs
no structure (finetune, fresh-student KD, export, quantize, bench); structural stages name
`supported(capability)` when they refuse it.

This module imports no torch: `edgepipe validate` reads specs from config.json alone. The functions
that touch modules (`edgepipe.arch.ops`) import torch themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class Kind(str, Enum):
    ENCODER = "encoder"
    DECODER = "decoder"


class Capability(str, Enum):
    """What a structural stage needs of a family."""

    LAYER_SUBSET = "layer subset students"
    FFN_PRUNING = "FFN neuron pruning"
    LAYER_PRUNING = "layer pruning"
    HEAD_PRUNING = "attention head pruning"
    HIDDEN_PRUNING = "embedding channel pruning"
    QUERY_HEAD_PRUNING = "grouped-query head pruning"
    FUSION = "onnxruntime transformer fusion"


@dataclass(frozen=True)
class ConfigKeys:
    """config.json names of the shape (DistilBERT and GPT-2 use their own)."""

    layers: str = "num_hidden_layers"
    hidden: str = "hidden_size"
    heads: str = "num_attention_heads"
    ffn: str = "intermediate_size"


@dataclass(frozen=True)
class Ffn:
    """An FFN's neurons: output units of `up` (and `gate`), input units of `down` (paths inside a layer).

    `fused_glu`: `up` holds both halves of a gated unit, [up; gate] stacked (ModernBERT's Wi, Phi-3's
    gate_up_proj), so neuron j is rows j and j + width. `conv1d`: GPT-2's Conv1D, weight (in, out)."""

    up: str
    down: str
    gate: str | None = None
    fused_glu: bool = False
    conv1d: bool = False


@dataclass(frozen=True)
class Attention:
    """A layer's self-attention heads (paths inside a layer): the q/k/v projections' output units and the
    output projection's input units, `head_size` units per head.

    `module` is the attention module whose attributes the forward pass reads: `heads` (the head count,
    None where it is derived from the width), `size` (units per head), `width` (heads x size, where it
    is kept). `qkv`: one fused [q; k; v] projection instead of q/k/v (ModernBERT's Wqkv). `extra`: more
    projections of the same units where a model has them (DeBERTa's separate position projections)."""

    module: str
    out: str
    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: str | None = None
    heads: str | None = "num_attention_heads"
    size: str = "attention_head_size"
    width: str | None = "all_head_size"
    extra: tuple[str, ...] = ()


@dataclass(frozen=True)
class Residual:
    """The residual stream's channels (the hidden size, Minitron's "embedding channels"), paths inside a layer
    unless named otherwise: the projections that read it (input units), those that write it (output units),
    the norms over it, the attention module (its `head_dim` is kept), and, relative to `model.base_model`,
    the token embedding and the final norm. The LM head reads it too (the model's output embeddings, tied
    or not).

    Only pre-norm decoders whose norms are RMSNorms without a width-dependent constant are spec'd: dropping a
    channel then changes each norm's mean square only by what that channel held, which KD recovers."""

    reads: tuple[str, ...]
    writes: tuple[str, ...]
    norms: tuple[str, ...]
    attention: str = "self_attn"
    embedding: str = "embed_tokens"
    final_norm: str = "norm"


@dataclass(frozen=True)
class QueryHeads:
    """A decoder's grouped-query attention heads (paths inside a layer): the query projection's output units
    and the output projection's input units, `size` units per query head; the key/value heads stay. Query
    heads go in equal numbers from every key/value group, so each group keeps its place and every layer one
    head count (the config stays plain); `groups` (query heads per key/value head) follows."""

    module: str = "self_attn"
    q: str = "self_attn.q_proj"
    out: str = "self_attn.o_proj"
    size: str = "head_dim"
    groups: str = "num_key_value_groups"


@dataclass(frozen=True)
class ArchSpec:
    family: str
    model_types: tuple[str, ...]
    kind: Kind
    # the layer list, relative to `model.base_model` (None: ALBERT shares one layer's weights)
    layers: str | None
    ffn: Ffn | None = None
    keys: ConfigKeys = field(default_factory=ConfigKeys)
    # onnxruntime.transformers.optimizer model_type whose fusions match this family's exported graph
    fusion: str | None = None
    # the attention heads, where a head-pruned model saves (edgepipe.runtime.pruned_bert) and reloads
    attention: Attention | None = None
    # the family's layers repeat one shared set of weights: a shallower student keeps it, with fewer repeats
    shared_layers: bool = False
    # where the FFN weights live when not in `layers` (a pattern, `*` for every index)
    blocks: str | None = None
    # layer 0 is built differently (ModernBERT: no attention norm): a subset or a layer drop must keep it first
    first_layer_fixed: bool = False
    # the residual stream's channels, for embedding-channel (hidden size) pruning
    residual: Residual | None = None
    # a decoder's grouped-query attention, for query-head pruning (Minitron's heads)
    query_heads: QueryHeads | None = None

    def can(self, capability: Capability) -> bool:
        if capability in (Capability.LAYER_SUBSET, Capability.LAYER_PRUNING):
            return self.layers is not None or self.shared_layers  # ALBERT: fewer repeats of its shared layer
        if capability is Capability.FFN_PRUNING:
            return self.ffn is not None
        if capability is Capability.HEAD_PRUNING:
            return self.attention is not None and self.layers is not None
        if capability is Capability.HIDDEN_PRUNING:
            return self.residual is not None and self.layers is not None
        if capability is Capability.QUERY_HEAD_PRUNING:
            return self.query_heads is not None and self.layers is not None
        return self.fusion is not None

    def shape(self, config: dict[str, Any]) -> dict[str, int] | None:
        """(layers, hidden, heads, ffn) from config.json; None when it leaves any out (defaults apply)."""
        k = self.keys
        values = {name: config.get(key) for name, key in zip(SHAPE, (k.layers, k.hidden, k.heads, k.ffn), strict=True)}
        if values["ffn"] is None and self.family == "gpt2" and values["hidden"] is not None:
            values["ffn"] = 4 * int(values["hidden"])  # n_inner: null means 4 x n_embd
        if any(v is None for v in values.values()):
            return None
        return {name: int(v) for name, v in values.items() if v is not None}


SHAPE = ("layers", "hidden", "heads", "ffn")
_BERT_FFN = Ffn(up="intermediate.dense", down="output.dense")
_BERT_ATTENTION = Attention(
    module="attention.self",
    q="attention.self.query",
    k="attention.self.key",
    v="attention.self.value",
    out="attention.output.dense",
)
_LLAMA_FFN = Ffn(up="mlp.up_proj", gate="mlp.gate_proj", down="mlp.down_proj")
_LLAMA_RESIDUAL = Residual(
    reads=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"),
    writes=("self_attn.o_proj", "mlp.down_proj"),
    norms=("input_layernorm", "post_attention_layernorm"),
)

SPECS: tuple[ArchSpec, ...] = (
    # encoders
    ArchSpec("bert", ("bert",), Kind.ENCODER, "encoder.layer", _BERT_FFN, fusion="bert", attention=_BERT_ATTENTION),
    ArchSpec(
        "roberta",
        ("roberta", "xlm-roberta", "camembert"),
        Kind.ENCODER,
        "encoder.layer",
        _BERT_FFN,
        fusion="bert",
        attention=_BERT_ATTENTION,
    ),
    ArchSpec(
        "electra", ("electra",), Kind.ENCODER, "encoder.layer", _BERT_FFN, fusion="bert", attention=_BERT_ATTENTION
    ),
    ArchSpec(
        "distilbert",
        ("distilbert",),
        Kind.ENCODER,
        "transformer.layer",
        Ffn(up="ffn.lin1", down="ffn.lin2"),
        keys=ConfigKeys(layers="n_layers", hidden="dim", heads="n_heads", ffn="hidden_dim"),
        fusion="bert",
        attention=Attention(
            module="attention",
            q="attention.q_lin",
            k="attention.k_lin",
            v="attention.v_lin",
            out="attention.out_lin",
            heads="n_heads",
            width=None,
        ),
    ),
    ArchSpec(
        "albert",
        ("albert",),
        Kind.ENCODER,
        None,
        Ffn(up="ffn", down="ffn_output"),
        fusion="bert",
        shared_layers=True,
        blocks="encoder.albert_layer_groups.*.albert_layers.*",
    ),
    # no head pruning: MPNet's relative position bias is one table, per head, shared by every layer
    ArchSpec("mpnet", ("mpnet",), Kind.ENCODER, "encoder.layer", _BERT_FFN),
    ArchSpec(
        "deberta-v2",
        ("deberta-v2",),
        Kind.ENCODER,
        "encoder.layer",
        _BERT_FFN,
        attention=Attention(
            module="attention.self",
            q="attention.self.query_proj",
            k="attention.self.key_proj",
            v="attention.self.value_proj",
            out="attention.output.dense",
            extra=("attention.self.pos_key_proj", "attention.self.pos_query_proj"),
        ),
    ),
    ArchSpec(
        "modernbert",
        ("modernbert",),
        Kind.ENCODER,
        "layers",
        Ffn(up="mlp.Wi", down="mlp.Wo", fused_glu=True),
        first_layer_fixed=True,
        attention=Attention(module="attn", qkv="attn.Wqkv", out="attn.Wo", heads=None, size="head_dim", width=None),
    ),
    # decoders
    ArchSpec(
        "llama",
        ("llama", "mistral"),
        Kind.DECODER,
        "layers",
        _LLAMA_FFN,
        residual=_LLAMA_RESIDUAL,
        query_heads=QueryHeads(),
    ),
    # Qwen3's q_norm / k_norm run over head_dim, not the residual stream
    ArchSpec(
        "qwen2",
        ("qwen2", "qwen3"),
        Kind.DECODER,
        "layers",
        _LLAMA_FFN,
        residual=_LLAMA_RESIDUAL,
        query_heads=QueryHeads(),
    ),
    # no residual spec: Gemma scales its embeddings by sqrt(hidden_size) and adds (1 + w) norms after blocks
    ArchSpec("gemma", ("gemma", "gemma2", "gemma3_text"), Kind.DECODER, "layers", _LLAMA_FFN, query_heads=QueryHeads()),
    ArchSpec(
        "phi3", ("phi3",), Kind.DECODER, "layers", Ffn(up="mlp.gate_up_proj", down="mlp.down_proj", fused_glu=True)
    ),
    ArchSpec(
        "gpt2",
        ("gpt2",),
        Kind.DECODER,
        "h",
        Ffn(up="mlp.c_fc", down="mlp.c_proj", conv1d=True),
        keys=ConfigKeys(layers="n_layer", hidden="n_embd", heads="n_head", ffn="n_inner"),
    ),
)
BY_MODEL_TYPE = {model_type: spec for spec in SPECS for model_type in spec.model_types}


def spec_of(config: Any) -> ArchSpec | None:
    """The spec of a config (a transformers config object or config.json as a dict), or None."""
    model_type = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    return BY_MODEL_TYPE.get(str(model_type))


def supported(capability: Capability, kind: Kind | None = None) -> str:
    """The model_types that have `capability`, for error messages."""
    return ", ".join(t for s in SPECS if s.can(capability) and kind in (None, s.kind) for t in s.model_types)


def refusal(config: dict[str, Any], capability: Capability, key: str) -> str | None:
    """Why the model of `config` cannot do `capability` (naming the recipe key), or None."""
    spec = spec_of(config)
    if spec is not None and spec.can(capability):
        return None
    model_type = config.get("model_type")
    why = "has no architecture spec (edgepipe.arch)" if spec is None else f"({spec.family}) has no {capability.value}"
    return f"`{key}`: model_type {model_type!r} {why}; {capability.value} support: {supported(capability)}"
