"""The demo student's architecture on a CUDA GPU: the torch fp32, fp16 and bf16 engines timed with CUDA
events at b1 and b8 (seq 128), each with its agreement against the CPU fp32 logits on real review
snippets (issue 21). `benchmarks/gpu_check.sh` runs it on the GPU machine; without a GPU,
`--device cpu` runs the same measurement on the CPU engine alone (its test does).

    python benchmarks/bench_gpu.py --model .gpu-kit/student --json $OUT/gpu.json

The model is any transformers sequence-classifier folder; the kit's (`benchmarks/gpu_kit.py`) is the
demo's student shape (3 of MiniLM-L6's layers, hidden 384) with MiniLM's own weights and an untrained
head: timing does not depend on the head, and agreement of a reduced precision with fp32 is measured on
the same weights either way. Device time (`device_ms`, CUDA events, inputs already on the GPU) and the
host-to-device copy (`h2d_ms`) are reported apart from the end-to-end call (`e2e_ms`: numpy in, numpy out).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

CUDA_ENGINES = ("torch-cuda", "torch-cuda-fp16", "torch-cuda-bf16")
SHAPES = ((1, 128), (8, 128))


def _wall_ms(fn: Any, runs: int, warmup_runs: int = 5) -> list[float]:
    for _ in range(warmup_runs):
        fn()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return samples


def measure(model: Path, texts: list[str], device: str, runs: int) -> dict[str, Any]:
    """One row per engine: agreement with CPU fp32 on `texts`, and latency at SHAPES."""
    from edgepipe.benchmarks.harness import cuda_event_ms, summarize
    from edgepipe.runtime.backends import BACKENDS
    from edgepipe.runtime.predictor import Predictor

    reference = Predictor.load(model).logits(texts)
    engines = CUDA_ENGINES if device == "cuda" else ("torch",)
    rows, skipped = [], {}
    for name in engines:
        reason = BACKENDS[name].available()
        if reason:
            skipped[name] = reason
            continue
        predictor = Predictor.load(model, target=device, backend=name)
        session = predictor.session
        logits = predictor.logits(texts)
        row: dict[str, Any] = {
            "engine": name,
            "describe": session.describe(),
            "argmax_agreement": float((logits.argmax(-1) == reference.argmax(-1)).mean()),
            "max_abs_diff": float(np.abs(logits - reference).max()),
            "latency": {},
        }
        for batch, seq in SHAPES:
            feeds = predictor.encode((texts * batch)[:batch], pad_to=seq)
            timing = {"e2e_ms": summarize(_wall_ms(lambda f=feeds, s=session: s.run(f), runs)).to_json()}
            if device == "cuda":
                tensors = session.to_device(feeds)  # type: ignore[attr-defined]
                timing["device_ms"] = summarize(
                    cuda_event_ms(lambda t=tensors, s=session: s.run_on_device(t), runs)
                ).to_json()  # type: ignore[attr-defined]
                timing["h2d_ms"] = summarize(cuda_event_ms(lambda f=feeds, s=session: s.to_device(f), runs)).to_json()  # type: ignore[attr-defined]
            row["latency"][f"b{batch}_s{seq}"] = timing
        rows.append(row)
    fp32 = next((r for r in rows if r["engine"] == "torch-cuda"), None)
    for row in rows:  # fp16/bf16 speed-up over fp32 on the same device, per shape
        if fp32 is not None and "device_ms" in row["latency"]["b1_s128"]:
            row["speedup_vs_fp32"] = {
                shape: round(fp32["latency"][shape]["device_ms"]["p50"] / timing["device_ms"]["p50"], 3)
                for shape, timing in row["latency"].items()
            }
    return {"rows": rows, "skipped": skipped}


def fp32_folder(folder: Path, out: Path) -> Path:
    """`folder` with float32 weights (the kit ships float16 to fit what travels to the GPU machine)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from edgepipe.pipeline.artifacts import write_meta

    model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(folder).save_pretrained(out)
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    write_meta(out, task="text-classification", labels=labels, precision="fp32", fmt="transformers")
    return out


def host() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a transformers sequence-classifier folder")
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--texts", type=int, default=512, help="val snippets for the agreement")
    args = parser.parse_args(argv)

    from edgepipe.pipeline.data import load_splits
    from edgepipe.pipeline.recipe import DataConfig

    texts = [str(t) for t in load_splits(DataConfig(), 0).val.inputs[: args.texts]]
    result = {"host": host(), "model": str(args.model), "texts": len(texts), "runs": args.runs}
    with tempfile.TemporaryDirectory() as work:
        result.update(measure(fp32_folder(args.model, Path(work)), texts, args.device, args.runs))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    for row in result["rows"]:
        shapes = ", ".join(
            f"{shape} {t.get('device_ms', t['e2e_ms'])['p50']:.3f} ms" for shape, t in row["latency"].items()
        )
        print(
            f"{row['engine']:>16}: agreement {row['argmax_agreement']:.4f}, "
            f"max |diff| {row['max_abs_diff']:.2e}; {shapes}"
        )
    for name, reason in result["skipped"].items():
        print(f"{name:>16}: skipped ({reason})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
