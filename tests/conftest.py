"""Shared fixtures: a tiny BERT built in code, a slice of the real Rotten Tomatoes data, one built run."""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reasons = {}
    try:
        import torch

        if not torch.cuda.is_available():
            reasons["cuda"] = "no CUDA device on this machine"
    except ImportError:
        reasons["cuda"] = "torch is not installed"
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        reasons["tensorrt"] = "TensorRT is not installed (pip install .[gpu] on a CUDA machine)"
    for item in items:
        for marker, reason in reasons.items():
            if marker in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded 2-layer BERT (hidden 32, 4 heads) with the real MiniLM WordPiece tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from edgepipe.pipeline.models import resolve_model

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("minilm-l6"))
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=2,
    )
    model = BertForSequenceClassification(config).eval()
    folder = tmp_path_factory.mktemp("tiny-bert")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_llama(seed: int = 0, layers: int = 4, vocab: int = 256, tie: bool = False, **changes: Any) -> Any:
    """A seeded Llama (hidden 64, 4 heads, 2 KV heads: grouped-query attention as in SmolLM2)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    values = {
        "vocab_size": vocab,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "tie_word_embeddings": tie,
        **changes,
    }
    return LlamaForCausalLM(LlamaConfig(**values)).eval()


@pytest.fixture(scope="session")
def rt_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """600 real Rotten Tomatoes reviews (balanced), written as a user CSV with text/label columns."""
    from edgepipe.pipeline.data import load_splits
    from edgepipe.pipeline.recipe import DataConfig

    splits = load_splits(DataConfig(), seed=0)
    names = splits.label_names
    rows = list(zip(splits.train.inputs[:600], splits.train.labels[:600].tolist(), strict=True))
    path = tmp_path_factory.mktemp("data") / "reviews.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows((text, names[label]) for text, label in rows)
    return path


def tiny_recipe(model_dir: Path, data: Path, **changes: Any) -> dict[str, Any]:
    recipe: dict[str, Any] = {
        "schema_version": 1,
        "name": "tiny",
        "seed": 0,
        "model": str(model_dir),
        "task": "text-classification",
        "data": {"source": str(data), "calibration_size": 32},
        "stages": [
            {"kind": "finetune", "max_steps": 40, "batch_size": 16, "max_seq_len": 32, "lr": 1e-3},
            {"kind": "export", "parity_shapes": [[1, 7], [3, 45]]},
            {"kind": "quantize", "mode": "dynamic"},
            {"kind": "quantize", "mode": "static", "calibration": {"samples": 32, "batch_size": 8}},
        ],
        "bench": {
            "batch_sizes": [1, 4],
            "seq_lens": [16],
            "runs": 6,
            "rounds": 2,
            "warmup_runs": 1,
            "warmup_s": 0.0,
            "eval_max_examples": 40,
        },
        "gates": {"max_accuracy_drop": 1.0},
    }
    recipe.update(changes)
    return recipe


def digits_recipe(**changes: Any) -> dict[str, Any]:
    recipe: dict[str, Any] = {
        "schema_version": 1,
        "name": "digits",
        "task": "image-classification",
        "model": "cnn-small",
        "data": {"source": "digits", "calibration_size": 64},
        "stages": [
            {"kind": "finetune", "max_steps": 120, "batch_size": 64, "lr": 0.003},
            {
                "kind": "distill",
                "student": {"init": "fresh", "model": "cnn-tiny"},
                "loss": {"ce": 0.5, "kd": 0.5, "hidden": 1.0},
                "max_steps": 120,
                "batch_size": 64,
                "lr": 0.003,
            },
            {"kind": "export", "fuse": False},
            {"kind": "quantize", "mode": "static", "calibration": {"samples": 64, "batch_size": 16}},
        ],
        "bench": {"batch_sizes": [1, 8], "runs": 6, "rounds": 2, "warmup_runs": 1, "warmup_s": 0.0},
        "gates": {"max_accuracy_drop": 0.1},
    }
    recipe.update(changes)
    return recipe


def write_recipe(path: Path, recipe: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def built_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, rt_csv: Path) -> Path:
    """One end-to-end build of the tiny recipe, shared read-only by many tests (copy before mutating)."""
    from edgepipe.pipeline.cli import main

    root = tmp_path_factory.mktemp("built")
    recipe = write_recipe(root / "tiny.yaml", tiny_recipe(tiny_model_dir, rt_csv))
    run = root / "run"
    assert main(["build", str(recipe), "--out", str(run)]) == 0
    return run


@pytest.fixture
def run_copy(built_run: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(built_run, target)
    return target
