"""One training batch in parts of similar length against one padded batch: the demo's model, data and batches.

    python benchmarks/bench_padding.py --json runs/bench/padding.json [--steps 40]

The default recipe's model (all-MiniLM-L6-v2 with a 2-label head) and train reviews, its batch size (32) and
max_seq_len (64), and the batches its finetune stage draws (`loop.batches`, seed 0). Two measurements:

each batch's forward + backward (train mode, the gradient dropped, so the model stays the same) run every way,
in a rotated order batch by batch: `task.logits(task.forward(...))` on the batch padded to its longest review,
and `task.batch_logits` in parts for each cost of a part in OVERHEADS (tokens of work; `adapters.PART_OVERHEAD`
is the default), and the default parts again under `torch.autocast("cpu", torch.bfloat16)` (`bf16`: the
recipes' `autocast: bf16`, fast where the CPU has AVX512-BF16 or AMX). Per way: the median step time, its ratio
to the padded batch, the tokens run, the parts.

AdamW's step on the model's parameters, the for-loop implementation against the fused kernel
(`loop.optimizer_and_schedule` uses the fused one), interleaved, 10 steps each after 2.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from edgepipe.pipeline.adapters import PART_OVERHEAD, TextClassification, padding_parts
from edgepipe.pipeline.artifacts import write_json
from edgepipe.pipeline.data import load_splits
from edgepipe.pipeline.loop import batches
from edgepipe.pipeline.models import resolve_model
from edgepipe.pipeline.recipe import default_recipe_path, load_recipe

OVERHEADS = (0, 8, 16, 32, 64, 256)


def _step(model: torch.nn.Module, logits: torch.Tensor) -> None:
    logits.float().logsumexp(-1).mean().backward()
    model.zero_grad(set_to_none=True)


def _adamw_ms(model: torch.nn.Module) -> dict[str, float]:
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    optimizers = {
        "for_loop": torch.optim.AdamW(params, lr=0.0, weight_decay=0.0, fused=False),
        "fused": torch.optim.AdamW(params, lr=0.0, weight_decay=0.0, fused=True),
    }  # lr 0: the model stays the same
    seconds: dict[str, list[float]] = {name: [] for name in optimizers}
    for _ in range(12):
        for name, optimizer in optimizers.items():
            seconds[name].append(_seconds(optimizer.step))
    model.zero_grad(set_to_none=True)
    return {name: round(1e3 * float(np.median(s[2:])), 1) for name, s in seconds.items()}


def _bf16(run) -> None:  # type: ignore[no-untyped-def]
    with torch.autocast("cpu", torch.bfloat16):
        run()


def _seconds(run) -> float:  # type: ignore[no-untyped-def]
    begun = time.perf_counter()
    run()
    return time.perf_counter() - begun


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    recipe = load_recipe(default_recipe_path())
    finetune = recipe.stages[0]
    train = load_splits(recipe.data, recipe.seed).train
    folder = resolve_model(recipe.model)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2).train()
    task = TextClassification(tokenizer, finetune.max_seq_len)

    plan = batches(len(train), finetune.batch_size, args.steps, recipe.seed)
    ways = ["padded", *(f"parts-{o}" for o in OVERHEADS), "bf16"]
    seconds: dict[str, list[float]] = {way: [] for way in ways}
    tokens: dict[str, list[int]] = {way: [] for way in ways}
    parts: dict[str, list[int]] = {way: [] for way in ways}
    for i, index in enumerate(plan):
        batch = task.batch(train, index)
        lengths = batch.inputs["attention_mask"].sum(1).numpy()
        runs = {"padded": lambda b=batch: _step(model, task.logits(task.forward(model, b), b))}
        cuts = {"padded": [np.arange(len(lengths))]}
        for o in OVERHEADS:
            runs[f"parts-{o}"] = lambda b=batch, o=o: _step(model, task.batch_logits(model, b, o))
            cuts[f"parts-{o}"] = padding_parts(lengths, o)
        runs["bf16"] = lambda b=batch: _bf16(lambda: _step(model, task.batch_logits(model, b)))
        cuts["bf16"] = padding_parts(lengths, PART_OVERHEAD)
        for way in ways[i % len(ways) :] + ways[: i % len(ways)]:
            seconds[way].append(_seconds(runs[way]))
            tokens[way].append(sum(len(p) * int(lengths[p].max()) for p in cuts[way]))
            parts[way].append(len(cuts[way]))
    padded = np.array(seconds["padded"][2:])  # the first two batches warm up
    result = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        },
        "versions": {"torch": torch.__version__},
        "model": recipe.model,
        "batch_size": finetune.batch_size,
        "max_seq_len": finetune.max_seq_len,
        "steps": args.steps,
        "part_overhead_default": PART_OVERHEAD,
        "mean_tokens_per_text": round(float(np.mean(task.lengths(train))), 1),
        "ways": {
            way: {
                "step_ms_p50": round(1e3 * float(np.median(seconds[way][2:])), 1),
                "step_ms_min_max": [round(1e3 * min(seconds[way][2:]), 1), round(1e3 * max(seconds[way][2:]), 1)],
                "speedup_p50": round(float(np.median(padded / np.array(seconds[way][2:]))), 3),
                "tokens_per_batch": round(float(np.mean(tokens[way])), 1),
                "parts_per_batch": round(float(np.mean(parts[way])), 2),
            }
            for way in ways
        },
        "adamw_step_ms": _adamw_ms(model),
    }
    write_json(args.json, result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
