"""The latency-budget search on the default recipe: budget = 1/8 of the teacher's PyTorch fp32 p90.

    python benchmarks/bench_search.py --json runs/bench/search.json [--teacher-run runs/demo]

Measures the fine-tuned teacher (PyTorch fp32, b1 s128, 30 runs) for the budget, then runs
`edgepipe search` on the default recipe with student depths 3 and 4, prune ratios 0.4 to 0.7
(400 recovery steps) and fp32 / dynamic / static int8 as candidates. The teacher's completed fine-tune
stage and cached logits are copied from the demo run, so only the students are trained. Accuracy is on
the validation split (the search's own measure).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from edgepipe.benchmarks.harness import measure_interleaved
from edgepipe.pipeline.artifacts import write_json
from edgepipe.pipeline.cli import main as edgepipe
from edgepipe.pipeline.data import load_splits
from edgepipe.pipeline.recipe import default_recipe_path, load_recipe
from edgepipe.pipeline.runner import copy_completed_stages
from edgepipe.runtime import Predictor

# 1- and 2-layer students keep 0.93 and 0.95 of the teacher (RESULTS.md): deeper students, pruned
DEPTHS = (3, 4)
RATIOS = (0.4, 0.5, 0.6, 0.7)
RECOVER_STEPS = 400


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("runs/search-bench"))
    parser.add_argument("--teacher-run", type=Path, default=Path("runs/demo"))
    args = parser.parse_args(argv)
    started = time.perf_counter()
    recipe = load_recipe(default_recipe_path())
    data = load_splits(recipe.data, recipe.seed)
    teacher = args.teacher_run / "01-finetune" / "model"

    @contextmanager
    def open_teacher(name: str):  # type: ignore[no-untyped-def]
        predictor = Predictor.load(teacher)
        feeds = predictor.encode(list(data.test.inputs[:1]), pad_to=128)
        yield {"x": lambda: predictor.session.run(feeds)}

    stats = measure_interleaved(["teacher"], open_teacher, runs=30, rounds=3, warmup_runs=5, warmup_s=0.5)
    teacher_p90 = stats[("teacher", "x")].p90
    budget = round(teacher_p90 / 8, 3)
    teacher_acc = float((Predictor.load(teacher).logits(list(data.val.inputs)).argmax(-1) == data.val.labels).mean())

    for depth in DEPTHS:  # the teacher is trained once: its stage and logits come from the demo run
        copy_completed_stages(args.teacher_run, args.out / f"layers-{depth}-prune-{RATIOS[0]:g}", 1)
    code = edgepipe(
        [
            "search",
            str(default_recipe_path()),
            "--latency-budget-ms",
            str(budget),
            "--out",
            str(args.out),
            "--set",
            f"search.student_layers={list(DEPTHS)}",
            "--set",
            f"search.prune_ratios={list(RATIOS)}",
            "--set",
            f"stages.2.recover.max_steps={RECOVER_STEPS}",
        ]
    )
    if code != 0:
        raise SystemExit(f"edgepipe search failed with exit code {code}")
    trials = [json.loads(line) for line in (args.out / "trials.jsonl").read_text().splitlines()]
    best_file = args.out / "best" / "search.json"
    best = json.loads(best_file.read_text()) if best_file.is_file() else None
    result = {
        "budget_ms": budget,
        "teacher_p90_ms": round(teacher_p90, 3),
        "teacher_acc": round(teacher_acc, 5),
        "best": None
        if best is None
        else {
            "p90_ms": best["p90_ms"],
            "acc": best["accuracy"],
            "size_mb": best["size_mb"],
            "knobs": {"student_layers": best["depth"], "prune_ratio": best.get("prune"), "int8": best["int8"]},
            "retention": round(best["accuracy"] / teacher_acc, 4),
        },
        "trials": trials,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    write_json(args.json, result)  # atomic, creates the folder
    print(json.dumps({k: v for k, v in result.items() if k != "trials"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
