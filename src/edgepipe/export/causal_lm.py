"""torch -> ONNX for decoder-only causal LMs (every decoder family with a spec) with a KV cache, and its parity check.

One graph serves prefill and decode, like Optimum's merged "with past" model: it always takes the
past keys and values, and the first step feeds them with past_sequence 0. Inputs are `input_ids`,
`attention_mask` (batch, past + sequence), `position_ids` (so left padding gets the positions
transformers' generate gives it) and `past_key_values.{i}.key` / `.value` (batch, kv_heads,
past_sequence, head_dim); outputs are `logits` (batch, sequence, vocab) and `present.{i}.key` / `.value`.
Every layer's cache keeps every token, sliding-window layers (Gemma 2/3) included: the mask applies the
window, so one graph holds past the window (a trimmed cache would be traced at one length).

The legacy TorchScript exporter is used (no onnxscript here), with eager attention, whose mask and
softmax trace into plain ONNX ops. The parity check decodes step by step in onnxruntime, feeding
present back as past, and compares every step with PyTorch's no-cache forward over the whole
sequence, at batch sizes and lengths other than the traced ones and with left padding.
"""

from __future__ import annotations

import logging
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgepipe.errors import ExportParityError, InputError
from edgepipe.runtime.generate import OnnxCausalLM, position_ids, torch_logits

log = logging.getLogger(__name__)

CAUSAL_LM_OPSET = 17


def past_names(num_layers: int, prefix: str = "past_key_values") -> list[str]:
    return [f"{prefix}.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def _with_past(model: Any) -> Any:
    """`model` behind flat tensors: (input_ids, attention_mask, position_ids, *past) -> (logits, *present)."""
    import torch
    from transformers import DynamicCache

    class WithPast(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any, positions: Any, *past: Any) -> tuple[Any, ...]:
            cache = DynamicCache(ddp_cache_data=list(zip(past[0::2], past[1::2], strict=True)))
            out = self.model(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, cache=cache, use_cache=True
            )
            return (out.logits, *(t for layer in out.cache.layers for t in (layer.keys, layer.values)))

    return WithPast()


def _kv_shape(config: Any) -> tuple[int, int]:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return getattr(config, "num_key_value_heads", None) or heads, head_dim


def export_causal_lm(model: Any, out_path: Path, *, opset: int = CAUSAL_LM_OPSET) -> None:
    """Export `model` (a transformers causal LM, fp32) to `out_path` as one prefill + decode graph."""
    import onnx
    import torch

    config = model.config
    kv_heads, head_dim = _kv_shape(config)
    layers = config.num_hidden_layers
    # traced at batch 2, 3 new tokens after 4 cached ones: no axis is 1 or equal to another, so none
    # is specialised into a constant; parity then runs other shapes
    batch, seq, past_len = 2, 3, 4
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=generator)
    mask = torch.ones(batch, past_len + seq, dtype=torch.int64)
    positions = torch.arange(past_len, past_len + seq).expand(batch, seq).contiguous()
    past = [torch.randn(batch, kv_heads, past_len, head_dim, generator=generator) for _ in range(2 * layers)]
    inputs, presents = past_names(layers), past_names(layers, "present")
    axes: dict[str, dict[int, str]] = {
        "input_ids": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "total_sequence"},
        "position_ids": {0: "batch", 1: "sequence"},
        "logits": {0: "batch", 1: "sequence"},
        **{name: {0: "batch", 2: "past_sequence"} for name in inputs},
        **{name: {0: "batch", 2: "total_sequence"} for name in presents},
    }
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        # The tracer warns about Python control flow in transformers' mask and cache code; parity checks it.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # the wrapper in eval mode too: the exporter restores the mode of the module it was given, and
            # a wrapper left in train mode would switch the model's dropout on (GPT-2's is 0.1) after export
            torch.onnx.export(
                _with_past(model.eval()).eval(),
                (ids, mask, positions, *past),
                str(out_path),
                input_names=["input_ids", "attention_mask", "position_ids", *inputs],
                output_names=["logits", *presents],
                dynamic_axes=axes,
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
    finally:
        model.set_attn_implementation(previous)
    onnx.checker.check_model(str(out_path))


@dataclass(frozen=True)
class CausalParityCase:
    batch: int
    prompt_len: int
    new_tokens: int
    left_pad: int = 0  # pad tokens before row i's prompt: i * left_pad (left padding, as for batch generation)


# batch 1 and a left-padded batch 2, at lengths other than the traced (2, 3 + 4)
DEFAULT_CASES = (CausalParityCase(1, 5, 4), CausalParityCase(2, 7, 4, left_pad=3))


@dataclass(frozen=True)
class CausalParityResult:
    batch: int
    prompt_len: int
    new_tokens: int
    max_abs_diff: float
    argmax_agreement: float


def check_causal_parity(
    model: Any, onnx_path: Path, *, atol: float, cases: tuple[CausalParityCase, ...] = DEFAULT_CASES, seed: int = 0
) -> list[CausalParityResult]:
    """Prefill then decode token by token in onnxruntime (present -> past) and compare each step's
    logits with PyTorch's no-cache forward over the whole sequence, on real (unpadded) positions;
    raise `ExportParityError` over `atol`."""
    session = OnnxCausalLM(onnx_path)
    rng = np.random.default_rng(seed)
    results = []
    for case in cases:
        total = case.prompt_len + case.new_tokens
        ids = rng.integers(0, model.config.vocab_size, (case.batch, total), dtype=np.int64)
        mask = np.ones_like(ids)
        for row in range(case.batch):
            mask[row, : row * case.left_pad] = 0
        if not mask[:, : case.prompt_len].any(axis=1).all():
            raise InputError(f"parity case {case} pads a whole prompt away; use a smaller left_pad")
        expected = torch_logits(model)(ids, mask)
        positions = position_ids(mask)
        steps = [(0, case.prompt_len)] + [(t, t + 1) for t in range(case.prompt_len, total)]
        past = session.empty_past(case.batch)
        got = []
        for start, end in steps:
            logits, past = session.step(ids[:, start:end], mask[:, :end], positions[:, start:end], past)
            got.append(logits)
        actual = np.concatenate(got, axis=1)
        real = mask.astype(bool)
        diff = float(np.abs(actual - expected)[real].max())
        agree = float((actual.argmax(-1) == expected.argmax(-1))[real].mean())
        results.append(CausalParityResult(case.batch, case.prompt_len, case.new_tokens, diff, agree))
        if diff > atol:
            raise ExportParityError(
                f"{onnx_path.name}: KV-cache decoding differs from PyTorch's full forward by {diff:.3g} (max abs "
                f"logit) at batch={case.batch}, prompt={case.prompt_len}, new_tokens={case.new_tokens}, "
                f"left_pad={case.left_pad}, over atol={atol:g}; check the opset or the cache wiring"
            )
    return results


GENAI_INSTALL = "pip install onnxruntime-genai==0.18.0"
# the fused graph's GroupQueryAttention takes right-padded (or unpadded) prompts, not left-padded ones
FUSED_CASES = (CausalParityCase(1, 5, 4), CausalParityCase(2, 7, 4))


def fused_available() -> str | None:
    """Why the fused export cannot run here, or None."""
    import importlib.util

    if importlib.util.find_spec("onnxruntime_genai") is None:
        return f"the fused causal-LM export uses onnxruntime-genai's model builder: {GENAI_INSTALL}"
    return None


def export_fused(model_dir: Path, out_dir: Path, log_path: Path) -> Path:
    """A transformers causal-LM folder as onnxruntime-genai's fused fp32 graph for the CPU (its model builder):
    GroupQueryAttention with rotary embeddings inside, SkipSimplifiedLayerNormalization, q/k/v and gate/up
    MatMuls merged; weights in `model.onnx.data`. Decode runs ~430 nodes instead of ~10,000, so per-op overhead
    stops dominating batch-1 decode. The builder runs as its own process (its command line is its stable
    interface; it prints per tensor), its output in `log_path`. Returns the model file."""
    import subprocess
    import sys

    from edgepipe.errors import BackendUnavailableError

    reason = fused_available()
    if reason:
        raise BackendUnavailableError(reason)
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(model_dir), "-o", str(out_dir)]
    command += ["-p", "fp32", "-e", "cpu", "-c", str(out_dir.parent / f".{out_dir.name}-builder-cache")]
    with log_path.open("w", encoding="utf-8") as log_file:
        done = subprocess.run(command, stdout=log_file, stderr=subprocess.STDOUT, check=False)
    path = out_dir / "model.onnx"
    shutil.rmtree(out_dir.parent / f".{out_dir.name}-builder-cache", ignore_errors=True)
    if done.returncode or not path.is_file():
        tail = log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-1:]
        raise InputError(
            f"onnxruntime-genai's model builder does not take {model_dir} (exit {done.returncode}: "
            f"{tail[0] if tail else 'no output'}; log {log_path}); set the export's fuse: false"
        )
    return path
