"""A causal-lm recipe end to end on a tiny Llama built in code: layer-subset distillation, KV-cache
export, int8 and int4, and the generation benchmark gated on perplexity."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import tiny_llama, write_recipe


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 4-layer tiny Llama with the real MiniLM WordPiece tokenizer (a real tokenizer for real text)."""
    from transformers import AutoTokenizer

    from edgepipe.pipeline.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("minilm-l6"))
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(vocab=tokenizer.vocab_size, pad_token_id=tokenizer.pad_token_id).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def lm_recipe(model_dir: Path, data: Path, **changes: Any) -> dict[str, Any]:
    recipe: dict[str, Any] = {
        "schema_version": 1,
        "name": "tiny-lm",
        "model": str(model_dir),
        "task": "causal-lm",
        "data": {"source": str(data), "max_examples": 300, "calibration_size": 8},
        "stages": [
            {
                "kind": "distill",
                "student": {"num_layers": 2},
                "divergence": "jsd",
                "temperature": 1.0,
                "max_steps": 8,
                "batch_size": 8,
                "max_seq_len": 32,
                "lr": 1e-3,
            },
            {"kind": "export", "parity_atol": 1e-4},
            {"kind": "quantize", "mode": "dynamic"},
        ],
        "bench": {
            "batch_sizes": [1],
            "seq_lens": [8],
            "new_tokens": 4,
            "runs": 6,
            "rounds": 2,
            "warmup_runs": 1,
            "eval_max_examples": 20,
            "eval_max_seq_len": 32,
        },
        "gates": {"max_perplexity_increase": 10.0},
    }
    recipe.update(changes)
    return recipe


def test_a_causal_lm_goes_through_distill_export_int8_and_bench(
    tmp_path: Path, tiny_llama_dir: Path, rt_csv: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from edgepipe.errors import InputError
    from edgepipe.pipeline.cli import main
    from edgepipe.runtime.predictor import Predictor

    recipe = write_recipe(tmp_path / "lm.yaml", lm_recipe(tiny_llama_dir, rt_csv))
    run = tmp_path / "run"
    assert main(["build", str(recipe), "--out", str(run)]) == 0
    table = capsys.readouterr().out.splitlines()  # the terminal summary: one row per artifact, then the path
    assert table[1].split() == ["artifact", "engine", "MB", "ppl", "KL", "tok/s", "x", "teacher", "1/size"]
    assert [line.split()[0] for line in table[3:7]] == ["teacher", "student", "fp32", "int8-dynamic"]
    assert table[3].split()[-2:] == ["1.00", "1.0"] and table[-1].startswith("report: ")
    distill = json.loads((run / "01-distill" / "metrics.json").read_text(encoding="utf-8"))
    assert distill["layers"] == [0, 3] and distill["divergence"] == "jsd"
    assert distill["loss_end"] < distill["loss_start"]
    student = json.loads((run / "01-distill" / "model" / "config.json").read_text(encoding="utf-8"))
    assert student["num_hidden_layers"] == 2
    export = json.loads((run / "02-export" / "metrics.json").read_text(encoding="utf-8"))
    assert all(p["max_abs_diff"] <= 1e-4 for p in export["parity"])
    counts = json.loads((run / "03-quantize" / "metrics.json").read_text(encoding="utf-8"))["op_counts"]
    assert counts["MatMulInteger"] == 2 * 6 + 1  # q, k, v, o, gate, up of 2 layers and the head (down stays fp32)

    report = json.loads((run / "report.json").read_text(encoding="utf-8"))
    rows = {r["artifact"]: r for r in report["results"]}
    assert set(rows) == {"teacher", "student", "fp32", "int8-dynamic"} and report["reference"] == "teacher"
    assert rows["fp32"]["perplexity"] == pytest.approx(rows["student"]["perplexity"], rel=1e-4)
    assert rows["fp32"]["greedy_agreement"] == pytest.approx(rows["student"]["greedy_agreement"])
    assert all(r["decode_tokens_per_s"]["n"] == 6 and r["ttft_ms"]["p50"] > 0 for r in rows.values())
    assert report["gates"] and all(line.startswith("pass") for line in report["gates"])
    markdown = (run / "report.md").read_text(encoding="utf-8")
    assert "| int8-dynamic | onnxruntime | int8-dynamic |" in markdown

    predictor = Predictor.load(run / "03-quantize" / "int8-dynamic")
    prompts = ["a gripping and funny", "the worst film of"]
    sampled = predictor.generate(prompts, 6, do_sample=True, temperature=1.5, seed=3)
    assert predictor.generate(prompts, 6, do_sample=True, temperature=1.5, seed=3) == sampled
    assert predictor.generate(prompts, 6, do_sample=True, temperature=1.5, seed=4) != sampled
    greedy = predictor.generate(prompts, 6)
    assert greedy == predictor.generate(prompts, 6) and len(greedy) == 2
    torch_student = Predictor.load(run / "01-distill" / "model")
    assert torch_student.generate(prompts, 6) == Predictor.load(run / "02-export" / "fp32").generate(prompts, 6)
    with pytest.raises(InputError, match=r"this artifact is a causal LM: use Predictor\.generate"):
        predictor.logits(prompts)


def test_weight_only_stages_measure_their_cost_and_the_bench_gates_kl(
    tmp_path: Path, tiny_llama_dir: Path, rt_csv: Path
) -> None:
    """The fused export (onnxruntime-genai's GroupQueryAttention graph) quantized weight-only: 8-bit RTN, 4-bit HQQ
    with the most sensitive MatMuls at 8 bits (measured), 4-bit GPTQ on calibration text; each stage reports KL
    and top-1 against its fp32 source, the bench KL and top-1 against the teacher."""
    import onnx

    from edgepipe.pipeline.cli import main

    distill = lm_recipe(tiny_llama_dir, rt_csv)["stages"][0]
    # its FFN, residual channels and query heads width-pruned (Minitron): hidden 48 with 2 heads of 16 (head_dim !=
    # hidden / heads), one query head per key/value head
    distill["student"] = {"num_layers": 2, "intermediate_size": 64, "hidden_size": 48, "num_heads": 2}
    stages = [
        distill,
        {"kind": "export", "parity_atol": 1e-4, "fuse": True},
        {"kind": "quantize", "mode": "weight-only", "weights": {"bits": 8}},
        {
            "kind": "quantize",
            "mode": "weight-only",
            "weights": {"algorithm": "hqq", "sensitive_8bit": 0.2, "eight_bit": ["lm_head"], "calibration_texts": 8},
        },
        # symmetric: o_proj's 32 inputs are one block, where onnxruntime packs asymmetric zero points wrongly
        {
            "kind": "quantize",
            "mode": "weight-only",
            "weights": {"algorithm": "gptq", "calibration_texts": 4, "symmetric": True},
        },
    ]
    gates = {"max_perplexity_increase": 10.0, "max_kl_divergence": 5.0}
    recipe = write_recipe(tmp_path / "lm.yaml", lm_recipe(tiny_llama_dir, rt_csv, stages=stages, gates=gates))
    run = tmp_path / "run"
    assert main(["build", str(recipe), "--out", str(run)]) == 0

    def metrics(stage: str) -> dict[str, Any]:
        return json.loads((run / stage / "metrics.json").read_text(encoding="utf-8"))

    student = metrics("01-distill")
    assert student["ffn_width"] == 64 and len(student["importance_kept"]["ffn"]) == 2
    assert student["hidden_size"] == 48 and 0.75 < student["importance_kept"]["hidden"] < 1
    assert student["num_heads"] == 2 and len(student["importance_kept"]["heads"]) == 2
    config = json.loads((run / "01-distill" / "model" / "config.json").read_text())
    assert (config["intermediate_size"], config["hidden_size"], config["head_dim"]) == (64, 48, 16)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (2, 2)
    export = metrics("02-export")
    assert export["fused"]["parity"] and all(p["max_abs_diff"] <= 1e-4 for p in export["fused"]["parity"])
    w8, mixed, gptq = metrics("03-quantize"), metrics("04-quantize"), metrics("05-quantize")
    # the fused graph: q, k and v one MatMul, so 5 per layer and the head
    assert w8["op_counts"]["MatMulNBits"] == 2 * 5 + 1 and w8["op_counts"]["GroupQueryAttention"] == 2
    assert w8["val_kl"] < mixed["val_kl"]
    assert w8["val_kl"] >= 0 and 0.5 < w8["val_top1"] <= 1 and w8["source_val_perplexity"] > 1
    # sensitivity: every torch Linear of the student measured; 20% of the 11 MatMuls (3) plus the head at 8 bits,
    # the most sensitive first (a q, k or v projection stands for the fused qkv MatMul)
    assert len(mixed["sensitivity_kl"]) == 15 and "lm_head" in mixed["sensitivity_kl"]
    chosen = mixed["weights"]["eight_bit"]
    assert len(chosen) in (3, 4) and any("lm_head" in name for name in chosen)
    top = next(iter(mixed["sensitivity_kl"])).replace("self_attn.", "attn.")
    top = top[: -len("q_proj")] + "qkv_proj" if top.endswith(("q_proj", "k_proj", "v_proj")) else top
    assert any(name.replace("/", ".").endswith(f".{top}.MatMul") for name in chosen), (top, chosen)
    graph = onnx.load(str(run / "04-quantize" / "w4-hqq-mixed" / "model.onnx")).graph
    matmuls = [n for n in graph.node if n.op_type == "MatMulNBits" and "/blocksum" not in n.name]  # integer_kernel's
    bits = [next(a.i for a in n.attribute if a.name == "bits") for n in matmuls]
    assert bits.count(8) == len(chosen) and bits.count(4) == 11 - len(chosen)
    assert gptq["op_counts"]["MatMulNBits"] == 11 and gptq["weights"]["algorithm"] == "gptq"

    report = json.loads((run / "report.json").read_text(encoding="utf-8"))
    rows = {r["artifact"]: r for r in report["results"]}
    assert set(rows) == {"teacher", "student", "fp32", "fp32-fused", "w8-rtn", "w4-hqq-mixed", "w4-gptq"}
    assert rows["teacher"]["kl_divergence"] == 0 and rows["teacher"]["top1_agreement"] == 1
    for name in ("fp32", "fp32-fused"):  # both exports compute the student's function
        assert rows[name]["kl_divergence"] == pytest.approx(rows["student"]["kl_divergence"], abs=1e-4)
    assert rows["fp32-fused"]["size_mb"] == pytest.approx(rows["fp32"]["size_mb"], rel=0.3)  # external data counted
    assert sum(line.startswith("pass") and "KL divergence" in line for line in report["gates"]) == 6


def test_causal_lm_recipes_reject_what_does_not_apply(tiny_llama_dir: Path, rt_csv: Path) -> None:
    import torch

    from edgepipe.pipeline.recipe import parse_recipe
    from edgepipe.pipeline.runner import check_recipe

    recipe = lm_recipe(tiny_llama_dir, rt_csv, gates={"max_accuracy_drop": 0.1})
    recipe["stages"][0]["student"] = {"num_layers": 9, "intermediate_size": 500}
    recipe["stages"][0]["transfer"] = {"source": "rotten-tomatoes"}
    recipe["stages"].append({"kind": "quantize", "mode": "static"})
    recipe["stages"].insert(0, {"kind": "finetune"})
    problems = check_recipe(parse_recipe(recipe))
    assert problems == [
        "`stages.0`: finetune does not apply to causal-lm; its stages are distill, export, quantize",
        "`stages.1.transfer`: causal-lm distills on its own text; remove it",
        "`stages.4.mode`: causal-lm quantizes `weight-only` (MatMulNBits), `int4` or `dynamic` (int8)",
        "`gates.max_accuracy_drop`: causal-lm is gated on perplexity: use gates.max_perplexity_increase",
        "`stages.1.student.num_layers`: 9 is not between 1 and the teacher's 4 layers",
    ]
    recipe["stages"][1]["student"] = {"num_layers": 2, "intermediate_size": 500}
    assert check_recipe(parse_recipe(recipe))[-1] == (
        "`stages.1.student.intermediate_size`: 500 is not between 1 and the teacher's FFN width 128"
    )
    recipe["stages"][1]["student"] = {"num_layers": 2, "hidden_size": 65}
    assert check_recipe(parse_recipe(recipe))[-1] == (
        "`stages.1.student.hidden_size`: 65 is not between 1 and the teacher's hidden size 64"
    )
    recipe["stages"][1]["student"] = {"num_layers": 2, "hidden_size": 50}
    assert check_recipe(parse_recipe(recipe))[-1] == (
        "`stages.1.student.hidden_size`: 50 is not a multiple of the student's 4 attention heads "
        "(transformers' config requires it); use 48 or 52"
    )
    recipe["stages"][1]["student"] = {"num_layers": 2, "num_heads": 2, "hidden_size": 51}
    assert check_recipe(parse_recipe(recipe))[-1].startswith(
        "`stages.1.student.hidden_size`: 51 is not a multiple of the student's 2 attention heads"
    )
    if not torch.cuda.is_available():
        recipe["stages"][1]["student"] = {"num_layers": 2}
        recipe["stages"][1]["device"] = "cuda"
        assert check_recipe(parse_recipe(recipe))[-1] == (
            "`stages.1.device`: cuda, but torch sees no CUDA device on this machine; use device: cpu"
        )
        del recipe["stages"][1]["device"]
    recipe["stages"][1]["student"] = {"num_layers": 2, "num_heads": 3}
    assert check_recipe(parse_recipe(recipe))[-1] == (
        "`stages.1.student.num_heads`: 3 query heads must be a multiple of the teacher's 2 key/value heads, at "
        "most its 4 (grouped-query attention keeps its key/value heads)"
    )
    recipe["stages"][1]["student"] = {"num_layers": 2, "num_heads": 2}
    assert not [p for p in check_recipe(parse_recipe(recipe)) if "student" in p]


@pytest.mark.parametrize(
    ("key", "value"), [("adaptive", "anneal"), ("layer_map", {0: 3}), ("hidden_projection", False)]
)
def test_causal_lm_distill_refuses_the_keys_it_has_no_use_for(
    tiny_llama_dir: Path, rt_csv: Path, key: str, value: Any
) -> None:
    from edgepipe.pipeline.recipe import parse_recipe
    from edgepipe.pipeline.runner import check_recipe

    raw = lm_recipe(tiny_llama_dir, rt_csv)
    raw["stages"][0][key] = value
    problems = check_recipe(parse_recipe(raw))
    assert [p for p in problems if p.startswith(f"`stages.0.{key}`: causal-lm")] and len(problems) == 1


def test_causal_lm_distill_honours_weight_decay_and_warmup(tiny_llama_dir: Path) -> None:
    from transformers import AutoTokenizer

    from edgepipe.pipeline.lm import distill_lm, layer_subset, lm_texts

    teacher = tiny_llama(layers=4, vocab=30522 + 64)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    texts = lm_texts("train")[:64]

    def first_weight(**options: Any) -> Any:
        student = layer_subset(teacher, [0, 3])
        distill_lm(teacher, student, texts, tokenizer, steps=3, batch_size=4, seq_len=16, lr=1e-2, **options)
        return student.model.layers[0].mlp.up_proj.weight.detach().clone()

    plain = first_weight()
    assert not first_weight(weight_decay=0.5).allclose(plain)
    assert not first_weight(warmup_ratio=0.5).allclose(plain)
