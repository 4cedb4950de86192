"""The structural operations through every family's spec equal masking: FFN neurons (plain, gated, fused
[up; gate], GPT-2's Conv1D), attention heads (separate or fused q/k/v) and whole layers, on tiny seeded
models built in code."""

from __future__ import annotations

import copy

import pytest
import torch
from families import DECODERS, ENCODERS, save_family

from edgepipe.arch import BY_MODEL_TYPE, Capability
from edgepipe.arch.ops import (
    blocks,
    ffn_unit_views,
    ffn_widths,
    head_count,
    head_size,
    keep_layers,
    layer_list,
    prune_ffn,
    prune_heads,
)

TEXTS = ["a gripping, beautifully shot film", "dull and far too long"]


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    from edgepipe.pipeline.models import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model("minilm-l6"))


def _model(model_type: str, tokenizer, tmp_path):  # type: ignore[no-untyped-def]
    from transformers import AutoModelForSequenceClassification

    folder = save_family(model_type, "text-classification", tmp_path / model_type, tokenizer, ["neg", "pos"])
    return AutoModelForSequenceClassification.from_pretrained(folder, attn_implementation="eager").eval()


def _logits(model, tokenizer):  # type: ignore[no-untyped-def]
    enc = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**enc).logits


@pytest.mark.parametrize("model_type", [*ENCODERS, *DECODERS])
def test_ffn_pruning_equals_masking_the_removed_neurons(model_type: str, tokenizer, tmp_path) -> None:  # type: ignore[no-untyped-def]
    arch = BY_MODEL_TYPE[model_type]
    assert arch.can(Capability.FFN_PRUNING)
    model = _model(model_type, tokenizer, tmp_path)
    masked = copy.deepcopy(model)
    width = ffn_widths(model, arch)[0]
    keep = torch.arange(0, width, 2)  # every other neuron
    prune_ffn(model, arch, [keep] * len(blocks(model, arch)))
    assert ffn_widths(model, arch) == [len(keep)] * len(blocks(model, arch))
    assert getattr(model.config, arch.keys.ffn) == len(keep)
    with torch.no_grad():  # a removed neuron's output path is its row of the down projection
        for block in blocks(masked, arch):
            down_rows = ffn_unit_views(block, arch)[-1][0]
            down_rows[1::2] = 0.0
    assert torch.allclose(_logits(model, tokenizer), _logits(masked, tokenizer), atol=1e-5)
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in masked.parameters())


@pytest.mark.parametrize("model_type", [t for t in (*ENCODERS, *DECODERS) if not BY_MODEL_TYPE[t].shared_layers])
def test_keeping_layers_equals_skipping_the_others(model_type: str, tokenizer, tmp_path) -> None:  # type: ignore[no-untyped-def]
    arch = BY_MODEL_TYPE[model_type]
    model = _model(model_type, tokenizer, tmp_path)
    skipped = copy.deepcopy(model)
    keep_layers(model, arch, [0, 2])
    layers = skipped.base_model.get_submodule(arch.layers)
    original = layers[1].forward

    def identity(hidden, *args, **kwargs):  # type: ignore[no-untyped-def]
        out = original(hidden, *args, **kwargs)
        return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

    layers[1].forward = identity
    assert model.config.num_hidden_layers == 2
    assert torch.allclose(_logits(model, tokenizer), _logits(skipped, tokenizer), atol=1e-5)


HEAD_FAMILIES = [t for t in ENCODERS if BY_MODEL_TYPE[t].can(Capability.HEAD_PRUNING)]


@pytest.mark.parametrize("model_type", HEAD_FAMILIES)
def test_head_pruning_equals_masking_the_removed_heads(model_type: str, tokenizer, tmp_path) -> None:  # type: ignore[no-untyped-def]
    arch = BY_MODEL_TYPE[model_type]
    model = _model(model_type, tokenizer, tmp_path)
    masked = copy.deepcopy(model)
    heads = head_count(layer_list(model, arch)[0], arch)
    keep = [torch.tensor([0, 2]), torch.tensor([1, 2, 3])] + [torch.arange(heads)] * (len(layer_list(model, arch)) - 2)
    prune_heads(model, arch, keep)
    assert [head_count(layer, arch) for layer in layer_list(model, arch)][:2] == [2, 3]
    with torch.no_grad():  # a removed head reaches the output only through its columns of the output projection
        for layer, kept in zip(layer_list(masked, arch), keep, strict=True):
            size = head_size(layer, arch)
            out = layer.get_submodule(arch.attention.out)
            for head in sorted(set(range(heads)) - set(kept.tolist())):
                out.weight[:, head * size : (head + 1) * size] = 0.0
    assert torch.allclose(_logits(model, tokenizer), _logits(masked, tokenizer), atol=1e-5)
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in masked.parameters())


def test_head_pruning_keeps_debertas_separate_position_projections_in_step(tokenizer) -> None:  # type: ignore[no-untyped-def]
    """DeBERTa-v2 with share_att_key false has its own position key/query projections: they lose the same heads."""
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    torch.manual_seed(0)
    config = DebertaV2Config(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, relative_attention=True, position_buckets=16, pos_att_type=["p2c", "c2p"],
        share_att_key=False,
    )  # fmt: skip
    model = DebertaV2ForSequenceClassification(config).eval()
    arch = BY_MODEL_TYPE["deberta-v2"]
    masked = copy.deepcopy(model)
    prune_heads(model, arch, [torch.tensor([1, 3]), torch.tensor([0])])
    attention = layer_list(model, arch)[0].attention.self
    assert attention.pos_key_proj.out_features == attention.pos_query_proj.out_features == 2 * 8
    with torch.no_grad():
        for layer, removed in zip(layer_list(masked, arch), ([0, 2], [1, 2, 3]), strict=True):
            for head in removed:
                layer.attention.output.dense.weight[:, head * 8 : (head + 1) * 8] = 0.0
    assert torch.allclose(_logits(model, tokenizer), _logits(masked, tokenizer), atol=1e-5)
