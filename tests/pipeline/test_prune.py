"""Structured pruning: heads, FFN neurons, layers and CNN channels shrink shapes, equal masking,
reload in a fresh process, run as a stage; bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
from conftest import digits_recipe, tiny_recipe, write_recipe
from transformers import AutoTokenizer

from edgepipe.arch import BY_MODEL_TYPE, Capability, supported
from edgepipe.arch.ops import keep_layers, prune_ffn
from edgepipe.errors import RecipeError
from edgepipe.pipeline.cli import main
from edgepipe.pipeline.data import load_splits
from edgepipe.pipeline.recipe import parse_recipe
from edgepipe.pipeline.runner import check_recipe
from edgepipe.pipeline.stages.prune import (
    kept_width,
    magnitude_scores,
    prune_heads,
    prune_problems,
    save_pruned,
    select_heads,
)
from edgepipe.runtime.modules import load_module
from edgepipe.runtime.text import load_text_model

TEXTS = ["a gripping, beautifully shot film", "dull and far too long", "the cast does what it can"]
REMOVED = {0: [1, 3], 1: [0]}  # non-uniform: layer 0 keeps 2 heads, layer 1 keeps 3
BERT = BY_MODEL_TYPE["bert"]


def _model(tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    """The tiny BERT with weights scaled up, so attention is far from uniform and masking shows."""
    model = load_text_model(tiny_model_dir, attn_implementation="eager")
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4)
    return model


def _logits(model, tiny_model_dir: Path) -> torch.Tensor:  # type: ignore[no-untyped-def]
    enc = AutoTokenizer.from_pretrained(tiny_model_dir)(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**enc).logits


def _head_pruned(tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    original, model = _model(tiny_model_dir), _model(tiny_model_dir)
    prune_heads(model, BERT, [torch.tensor([h for h in range(4) if h not in REMOVED[i]]) for i in range(2)])
    return original, model


def test_head_pruning_shrinks_qkv_and_output_exactly(tiny_model_dir: Path) -> None:
    original, model = _head_pruned(tiny_model_dir)
    for layer, kept in zip(model.base_model.encoder.layer, (2, 3), strict=True):
        attention = layer.attention.self
        for proj in (attention.query, attention.key, attention.value):
            assert tuple(proj.weight.shape) == (kept * 8, 32) and tuple(proj.bias.shape) == (kept * 8,)
        assert tuple(layer.attention.output.dense.weight.shape) == (32, kept * 8)
    removed = 3 * 8 * (3 * (32 + 1) + 32)  # 3 heads of size 8: q/k/v rows with biases, output columns
    assert sum(p.numel() for p in original.parameters()) - sum(p.numel() for p in model.parameters()) == removed


def test_head_pruning_equals_head_masking(tiny_model_dir: Path) -> None:
    original, model = _head_pruned(tiny_model_dir)
    with torch.no_grad():  # mask: a removed head's context never reaches the output projection
        for i, layer in enumerate(original.base_model.encoder.layer):
            for head in REMOVED[i]:
                layer.attention.output.dense.weight[:, head * 8 : (head + 1) * 8] = 0.0
    pruned, masked = _logits(model, tiny_model_dir), _logits(original, tiny_model_dir)
    assert torch.allclose(pruned, masked, atol=1e-5)
    assert not torch.allclose(_logits(_model(tiny_model_dir), tiny_model_dir), masked, atol=1e-3)  # heads mattered


def test_global_head_selection_keeps_one_head_per_layer() -> None:
    scores = [torch.tensor([9.0, 8.0, 7.0, 6.0]), torch.tensor([0.1, 0.1, 0.3, 0.01])]
    kept = select_heads(scores, 3)
    assert [k.tolist() for k in kept] == [[0, 1], [2]]  # normalised per layer: layer 1's best survives


def _ffn_pruned(tiny_model_dir: Path, ratio: float = 0.5):  # type: ignore[no-untyped-def]
    original, model = _model(tiny_model_dir), _model(tiny_model_dir)
    count = kept_width(64, ratio, 8)
    keep = [torch.sort(torch.topk(s, count).indices).values for s in magnitude_scores(model, BERT)[1]]
    prune_ffn(model, BERT, keep)
    return original, model, keep


def test_ffn_pruning_shrinks_shapes_and_equals_masking(tiny_model_dir: Path) -> None:
    original, model, keep = _ffn_pruned(tiny_model_dir)
    assert model.config.intermediate_size == 32
    for layer in model.base_model.encoder.layer:
        assert tuple(layer.intermediate.dense.weight.shape) == (32, 32)
        assert tuple(layer.output.dense.weight.shape) == (32, 32)
    removed = 2 * (64 - 32) * (32 + 32 + 1)  # per layer: W_in rows + biases, W_out columns
    assert sum(p.numel() for p in original.parameters()) - sum(p.numel() for p in model.parameters()) == removed
    with torch.no_grad():
        for layer, index in zip(original.base_model.encoder.layer, keep, strict=True):
            mask = torch.ones(64, dtype=torch.bool)
            mask[index] = False
            layer.output.dense.weight[:, mask] = 0.0
    assert torch.allclose(_logits(model, tiny_model_dir), _logits(original, tiny_model_dir), atol=1e-5)


def test_layer_removal_equals_skipping_the_layer(tiny_model_dir: Path) -> None:
    model = _model(tiny_model_dir)
    skipped = _model(tiny_model_dir)
    skipped.base_model.encoder.layer[1].forward = lambda hidden, *args, **kwargs: hidden  # type: ignore[method-assign]
    keep_layers(model, BERT, [0])
    assert model.config.num_hidden_layers == 1 and len(model.base_model.encoder.layer) == 1
    assert torch.allclose(_logits(model, tiny_model_dir), _logits(skipped, tiny_model_dir), atol=1e-5)


_RELOAD = (
    "import sys, json\n"
    "from transformers import AutoModelForSequenceClassification, AutoTokenizer\n"
    "m = AutoModelForSequenceClassification.from_pretrained(sys.argv[1], trust_remote_code=True).eval()\n"
    "enc = AutoTokenizer.from_pretrained(sys.argv[1])(json.loads(sys.argv[2]), padding=True, return_tensors='pt')\n"
    "print(type(m).__name__, json.dumps(m(**enc).logits.tolist()))\n"
)


@pytest.mark.parametrize("what", ["heads", "ffn"])
def test_pruned_model_reloads_with_plain_from_pretrained_in_a_fresh_process(
    tiny_model_dir: Path, tmp_path: Path, what: str
) -> None:
    model = _head_pruned(tiny_model_dir)[1] if what == "heads" else _ffn_pruned(tiny_model_dir)[1]
    ctx = SimpleNamespace(task="text-classification", data=SimpleNamespace(label_names=["neg", "pos"]))
    save_pruned(model, BERT, AutoTokenizer.from_pretrained(tiny_model_dir), tmp_path / "pruned", ctx)  # type: ignore[arg-type]
    config = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert config["model_type"] == "bert" and (tmp_path / "pruned" / "model.safetensors").is_file()
    if what == "heads":
        assert config["layer_heads"] == [2, 3] and (tmp_path / "pruned" / "modeling_pruned_bert.py").is_file()
    else:
        assert "layer_heads" not in config and config["intermediate_size"] == 32  # a plain BERT
    out = (
        subprocess.run(
            [sys.executable, "-c", _RELOAD, str(tmp_path / "pruned"), json.dumps(TEXTS)],
            capture_output=True,
            text=True,
            check=True,
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    name, logits = out.split(" ", 1)
    assert name == ("PrunedBertForSequenceClassification" if what == "heads" else "BertForSequenceClassification")
    assert torch.allclose(torch.tensor(json.loads(logits)), _logits(model, tiny_model_dir), atol=1e-6)
    edgepipe_load = load_text_model(tmp_path / "pruned", attn_implementation="eager")
    assert torch.allclose(_logits(edgepipe_load, tiny_model_dir), _logits(model, tiny_model_dir), atol=1e-6)


def test_prune_stage_heads_ffn_and_a_layer_in_a_run(tmp_path: Path, tiny_model_dir: Path, rt_csv: Path) -> None:
    raw = tiny_recipe(tiny_model_dir, rt_csv)
    raw["stages"] = [
        {**raw["stages"][0], "max_steps": 20},
        {
            "kind": "prune",
            "ratio": 0.5,
            "importance": "taylor",
            "samples": 32,
            "batch_size": 16,
            "iterations": 2,
            "recover": {"max_steps": 8, "batch_size": 16, "lr": 1e-3},
        },
        {"kind": "export", "parity_shapes": [[1, 7], [3, 45]]},
    ]
    raw["bench"]["batch_sizes"] = [1]
    run = tmp_path / "run"
    assert main(["build", str(write_recipe(tmp_path / "r.yaml", raw)), "--out", str(run)]) == 0
    metrics = json.loads((run / "02-prune" / "metrics.json").read_text())
    assert (metrics["ffn_before"], metrics["ffn_after"]) == (64, 32)
    assert [i["ffn"] for i in metrics["iterations"]] == [48, 32]  # half the way, recover, the rest
    assert [sum(i["heads"]) for i in metrics["iterations"]] == [6, 4]  # of 8 heads
    assert all(h >= 1 for h in metrics["heads_after"]) and sum(metrics["heads_after"]) == 4
    assert all("val_accuracy_recovered" in i and i["recover_loss_end"] > 0 for i in metrics["iterations"])
    assert all(len(k) == 32 and len(set(k)) == 32 and max(k) < 64 for k in metrics["kept_neurons"])
    assert [len(k) for k in metrics["kept_heads"].values()] == metrics["heads_after"]
    removed = 1 - metrics["encoder_params_after"] / metrics["encoder_params_before"]
    assert abs(removed - 0.5) < 0.05  # the asked ratio of the encoder layers' parameters
    assert metrics["macs_per_seq128_after"] < 0.55 * metrics["macs_per_seq128_before"]
    latency = metrics["ort_latency_ms"]
    assert set(latency) == {"before", "after"} and set(latency["after"]) == {"b1_s128", "b8_s128"}
    export = json.loads((run / "03-export" / "metrics.json").read_text())
    assert export["fused_ops"]["Attention"] == 2  # each layer fused with its own head count
    assert all(p["max_abs_diff"] < 1e-4 for p in export["fused_parity"])
    report = json.loads((run / "report.json").read_text())
    assert {r["artifact"] for r in report["results"]} >= {"teacher", "pruned", "fp32", "fp32-fused"}
    assert "## Pruning" in (run / "report.md").read_text()


def test_explicit_heads_and_drop_layers(tmp_path: Path, tiny_model_dir: Path, rt_csv: Path) -> None:
    stage = {"kind": "prune", "heads": {0: [0, 1, 2, 3], 1: [2]}, "drop_layers": [0], "latency": False}
    raw = tiny_recipe(tiny_model_dir, rt_csv, stages=[stage, {"kind": "export", "fuse": False}])
    raw["bench"]["batch_sizes"] = [1]
    run = tmp_path / "run"
    assert main(["build", str(write_recipe(tmp_path / "r.yaml", raw)), "--out", str(run)]) == 0
    metrics = json.loads((run / "01-prune" / "metrics.json").read_text())
    assert (metrics["layers_after"], metrics["heads_after"]) == (1, [3])
    assert metrics["kept_heads"] == {"1": [0, 1, 3]}


@pytest.mark.parametrize("recover", [False, True])
def test_cnn_with_residual_adds_is_channel_pruned_exports_and_equals_masking(tmp_path: Path, recover: bool) -> None:
    raw = digits_recipe()
    prune = {"kind": "prune", "ratio": 0.4, "importance": "taylor", "round_to": 4, "latency": recover}
    raw["stages"] = [
        {"kind": "finetune", "max_steps": 30, "batch_size": 64, "lr": 0.003},
        {**prune, "recover": {"max_steps": 10}} if recover else prune,
        {"kind": "export", "fuse": False},
    ]
    raw["bench"]["batch_sizes"] = [1]
    raw["gates"] = {"max_accuracy_drop": 1.0}  # a 10-step recovery: this test is about shapes and equality
    run = tmp_path / "run"
    assert main(["build", str(write_recipe(tmp_path / "r.yaml", raw)), "--out", str(run)]) == 0
    metrics = json.loads((run / "02-prune" / "metrics.json").read_text())
    assert abs(1 - metrics["params_after"] / metrics["params_before"] - 0.4) < 0.05
    assert all(after % 4 == 0 and after < before for before, after in metrics["channels"].values() if before > 1)
    if recover:  # recovery trains the kept weights: the model no longer equals the masked original
        assert metrics["val_accuracy_recovered"] > metrics["val_accuracy_pruned"]
        assert set(metrics["ort_latency_ms"]["after"]) == {"b1_s128", "b8_s128"}
        return
    original, pruned = load_module(run / "01-finetune" / "model"), load_module(run / "02-prune" / "model")
    # a residual add forces the same channels out of both branches: block output == shortcut output
    block = pruned.stages[1][0]
    assert block.conv2.out_channels == block.shortcut[0].out_channels < original.stages[1][0].conv2.out_channels
    # masking: zero the scale and shift of every removed channel's batch norm (kept ones matched by statistics)
    with torch.no_grad():
        bns = dict(pruned.named_modules())
        for name, bn in original.named_modules():
            if isinstance(bn, torch.nn.BatchNorm2d):
                kept = [int(np.argmin(np.abs(bn.running_mean.numpy() - m))) for m in bns[name].running_mean.numpy()]
                removed = sorted(set(range(bn.num_features)) - set(kept))
                bn.weight[removed] = 0.0
                bn.bias[removed] = 0.0
    recipe = parse_recipe(raw)
    images = torch.from_numpy(np.asarray(load_splits(recipe.data, recipe.seed, recipe.task).val.inputs[:16]))
    with torch.no_grad():
        assert torch.allclose(pruned(images), original(images), atol=1e-4)
    graph = onnx.load(str(run / "03-export" / "fp32" / "model.onnx"))
    assert any(n.op_type == "Add" for n in graph.graph.node)
    assert json.loads((run / "03-export" / "metrics.json").read_text())["parity"]


def _config(**changes):  # type: ignore[no-untyped-def]
    return {"model_type": "bert", "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64, **changes}


@pytest.mark.parametrize("key", ["ratio", "ffn_ratio", "head_ratio"])
@pytest.mark.parametrize("ratio", [0, 1, 1.5])
def test_ratio_outside_zero_one(key: str, ratio: float) -> None:
    raw = {"schema_version": 1, "model": "minilm-l6", "stages": [{"kind": "prune", key: ratio}]}
    with pytest.raises(RecipeError, match=rf"`stages.0.{key}`: Input should be (greater|less) than"):
        parse_recipe(raw)


def test_every_head_of_a_layer_needs_layer_removal() -> None:
    cfg = parse_recipe(
        {"schema_version": 1, "model": "minilm-l6", "stages": [{"kind": "prune", "heads": {1: [0, 1, 2, 3]}}]}
    ).stages[0]
    assert prune_problems(cfg, _config(), "stages.0") == [  # type: ignore[arg-type]
        "`stages.0.heads.1`: removes every head of layer 1; to remove the layer, add it to `drop_layers` instead"
    ]


def test_unsupported_model_types_name_the_supported_ones() -> None:
    cfg = parse_recipe({"schema_version": 1, "model": "minilm-l6", "stages": [{"kind": "prune", "ratio": 0.3}]})
    stage = cfg.stages[0]
    assert prune_problems(stage, _config(model_type="t5"), "stages.0") == [  # type: ignore[arg-type]
        "`stages.0`: model_type 't5' has no architecture spec (edgepipe.arch); attention head pruning support: "
        f"{supported(Capability.HEAD_PRUNING)}; use ffn_ratio / drop_layers",
        "`stages.0`: model_type 't5' has no architecture spec (edgepipe.arch); FFN neuron pruning support: "
        f"{supported(Capability.FFN_PRUNING)}; use drop_layers",
    ]
    assert prune_problems(stage, _config(model_type="mpnet"), "stages.0") == [  # type: ignore[arg-type]
        "`stages.0`: model_type 'mpnet' (mpnet) has no attention head pruning; attention head pruning "
        "support: bert, roberta, xlm-roberta, camembert, electra, distilbert, deberta-v2, modernbert; use ffn_ratio / "
        "drop_layers"
    ]


def test_round_to_larger_than_the_ffn(tiny_model_dir: Path, rt_csv: Path) -> None:
    raw = tiny_recipe(tiny_model_dir, rt_csv, stages=[{"kind": "prune", "ffn_ratio": 0.5, "round_to": 128}])
    assert "`stages.0.round_to`: 128 is larger than the FFN width 64; use a smaller multiple" in check_recipe(
        parse_recipe(raw)
    )


@pytest.mark.parametrize(
    ("stage", "message"),
    [
        ({"kind": "prune"}, "nothing to prune"),
        ({"kind": "prune", "ratio": 0.3, "ffn_ratio": 0.2}, "give either ratio or"),
        ({"kind": "prune", "heads": {0: [1]}, "head_ratio": 0.2}, "give either heads or head_ratio"),
        ({"kind": "prune", "heads": {0: [1, 1]}}, "must be distinct head indices"),
    ],
)
def test_contradictory_prune_specs(stage: dict, message: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(RecipeError, match=message):
        parse_recipe({"schema_version": 1, "model": "minilm-l6", "stages": [stage]})


def test_image_models_are_pruned_by_ratio_only() -> None:
    raw = digits_recipe()
    raw["stages"] = [{"kind": "prune", "ffn_ratio": 0.3}]
    assert check_recipe(parse_recipe(raw)) == [
        "`stages.0.ffn_ratio`: applies to transformers; an image model is pruned by conv channels: use `ratio`"
    ]
