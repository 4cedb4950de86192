"""A BERT whose layers keep different numbers of attention heads and FFN neurons: a pruned BERT.

transformers 5 removed `prune_heads`/`pruned_heads` and derives every layer's head count from
`num_attention_heads`, so a head-pruned BERT does not fit `BertConfig`. This config records the
kept heads and FFN width per layer (`layer_heads`, `layer_ffn`; the head size stays
hidden_size / num_attention_heads) and the model resizes each layer's projections when it is built,
so `from_pretrained` loads the pruned safetensors as they are.

The config keeps `model_type: bert` (tokenizers, ONNX Runtime's optimizer and every tool that reads
config.json see a BERT) and names this class in `auto_map`. The file imports only torch and
transformers because the prune stage copies it into every head-pruned model folder: there,
`AutoModelFor{Sequence,Token}Classification.from_pretrained(folder, trust_remote_code=True)` loads the model
without edgepipe installed. edgepipe itself loads such folders with this class directly
(`edgepipe.runtime.text.load_text_model`), so no code from a model folder ever runs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, BertForTokenClassification
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.bert.modeling_bert import BertSelfAttention, eager_attention_forward


class PrunedBertConfig(BertConfig):
    def __init__(self, layer_heads: list[int] | None = None, layer_ffn: list[int] | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        layers = self.num_hidden_layers
        self.layer_heads = list(layer_heads) if layer_heads is not None else [self.num_attention_heads] * layers
        self.layer_ffn = list(layer_ffn) if layer_ffn is not None else [self.intermediate_size] * layers
        if len(self.layer_heads) != layers or len(self.layer_ffn) != layers:
            raise ValueError(
                f"layer_heads ({len(self.layer_heads)}) and layer_ffn ({len(self.layer_ffn)}) need one entry "
                f"per layer (num_hidden_layers={layers})"
            )


class PrunedBertSelfAttention(BertSelfAttention):
    """BertSelfAttention (encoder only) that reshapes to its own head count instead of -1.

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


def resize_layer(layer: Any, config: BertConfig, index: int, heads: int, ffn: int) -> None:
    """Give one BertLayer `heads` attention heads and `ffn` FFN neurons (fresh, uninitialised weights)."""
    hidden = config.hidden_size
    attention = PrunedBertSelfAttention(config, layer_idx=index)
    width = heads * attention.attention_head_size
    attention.query, attention.key, attention.value = (nn.Linear(hidden, width) for _ in range(3))
    attention.num_attention_heads, attention.all_head_size = heads, width
    layer.attention.self = attention
    layer.attention.output.dense = nn.Linear(width, hidden)
    layer.intermediate.dense = nn.Linear(hidden, ffn)
    layer.output.dense = nn.Linear(ffn, hidden)


def resize_layers(model: Any, config: PrunedBertConfig) -> None:
    for index, layer in enumerate(model.bert.encoder.layer):
        resize_layer(layer, config, index, config.layer_heads[index], config.layer_ffn[index])
    model.post_init()


class PrunedBertForSequenceClassification(BertForSequenceClassification):
    config_class = PrunedBertConfig

    def __init__(self, config: PrunedBertConfig) -> None:
        super().__init__(config)
        resize_layers(self, config)


class PrunedBertForTokenClassification(BertForTokenClassification):
    config_class = PrunedBertConfig

    def __init__(self, config: PrunedBertConfig) -> None:
        super().__init__(config)
        resize_layers(self, config)
