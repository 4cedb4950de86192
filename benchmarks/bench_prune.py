"""FFN pruning of the default recipe's distilled student at ratios 0.3 and 0.5, with KD recovery.

    python benchmarks/bench_prune.py --json runs/bench/prune.json [--teacher-run runs/demo]

For each ratio, the default recipe with `{kind: prune, ffn_ratio: R, importance: taylor, recover:
{max_steps: 200}}` after distill and an fp32 export is built into `--out/ratio-R` (teacher, logits and
student copied from the demo run, so only pruning and recovery run here). Then the student's fp32 ONNX
and every pruned fp32 ONNX are timed interleaved in one process, b1 s128 and b8 s128, one alive at a time.
Accuracies are the prune stage's own measurements on the validation split (before, pruned, recovered).
The CNN rows are not built: channel pruning is not implemented yet (`"cnn": null`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from edgepipe.benchmarks.harness import measure_interleaved
from edgepipe.pipeline.artifacts import write_json
from edgepipe.pipeline.data import load_splits
from edgepipe.pipeline.recipe import default_recipe_path, load_recipe, parse_recipe
from edgepipe.pipeline.runner import build
from edgepipe.runtime import Predictor

RATIOS = (0.3, 0.5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("runs/prune-bench"))
    parser.add_argument("--teacher-run", type=Path, default=Path("runs/demo"))
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args(argv)
    base = load_recipe(default_recipe_path()).model_dump(mode="json")
    folders = {"student": args.teacher_run / "03-export" / "fp32"}
    metrics = {}
    for ratio in RATIOS:
        raw = json.loads(json.dumps(base))
        prune = {"kind": "prune", "ffn_ratio": ratio, "importance": "taylor", "recover": {"max_steps": 200}}
        raw["stages"] = [*raw["stages"][:2], prune, {"kind": "export", "fuse": False}]
        out = args.out / f"ratio-{ratio}"
        for part in ("01-finetune", "02-distill", "cache"):
            if (args.teacher_run / part).is_dir() and not (out / part).exists():
                shutil.copytree(args.teacher_run / part, out / part)
        build(parse_recipe(raw), out, benchmark=False)
        folders[f"ratio-{ratio}"] = out / "04-export" / "fp32"
        metrics[ratio] = json.loads((out / "03-prune" / "metrics.json").read_text())
    recipe = load_recipe(default_recipe_path())
    texts = list(load_splits(recipe.data, recipe.seed).test.inputs)

    @contextmanager
    def open_runners(name: str):  # type: ignore[no-untyped-def]
        predictor = Predictor.load(folders[name])
        runners = {}
        for batch in (1, 8):
            feeds = predictor.encode(texts[:batch], pad_to=128)
            runners[batch] = lambda feeds=feeds: predictor.session.run(feeds)
        yield runners

    stats = measure_interleaved(list(folders), open_runners, runs=args.runs, rounds=5, warmup_runs=5, warmup_s=0.5)
    rows = []
    for ratio in RATIOS:
        m = metrics[ratio]
        rows.append(
            {
                "ratio": ratio,
                "ffn_before": m["ffn_before"],
                "ffn_after": m["ffn_after"],
                "params_before": m["params_before"],
                "params_after": m["params_after"],
                "flops_before": 2 * m["macs_per_token_before"] * 128,
                "flops_after": 2 * m["macs_per_token_after"] * 128,
                "p50_before_ms": round(stats[("student", 1)].p50, 3),
                "p50_after_ms": round(stats[(f"ratio-{ratio}", 1)].p50, 3),
                "p50_before_b8_ms": round(stats[("student", 8)].p50, 3),
                "p50_after_b8_ms": round(stats[(f"ratio-{ratio}", 8)].p50, 3),
                "acc_before": m["val_accuracy_before"],
                "acc_pruned": m["val_accuracy_pruned"],
                "acc_recovered": m["val_accuracy_recovered"],
            }
        )
    result = {"transformer": rows, "cnn": None, "accuracy_split": "val", "runs": args.runs}
    write_json(args.json, result)  # atomic, creates the folder
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
