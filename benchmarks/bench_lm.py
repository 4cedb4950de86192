"""Causal-LM benchmark: SmolLM2-135M teacher vs a distilled layer-subset student, fp32 / int8 / int4.

    python benchmarks/bench_lm.py --json runs/bench/lm.json [--work runs/lm] [--steps 300]

Converts the shipped SmolLM2-135M GGUF once (cached in WORK/cache), builds the student from a subset of
the teacher's decoder layers, distills it with `distill_lm` on the shipped review snippets (train
split) with the distill settings of `recipes/smollm2.yaml` (the flags override them), exports teacher
and student to ONNX with a KV cache (parity-checked step by step), quantizes the student (dynamic
int8, 4-bit MatMulNBits) and the teacher (dynamic int8: the other end of the trade-off, full depth)
and measures for each artifact:
- perplexity on held-out snippets (test split; padding excluded),
- greedy agreement with the fp32 torch teacher on fixed prompts,
- time to first token and decode tokens/s at batch 1 for a fixed prompt and generation length,
  timed interleaved over rounds in rotating order, one artifact loaded at a time, warm-up first.
The distilled student is cached in WORK/student for the same settings, so a rerun only re-measures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from edgepipe.benchmarks.harness import summarize
from edgepipe.export.causal_lm import check_causal_parity, export_causal_lm
from edgepipe.export.lm_quantize import WeightOnly, quantize_int8, quantize_weight_only
from edgepipe.pipeline.adapters import text_batches
from edgepipe.pipeline.lm import (
    distill_lm,
    greedy_agreement,
    layer_subset,
    lm_texts,
)
from edgepipe.pipeline.models import smollm2_folder
from edgepipe.pipeline.recipe import DistillConfig, default_recipe_path, load_recipe
from edgepipe.runtime.backends import RuntimeOptions
from edgepipe.runtime.generate import OnnxCausalLM, TorchCausalLM, perplexity, prompt_windows

log = logging.getLogger("bench_lm")

ARTIFACTS = ("teacher-torch", "teacher-onnx", "teacher-int8", "student-onnx", "student-int8", "student-int4")


def recipe_distill() -> DistillConfig:
    """The distill stage of the shipped causal-lm recipe: the benchmark's default student and settings."""
    recipe = load_recipe(default_recipe_path().parent / "smollm2.yaml")
    return next(s for s in recipe.stages if isinstance(s, DistillConfig))


def _prompts(tokenizer: Any, texts: list[str], count: int, length: int) -> np.ndarray:
    """`count` windows of exactly `length` tokens from the held-out text stream (no padding)."""
    return prompt_windows([tokenizer(t)["input_ids"] for t in texts], count, length, tokenizer.eos_token_id)


def _student(
    teacher: Any, tokenizer: Any, folder: Path, layers: list[int], train: list[str], settings: dict[str, Any]
) -> tuple[Any, dict[str, Any]]:
    """The distilled student, from `folder` when it was trained with the same settings."""
    from transformers import AutoModelForCausalLM

    key = {"layers": layers, **settings}
    meta = folder / "distill.json"
    if meta.is_file() and json.loads(meta.read_text())["settings"] == key:
        return AutoModelForCausalLM.from_pretrained(folder).eval(), json.loads(meta.read_text())["metrics"]
    student = layer_subset(teacher, layers)
    start = time.perf_counter()
    metrics = distill_lm(teacher, student, train, tokenizer, progress=True, **settings)
    metrics["train_s"] = round(time.perf_counter() - start, 1)
    student.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    meta.write_text(json.dumps({"settings": key, "metrics": metrics}))
    return student, metrics


def _export(model: Any, folder: Path, atol: float) -> dict[str, Any]:
    path = folder / "model.onnx"
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    export_causal_lm(model, path)
    exported = time.perf_counter() - start
    parity = check_causal_parity(model, path, atol=atol)
    return {
        "export_s": round(exported, 1),
        "parity_max_abs": max(r.max_abs_diff for r in parity),
        "parity_argmax": min(r.argmax_agreement for r in parity),
    }


def _speed(
    models: dict[str, Any], prompt: np.ndarray, new_tokens: int, runs: int, rounds: int
) -> dict[str, dict[str, Any]]:
    """TTFT and decode tokens/s per artifact, interleaved in rotating order; one loaded at a time."""
    mask = np.ones_like(prompt)
    ttft: dict[str, list[float]] = {name: [] for name in models}
    tok_s: dict[str, list[float]] = {name: [] for name in models}
    names = list(models)
    per_round = max(1, runs // rounds)
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            with models[name]() as lm:
                lm.generate(prompt, mask, new_tokens)  # warm-up: first-run allocations and kernel choice
                for _ in range(per_round):
                    result = lm.generate(prompt, mask, new_tokens)
                    ttft[name].append(result.ttft_s * 1e3)
                    tok_s[name].append(result.decode_tokens_per_s)
    out = {}
    for name in names:
        t, s = summarize(ttft[name]), summarize(tok_s[name])
        out[name] = {
            "ttft_ms_p50": round(t.p50, 2),
            "ttft_ms_min_max": [round(t.min, 2), round(t.max, 2)],
            "decode_tok_s_p50": round(s.p50, 2),
            "decode_tok_s_min_max": [round(s.min, 2), round(s.max, 2)],
            "decode_tok_s_cv": round(s.cv, 3),
            "n": t.n,
        }
    return out


def run_lm(
    work: Path,
    *,
    overrides: dict[str, Any] | None = None,
    ppl_texts: int = 256,
    agreement_prompts: int = 8,
    prompt_len: int = 32,
    new_tokens: int = 32,
    runs: int = 9,
    rounds: int = 3,
    parity_atol: float = 1e-3,
    seed: int = 0,
    torch_threads: int | None = None,
) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if torch_threads:
        # torch's OpenMP threads spin-wait: with another busy process on a 2-core machine, 2 threads made
        # a distillation step ~7x slower than 1 thread (27.7 vs 4.1 s); on an idle machine 2 are faster
        torch.set_num_threads(torch_threads)

    timings: dict[str, float] = {}
    start = time.perf_counter()
    teacher_dir = smollm2_folder(work / "cache")
    timings["convert_s"] = round(time.perf_counter() - start, 1)
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    cfg = recipe_distill()
    layers = list(cfg.student.layers or [])
    seq_len = cfg.max_seq_len
    train, held_out = lm_texts("train", seed), lm_texts("test", seed)[:ppl_texts]
    settings = {
        "kind": cfg.divergence,
        "temperature": cfg.temperature,
        "steps": cfg.max_steps,
        "batch_size": cfg.batch_size,
        "seq_len": seq_len,
        "lr": cfg.lr,
        "kd_weight": cfg.loss.kd,
        "ce_weight": cfg.loss.ce,
        "seed": seed,
    }
    overrides = dict(overrides or {})
    layers = overrides.pop("layers", None) or layers
    settings.update(overrides)
    student, distill = _student(teacher, tokenizer, work / "student", layers, train, settings)

    folders = {name: work / name for name in ARTIFACTS[1:]}
    parity = {
        "teacher-onnx": _export(teacher, folders["teacher-onnx"], parity_atol),
        "student-onnx": _export(student, folders["student-onnx"], parity_atol),
    }
    quantizers: dict[str, tuple[str, Callable[[Path, Path], dict[str, int]]]] = {
        "teacher-int8": ("teacher-onnx", quantize_int8),
        "student-int8": ("student-onnx", quantize_int8),
        "student-int4": ("student-onnx", lambda s, d: quantize_weight_only(s, d, WeightOnly(bits=4, symmetric=True))),
    }
    ops = {}
    for name, (source, quantize) in quantizers.items():
        start = time.perf_counter()
        folders[name].mkdir(exist_ok=True)
        ops[name] = quantize(folders[source] / "model.onnx", folders[name] / "model.onnx")
        timings[f"{name}_s"] = round(time.perf_counter() - start, 1)
    del student

    @contextlib.contextmanager
    def opener(name: str) -> Iterator[Any]:
        yield TorchCausalLM(teacher) if name == "teacher-torch" else OnnxCausalLM(folders[name])

    models = {name: (lambda name=name: opener(name)) for name in ARTIFACTS}
    prompts = _prompts(tokenizer, held_out, agreement_prompts, prompt_len)
    quality: dict[str, dict[str, Any]] = {}
    reference = None
    for name in ARTIFACTS:
        start = time.perf_counter()
        with models[name]() as lm:
            ppl = perplexity(lm.logits, text_batches(tokenizer, held_out, 16, seq_len))
            tokens = lm.generate(prompts, np.ones_like(prompts), new_tokens).tokens
        reference = tokens if reference is None else reference
        size = sum(f.stat().st_size for f in folders[name].iterdir()) if name in folders else None
        quality[name] = {
            "ppl": round(ppl, 3),
            "greedy_agreement": round(greedy_agreement(reference, tokens), 4),
            "size_mb": round(size / 2**20, 1) if size else None,
            "eval_s": round(time.perf_counter() - start, 1),
        }
    speed = _speed(models, prompts[:1], new_tokens, runs, rounds)
    rows = {name: {**quality[name], **speed[name]} for name in ARTIFACTS}
    teacher_onnx_tok_s = rows["teacher-onnx"]["decode_tok_s_p50"]
    teacher_torch_tok_s = rows["teacher-torch"]["decode_tok_s_p50"]
    int8_tok_s = rows["student-int8"]["decode_tok_s_p50"]
    return {
        "teacher_ppl": rows["teacher-torch"]["ppl"],
        "teacher_onnx_ppl": rows["teacher-onnx"]["ppl"],
        "teacher_int8_ppl": rows["teacher-int8"]["ppl"],
        "teacher_int8_tok_s": rows["teacher-int8"]["decode_tok_s_p50"],
        "student_ppl": rows["student-onnx"]["ppl"],
        "int8_ppl": rows["student-int8"]["ppl"],
        "int4_ppl": rows["student-int4"]["ppl"],
        "teacher_tok_s": teacher_onnx_tok_s,
        "teacher_torch_tok_s": teacher_torch_tok_s,
        "student_tok_s": rows["student-onnx"]["decode_tok_s_p50"],
        "student_int8_tok_s": int8_tok_s,
        "student_int4_tok_s": rows["student-int4"]["decode_tok_s_p50"],
        "int8_speedup_vs_teacher_onnx": round(int8_tok_s / teacher_onnx_tok_s, 3),
        "int8_speedup_vs_teacher_torch": round(int8_tok_s / teacher_torch_tok_s, 3),
        "int8_ppl_ratio": round(rows["student-int8"]["ppl"] / rows["teacher-torch"]["ppl"], 3),
        "student_layers": layers,
        "distill": {k: v for k, v in distill.items() if k != "losses"} | {"losses_every_10": distill["losses"][::10]},
        "parity": parity,
        "quantized_ops": ops,
        "timings": timings,
        "settings": {
            "prompt_len": prompt_len,
            "new_tokens": new_tokens,
            "batch": 1,
            "runs": runs,
            "rounds": rounds,
            "ppl_texts": len(held_out),
            "agreement_prompts": agreement_prompts,
            "torch_threads": torch.get_num_threads(),
            "ort_threads": RuntimeOptions().resolved_threads,
        },
        "rows": rows,
        "table": table(rows),
    }


def table(rows: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| artifact | ppl | greedy agreement | TTFT ms p50 (min-max) | decode tok/s p50 (min-max) | size MB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, row in rows.items():
        lo, hi = row["ttft_ms_min_max"]
        slo, shi = row["decode_tok_s_min_max"]
        lines.append(
            f"| {name} | {row['ppl']:.2f} | {row['greedy_agreement']:.3f} | {row['ttft_ms_p50']:.1f} "
            f"({lo:.1f}-{hi:.1f}) | {row['decode_tok_s_p50']:.1f} ({slo:.1f}-{shi:.1f}) | {row['size_mb'] or '-'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("runs/lm"))
    # unset flags keep recipes/smollm2.yaml's distill settings
    parser.add_argument("--layers", type=int, nargs="+", help="teacher layers the student keeps")
    parser.add_argument("--kind", choices=["forward_kl", "reverse_kl", "jsd"])
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--kd-weight", type=float)
    parser.add_argument("--ce-weight", type=float)
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--torch-threads", type=int, help="torch intra-op threads (default: torch's own)")
    args = parser.parse_args(argv)
    # onnxruntime.quantization logs every tensor at INFO on the root logger: INFO only for ours
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    for name in ("edgepipe", "bench_lm"):
        logging.getLogger(name).setLevel(logging.INFO)
    args.work.mkdir(parents=True, exist_ok=True)
    result = run_lm(
        args.work,
        overrides={
            key: value
            for key, value in {
                "layers": args.layers,
                "kind": args.kind,
                "temperature": args.temperature,
                "steps": args.steps,
                "batch_size": args.batch_size,
                "lr": args.lr,
                "kd_weight": args.kd_weight,
                "ce_weight": args.ce_weight,
            }.items()
            if value is not None
        },
        runs=args.runs,
        torch_threads=args.torch_threads,
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(result["table"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
