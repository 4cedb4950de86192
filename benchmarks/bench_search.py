"""The latency-budget search on the default recipe: budget = 1/8 of the teacher's PyTorch fp32 p90.

    python benchmarks/bench_search.py --json runs/bench/search.json [--teacher-run runs/demo]

Measures the fine-tuned teacher (PyTorch fp32, b1 s128, 50 runs over 5 rounds) for the budget, then
runs `edgepipe search` on the default recipe with a 3-layer student, prune ratios 0.4 to 0.7
(1000 recovery steps) and fp32 / dynamic / static int8 as candidates. The teacher is measured again
after the search and the budget is 1/8 of the lower p90 of the two (one early measurement read 19.6 ms
where repeats read 16.1-16.7): if that moves the budget, the search is rerun with it, which measures
nothing again and only re-selects the best. The teacher's completed fine-tune
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

# 1- and 2-layer students keep 0.93 and 0.95 of the teacher, and pruned 4-layer students were slower at
# the same accuracy than pruned 3-layer ones (RESULTS.md): 3 layers, pruned. 1000 recovery steps: at
# ratio 0.5 they recovered val 79.45% where 400 reached 78.27% (unpruned 79.84%).
DEPTHS = (3,)
RATIOS = (0.4, 0.5, 0.6, 0.7)
RECOVER_STEPS = 1000


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

    def teacher_p90() -> float:
        stats = measure_interleaved(["teacher"], open_teacher, runs=50, rounds=5, warmup_runs=5, warmup_s=0.5)
        return stats[("teacher", "x")].p90

    teacher_p90s = [teacher_p90()]
    budget = round(teacher_p90s[0] / 8, 3)
    teacher_acc = float((Predictor.load(teacher).logits(list(data.val.inputs)).argmax(-1) == data.val.labels).mean())

    for depth in DEPTHS:  # the teacher is trained once: its stage and logits come from the demo run
        copy_completed_stages(args.teacher_run, args.out / f"layers-{depth}-prune-{RATIOS[0]:g}", 1)

    def search(budget_ms: float) -> None:
        code = edgepipe(
            [
                "search",
                str(default_recipe_path()),
                "--latency-budget-ms",
                str(budget_ms),
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

    search(budget)
    teacher_p90s.append(teacher_p90())
    if round(min(teacher_p90s) / 8, 3) != budget:
        budget = round(min(teacher_p90s) / 8, 3)
        search(budget)
    trials = [json.loads(line) for line in (args.out / "trials.jsonl").read_text().splitlines()]
    best_file = args.out / "best" / "search.json"
    best = json.loads(best_file.read_text()) if best_file.is_file() else None
    result = {
        "budget_ms": budget,
        "teacher_p90_ms": round(min(teacher_p90s), 3),
        "teacher_p90_ms_before_after": [round(t, 3) for t in teacher_p90s],
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
