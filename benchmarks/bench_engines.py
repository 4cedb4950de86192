"""Every engine this machine can run, on the default recipe's final student, in one report.

    python benchmarks/bench_engines.py --run runs/demo --json runs/bench/engines.json [--targets cpu cuda]

Takes the artifacts of a finished run of the default recipe (teacher and students in PyTorch, the
student's ONNX fp32 / fused / int8 models, its .ort model) and measures each on every registered
engine whose format and target fit (`edgepipe engines`), b1 and b8 at s128, 50 runs interleaved over
5 rounds, one model alive at a time; unavailable engines are listed with the reason. Every row is
compared with the fp32 ONNX reference on the same test inputs (argmax agreement, max abs diff).

Peers, measured in the same interleaved run: NNCF's post-training int8 of the same fp32 ONNX model with
the same calibration texts (`benchmarks/peers/nncf_int8.py`: its OpenVINO IR and its QDQ ONNX), on every
engine that reads them; written to `peers` in the JSON. The closing table is `edgepipe recommend`'s: the
fastest artifact x engine within the accuracy gate, peers included. On a GPU machine (`make bench-gpu`)
`--targets cuda` times torch fp32 / fp16 / bf16 (and TensorRT where
installed) with CUDA events for the device time and the host-to-device copy measured apart.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from edgepipe.benchmarks.bench import BenchItem, run_bench
from edgepipe.benchmarks.recommend import recommend, render
from edgepipe.pipeline.artifacts import write_json
from edgepipe.pipeline.measure import bench_items, bench_settings, open_run
from edgepipe.runtime.backends import BACKENDS

sys.path.insert(0, str(Path(__file__).parent))
from peers.nncf_int8 import nncf_folders


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=Path("runs/demo"))
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--targets", nargs="+", default=["cpu"], choices=["cpu", "cuda"])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--no-peers", action="store_true", help="skip NNCF's int8 peers")
    args = parser.parse_args(argv)
    _, recipe, data, artifacts = open_run(args.run)
    items = bench_items(artifacts, include_torch=True)
    peers = []
    if not args.no_peers:
        fp32 = next(a.path for a in artifacts if a.name == "fp32")
        calibration = list(data.calibration.inputs)
        for name, folder in nncf_folders(fp32, calibration, args.run.parent / f"{args.run.name}-nncf").items():
            peers.append(BenchItem(name, folder, "int8-static", "onnx"))
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
    report = run_bench([*items, *peers], data.test.inputs, data.test.labels, settings, items[0].name)
    peer_names = {p.name for p in peers}
    ours = [r for r in report["results"] if r["artifact"].split("@")[0] not in peer_names]
    theirs = [r for r in report["results"] if r["artifact"].split("@")[0] in peer_names]
    limit = recipe.gates.max_accuracy_drop if recipe.gates.max_accuracy_drop is not None else 0.01
    choices = recommend(report, limit)
    write_json(
        args.json,
        {
            "results": ours,
            "peers": theirs,
            "recommended": [asdict(c) for c in choices],
            "skipped": report["skipped"],
            "machine": report["machine"],
            "versions": report["versions"],
            "settings": {"runs": settings.runs, "rounds": settings.rounds, "threads": report["threads"]},
        },
    )
    for row in report["results"]:
        agree = row.get("agreement", {})
        print(
            f"{row['artifact']:<32}{row['engine']:<16}{row['target']:<5} b{row['batch']:<2} "
            f"p50 {row['latency_ms']['p50']:8.2f} ms  acc {100 * row['accuracy']:.2f}%  "
            f"agree {100 * agree.get('argmax_agreement', float('nan')):.2f}%"
        )
    for skip in report["skipped"]:
        print(f"skipped {skip['artifact']} on {skip['target']}: {skip['reason']}")
    folders = {a.name: a.path for a in artifacts} | {p.name: p.path for p in peers}
    print("\n".join(render(choices, limit, folders)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
