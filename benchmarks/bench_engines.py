"""Every engine this machine can run, on the default recipe's final student, in one report.

    python benchmarks/bench_engines.py --run runs/demo --json runs/bench/engines.json [--targets cpu cuda]

Takes the artifacts of a finished run of the default recipe (teacher and students in PyTorch, the
student's ONNX fp32 / fused / int8 models, its .ort model) and measures each on every registered
engine whose format and target fit (`edgepipe engines`), b1 and b8 at s128, 50 runs interleaved over
5 rounds, one model alive at a time; unavailable engines are listed with the reason. Every row is
compared with the fp32 ONNX reference on the same test inputs (argmax agreement, max abs diff). On a
GPU machine (`make bench-gpu`) `--targets cuda` times torch fp32 / fp16 / bf16 (and TensorRT where
installed) with CUDA events for the device time and the host-to-device copy measured apart.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from edgepipe.benchmarks.bench import run_bench
from edgepipe.pipeline.artifacts import write_json
from edgepipe.pipeline.measure import bench_items, bench_settings, open_run
from edgepipe.runtime.backends import BACKENDS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=Path("runs/demo"))
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--targets", nargs="+", default=["cpu"], choices=["cpu", "cuda"])
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args(argv)
    _, recipe, data, artifacts = open_run(args.run)
    items = bench_items(artifacts, include_torch=True)
    settings = bench_settings(recipe, data)
    settings = type(settings)(
        **{
            **settings.__dict__,
            "targets": args.targets,
            "batch_sizes": [1, 8],
            "seq_lens": [128],
            "runs": args.runs,
            "engines": [n for n, b in BACKENDS.items() if b.target in args.targets],
        }
    )
    report = run_bench(items, data.test.inputs, data.test.labels, settings, items[0].name)
    write_json(args.json, {"results": report["results"], "skipped": report["skipped"], "machine": report["machine"]})
    for row in report["results"]:
        agree = row.get("agreement", {})
        print(
            f"{row['artifact']:<32}{row['engine']:<16}{row['target']:<5} b{row['batch']:<2} "
            f"p50 {row['latency_ms']['p50']:8.2f} ms  acc {100 * row['accuracy']:.2f}%  "
            f"agree {100 * agree.get('argmax_agreement', float('nan')):.2f}%"
        )
    for skip in report["skipped"]:
        print(f"skipped {skip['artifact']} on {skip['target']}: {skip['reason']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
