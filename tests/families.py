"""Tiny seeded models of every architecture family, built in code with the real MiniLM WordPiece tokenizer.

Each builder returns the keyword arguments of the family's config at hidden 32, 4 heads, 3 layers, FFN 64
(GPT-2 and DistilBERT under their own key names); `save_family` writes a model folder for a task.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

LAYERS, HIDDEN, HEADS, FFN = 3, 32, 4, 64
_STANDARD = {
    "hidden_size": HIDDEN,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS,
    "intermediate_size": FFN,
    "max_position_embeddings": 128,
}
_DECODER = {**_STANDARD, "num_key_value_heads": 2, "head_dim": HIDDEN // HEADS}
# model_type -> (config class, extra config keys); the model classes come from the Auto* mappings
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "bert": ("BertConfig", _STANDARD),
    "roberta": ("RobertaConfig", {**_STANDARD, "max_position_embeddings": 130}),
    "xlm-roberta": ("XLMRobertaConfig", {**_STANDARD, "max_position_embeddings": 130}),
    "electra": ("ElectraConfig", {**_STANDARD, "embedding_size": 16}),
    "distilbert": (
        "DistilBertConfig",
        {"dim": HIDDEN, "n_layers": LAYERS, "n_heads": HEADS, "hidden_dim": FFN, "max_position_embeddings": 128},
    ),
    "albert": ("AlbertConfig", {**_STANDARD, "embedding_size": 16}),
    "mpnet": ("MPNetConfig", {**_STANDARD, "max_position_embeddings": 130}),
    # DeBERTa-v3's attention: relative positions through the shared q/k projections (c2p and p2c)
    "deberta-v2": (
        "DebertaV2Config",
        {
            **_STANDARD,
            "relative_attention": True,
            "position_buckets": 16,
            "pos_att_type": ["p2c", "c2p"],
            "share_att_key": True,
        },
    ),
    "modernbert": ("ModernBertConfig", {**_STANDARD, "global_attn_every_n_layers": 2, "local_attention": 16}),
    "llama": ("LlamaConfig", _DECODER),
    "qwen2": ("Qwen2Config", _DECODER),
    "qwen3": ("Qwen3Config", _DECODER),
    "gemma": ("GemmaConfig", _DECODER),
    # a window shorter than the test sequences: the KV-cache export is checked past it (README matrix note)
    "gemma3_text": ("Gemma3TextConfig", {**_DECODER, "sliding_window": 4}),
    "phi3": ("Phi3Config", {**_DECODER, "head_dim": None}),
    "gpt2": ("GPT2Config", {"n_embd": HIDDEN, "n_layer": LAYERS, "n_head": HEADS, "n_inner": FFN, "n_positions": 128}),
}
# image classifiers over 1-channel 8x8 digits
VISION: dict[str, tuple[str, dict[str, Any]]] = {
    "vit": ("ViTConfig", {**_STANDARD, "image_size": 8, "patch_size": 2}),
    "resnet": ("ResNetConfig", {"embedding_size": 16, "hidden_sizes": [16, 32], "depths": [1, 1]}),
    "mobilenet_v2": ("MobileNetV2Config", {"image_size": 8, "depth_multiplier": 0.25}),
    "convnext": ("ConvNextConfig", {"hidden_sizes": [8, 16], "depths": [1, 1], "num_stages": 2, "patch_size": 2}),
}
ENCODERS = ("bert", "roberta", "xlm-roberta", "electra", "distilbert", "albert", "mpnet", "deberta-v2", "modernbert")
DECODERS = ("llama", "qwen2", "qwen3", "gemma", "gemma3_text", "phi3", "gpt2")


def family_config(model_type: str, tokenizer: Any, **changes: Any) -> Any:
    import transformers

    name, values = FAMILIES[model_type]
    ids = {
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.cls_token_id,
        "eos_token_id": tokenizer.sep_token_id,
    }
    if model_type == "modernbert":
        ids |= {"cls_token_id": tokenizer.cls_token_id, "sep_token_id": tokenizer.sep_token_id}
    values = {k: v for k, v in values.items() if v is not None}
    # room above the WordPiece vocabulary: a family's tokenizer class may add its own special tokens
    return getattr(transformers, name)(vocab_size=tokenizer.vocab_size + 64, **ids, **values, **changes)


def save_family(model_type: str, task: str, folder: Path, tokenizer: Any, labels: list[str], seed: int = 0) -> Path:
    """A seeded model of the family with the head of `task`, saved with the tokenizer."""
    import torch
    import transformers

    auto = {
        "text-classification": transformers.AutoModelForSequenceClassification,
        "token-classification": transformers.AutoModelForTokenClassification,
        "causal-lm": transformers.AutoModelForCausalLM,
    }[task]
    heads = (
        {}
        if task == "causal-lm"
        else {"id2label": dict(enumerate(labels)), "label2id": {n: i for i, n in enumerate(labels)}}
    )
    torch.manual_seed(seed)
    model = auto.from_config(family_config(model_type, tokenizer, **heads)).eval()
    with torch.no_grad():  # larger weights than the init's: differences between layers and units show
        for param in model.parameters():
            if param.ndim > 1:
                param.mul_(3)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_vision(model_type: str, folder: Path, labels: list[str], seed: int = 0) -> Path:
    """A seeded transformers image classifier of the family for 1-channel 8x8 images."""
    import torch
    import transformers

    name, values = VISION[model_type]
    config = getattr(transformers, name)(num_channels=1, num_labels=len(labels), **values)
    torch.manual_seed(seed)
    transformers.AutoModelForImageClassification.from_config(config).eval().save_pretrained(folder)
    return folder
