"""The word-embedding table under the size target: vocabulary pruning against a 4-bit table, over seeds.

    python benchmarks/bench_tables.py --json runs/bench/tables.json --run runs/demo [--run runs/chain-seeds/s1...]
        [--runs 100]

A 1/8-size student of the demo needs the 30,522 x 384 word table well under its int8 11.7 MB. Two ways, each on
the same pruned student of each `--run` (a built demo run; bench_chain_seeds.py writes one per seed):
- `vocab + 8-bit table`: the shipped way until now: the vocab stage (the tokens the train split uses and single
  characters, 15.5k rows; every other word re-split into kept pieces), int8-dynamic with the 8-bit table;
- `4-bit table, block B`: the full vocabulary, the table as symmetric 4-bit blocks of B along the hidden axis
  (GatherBlockQuantized), the position table in float16 (`embedding_bits: 4`, `float16_tables: true`);
beside `8-bit table` (the full vocabulary in int8: over the size target) and the fp32 export of the pruned student,
the reference. Each is built by the stages themselves from a copy of the run (01-03 reused). Per artifact:
MB, test and val accuracy, argmax agreement with the fp32 reference on val + test; b1/b8 s128 p50 interleaved in
one process for the first run.
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

import numpy as np
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from edgepipe.benchmarks.harness import measure_interleaved
from edgepipe.pipeline.artifacts import write_json
from edgepipe.pipeline.data import load_splits
from edgepipe.pipeline.recipe import parse_recipe
from edgepipe.pipeline.runner import build
from edgepipe.runtime import Predictor

GATHER = ["MatMul", "Attention", "Gemm", "Gather"]
WAYS = {  # quantize stage settings (dynamic, op_types GATHER) per artifact name
    "8-bit table": {},
    "4-bit table, block 64": {"embedding_bits": 4, "embedding_block_size": 64, "float16_tables": True},
    "4-bit table, block 32": {"embedding_bits": 4, "embedding_block_size": 32, "float16_tables": True},
}


def _chain(run: Path, out: Path, vocab: bool) -> dict[str, Path]:
    """The run's chain up to its pruned student (reused where its hashes hold), then with `vocab` the vocab
    stage, export and the 8-bit table; without, the export of the whole vocabulary quantized each way of WAYS."""
    if not out.exists():
        shutil.copytree(run, out, ignore=shutil.ignore_patterns("0[4-9]-*", "report.*", "*.png"))
    raw = yaml.safe_load((run / "recipe.resolved.yaml").read_text())
    kinds = {"finetune", "distill", "prune", "export"} | ({"vocab"} if vocab else set())
    stages = [s for s in raw["stages"] if s["kind"] in kinds]
    if vocab and not any(s["kind"] == "vocab" for s in stages):  # the shipped recipe no longer has it
        stages.insert(3, {"kind": "vocab", "min_count": 1})
    ways = {"vocab + 8-bit table": {}} if vocab else WAYS
    for n, settings in enumerate(ways.values()):
        stages.append({"kind": "quantize", "mode": "dynamic", "op_types": GATHER, "name": f"way{n}", **settings})
    raw["stages"] = stages
    build(parse_recipe(raw), out, benchmark=False)
    first = 5 + vocab
    paths = {name: out / f"{first + n:02d}-quantize" / f"way{n}" for n, name in enumerate(ways)}
    return paths if vocab else {"fp32 (reference)": out / "04-export" / "fp32", **paths}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--run", type=Path, nargs="+", default=[Path("runs/demo")])
    parser.add_argument("--out", type=Path, default=Path("runs/tables-bench"))
    parser.add_argument("--runs", type=int, default=100)
    args = parser.parse_args(argv)
    result: dict[str, Any] = {}
    timed: dict[str, Path] = {}
    for k, run in enumerate(args.run):
        recipe = parse_recipe(yaml.safe_load((run / "recipe.resolved.yaml").read_text()))
        seed = next((s.seed for s in recipe.stages if s.kind == "distill"), None)
        splits = load_splits(recipe.data, recipe.seed)
        paths = {
            **_chain(run, args.out / f"run{k}", vocab=False),
            **_chain(run, args.out / f"run{k}-vocab", vocab=True),
        }
        texts = list(splits.val.inputs) + list(splits.test.inputs)
        reference = Predictor.load(paths["fp32 (reference)"]).logits(texts).argmax(-1)
        rows: dict[str, Any] = {}
        for name, path in paths.items():
            predicted = Predictor.load(path).logits(texts).argmax(-1)
            val, test = predicted[: len(splits.val.labels)], predicted[len(splits.val.labels) :]
            rows[name] = {
                "mb": round((path / "model.onnx").stat().st_size / 1e6, 2),
                "test_accuracy": round(float(np.mean(test == splits.test.labels)), 5),
                "val_accuracy": round(float(np.mean(val == splits.val.labels)), 5),
                "agreement_with_fp32": round(float(np.mean(predicted == reference)), 5),
            }
        result[f"{run} (distill seed {seed if seed is not None else recipe.seed})"] = rows
        if k == 0:
            timed = paths
    names = list(timed)
    per_run = list(result.values())
    result["mean over runs"] = {
        name: {key: round(float(np.mean([r[name][key] for r in per_run])), 5) for key in rows[name]} for name in names
    }

    @contextmanager
    def open_runners(name: str):  # type: ignore[no-untyped-def]
        predictor = Predictor.load(timed[name])
        text = "a fine film"
        feeds = {b: predictor.encode([text] * b, pad_to=128) for b in (1, 8)}
        yield {b: (lambda f=f: predictor.session.run(f)) for b, f in feeds.items()}

    stats = measure_interleaved(names, open_runners, runs=args.runs, rounds=10, warmup_runs=5, warmup_s=0.5)
    result["latency (first run)"] = {
        name: {f"b{b}_p50_ms": round(stats[(name, b)].p50, 3) for b in (1, 8)}
        | {f"b{b}_cv": round(stats[(name, b)].cv, 3) for b in (1, 8)}
        for name in names
    }
    write_json(args.json, result)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
