"""llama.cpp (llama-cpp-python) on a GGUF, the peer of `bench_lm.py`: run in its own environment
(`make .venv-llamacpp/.installed`), one process per timing round so the parent can interleave it.

    python benchmarks/peers/llamacpp_lm.py --gguf FILE --job job.json --json out.json

The job holds token ids the parent tokenized (so both engines see the same tokens): `prompt` (one prompt),
`new_tokens`, `runs` and `threads` for timing, and optionally `texts` (lists of ids) for teacher-forced quality.
Timing is the parent's loop: prefill the prompt (time to first token), then one token per step, greedy,
exactly `new_tokens` tokens, warm-up first. Quality returns per text the sum of next-token NLL and the
argmax of every position, so the parent scores perplexity and top-1 agreement against its own reference.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np


def _generate(llm: Any, prompt: list[int], new_tokens: int) -> tuple[float, list[float], list[int]]:
    llm.reset()
    llm._ctx.kv_cache_clear()
    vocab = llm.n_vocab()
    start = time.perf_counter()
    llm.eval(prompt)
    token = int(np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(vocab,)).argmax())
    ttft = time.perf_counter() - start
    tokens, steps = [token], []
    for _ in range(new_tokens - 1):
        start = time.perf_counter()
        llm.eval([token])
        token = int(np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(vocab,)).argmax())
        steps.append(time.perf_counter() - start)
        tokens.append(token)
    return ttft, steps, tokens


def _quality(gguf: Path, texts: list[list[int]], threads: int) -> list[dict[str, Any]]:
    from llama_cpp import Llama

    longest = max(len(t) for t in texts)
    llm = Llama(str(gguf), n_ctx=max(64, longest), n_threads=threads, logits_all=True, verbose=False)
    rows = []
    for ids in texts:
        llm.reset()
        llm._ctx.kv_cache_clear()
        llm.eval(ids)
        logits = np.asarray(llm.scores[: len(ids)], dtype=np.float64)
        shifted = logits - logits.max(-1, keepdims=True)
        logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
        nll = -logp[np.arange(len(ids) - 1), ids[1:]].sum()
        rows.append({"nll": float(nll), "argmax": logits[:-1].argmax(-1).tolist()})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", type=Path, required=True)
    parser.add_argument("--job", type=Path, required=True)
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args(argv)
    import llama_cpp
    from llama_cpp import Llama

    job = json.loads(args.job.read_text())
    out: dict[str, Any] = {"version": llama_cpp.__version__, "threads": job["threads"]}
    if job.get("texts"):
        out["quality"] = _quality(args.gguf, job["texts"], job["threads"])
    if job.get("runs"):
        prompt, new_tokens = job["prompt"], job["new_tokens"]
        llm = Llama(str(args.gguf), n_ctx=len(prompt) + new_tokens + 8, n_threads=job["threads"], verbose=False)
        _generate(llm, prompt, new_tokens)  # warm-up
        runs = [_generate(llm, prompt, new_tokens) for _ in range(job["runs"])]
        out["ttft_s"] = [r[0] for r in runs]
        out["decode_tok_s"] = [len(r[1]) / sum(r[1]) for r in runs]
        out["tokens"] = runs[0][2]
    args.json.write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
