"""Benchmark of causal LMs: perplexity, greedy agreement with the teacher, time to first token and
decode tokens per second of every artifact (PyTorch models and KV-cache ONNX models) in one run.

Prompts are windows of `prompt_len` tokens cut from the test texts' token stream (no padding);
each timed run generates exactly `new_tokens` tokens greedily (no early stop, so every run does the
same work). Artifacts are all loaded, warmed up, then timed in rotating order over `rounds`, as the
classification bench does, so machine drift spreads over all of them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from edgepipe.benchmarks.harness import summarize
from edgepipe.runtime.backends import RuntimeOptions
from edgepipe.runtime.generate import Batch, load_causal_lm, prompt_windows, token_quality
from edgepipe.runtime.host import host_info, versions

log = logging.getLogger(__name__)
REPORT_SCHEMA_VERSION = 1


def tokenize_texts(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    return [list(tokenizer(t)["input_ids"]) for t in texts]


def padded_batches(token_lists: list[list[int]], batch_size: int, max_len: int, pad_id: int) -> Iterator[Batch]:
    """The texts' token lists (each cut to `max_len`) in right-padded batches with their masks."""
    for start in range(0, len(token_lists), batch_size):
        chunk = [ids[:max_len] for ids in token_lists[start : start + batch_size]]
        ids = np.full((len(chunk), max(len(c) for c in chunk)), pad_id, dtype=np.int64)
        mask = np.zeros_like(ids)
        for row, tokens in enumerate(chunk):
            ids[row, : len(tokens)], mask[row, : len(tokens)] = tokens, 1
        yield ids, mask


def run_generation_bench(
    items: list[Any], texts: list[str], tokenizer: Any, settings: Any, new_tokens: int
) -> dict[str, Any]:
    """Measure every item (BenchItem: name, path, precision, model_format); the first is the reference."""
    options = RuntimeOptions(
        threads=settings.threads, denormal_as_zero=settings.denormal_as_zero, optimization=settings.graph_optimization
    )
    if settings.eval_max_examples is not None:
        texts = texts[: settings.eval_max_examples]
    token_lists = tokenize_texts(tokenizer, texts)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    models = {item.name: load_causal_lm(item.path, item.model_format, options) for item in items}
    greedy: dict[tuple[str, int, int], np.ndarray] = {}
    shapes = [(b, s) for b in settings.batch_sizes for s in settings.seq_lens]
    started = time.perf_counter()
    # teacher-forced, as llama.cpp's `perplexity --kl-divergence`: against the first item, the reference
    quality = token_quality(
        {name: model.logits for name, model in models.items()},
        padded_batches(token_lists, settings.eval_batch_size, settings.eval_max_seq_len, pad_id),
    )
    quality_seconds = round(time.perf_counter() - started, 1)
    for name, model in models.items():
        for batch, length in shapes:
            ids = prompt_windows(token_lists, batch, length, tokenizer.eos_token_id)
            greedy[(name, batch, length)] = model.generate(ids, np.ones_like(ids), new_tokens).tokens
        log.info(
            "generation bench: %s perplexity %.3f, KL %.4f, top-1 %.3f",
            name,
            quality[name].perplexity,
            quality[name].kl,
            quality[name].top1,
        )
    samples: dict[tuple[str, int, int], dict[str, list[float]]] = {}
    per_round = max(1, settings.runs // settings.rounds)
    for batch, length in shapes:
        ids = prompt_windows(token_lists, batch, length, tokenizer.eos_token_id)
        mask = np.ones_like(ids)
        for model in models.values():  # warm-up: allocations, thread pools, first-call graph work
            for _ in range(max(1, settings.warmup_runs)):
                model.generate(ids, mask, new_tokens)
        for round_index in range(settings.rounds):
            order = list(models)
            order = order[round_index % len(order) :] + order[: round_index % len(order)]
            for name in order:
                for _ in range(per_round):
                    result = models[name].generate(ids, mask, new_tokens)
                    got = samples.setdefault((name, batch, length), {"ttft_ms": [], "tok_s": [], "total_ms": []})
                    got["ttft_ms"].append(1000 * result.ttft_s)
                    got["tok_s"].append(result.decode_tokens_per_s)
                    got["total_ms"].append(1000 * (result.ttft_s + sum(result.decode_s)))
    reference = items[0].name
    results = []
    for batch, length in shapes:
        for item in items:
            got = samples[(item.name, batch, length)]
            agree = float((greedy[(item.name, batch, length)] == greedy[(reference, batch, length)]).mean())
            results.append(
                {
                    "artifact": item.name,
                    "precision": item.precision,
                    "engine": "onnxruntime" if item.model_format == "onnx" else "torch",
                    "size_mb": item.size_mb,
                    "batch": batch,
                    "prompt_len": length,
                    "new_tokens": new_tokens,
                    "perplexity": round(quality[item.name].perplexity, 4),
                    "kl_divergence": round(quality[item.name].kl, 6),
                    "top1_agreement": round(quality[item.name].top1, 4),
                    "greedy_agreement": round(agree, 4),
                    "ttft_ms": summarize(got["ttft_ms"]).to_json(),
                    "decode_tokens_per_s": summarize(got["tok_s"]).to_json(),
                    "generate_ms": summarize(got["total_ms"]).to_json(),
                }
            )
    return {
        "schema_version": REPORT_SCHEMA_VERSION,
        "task": "causal-lm",
        "machine": host_info(),
        "versions": versions(),
        "settings": {**settings.__dict__, "new_tokens": new_tokens},
        "threads": options.resolved_threads,
        "eval_examples": len(texts),
        "reference": reference,
        "results": results,
        "quality_tokens": quality[reference].tokens,
        "quality_seconds": quality_seconds,
    }


def generation_gate(
    report: dict[str, Any], max_increase: float | None, max_kl: float | None, artifacts: list[str] | None
) -> list[str]:
    """One line per artifact and limit set: its perplexity's relative increase over the reference's (`max_increase`)
    and its mean KL divergence from the reference (`max_kl`, nats per token); FAIL over the limit."""
    rows = {r["artifact"]: r for r in report["results"]}
    ref_name = report["reference"]
    ref_ppl = rows[ref_name]["perplexity"]
    lines = []
    for name, row in rows.items():
        if name == ref_name or (artifacts is not None and name not in artifacts):
            continue
        if max_increase is not None:
            increase = row["perplexity"] / ref_ppl - 1
            lines.append(
                f"{'FAIL' if increase > max_increase else 'pass'}: `{name}` perplexity {row['perplexity']:.3f} vs "
                f"`{ref_name}` {ref_ppl:.3f} ({100 * increase:+.1f}%, limit +{100 * max_increase:.1f}%)"
            )
        if max_kl is not None:
            kl = row["kl_divergence"]
            lines.append(
                f"{'FAIL' if kl > max_kl else 'pass'}: `{name}` KL divergence from `{ref_name}` {kl:.4f} "
                f"(limit {max_kl:.4f}), top-1 agreement {100 * row['top1_agreement']:.1f}%"
            )
    return lines


def render_generation_markdown(report: dict[str, Any], title: str, gate_lines: list[str] | None = None) -> str:
    machine, vers, settings = report["machine"], report["versions"], report["settings"]
    out = [f"# edgepipe report: {title}", ""]
    out.append(f"Machine: {machine['cpu']} ({machine['physical_cores']} physical cores, {machine['memory_gb']} GB).")
    out.append("Versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()) + ".")
    out.append(
        f"Generation: greedy, {settings['new_tokens']} new tokens per run, {settings['runs']} timed runs per "
        f"artifact and shape interleaved over {settings['rounds']} rounds after warm-up; threads {report['threads']}. "
        f"Perplexity on {report['eval_examples']} test texts (<= {settings['eval_max_seq_len']} tokens); KL "
        "divergence (nats per token) from and top-1 agreement with the reference's next-token distributions on the "
        "same tokens, teacher-forced, as llama.cpp's `perplexity --kl-divergence`; greedy agreement: free-running."
    )
    ref = report["reference"]
    out += [
        "",
        f"| artifact | engine | precision | size MB | batch | prompt | perplexity | KL vs {ref} | top-1 vs {ref} | "
        f"greedy agreement vs {ref} | TTFT p50 ms | decode tok/s p50 (min-max) | x vs reference |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = report["results"]
    base = {(r["batch"], r["prompt_len"]): r["decode_tokens_per_s"]["p50"] for r in rows if r["artifact"] == ref}
    for r in report["results"]:
        tok = r["decode_tokens_per_s"]
        speed = tok["p50"] / base[(r["batch"], r["prompt_len"])]
        out.append(
            f"| {r['artifact']} | {r['engine']} | {r['precision']} | {r['size_mb']:.1f} | {r['batch']} | "
            f"{r['prompt_len']} | {r['perplexity']:.3f} | {r['kl_divergence']:.4f} | "
            f"{100 * r['top1_agreement']:.1f}% | {100 * r['greedy_agreement']:.1f}% | "
            f"{r['ttft_ms']['p50']:.1f} | {tok['p50']:.1f} ({tok['min']:.1f}-{tok['max']:.1f}) | {speed:.2f} |"
        )
    if gate_lines:
        out += ["", "## Gates", "", *[f"- {line}" for line in gate_lines]]
    return "\n".join(out) + "\n"
