"""Token generation with a KV cache: an exported causal LM in onnxruntime (CPU) or a transformers
model in PyTorch, behind one `generate` so the benchmark compares them on equal terms.

Both run the same loop: prefill the prompt (every position's logits, which perplexity also uses),
then one token per step with the cache fed back. Greedy or seeded sampling (numpy Generator, with
temperature and top-k); time to first token and each decode step are timed with `perf_counter`.
The ONNX model is the one `edgepipe.export.causal_lm` writes: it takes `past_key_values.{i}.key` /
`.value`, also empty (past_sequence 0) for the first step.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgepipe.errors import InputError
from edgepipe.runtime.backends import RuntimeOptions, model_file, ort_cpu_session

PAST_PREFIX = "past_key_values."
Batch = tuple[np.ndarray, np.ndarray]  # input_ids, attention_mask: (batch, seq) int64
LogitsFn = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (input_ids, attention_mask) -> (batch, seq, vocab)


def position_ids(attention_mask: np.ndarray) -> np.ndarray:
    """Positions that skip left padding, as transformers' generate computes them."""
    return np.maximum(np.cumsum(attention_mask, axis=-1) - 1, 0).astype(np.int64)


@dataclass(frozen=True)
class GenerationResult:
    tokens: np.ndarray  # (batch, generated) int64; a row that hit eos repeats it to the end
    ttft_s: float  # prefill and the first token's choice
    decode_s: tuple[float, ...]  # each later token's step

    @property
    def decode_tokens_per_s(self) -> float:
        """Generated tokens per second after the first, over the whole batch."""
        spent = sum(self.decode_s)
        return self.tokens.shape[0] * len(self.decode_s) / spent if spent > 0 else 0.0


# (input_ids, attention_mask, position_ids, cache) -> (logits (batch, sequence, vocab), cache)
StepFn = Callable[[np.ndarray, np.ndarray, np.ndarray, Any], tuple[np.ndarray, Any]]


def _choose(logits: np.ndarray, do_sample: bool, temperature: float, top_k: int | None, rng: Any) -> np.ndarray:
    if not do_sample:
        return np.asarray(logits.argmax(-1), dtype=np.int64)
    scaled = logits.astype(np.float64) / temperature
    if top_k is not None and top_k < scaled.shape[-1]:
        kth = np.partition(scaled, -top_k, axis=-1)[:, -top_k, None]
        scaled = np.where(scaled < kth, -np.inf, scaled)
    probs = np.exp(scaled - scaled.max(-1, keepdims=True))
    cdf = np.cumsum(probs, axis=-1)
    # inverse-CDF sampling: one uniform draw per row keeps a seed's stream independent of the vocabulary
    draws = rng.random(len(cdf))[:, None] * cdf[:, -1:]
    return np.minimum((cdf < draws).sum(-1), cdf.shape[-1] - 1).astype(np.int64)


class _Generation:
    """`logits` and `generate` on top of a model's `step`."""

    step: StepFn

    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Every position's logits (for perplexity), from an empty cache."""
        ids, mask = np.asarray(input_ids, dtype=np.int64), np.asarray(attention_mask, dtype=np.int64)
        return self.step(ids, mask, position_ids(mask), None)[0]

    def generate(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        max_new_tokens: int,
        *,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        seed: int | None = None,
        eos_token_id: int | None = None,
    ) -> GenerationResult:
        """Greedy (default) or seeded sampled continuations of left-padded prompts: the decoding loop shared
        by the ONNX and torch models (prefill, then one token per step with the cache fed back)."""
        input_ids = np.asarray(input_ids, dtype=np.int64)
        mask = np.asarray(attention_mask, dtype=np.int64)
        if input_ids.ndim != 2 or input_ids.shape != mask.shape or input_ids.shape[1] == 0:
            raise InputError(
                f"generate: input_ids and attention_mask must both be (batch, prompt_len) with prompt_len >= 1, got "
                f"{input_ids.shape} and {mask.shape}"
            )
        if max_new_tokens < 1 or temperature <= 0 or (top_k is not None and top_k < 1):
            raise InputError(
                f"generate: needs max_new_tokens >= 1, temperature > 0 and top_k >= 1 (or None); got "
                f"{max_new_tokens}, {temperature}, {top_k}"
            )
        rng = np.random.default_rng(seed)
        positions = position_ids(mask)
        start = time.perf_counter()
        logits, cache = self.step(input_ids, mask, positions, None)
        token = _choose(logits[:, -1], do_sample, temperature, top_k, rng)
        ttft = time.perf_counter() - start
        tokens, decode_s = [token], []
        finished = token == eos_token_id if eos_token_id is not None else np.zeros(len(token), dtype=bool)
        for _ in range(max_new_tokens - 1):
            if finished.all():
                break
            start = time.perf_counter()
            mask = np.concatenate([mask, np.ones((len(mask), 1), dtype=np.int64)], axis=1)
            positions = positions[:, -1:] + 1
            logits, cache = self.step(token[:, None], mask, positions, cache)
            token = _choose(logits[:, -1], do_sample, temperature, top_k, rng)
            decode_s.append(time.perf_counter() - start)
            if eos_token_id is not None:
                token = np.where(finished, eos_token_id, token)
                finished |= token == eos_token_id
            tokens.append(token)
        return GenerationResult(np.stack(tokens, axis=1), ttft, tuple(decode_s))


def _head_dim(model_path: Path, dim: Any) -> int:
    """The cache's head dimension: from the graph, else (a symbolic dimension, as onnxruntime-genai writes it) from
    the folder's genai_config.json or config.json."""
    if isinstance(dim, int):
        return dim
    import json

    for name in ("genai_config.json", "config.json"):
        path = model_path.parent / name
        if path.is_file():
            config = json.loads(path.read_text(encoding="utf-8"))
            decoder = config.get("model", {}).get("decoder", {})
            if "head_size" in decoder:
                return int(decoder["head_size"])
            if "hidden_size" in config:
                return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
    raise InputError(f"{model_path}: the KV cache's head dimension is symbolic ({dim}) and no config.json gives it")


class OnnxCausalLM(_Generation):
    """An exported causal LM (model.onnx of a folder, or the file) in an onnxruntime CPU session."""

    def __init__(self, path: Path, options: RuntimeOptions | None = None) -> None:
        self.path = model_file(Path(path))
        if not self.path.is_file():
            raise InputError(f"no ONNX model at {self.path}; export one with edgepipe.export.causal_lm")
        self.options = options or RuntimeOptions()
        self.session = ort_cpu_session(self.path, self.options)
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.past_names = [name for name in inputs if name.startswith(PAST_PREFIX)]
        if not self.past_names or not {"input_ids", "attention_mask"} <= set(inputs):
            raise InputError(
                f"{self.path}: not a KV-cache causal LM (inputs {sorted(inputs)}); export it with "
                "edgepipe.export.causal_lm.export_causal_lm"
            )
        # onnxruntime-genai's fused graphs (GroupQueryAttention) take no position_ids: positions come from the mask
        self.takes_positions = "position_ids" in inputs
        shape = inputs[self.past_names[0]].shape  # batch, kv_heads, past_sequence, head_dim
        self.kv_heads, self.head_dim = int(shape[1]), _head_dim(self.path, shape[3])
        self.output_names = ["logits", *(n.replace(PAST_PREFIX, "present.") for n in self.past_names)]

    def empty_past(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, self.kv_heads, 0, self.head_dim), dtype=np.float32) for _ in self.past_names]

    def step(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, positions: np.ndarray, past: list[np.ndarray] | None
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """Logits of the new tokens and the grown cache; `past` None is an empty cache."""
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.takes_positions:
            feeds["position_ids"] = positions
        elif past is None and not attention_mask[:, 0].all():
            raise InputError(
                f"{self.path}: a fused graph (GroupQueryAttention) takes right-padded or equal-length prompts, "
                "not left-padded ones; generate one prompt at a time or use the plain export (fp32)"
            )
        past = self.empty_past(len(input_ids)) if past is None else past
        feeds.update(zip(self.past_names, past, strict=True))
        logits, *present = self.session.run(self.output_names, feeds)
        return logits, present

    def feeds(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> dict[str, np.ndarray]:
        """The model's inputs for a prompt from an empty cache (e.g. calibration data for GPTQ)."""
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.takes_positions:
            feeds["position_ids"] = position_ids(attention_mask)
        return feeds | dict(zip(self.past_names, self.empty_past(len(input_ids)), strict=True))

    def describe(self) -> dict[str, Any]:
        return {"engine": "onnxruntime", "provider": "CPUExecutionProvider", "threads": self.options.resolved_threads}


class TorchCausalLM(_Generation):
    """A transformers causal LM in PyTorch eager with its DynamicCache, same `generate` as `OnnxCausalLM`."""

    def __init__(self, model: Any) -> None:
        self.model = model.eval()

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, positions: np.ndarray, cache: Any) -> Any:
        import torch

        with torch.inference_mode():
            out = self.model(
                input_ids=torch.from_numpy(np.ascontiguousarray(input_ids)),
                attention_mask=torch.from_numpy(attention_mask),
                position_ids=torch.from_numpy(np.ascontiguousarray(positions)),
                cache=cache,
                use_cache=True,
            )
        return out.logits.float().numpy(), out.cache

    def describe(self) -> dict[str, Any]:
        import torch

        return {"engine": "torch", "threads": torch.get_num_threads()}


def load_causal_lm(folder: Path, fmt: str, options: RuntimeOptions | None = None) -> OnnxCausalLM | TorchCausalLM:
    """An artifact folder as a generator: `model.onnx` in onnxruntime (fmt "onnx"), else a transformers
    folder in PyTorch fp32."""
    if fmt == "onnx":
        return OnnxCausalLM(folder, options)
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads((options or RuntimeOptions()).resolved_threads)  # as many threads as ORT sessions
    return TorchCausalLM(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, use_safetensors=True))


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    """float64 log-probabilities of (tokens, vocab) logits."""
    shifted = logits.astype(np.float64) - logits.max(-1, keepdims=True)
    return np.asarray(shifted - np.log(np.exp(shifted).sum(-1, keepdims=True)))


def _predicted(logits_fn: LogitsFn, input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, Any]:
    """(tokens, vocab) logits of every counted position (context and target real tokens) and the counted mask."""
    counted = (attention_mask[:, 1:] * attention_mask[:, :-1]).astype(bool)
    # only counted rows: a (batch, seq, 49152) float64 copy would be ~300 MB per batch
    return np.asarray(logits_fn(input_ids, attention_mask))[:, :-1][counted], counted


def perplexity(logits_fn: LogitsFn, batches: Iterable[Batch]) -> float:
    """exp(mean next-token NLL) over every predicted token whose context and target are real tokens.

    `logits_fn` is any model's `logits` (`OnnxCausalLM`, `TorchCausalLM`, `edgepipe.pipeline.lm.torch_logits`)."""
    return token_quality({"model": logits_fn}, batches)["model"].perplexity


@dataclass(frozen=True)
class TokenQuality:
    """Teacher-forced quality on held-out text, as llama.cpp's `perplexity --kl-divergence` reports it."""

    perplexity: float
    kl: float  # mean KL(reference || model) per predicted token, nats; 0 for the reference itself
    top1: float  # fraction of predicted tokens whose argmax equals the reference's
    tokens: int


def token_quality(
    models: Mapping[str, LogitsFn], batches: Iterable[Batch], reference: str | None = None
) -> dict[str, TokenQuality]:
    """Perplexity of every model, and its KL divergence from and top-1 agreement with `reference` (default: the
    first model), on the same batches: one pass, each batch's reference distribution computed once."""
    reference = reference or next(iter(models))
    if reference not in models:
        raise InputError(f"token_quality: reference {reference!r} is not one of the models {sorted(models)}")
    nll = dict.fromkeys(models, 0.0)
    kl = dict.fromkeys(models, 0.0)
    top1 = dict.fromkeys(models, 0)
    count = 0
    for input_ids, attention_mask in batches:
        ref_logits, counted = _predicted(models[reference], input_ids, attention_mask)
        ref_logp = _log_softmax(ref_logits)
        ref_p, ref_top = np.exp(ref_logp), ref_logits.argmax(-1)
        targets = input_ids[:, 1:][counted]
        rows = np.arange(len(targets))
        for name, logits_fn in models.items():
            logits = ref_logits if name == reference else _predicted(logits_fn, input_ids, attention_mask)[0]
            logp = ref_logp if name == reference else _log_softmax(logits)
            nll[name] += float(-logp[rows, targets].sum())
            kl[name] += float((ref_p * (ref_logp - logp)).sum())
            top1[name] += int((logits.argmax(-1) == ref_top).sum())
        count += len(targets)
    if count == 0:
        raise InputError("perplexity: no predicted tokens (every text is shorter than 2 tokens)")
    return {
        name: TokenQuality(float(np.exp(nll[name] / count)), kl[name] / count, top1[name] / count, count)
        for name in models
    }


def prompt_windows(token_lists: list[list[int]], count: int, length: int, separator: int | None = None) -> np.ndarray:
    """`count` prompts of exactly `length` tokens (no padding): the texts' tokens as one stream, `separator`
    (e.g. eos) between texts, cut into consecutive windows."""
    stream: list[int] = []
    for ids in token_lists:
        stream += [*ids, *([] if separator is None else [separator])]
        if len(stream) >= count * length:
            break
    if len(stream) < count * length:
        raise InputError(f"the texts hold {len(stream)} tokens, fewer than {count} prompts of {length}")
    return np.asarray(stream[: count * length], dtype=np.int64).reshape(count, length)


def torch_logits(model: Any) -> LogitsFn:
    """A `perplexity` logits function for a transformers causal LM (no cache, positions from the mask)."""
    import torch

    def logits(input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out = model(
                input_ids=torch.from_numpy(input_ids),
                attention_mask=torch.from_numpy(attention_mask),
                position_ids=torch.from_numpy(position_ids(attention_mask)),
                use_cache=False,
            )
        return out.logits.float().numpy()

    return logits
