"""The demo chain after the student over seeds: distill and prune with the same stage seed, for each
recovery learning rate, test accuracy of the student, the pruned and int8-dynamic artifacts.

    python benchmarks/bench_chain_seeds.py --json runs/bench/chain.json --teacher-run runs/demo \
        [--seeds 1 2] [--recover-lr 5e-5 1.5e-4]

Each (seed, lr) builds into `--out/s{seed}-lr{lr}` from a copy of the teacher run (its fine-tuned teacher and
cached logits reused), without the benchmark: only accuracy is measured here. Seed 0 with no stage seed is the
demo run itself.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from edgepipe.pipeline.artifacts import write_json
from edgepipe.pipeline.data import load_splits
from edgepipe.pipeline.recipe import parse_recipe
from edgepipe.pipeline.runner import build
from edgepipe.runtime import Predictor

RECIPE = Path(__file__).resolve().parents[1] / "src" / "edgepipe" / "recipes" / "default.yaml"
ARTIFACTS = {
    "student": "02-distill/model",
    "pruned": "03-prune/model",
    "int8-dynamic": "05-quantize/int8-dynamic",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("runs/chain-seeds"))
    parser.add_argument("--teacher-run", type=Path, default=Path("runs/demo"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--recover-lr", type=float, nargs="+", default=[5e-5, 1.5e-4])
    args = parser.parse_args(argv)
    results: dict[str, dict[str, float]] = {}
    for seed in args.seeds:
        previous = args.teacher_run
        for lr in args.recover_lr:
            out = args.out / f"s{seed}-lr{lr:g}"
            if not out.exists():
                shutil.copytree(previous, out)  # the previous lr's distilled student is reused
            raw = yaml.safe_load(RECIPE.read_text())
            raw["stages"][1]["seed"] = raw["stages"][2]["seed"] = seed
            raw["stages"][2]["recover"]["lr"] = lr
            recipe = parse_recipe(raw)
            build(recipe, out, benchmark=False)
            test = load_splits(recipe.data, recipe.seed).test
            results[f"seed {seed}, recover lr {lr:g}"] = {
                name: round(
                    float((Predictor.load(out / path).logits(list(test.inputs)).argmax(-1) == test.labels).mean()), 5
                )
                for name, path in ARTIFACTS.items()
            }
            previous = out
    write_json(args.json, results)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
