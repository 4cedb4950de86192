"""The structural operations through every family's spec equal masking: FFN neurons (plain, gated, fused
[up; gate], GPT-2's Conv1D) and whole layers, on tiny seeded models built in code."""

from __future__ import annotations

import copy

import pytest
import torch
from families import DECODERS, ENCODERS, save_family

from edgepipe.arch import BY_MODEL_TYPE, Capability
from edgepipe.arch.ops import blocks, ffn_unit_views, ffn_widths, keep_layers, prune_ffn

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
