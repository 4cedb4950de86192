"""Sensitivity analysis and accuracy-aware fallback for int8 quantization.

Both work through a `Quantizer`, a function that writes a quantized copy of the model with some nodes
left in float, so they apply unchanged to dynamic and static (QDQ) quantization:

- `sensitivity`: quantize each candidate node alone; compare the model's outputs on a validation slice
  with fp32 (SQNR in dB, MSE, argmax agreement) and its accuracy. Sorted most sensitive first.
- `fallback`: quantize everything, then leave the most sensitive nodes in float, more at each step
  (1, 2, 3, 4, 6, 8, 12, ... nodes), until the accuracy drop against fp32 is within budget. The best
  model found so far is always the one at `out`: the first within budget, else the smallest drop.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# (nodes to keep in float, or None; nodes to quantize, or None for all; output path)
Quantizer = Callable[[list[str], list[str] | None, Path], None]


def run_model(path: Path, feeds: Iterable[dict[str, np.ndarray]]) -> np.ndarray:
    """Logits of an ONNX model over a list of feed batches (CPU, all graph optimizations)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.set_denormal_as_zero", "1")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return np.concatenate([session.run(None, {n: f[n] for n in names})[0] for f in feeds])


def sqnr_db(reference: np.ndarray, got: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio of `got` against `reference`, in dB (higher is better)."""
    noise = float(np.sum((reference - got) ** 2))
    signal = float(np.sum(reference**2))
    return float("inf") if noise == 0 else 10.0 * float(np.log10(signal / noise))


@dataclass(frozen=True)
class NodeSensitivity:
    node: str
    op_type: str
    sqnr_db: float
    mse: float
    argmax_agreement: float
    accuracy: float


def sensitivity(
    quantize: Quantizer,
    candidates: list[tuple[str, str]],
    feeds: list[dict[str, np.ndarray]],
    labels: np.ndarray,
    reference: np.ndarray,
    work_dir: Path,
) -> list[NodeSensitivity]:
    """Each (node, op_type) quantized alone, most sensitive (lowest SQNR) first."""
    trial = work_dir / "sensitivity-trial.onnx"
    rows = []
    for node, op_type in candidates:
        quantize([], [node], trial)
        got = run_model(trial, feeds)
        rows.append(
            NodeSensitivity(
                node=node,
                op_type=op_type,
                sqnr_db=round(sqnr_db(reference, got), 3),
                mse=float(np.mean((reference - got) ** 2)),
                argmax_agreement=float(np.mean(reference.argmax(-1) == got.argmax(-1))),
                accuracy=float(np.mean(got.argmax(-1) == labels)),
            )
        )
    trial.unlink(missing_ok=True)
    return sorted(rows, key=lambda r: (r.sqnr_db, r.node))


def fallback_steps(count: int) -> list[int]:
    """How many of the most sensitive nodes stay float at each step: 0, 1, 2, 3, 4, 6, 8, 12, ... count."""
    steps, k = [0], 1
    while k < count:
        steps.append(k)
        k = max(k + 1, int(k * 1.5))
    return [*steps, count] if count else steps


@dataclass(frozen=True)
class FallbackResult:
    met: bool
    fp32_accuracy: float
    accuracy: float
    excluded: list[str]
    trials: list[dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def fallback(
    quantize: Quantizer,
    ranking: list[str],
    feeds: list[dict[str, np.ndarray]],
    labels: np.ndarray,
    fp32_accuracy: float,
    max_drop: float,
    out: Path,
    work_dir: Path,
) -> FallbackResult:
    """Keep the most sensitive nodes of `ranking` in float until accuracy is within `max_drop` of fp32."""
    trial = work_dir / "fallback-trial.onnx"
    trials: list[dict[str, Any]] = []
    best: dict[str, Any] = {"excluded": [], "accuracy": 0.0, "drop": float("inf"), "met": False}
    for k in fallback_steps(len(ranking)):
        excluded = ranking[:k]
        quantize(excluded, None, trial)
        accuracy = float(np.mean(run_model(trial, feeds).argmax(-1) == labels))
        drop = fp32_accuracy - accuracy
        met = drop <= max_drop + 1e-12
        trials.append({"excluded": k, "accuracy": accuracy, "drop": round(drop, 5), "met": met})
        log.info("fallback: %d node(s) in float -> accuracy %.4f (drop %.4f)", k, accuracy, drop)
        if met or drop < best["drop"]:
            best = {"excluded": excluded, "accuracy": accuracy, "drop": drop, "met": met}
            shutil.copyfile(trial, out)  # the best model so far is always at `out`
        if met:
            break
    trial.unlink(missing_ok=True)
    return FallbackResult(best["met"], fp32_accuracy, best["accuracy"], best["excluded"], trials)
