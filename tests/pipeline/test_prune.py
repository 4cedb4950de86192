"""FFN-neuron pruning: shapes shrink, pruning equals masking, the model reloads plainly, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_recipe, write_recipe
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from edgepipe.errors import RecipeError
from edgepipe.pipeline.cli import main
from edgepipe.pipeline.recipe import parse_recipe
from edgepipe.pipeline.runner import check_recipe
from edgepipe.pipeline.stages.prune import kept_width, magnitude_scores, prune_ffn

TEXTS = ["a gripping, beautifully shot film", "dull and far too long", "the cast does what it can"]


def _pruned(tiny_model_dir: Path, ratio: float = 0.5):  # type: ignore[no-untyped-def]
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir).eval()
    count = kept_width(model.config.intermediate_size, ratio, 8)
    keep = [torch.sort(torch.topk(s, count).indices).values for s in magnitude_scores(model)]
    original = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir).eval()
    prune_ffn(model, keep)
    return original, model, keep


def test_pruning_shrinks_the_ffn_shapes_exactly(tiny_model_dir: Path) -> None:
    original, model, keep = _pruned(tiny_model_dir)
    assert [len(k) for k in keep] == [32, 32] and model.config.intermediate_size == 32
    for layer in model.base_model.encoder.layer:
        assert tuple(layer.intermediate.dense.weight.shape) == (32, 32)
        assert tuple(layer.output.dense.weight.shape) == (32, 32)
    removed = 2 * (64 - 32) * (32 + 32 + 1)  # per layer: W_in rows + biases, W_out columns
    assert sum(p.numel() for p in original.parameters()) - sum(p.numel() for p in model.parameters()) == removed


def test_pruning_equals_masking(tiny_model_dir: Path) -> None:
    original, model, keep = _pruned(tiny_model_dir)
    with torch.no_grad():  # mask: the removed neurons contribute nothing to the FFN output
        for layer, index in zip(original.base_model.encoder.layer, keep, strict=True):
            mask = torch.zeros(layer.output.dense.in_features, dtype=torch.bool)
            mask[index] = True
            layer.output.dense.weight[:, ~mask] = 0.0
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    enc = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(model(**enc).logits, original(**enc).logits, atol=1e-5)


def test_pruned_model_reloads_with_plain_from_pretrained(tiny_model_dir: Path, tmp_path: Path) -> None:
    _, model, _ = _pruned(tiny_model_dir)
    model.save_pretrained(tmp_path / "pruned")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "pruned")
    enc = AutoTokenizer.from_pretrained(tiny_model_dir)(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model(**enc).logits.tolist()
    script = (
        "import sys, json, torch\n"
        "from transformers import AutoModelForSequenceClassification, AutoTokenizer\n"
        "m = AutoModelForSequenceClassification.from_pretrained(sys.argv[1]).eval()\n"
        "enc = AutoTokenizer.from_pretrained(sys.argv[1])(json.loads(sys.argv[2]), padding=True, return_tensors='pt')\n"
        "print(json.dumps(m(**enc).logits.tolist()))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "pruned"), json.dumps(TEXTS)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    reloaded = torch.tensor(json.loads(out.strip().splitlines()[-1]))
    assert torch.allclose(reloaded, torch.tensor(expected), atol=1e-6)


def test_prune_stage_in_a_run_with_taylor_importance(tmp_path: Path, tiny_model_dir: Path, rt_csv: Path) -> None:
    raw = tiny_recipe(tiny_model_dir, rt_csv)
    raw["stages"] = [
        {**raw["stages"][0], "max_steps": 20},
        {
            "kind": "prune",
            "ffn_ratio": 0.5,
            "importance": "taylor",
            "samples": 32,
            "batch_size": 16,
            "iterations": 2,
            "recover": {"max_steps": 8, "batch_size": 16, "lr": 1e-3},
        },
        {"kind": "export", "fuse": False},
    ]
    raw["bench"]["batch_sizes"] = [1]
    run = tmp_path / "run"
    assert main(["build", str(write_recipe(tmp_path / "r.yaml", raw)), "--out", str(run)]) == 0
    metrics = json.loads((run / "02-prune" / "metrics.json").read_text())
    assert (metrics["ffn_before"], metrics["ffn_after"]) == (64, 32)
    assert [i["ffn"] for i in metrics["iterations"]] == [48, 32]  # half the way, recover, the rest
    assert all("val_accuracy_recovered" in i and i["recover_loss_end"] > 0 for i in metrics["iterations"])
    assert all(len(k) == 32 and len(set(k)) == 32 and max(k) < 64 for k in metrics["kept_neurons"])
    assert metrics["params_after"] < metrics["params_before"]
    assert metrics["macs_per_token_after"] < metrics["macs_per_token_before"]
    config = json.loads((run / "02-prune" / "model" / "config.json").read_text())
    assert config["intermediate_size"] == 32
    report = json.loads((run / "report.json").read_text())
    assert {r["artifact"] for r in report["results"]} >= {"teacher", "pruned", "fp32"}


@pytest.mark.parametrize("ratio", [0, 1, 1.5])
def test_ratio_outside_zero_one(ratio: float) -> None:
    raw = {"schema_version": 1, "model": "minilm-l6", "stages": [{"kind": "prune", "ffn_ratio": ratio}]}
    with pytest.raises(RecipeError, match=r"`stages.0.ffn_ratio`: Input should be (greater|less) than"):
        parse_recipe(raw)


def test_round_to_larger_than_the_ffn(tiny_model_dir: Path, rt_csv: Path) -> None:
    raw = tiny_recipe(tiny_model_dir, rt_csv, stages=[{"kind": "prune", "ffn_ratio": 0.5, "round_to": 128}])
    assert "`stages.0.round_to`: 128 is larger than the FFN width 64; use a smaller multiple" in check_recipe(
        parse_recipe(raw)
    )
