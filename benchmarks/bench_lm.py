"""Causal-LM benchmark: the SmolLM2-135M teacher and a distilled layer-subset student, fp32 / int8 / int4,
against llama.cpp on the teacher's own GGUF, in one run.

    python benchmarks/bench_lm.py --json runs/bench/lm.json [--work runs/lm] [--steps 300] \\
        [--llamacpp-python .venv-llamacpp/bin/python]

Converts the shipped SmolLM2-135M GGUF once (cached in WORK/cache), builds the student from a subset of the
teacher's decoder layers and distills it with `distill_lm` on the shipped review snippets (train split) with
the distill settings of `recipes/smollm2-student.yaml` (the flags override them; cached in WORK/student by settings).
Exports teacher and student twice: our torch.onnx export (the fp32 baseline every ratio is against) and
onnxruntime-genai's fused graph (GroupQueryAttention), both parity-checked step by step against PyTorch.
Quantizes the fused graphs weight-only (MatMulNBits: 8-bit RTN; 4-bit RTN, HQQ, GPTQ; HQQ with the most
sensitive MatMuls at 8 bits by measured KL) and the plain teacher with dynamic int8 (the previous path), then
measures every artifact:
- teacher-forced on held-out snippets (test split), as llama.cpp's `perplexity --kl-divergence`:
  perplexity, mean KL divergence from the fp32 ONNX teacher, top-1 agreement with it;
- free-running greedy agreement with the fp32 ONNX teacher on fixed prompts;
- time to first token and decode tokens/s at batch 1, fixed prompt and generation length, timed interleaved
  over rounds in rotating order, one artifact loaded at a time, warm-up first.
llama.cpp (llama-cpp-python built from the registry's source, its own environment) runs the shipped Q4_1 GGUF,
the teacher's own weights at 4 bits, on the same token ids with the same threads, one process per round.
Quantized artifacts are cached in WORK by name: delete a folder to rebuild it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from edgepipe.benchmarks.harness import summarize
from edgepipe.export.causal_lm import FUSED_CASES, check_causal_parity, export_causal_lm, export_fused
from edgepipe.export.lm_quantize import WeightOnly, head_nodes, matmul_nodes, quantize_int8, quantize_weight_only
from edgepipe.pipeline.adapters import text_batches
from edgepipe.pipeline.lm import (
    distill_lm,
    greedy_agreement,
    layer_subset,
    lm_texts,
    matmul_sensitivity,
    prune_width,
)
from edgepipe.pipeline.models import SMOLLM2_GGUF, SMOLLM2_PACKAGE, package_dir, smollm2_folder
from edgepipe.pipeline.recipe import DistillConfig, default_recipe_path, load_recipe
from edgepipe.pipeline.stages.lm import WIDTH_CALIBRATION_TEXTS, node_of
from edgepipe.runtime.backends import RuntimeOptions
from edgepipe.runtime.generate import OnnxCausalLM, TorchCausalLM, prompt_windows, token_quality
from edgepipe.runtime.host import host_info, versions

log = logging.getLogger("bench_lm")

PEER = "llama.cpp Q4_1 (shipped GGUF)"
CALIBRATION_TEXTS = 16  # train texts for GPTQ and the sensitivity measurement (<= 64 tokens each)
SENSITIVE_FRACTION = 0.1  # of the MatMuls kept at 8 bits in the mixed artifact


def recipe_distill() -> DistillConfig:
    """The distill stage of the shipped causal-lm recipe: the benchmark's default student and settings."""
    recipe = load_recipe(default_recipe_path().parent / "smollm2-student.yaml")
    return next(s for s in recipe.stages if isinstance(s, DistillConfig))


def distill_settings(cfg: DistillConfig, seed: int) -> dict[str, Any]:
    """`distill_lm`'s keyword arguments from a distill stage: what a cached student is keyed by."""
    return {
        "kind": cfg.divergence,
        "temperature": cfg.temperature,
        "steps": cfg.max_steps,
        "batch_size": cfg.batch_size,
        "seq_len": cfg.max_seq_len,
        "lr": cfg.lr,
        "kd_weight": cfg.loss.kd,
        "ce_weight": cfg.loss.ce,
        "seed": seed,
    }


def _prompts(tokenizer: Any, texts: list[str], count: int, length: int) -> np.ndarray:
    """`count` windows of exactly `length` tokens from the held-out text stream (no padding)."""
    return prompt_windows([tokenizer(t)["input_ids"] for t in texts], count, length, tokenizer.eos_token_id)


def _student(
    teacher: Any,
    tokenizer: Any,
    folder: Path,
    layers: list[int],
    train: list[str],
    settings: dict[str, Any],
    ffn_width: int | None = None,
    hidden_width: int | None = None,
) -> tuple[Any, dict[str, Any]]:
    """The distilled student, from `folder` when it was trained with the same settings; with `ffn_width` /
    `hidden_width` its FFN / residual channels are first width-pruned by activation importance on train texts
    (Minitron), then distilled the same way."""
    import torch
    from transformers import AutoModelForCausalLM

    widths = {"ffn_width": ffn_width, "hidden_width": hidden_width}
    key = {"layers": layers, **settings, **{k: v for k, v in widths.items() if v}}
    meta = folder / "distill.json"
    if meta.is_file() and json.loads(meta.read_text())["settings"] == key:
        return AutoModelForCausalLM.from_pretrained(folder).eval(), json.loads(meta.read_text())["metrics"]
    student = layer_subset(teacher, layers)
    kept = None
    if ffn_width or hidden_width:
        texts = train[:WIDTH_CALIBRATION_TEXTS]
        batches = [(torch.from_numpy(i), torch.from_numpy(m)) for i, m in text_batches(tokenizer, texts, 8, 64)]
        kept = prune_width(student, batches, intermediate_size=ffn_width, hidden_size=hidden_width)
    start = time.perf_counter()
    metrics = distill_lm(teacher, student, train, tokenizer, **settings)
    metrics["train_s"] = round(time.perf_counter() - start, 1)
    metrics["parameters"] = sum(p.numel() for p in student.parameters())
    metrics["importance_kept"] = kept
    student.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    meta.write_text(json.dumps({"settings": key, "metrics": metrics}))
    return student, metrics


def _parity_summary(parity: list[Any]) -> dict[str, Any]:
    return {
        "parity_max_abs": max(r.max_abs_diff for r in parity),
        "parity_argmax": min(r.argmax_agreement for r in parity),
    }


def _export(model: Any, folder: Path, atol: float) -> dict[str, Any]:
    """Our torch.onnx export with the KV cache, once; its step-by-step parity against PyTorch."""
    path = folder / "model.onnx"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        export_causal_lm(model, path)
    return _parity_summary(check_causal_parity(model, path, atol=atol))


def _export_fused(model: Any, source: Path, folder: Path, atol: float) -> dict[str, Any]:
    """onnxruntime-genai's fused graph of the folder `source`, once; parity against PyTorch."""
    if not (folder / "model.onnx").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        export_fused(source, folder, folder.with_name(f"{folder.name}-builder.log"))
    return _parity_summary(check_causal_parity(model, folder / "model.onnx", atol=atol, cases=FUSED_CASES))


def _quantize(src: Path, dst: Path, quantize: Callable[[Path, Path], dict[str, int]]) -> dict[str, Any]:
    """`quantize` src's model.onnx into dst (with src's configs and tokenizer), once; its op counts and time."""
    meta = dst / "quantized.json"
    if meta.is_file():
        return json.loads(meta.read_text())
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    for item in src.iterdir():
        if item.is_file() and item.name not in ("model.onnx", "model.onnx.data"):
            shutil.copy2(item, dst / item.name)
    start = time.perf_counter()
    ops = quantize(src / "model.onnx", dst / "model.onnx")
    done = {"seconds": round(time.perf_counter() - start, 1), "op_counts": ops}
    meta.write_text(json.dumps(done))
    return done


def _size_mb(folder: Path) -> float:
    files = [folder / "model.onnx", folder / "model.onnx.data"]
    return round(sum(f.stat().st_size for f in files if f.is_file()) / 1e6, 1)


class LlamaCpp:
    """The llama.cpp peer behind a child process in its own environment (benchmarks/peers/llamacpp_lm.py)."""

    def __init__(self, python: Path, gguf: Path, threads: int) -> None:
        self.python, self.gguf, self.threads = python, gguf, threads

    def run(self, **job: Any) -> dict[str, Any]:
        script = Path(__file__).parent / "peers" / "llamacpp_lm.py"
        with tempfile.TemporaryDirectory() as tmp:
            job_file, out = Path(tmp) / "job.json", Path(tmp) / "out.json"
            job_file.write_text(json.dumps({"threads": self.threads, **job}))
            command = [str(self.python), str(script), "--gguf", str(self.gguf), "--job", str(job_file)]
            subprocess.run([*command, "--json", str(out)], check=True)
            return dict(json.loads(out.read_text()))


def llamacpp_problem(python: Path | None) -> str | None:
    """Why the llama.cpp peer cannot run, or None."""
    if python is None:
        return "no --llamacpp-python given (make .venv-llamacpp/.installed builds llama-cpp-python from source)"
    if not python.is_file():
        return f"{python} does not exist; run `make .venv-llamacpp/.installed` (builds llama.cpp, ~9 min on 2 cores)"
    done = subprocess.run([str(python), "-c", "import llama_cpp"], capture_output=True, text=True, check=False)
    return f"{python} cannot import llama_cpp: {done.stderr.strip()[-200:]}" if done.returncode else None


def _speed(
    models: dict[str, Callable[[], Any]],
    peer: LlamaCpp | None,
    prompt: np.ndarray,
    new_tokens: int,
    runs: int,
    rounds: int,
) -> dict[str, dict[str, Any]]:
    """TTFT and decode tokens/s per artifact, interleaved in rotating order; one loaded at a time, the peer in
    its own process per round."""
    mask = np.ones_like(prompt)
    names = [*models, *([PEER] if peer else [])]
    ttft: dict[str, list[float]] = {name: [] for name in names}
    tok_s: dict[str, list[float]] = {name: [] for name in names}
    per_round = max(1, runs // rounds)
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            if name == PEER and peer is not None:
                got = peer.run(prompt=prompt[0].tolist(), new_tokens=new_tokens, runs=per_round)
                ttft[name] += [1e3 * t for t in got["ttft_s"]]
                tok_s[name] += got["decode_tok_s"]
                continue
            lm = models[name]()
            lm.generate(prompt, mask, new_tokens)  # warm-up: first-run allocations and kernel choice
            for _ in range(per_round):
                result = lm.generate(prompt, mask, new_tokens)
                ttft[name].append(result.ttft_s * 1e3)
                tok_s[name].append(result.decode_tokens_per_s)
            del lm
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


def _peer_quality(peer: LlamaCpp, token_lists: list[list[int]], reference_top: list[np.ndarray]) -> dict[str, Any]:
    """The peer's teacher-forced perplexity and top-1 agreement with the reference, on the same token ids."""
    rows = peer.run(texts=token_lists)["quality"]
    nll = sum(r["nll"] for r in rows)
    count = sum(len(ids) - 1 for ids in token_lists)
    agree = sum(int((np.asarray(r["argmax"]) == ref).sum()) for r, ref in zip(rows, reference_top, strict=True))
    return {"ppl": round(float(np.exp(nll / count)), 3), "top1": round(agree / count, 4), "kl": None}


def _choose(rows: dict[str, dict[str, Any]], base: str, names: list[str]) -> dict[str, Any] | None:
    """The most accurate (lowest perplexity) of `names`, with its ratios against `base`."""
    if not names:
        return None
    name = min(names, key=lambda n: rows[n]["ppl"])
    row = rows[name]
    return {
        "name": name,
        "ppl_ratio": round(row["ppl"] / rows[base]["ppl"], 4),
        "kl": row["kl"],
        "top1": row["top1"],
        "tok_s_ratio": round(row["decode_tok_s_p50"] / rows[base]["decode_tok_s_p50"], 3),
    }


Quantizer = Callable[[Path, Path], dict[str, int]]


def _head(folder: Path) -> tuple[str, ...]:
    return tuple(head_nodes(folder / "model.onnx"))


def _weights(settings: WeightOnly, **extra: Any) -> Quantizer:
    return lambda src, dst: quantize_weight_only(src, dst, settings, **extra)


def _teacher_quantizers(
    teacher: Any, tokenizer: Any, f: dict[str, Path], train: list[str], seq_len: int, timings: dict[str, float]
) -> tuple[dict[str, tuple[str, Quantizer]], dict[str, float], tuple[str, ...]]:
    """The teacher's artifacts: dynamic int8 of the plain graph, weight-only variants of the fused one (GPTQ
    calibrated on train texts; the mixed one keeps the most sensitive MatMuls, by measured KL, at 8 bits)."""
    import torch

    calibration = train[:CALIBRATION_TEXTS]
    fused = OnnxCausalLM(f["teacher-fused"])
    feeds = [fused.feeds(ids, mask) for ids, mask in text_batches(tokenizer, calibration, 1, seq_len)]
    start = time.perf_counter()
    batches = [(torch.from_numpy(i), torch.from_numpy(m)) for i, m in text_batches(tokenizer, calibration, 8, seq_len)]
    sensitivity = matmul_sensitivity(teacher, batches, bits=4, block_size=32, symmetric=False)
    timings["sensitivity_s"] = round(time.perf_counter() - start, 1)
    nodes = matmul_nodes(f["teacher-fused"] / "model.onnx")
    ranked = list(dict.fromkeys(n for n in (node_of(m, nodes) for m in sensitivity) if n))
    mixed = tuple(ranked[: int(np.ceil(SENSITIVE_FRACTION * len(set(nodes.values()))))])
    head = _head(f["teacher-fused"])
    quantizers: dict[str, tuple[str, Quantizer]] = {
        "teacher-int8-dynamic": ("teacher-onnx", quantize_int8),
        "teacher-w8": ("teacher-fused", _weights(WeightOnly(bits=8))),
        "teacher-w4-rtn": ("teacher-fused", _weights(WeightOnly(bits=4))),
        "teacher-w4-gptq": (
            "teacher-fused",
            _weights(WeightOnly(bits=4, algorithm="gptq", eight_bit=head), calibration=feeds),
        ),
        "teacher-w4-hqq": ("teacher-fused", _weights(WeightOnly(bits=4, algorithm="hqq", eight_bit=head))),
        "teacher-w4-hqq-mixed": (
            "teacher-fused",
            _weights(WeightOnly(bits=4, algorithm="hqq", eight_bit=tuple(dict.fromkeys(head + mixed)))),
        ),
    }
    return quantizers, sensitivity, mixed


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
    llamacpp_python: Path | None = None,
    ffn_width: int | None = None,
    hidden_width: int | None = None,
    student_only: bool = False,
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
    settings = distill_settings(cfg, seed)
    overrides = dict(overrides or {})
    layers = overrides.pop("layers", None) or layers
    settings.update(overrides)
    student, distill = _student(teacher, tokenizer, work / "student", layers, train, settings, ffn_width, hidden_width)

    exports = (
        ("teacher-onnx", "student-onnx", "student-fused")
        if student_only
        else ("teacher-onnx", "teacher-fused", "student-onnx", "student-fused")
    )
    f = {name: work / name for name in exports}
    parity = {
        "teacher-onnx": _export(teacher, f["teacher-onnx"], parity_atol),
        "student-onnx": _export(student, f["student-onnx"], parity_atol),
        "student-fused": _export_fused(student, work / "student", f["student-fused"], parity_atol),
    }
    if not student_only:
        parity["teacher-fused"] = _export_fused(teacher, teacher_dir, f["teacher-fused"], parity_atol)
    for name in f:  # tokenizer and config beside every graph (the fused graph's cache head size, Predictor)
        tokenizer.save_pretrained(f[name])
        (teacher if name.startswith("teacher") else student).config.save_pretrained(f[name])

    quantizers: dict[str, tuple[str, Quantizer]] = {
        "student-w8": ("student-fused", _weights(WeightOnly(bits=8))),
        "student-w4-hqq": (
            "student-fused",
            _weights(WeightOnly(bits=4, algorithm="hqq", eight_bit=_head(f["student-fused"]))),
        ),
    }
    sensitivity: dict[str, float] = {}
    mixed: tuple[str, ...] = ()
    if not student_only:
        teacher_quantizers, sensitivity, mixed = _teacher_quantizers(teacher, tokenizer, f, train, seq_len, timings)
        quantizers = teacher_quantizers | quantizers
    quantized = {}
    for name, (source, quantize) in quantizers.items():
        log.info("quantize %s", name)
        f[name] = work / name
        quantized[name] = _quantize(f[source], f[name], quantize)
        timings[f"{name}_s"] = quantized[name]["seconds"]
    del student
    problem = "--student-only" if student_only else llamacpp_problem(llamacpp_python)
    gguf = (package_dir(SMOLLM2_PACKAGE) or Path()) / SMOLLM2_GGUF
    peer = (
        None
        if problem or llamacpp_python is None
        else LlamaCpp(llamacpp_python, gguf, RuntimeOptions().resolved_threads)
    )

    names = ["teacher-torch", *f]
    log.info("teacher-forced quality of %d artifacts on %d texts", len(names), len(held_out))
    token_lists = [list(tokenizer(t)["input_ids"])[:seq_len] for t in held_out]
    start = time.perf_counter()
    loaded = {name: OnnxCausalLM(f[name]) for name in f}
    logits = {"teacher-torch": TorchCausalLM(teacher).logits, **{n: m.logits for n, m in loaded.items()}}
    quality = token_quality(logits, text_batches(tokenizer, held_out, 16, seq_len), reference="teacher-onnx")
    timings["quality_s"] = round(time.perf_counter() - start, 1)
    prompts = _prompts(tokenizer, held_out, agreement_prompts, prompt_len)
    greedy = {}
    for name in names:  # one prompt at a time: the fused graphs take no left padding (none here), same loop
        lm = TorchCausalLM(teacher) if name == "teacher-torch" else loaded[name]
        greedy[name] = lm.generate(prompts, np.ones_like(prompts), new_tokens).tokens
    reference = loaded["teacher-onnx"]
    reference_top = (
        [
            reference.logits(np.asarray([ids]), np.ones((1, len(ids)), dtype=np.int64))[0, :-1].argmax(-1)
            for ids in token_lists
        ]
        if peer
        else []
    )
    del loaded, reference
    rows: dict[str, dict[str, Any]] = {}
    for name in names:
        q = quality[name]
        rows[name] = {
            "ppl": round(q.perplexity, 3),
            "kl": round(q.kl, 5),
            "top1": round(q.top1, 4),
            "greedy_agreement": round(greedy_agreement(greedy["teacher-onnx"], greedy[name]), 4),
            "size_mb": _size_mb(f[name]) if name in f else None,
        }
    if peer is not None:
        size = round(gguf.stat().st_size / 1e6, 1)
        rows[PEER] = {**_peer_quality(peer, token_lists, reference_top), "greedy_agreement": None, "size_mb": size}

    def opener(name: str) -> Callable[[], Any]:
        return lambda: TorchCausalLM(teacher) if name == "teacher-torch" else OnnxCausalLM(f[name])

    log.info("timing %d artifacts%s: keep the machine quiet", len(names), " and llama.cpp" if peer else "")
    speed = _speed({name: opener(name) for name in names}, peer, prompts[:1], new_tokens, runs, rounds)
    for name in rows:
        rows[name] |= speed[name]
    base = "teacher-onnx"
    int4 = [n for n in rows if "-w4-" in n]
    fast = [n for n in rows if n != PEER and rows[n]["decode_tok_s_p50"] >= 3 * rows[base]["decode_tok_s_p50"]]
    best_int4 = _choose(rows, base, int4)
    llamacpp: dict[str, Any] = (
        {"skipped": problem}
        if peer is None
        else {
            "tok_s_ratio": round(rows[PEER]["decode_tok_s_p50"] / rows[base]["decode_tok_s_p50"], 3),
            "best_int4_vs_llamacpp": round(
                rows[best_int4["name"]]["decode_tok_s_p50"] / rows[PEER]["decode_tok_s_p50"], 3
            )
            if best_int4
            else None,
            "ppl_ratio": round(rows[PEER]["ppl"] / rows[base]["ppl"], 4),
            "top1": rows[PEER]["top1"],
        }
    )
    return {
        "teacher_int8": _choose(rows, base, [n for n in ("teacher-w8",) if n in rows]),
        "best_int4": best_int4,
        "best_3x": _choose(rows, base, fast),
        "llamacpp": llamacpp,
        "student_layers": layers,
        "distill": {k: v for k, v in distill.items() if k != "losses"} | {"losses_every_10": distill["losses"][::10]},
        "parity": parity,
        "quantized": quantized,
        "sensitivity_top10": dict(list(sensitivity.items())[:10]),
        "mixed_8bit_nodes": list(mixed),
        "timings": timings,
        "machine": host_info(),
        "versions": versions(),
        "settings": {
            "prompt_len": prompt_len,
            "new_tokens": new_tokens,
            "batch": 1,
            "runs": runs,
            "rounds": rounds,
            "ppl_texts": len(held_out),
            "quality_tokens": quality[base].tokens,
            "agreement_prompts": agreement_prompts,
            "torch_threads": torch.get_num_threads(),
            "ort_threads": RuntimeOptions().resolved_threads,
        },
        "rows": rows,
        "table": table(rows),
    }


def table(rows: dict[str, dict[str, Any]], base: str = "teacher-onnx") -> str:
    """Markdown: every artifact's quality against the fp32 ONNX teacher and its speed, ratios to `base`."""
    lines = [
        f"| artifact | size MB | ppl | ppl vs {base} | KL | top-1 | greedy agreement | TTFT ms p50 (min-max) | "
        f"decode tok/s p50 (min-max) | x {base} |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    ppl, tok_s = rows[base]["ppl"], rows[base]["decode_tok_s_p50"]
    for name, row in rows.items():
        lo, hi = row["ttft_ms_min_max"]
        slo, shi = row["decode_tok_s_min_max"]
        kl = "-" if row["kl"] is None else f"{row['kl']:.4f}"
        greedy = "-" if row["greedy_agreement"] is None else f"{row['greedy_agreement']:.3f}"
        lines.append(
            f"| {name} | {row['size_mb'] or '-'} | {row['ppl']:.2f} | {row['ppl'] / ppl:.3f} | {kl} | "
            f"{row['top1']:.3f} | {greedy} | {row['ttft_ms_p50']:.1f} ({lo:.1f}-{hi:.1f}) | "
            f"{row['decode_tok_s_p50']:.1f} ({slo:.1f}-{shi:.1f}) | {row['decode_tok_s_p50'] / tok_s:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("runs/lm"))
    # unset flags keep recipes/smollm2-student.yaml's distill settings
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
    parser.add_argument("--llamacpp-python", type=Path, help="python of the llama-cpp-python environment (the peer)")
    parser.add_argument("--ffn-width", type=int, help="also width-prune the student's FFN to this (Minitron)")
    parser.add_argument("--hidden-width", type=int, help="also prune the student's residual channels to this")
    parser.add_argument("--student-only", action="store_true", help="the student's artifacts and the fp32 teacher")
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
        llamacpp_python=args.llamacpp_python,
        ffn_width=args.ffn_width,
        hidden_width=args.hidden_width,
        student_only=args.student_only,
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(result["table"])
    print(json.dumps({k: result[k] for k in ("teacher_int8", "best_int4", "best_3x", "llamacpp")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
