"""Dynamic int8 and the embedding tables: the demo run's fp32 export quantized dynamically with the fp32 table
(the fused export), with every Gather's table in 8 bits, and with the token ids' table only (what the quantize
stage does), beside the run's static int8; MB, test accuracy, b1/b8 s128 p50 interleaved in one process.

    python benchmarks/bench_gather.py --json runs/bench/gather.json [--run runs/demo] [--runs 100]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from edgepipe.benchmarks.harness import measure_interleaved
from edgepipe.export import fuse_transformer
from edgepipe.pipeline.artifacts import write_json
from edgepipe.pipeline.data import load_splits
from edgepipe.pipeline.recipe import parse_recipe
from edgepipe.runtime import Predictor


def _dynamic(run: Path, out: Path, gather: bool, positions: bool) -> Path:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from transformers import AutoConfig

    src = run / "04-export" / ("fp32" if gather else "fp32-fused")
    shutil.copytree(src, out, dirs_exist_ok=True)
    model = src / "model.onnx"
    exclude: list[str] = []
    if gather:  # fused without EmbedLayerNormalization, which hides the table
        model = out / ".fused.onnx"
        fuse_transformer(src / "model.onnx", model, AutoConfig.from_pretrained(src), embed_layer_norm=False)
        graph = onnx.load(str(model)).graph
        inputs = {i.name for i in graph.input}
        exclude = (
            [] if positions else [n.name for n in graph.node if n.op_type == "Gather" and n.input[1] not in inputs]
        )
    quantize_dynamic(
        model,
        out / "model.onnx",
        op_types_to_quantize=["MatMul", "Attention", "Gemm", *(["Gather"] if gather else [])],
        per_channel=True,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=exclude,
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )
    (out / ".fused.onnx").unlink(missing_ok=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--run", type=Path, default=Path("runs/demo"))
    parser.add_argument("--out", type=Path, default=Path("runs/gather-bench"))
    parser.add_argument("--runs", type=int, default=100)
    args = parser.parse_args(argv)
    paths = {
        "dynamic, fp32 table": _dynamic(args.run, args.out / "fp32-table", gather=False, positions=False),
        "dynamic, every table 8-bit": _dynamic(args.run, args.out / "all-tables", gather=True, positions=True),
        "dynamic, token table 8-bit": _dynamic(args.run, args.out / "token-table", gather=True, positions=False),
        "static, 8-bit table": args.run / "06-quantize" / "int8-static",
    }
    recipe = parse_recipe(yaml.safe_load((args.run / "recipe.resolved.yaml").read_text()))
    test = load_splits(recipe.data, recipe.seed).test
    result: dict[str, dict[str, Any]] = {}
    for name, path in paths.items():
        logits = Predictor.load(path).logits(list(test.inputs))
        result[name] = {
            "mb": round((path / "model.onnx").stat().st_size / 1e6, 2),
            "accuracy": round(float((logits.argmax(-1) == test.labels).mean()), 5),
        }

    @contextmanager
    def open_runners(name: str):  # type: ignore[no-untyped-def]
        predictor = Predictor.load(paths[name])
        feeds = {b: predictor.encode([test.inputs[0]] * b, pad_to=128) for b in (1, 8)}
        yield {b: (lambda f=f: predictor.session.run(f)) for b, f in feeds.items()}

    stats = measure_interleaved(list(paths), open_runners, runs=args.runs, rounds=10, warmup_runs=5, warmup_s=0.5)
    for (name, batch), s in stats.items():
        result[name][f"b{batch}_p50_ms"] = round(s.p50, 3)
        result[name][f"b{batch}_cv"] = round(s.cv, 3)
    write_json(args.json, result)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
