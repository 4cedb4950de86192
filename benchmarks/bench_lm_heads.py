"""What ranks a decoder's query heads: SmolLM2-135M with every layer's 9 query heads cut to 6 (2 of 3 per
key/value group) and no retraining, held-out perplexity with the heads kept by edgepipe's ranking (what each
head writes into the residual stream), by the magnitude of its output at o_proj's input, and at random.

    python benchmarks/bench_lm_heads.py --json runs/bench/lm_heads.json [--keep 6] [--texts 128]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from edgepipe.arch import BY_MODEL_TYPE
from edgepipe.arch.ops import prune_query_heads
from edgepipe.pipeline.adapters import text_batches
from edgepipe.pipeline.artifacts import write_json
from edgepipe.pipeline.lm import keep_per_group, lm_texts, prune_width
from edgepipe.pipeline.models import smollm2_folder, user_cache
from edgepipe.runtime.generate import perplexity, torch_logits


def _input_magnitude(model: Any, batches: list[tuple[Any, Any]], size: int) -> list[Any]:
    """Per layer and head: mean |activation| at o_proj's input, summed over the head's units."""
    sums = [torch.zeros(layer.self_attn.o_proj.in_features) for layer in model.model.layers]
    real: dict[str, Any] = {}
    hooks = [
        layer.self_attn.o_proj.register_forward_pre_hook(
            lambda _m, a, i=i: sums[i].add_((a[0].abs() * real["mask"][..., None]).sum((0, 1)))
        )
        for i, layer in enumerate(model.model.layers)
    ]
    with torch.inference_mode():
        for ids, mask in batches:
            real["mask"] = mask.float()
            model(input_ids=ids, attention_mask=mask, use_cache=False)
    for hook in hooks:
        hook.remove()
    return [s.view(-1, size).sum(1) for s in sums]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--keep", type=int, default=6, help="query heads kept per layer")
    parser.add_argument("--texts", type=int, default=128, help="held-out snippets for the perplexity")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_folder(user_cache())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    calib = [
        (torch.from_numpy(i), torch.from_numpy(m)) for i, m in text_batches(tokenizer, lm_texts("train")[:64], 8, 64)
    ]
    held = list(text_batches(tokenizer, lm_texts("test")[: args.texts], 8, 64))
    heads, kv = model.config.num_attention_heads, model.config.num_key_value_heads
    spec = BY_MODEL_TYPE[model.config.model_type]
    result: dict[str, Any] = {"heads": heads, "kept": args.keep, "teacher": perplexity(torch_logits(model), held)}
    ranked = copy.deepcopy(model)
    result["importance_kept"] = prune_width(ranked, calib, num_heads=args.keep)["heads"]
    result["residual_write"] = perplexity(torch_logits(ranked), held)
    by_input = copy.deepcopy(model)
    prune_query_heads(
        by_input,
        spec,
        [keep_per_group(s, kv, args.keep // kv) for s in _input_magnitude(model, calib, model.config.head_dim)],
    )
    result["input_magnitude"] = perplexity(torch_logits(by_input), held)
    for seed in (0, 1):
        scores = [
            torch.rand(heads, generator=torch.Generator().manual_seed(seed * 100 + i))
            for i in range(len(model.model.layers))
        ]
        randomly = copy.deepcopy(model)
        prune_query_heads(randomly, spec, [keep_per_group(s, kv, args.keep // kv) for s in scores])
        result[f"random_{seed}"] = perplexity(torch_logits(randomly), held)
    write_json(args.json, result)
    print(json.dumps({k: v for k, v in result.items() if k != "importance_kept"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
