"""An encoder whose layers keep different numbers of attention heads and FFN neurons: a pruned BERT (or
DistilBERT, DeBERTa-v2/v3, ModernBERT).

transformers 5 removed `prune_heads`/`pruned_heads` and derives every layer's head count from
`num_attention_heads`, so a head-pruned BERT does not fit `BertConfig`. This config records the
kept heads and FFN width per layer (`layer_heads`, `layer_ffn`; the head size stays
hidden_size / num_attention_heads) and the model resizes each layer's projections when it is built,
so `from_pretrained` loads the pruned safetensors as they are. BERT's layer layout (BERT, RoBERTa, XLM-R,
CamemBERT, ELECTRA) gets a self-attention that reshapes to its own head count (what ONNX Runtime's
fusion reads); the other families are resized through `pruned_layout`, the module paths the prune stage
writes into config.json from the family's architecture spec (this file cannot import edgepipe).

The config keeps its `model_type` (tokenizers, ONNX Runtime's optimizer and every tool that reads
config.json see the family) and names the family's pruned class in `auto_map`. The file imports only torch and
transformers because the prune stage copies it into every head-pruned model folder: there,
`AutoModelFor{Sequence,Token}Classification.from_pretrained(folder, trust_remote_code=True)` loads the model
without edgepipe installed. edgepipe itself loads such folders with this class directly
(`edgepipe.runtime.text.load_text_model`), so no code from a model folder ever runs.
"""

from __future__ import annotations

from typing import Any

import torch
import transformers
from torch import nn
from transformers import BertConfig
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.bert.modeling_bert import BertSelfAttention, eager_attention_forward


def _per_layer(config: Any, layer_heads: list[int] | None, layer_ffn: list[int] | None) -> None:
    layers = config.num_hidden_layers
    config.layer_heads = list(layer_heads) if layer_heads is not None else [config.num_attention_heads] * layers
    width = getattr(config, "intermediate_size", None)
    config.layer_ffn = list(layer_ffn) if layer_ffn is not None else [width] * layers
    if len(config.layer_heads) != layers or len(config.layer_ffn) != layers:
        raise ValueError(
            f"layer_heads ({len(config.layer_heads)}) and layer_ffn ({len(config.layer_ffn)}) need one entry "
            f"per layer (num_hidden_layers={layers})"
        )


class PrunedBertConfig(BertConfig):
    def __init__(self, layer_heads: list[int] | None = None, layer_ffn: list[int] | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        _per_layer(self, layer_heads, layer_ffn)


class PrunedSelfAttention(BertSelfAttention):
    """A BERT-layout self-attention (encoder only) that reshapes to its own head count instead of -1.

    The explicit count is what ONNX Runtime's transformer optimizer reads from the Reshape to fuse
    each layer's Attention with its own number of heads; with -1 it falls back to one global count."""

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, self.num_attention_heads, self.attention_head_size)
        query, key, value = (
            proj(hidden_states).view(*hidden_shape).transpose(1, 2) for proj in (self.query, self.key, self.value)
        )
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        output, weights = attention(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else self.dropout.p,
            scaling=self.scaling,
            **kwargs,
        )
        return output.reshape(*input_shape, -1).contiguous(), weights


def resize_layer(layer: Any, config: Any, index: int, heads: int, ffn: int) -> None:
    """Give one BERT-layout layer `heads` attention heads and `ffn` FFN neurons (fresh, uninitialised weights)."""
    hidden = config.hidden_size
    attention = PrunedSelfAttention(config, layer_idx=index)
    width = heads * attention.attention_head_size
    attention.query, attention.key, attention.value = (nn.Linear(hidden, width) for _ in range(3))
    attention.num_attention_heads, attention.all_head_size = heads, width
    layer.attention.self = attention
    layer.attention.output.dense = nn.Linear(width, hidden)
    layer.intermediate.dense = nn.Linear(hidden, ffn)
    layer.output.dense = nn.Linear(ffn, hidden)


def resize_layers(model: Any, config: Any) -> None:
    for index, layer in enumerate(model.base_model.encoder.layer):
        resize_layer(layer, config, index, config.layer_heads[index], config.layer_ffn[index])
    model.post_init()


def _set(root: Any, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def _resized(old: nn.Linear, *, out_features: int | None = None, in_features: int | None = None) -> nn.Linear:
    return nn.Linear(in_features or old.in_features, out_features or old.out_features, bias=old.bias is not None)


def resize_by_layout(model: Any, config: Any) -> None:
    """Give every layer its `layer_heads` and `layer_ffn` through the paths of `config.pruned_layout`."""
    layout = config.pruned_layout
    for index, layer in enumerate(model.base_model.get_submodule(layout["layers"])):
        heads, ffn = config.layer_heads[index], config.layer_ffn[index]
        width = heads * layout["head_size"]
        for path, copies in layout["projections"].items():  # q, k, v (or one fused qkv: 3 copies)
            _set(layer, path, _resized(layer.get_submodule(path), out_features=copies * width))
        _set(layer, layout["out"], _resized(layer.get_submodule(layout["out"]), in_features=width))
        attention = layer.get_submodule(layout["module"])
        if layout["heads"]:
            setattr(attention, layout["heads"], heads)
        if layout["width"]:
            setattr(attention, layout["width"], width)
        for path in layout["up"]:
            _set(layer, path, _resized(layer.get_submodule(path), out_features=layout["glu"] * ffn))
        _set(layer, layout["down"], _resized(layer.get_submodule(layout["down"]), in_features=ffn))
    model.post_init()


def _pruned_model(base: type, config_class: type, resize: Any) -> type:
    def __init__(self: Any, config: Any) -> None:
        base.__init__(self, config)  # type: ignore[misc]
        resize(self, config)

    return type(f"Pruned{base.__name__}", (base,), {"config_class": config_class, "__init__": __init__})


def _pruned_config(base: type) -> type:
    def __init__(self: Any, layer_heads: list[int] | None = None, layer_ffn: list[int] | None = None, **kw: Any):
        base.__init__(self, **kw)  # type: ignore[misc]
        _per_layer(self, layer_heads, layer_ffn)

    return type(f"Pruned{base.__name__}", (base,), {"__init__": __init__})


# model_type -> the transformers class prefix of each family with BERT's layer layout
BERT_LAYOUT = {
    "bert": "Bert",
    "roberta": "Roberta",
    "xlm-roberta": "XLMRoberta",
    "camembert": "Camembert",
    "electra": "Electra",
}
# ... and of the families resized through `pruned_layout`
FAMILIES = {**BERT_LAYOUT, "distilbert": "DistilBert", "deberta-v2": "DebertaV2", "modernbert": "ModernBert"}


for _prefix in FAMILIES.values():
    _config = PrunedBertConfig if _prefix == "Bert" else _pruned_config(getattr(transformers, f"{_prefix}Config"))
    _resize = resize_layers if _prefix in BERT_LAYOUT.values() else resize_by_layout
    globals()[f"Pruned{_prefix}Config"] = _config
    for _head in ("SequenceClassification", "TokenClassification"):
        _name = f"Pruned{_prefix}For{_head}"
        globals()[_name] = _pruned_model(getattr(transformers, f"{_prefix}For{_head}"), _config, _resize)


def pruned_class(model_type: str, head: str) -> Any:
    """The pruned model class of a family and head ("SequenceClassification" / "TokenClassification")."""
    return globals()[f"Pruned{FAMILIES[model_type]}For{head}"]
