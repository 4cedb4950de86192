"""The one training loop: finetune, distill (text and image), pruning's recovery and causal-LM
distillation all run `fit`, and differ only in the loss of a step.

A step takes a seeded batch of train-example indices (reshuffled epochs, sharded over the torchrun
world), asks the stage for its loss, and takes an AdamW step with a linear warm-up and decay and the
gradient norm clipped at 1.0; with `autocast` the step's forward passes run in bfloat16 over the fp32
weights (`torch.autocast`), the losses in fp32.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

log = logging.getLogger("edgepipe")


class Scheduled(Protocol):
    """What a config says about its optimization (FinetuneConfig, DistillConfig, RecoverConfig, Schedule)."""

    @property
    def lr(self) -> float: ...
    @property
    def weight_decay(self) -> float: ...
    @property
    def warmup_ratio(self) -> float: ...
    @property
    def max_steps(self) -> int: ...
    @property
    def batch_size(self) -> int: ...
    @property
    def autocast(self) -> str: ...


@dataclass(frozen=True)
class Schedule:
    """The optimization settings of a loop called outside a recipe (causal-LM distillation's API)."""

    lr: float
    weight_decay: float
    warmup_ratio: float
    max_steps: int
    batch_size: int
    autocast: str = "none"


@dataclass(frozen=True)
class Fitted:
    """What a finished loop measured: the loss and wall time of every step, and the whole loop's seconds."""

    losses: list[float]
    step_s: list[float]
    seconds: float


StepLoss = Callable[[Any, int, np.ndarray], Any]
"""`(model, step, index) -> loss`: the loss of one step on train examples `index`; `model` is the
trained model as the world runs it (DDP-wrapped under torchrun)."""


GROUP = 50  # batches sorted by length together (transformers' LengthGroupedSampler uses 50 too)


def batches(n: int, batch_size: int, steps: int, seed: int, lengths: np.ndarray | None = None) -> list[np.ndarray]:
    """`steps` batches of indices: reshuffled epochs, every example seen once per epoch.

    With `lengths` (tokens per example), each run of GROUP batches' worth of an epoch's order is sorted by
    length before it is cut into batches, and the epoch's batches are then shuffled (transformers'
    group_by_length): a batch pads to its longest example, and random batches of the demo's reviews pad to
    1.9x their mean length."""
    rng = np.random.default_rng(seed)
    batch_size = min(batch_size, n)
    out: list[np.ndarray] = []
    while len(out) < steps:
        order = rng.permutation(n)
        if lengths is not None:
            runs = np.split(order, range(GROUP * batch_size, n, GROUP * batch_size))
            order = np.concatenate([run[np.argsort(-lengths[run], kind="stable")] for run in runs])
        epoch = [order[i : i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]
        if lengths is not None:
            epoch = [epoch[i] for i in rng.permutation(len(epoch))]
        out.extend(epoch)
    return out[:steps]


AUTOCAST = ("none", "bf16", "auto")


def autocast_mode(mode: str, device: str) -> str:
    """`bf16` or `none`: what `mode` means for training on `device` (cpu or cuda). `auto` is bf16 where the
    device computes it natively (a CPU with AVX512-BF16 or AMX, a CUDA GPU with bf16), fp32 elsewhere: on an
    AVX2-only CPU bf16 matmuls are emulated and slower than fp32. On AVX512-BF16 (AMD EPYC, Zen 4) the demo's
    training step is 1.45x faster in bf16 (benchmarks/bench_padding.py, RESULTS.md)."""
    import torch

    if mode not in AUTOCAST:
        raise ValueError(f"autocast {mode!r}: use one of {', '.join(AUTOCAST)}")
    if mode != "auto":
        return mode
    if device == "cuda":
        native = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    else:
        native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return "bf16" if native else "none"


def optimizer_and_schedule(params: list[Any], cfg: Scheduled) -> Any:
    import torch
    from transformers import get_linear_schedule_with_warmup

    # The fused kernel: one pass per tensor instead of one op per moment (the same update to float rounding);
    # 5x faster on the demo's 22.7M parameters (112 -> 22 ms), a tenth of its training step on 2 cores (RESULTS.md).
    fused = all(p.device.type in ("cpu", "cuda") for p in params)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
    return optimizer, get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * cfg.max_steps), cfg.max_steps)


def fit(
    model: Any,
    step_loss: StepLoss,
    cfg: Scheduled,
    examples: int,
    seed: int,
    *,
    outside: Sequence[Any] = (),
    world: Any = None,
    desc: str = "train",
    lengths: np.ndarray | None = None,
) -> Fitted:
    """Train `model` in place for `cfg.max_steps` steps of `step_loss` over `examples` train examples.

    `outside`: trained parameters that are not `model`'s (hidden-state projections); they are optimized
    with it, and as DDP does not see them their gradients are averaged over `world` here. The model is
    left in eval mode. `desc` names its progress bar; `lengths` (tokens per example) groups batches by
    length (`batches`); `cfg.autocast` runs `step_loss` under bf16 autocast (`autocast_mode`)."""
    import torch

    from edgepipe.progress import bar

    params = [p for p in model.parameters() if p.requires_grad] + list(outside)
    optimizer, schedule = optimizer_and_schedule(params, cfg)
    device = params[0].device.type if params else "cpu"
    bf16 = autocast_mode(cfg.autocast, device) == "bf16"
    if bf16:
        log.info("%s: forward passes in bf16 on %s (autocast: %s)", desc, device, cfg.autocast)
    model.train()
    trained = world.wrap(model) if world is not None else model  # DDP: each rank takes its share of a batch
    losses, step_s = [], []
    started = time.perf_counter()
    plan = batches(examples, cfg.batch_size, cfg.max_steps, seed, lengths)
    for step, index in enumerate(bar(plan, desc=desc, unit="step")):
        begun = time.perf_counter()
        with torch.autocast(device, torch.bfloat16, enabled=bf16):
            loss = step_loss(trained, step, world.shard(index) if world is not None else index)
        loss.backward()
        if world is not None:
            world.average_gradients(outside)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        step_s.append(time.perf_counter() - begun)
    model.eval()
    return Fitted(losses, step_s, time.perf_counter() - started)


def loss_window(losses: list[float]) -> tuple[float, float]:
    """Mean loss over the first and the last few steps."""
    window = max(1, min(20, len(losses) // 4))
    return float(np.mean(losses[:window])), float(np.mean(losses[-window:]))
