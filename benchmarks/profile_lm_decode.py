"""Where one decode step of SmolLM2-135M goes, per operator type: the fused fp32 graph, 4-bit RTN and 4-bit HQQ
(float zero points rewritten for the integer kernel by `lm_quantize.integer_kernel`), LM head at 8 bits.

    python benchmarks/profile_lm_decode.py --json runs/bench/lm_decode_profile.json [--work runs/lm-profile]

Builds the three graphs once (cached in WORK), then for each: one decode step after a 32-token prompt, wall
p50 over 100 steps, then ONNX Runtime's profiler over 50 steps (kernel ms per op type; the profiler's own
overhead makes these sum above the wall time: compare them with each other). Rounds alternate the artifacts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

from bench_lm import _head, _quantize, _weights

from edgepipe.export.causal_lm import export_fused
from edgepipe.export.lm_quantize import WeightOnly
from edgepipe.pipeline.models import smollm2_folder
from edgepipe.runtime.backends import RuntimeOptions
from edgepipe.runtime.generate import OnnxCausalLM
from edgepipe.runtime.host import host_info, versions
from edgepipe.runtime.profiling import op_type_profile


def build(work: Path) -> dict[str, Path]:
    fused = work / "teacher-fused"
    if not (fused / "model.onnx").is_file():
        export_fused(smollm2_folder(work / "cache"), fused, work / "builder.log")
    head = _head(fused)
    folders = {"teacher-fused": fused}
    for name, settings in {
        "w4-rtn": WeightOnly(bits=4, eight_bit=head),
        "w4-hqq": WeightOnly(bits=4, algorithm="hqq", eight_bit=head),
    }.items():
        folders[name] = work / name
        _quantize(fused, folders[name], _weights(settings))  # once, cached with its tokenizer and configs
    return folders


def decode_feeds(lm: OnnxCausalLM, prompt: np.ndarray) -> dict[str, np.ndarray]:
    """The feeds of the step after `prompt` (1, P): one new token, the prompt's cache."""
    _, present = lm.step(prompt, np.ones_like(prompt), np.arange(prompt.shape[1])[None], None)
    feeds = {"input_ids": prompt[:, :1], "attention_mask": np.ones((1, prompt.shape[1] + 1), dtype=np.int64)}
    if lm.takes_positions:
        feeds["position_ids"] = np.asarray([[prompt.shape[1]]], dtype=np.int64)
    feeds.update(zip(lm.past_names, present, strict=True))
    return feeds


def profile(folders: dict[str, Path], rounds: int = 2, steps: int = 100) -> dict[str, Any]:
    prompt = np.random.default_rng(0).integers(100, 20_000, (1, 32)).astype(np.int64)
    wall: dict[str, list[float]] = {name: [] for name in folders}
    kernels: dict[str, list[dict[str, float]]] = {name: [] for name in folders}
    names = list(folders)
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            lm = OnnxCausalLM(folders[name])
            feeds = decode_feeds(lm, prompt)
            for _ in range(20):
                lm.session.run(None, feeds)
            for _ in range(steps):
                start = time.perf_counter_ns()
                lm.session.run(None, feeds)
                wall[name].append((time.perf_counter_ns() - start) / 1e6)
            kernels[name].append(op_type_profile(lm.path, feeds, 50, RuntimeOptions()))
            del lm
    out = {}
    for name in folders:
        ops = {op: round(float(np.mean([k.get(op, 0.0) for k in kernels[name]])), 3) for op in kernels[name][0]}
        out[name] = {"step_ms_p50": round(float(np.median(wall[name])), 3), "kernel_ms_per_op_type": ops}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("runs/lm-profile"))
    args = parser.parse_args(argv)
    rows = profile(build(args.work))
    for name, row in rows.items():
        ops = ", ".join(f"{op} {ms:.2f}" for op, ms in list(row["kernel_ms_per_op_type"].items())[:7])
        print(f"{name}: step p50 {row['step_ms_p50']:.2f} ms; kernel ms: {ops}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"rows": rows, "machine": host_info(), "versions": versions()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
