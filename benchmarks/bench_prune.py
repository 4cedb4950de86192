"""Structured pruning at ratios 0.3 and 0.5, with KD recovery: the default recipe's distilled student
(heads + FFN neurons) and the MNIST CNN (conv channels).

    python benchmarks/bench_prune.py --json runs/bench/prune.json [--teacher-run runs/demo]

Transformer: for each ratio, the default recipe up to its distill stage, then `{kind: prune, ratio: R,
importance: taylor, recover: {max_steps: 200}}` and an fp32 export, is built into `--out/ratio-R` (teacher,
logits and student copied from the demo run, so only pruning and recovery run here). CNN: the same on
`recipes/mnist.yaml`'s teacher (cnn-base, 2 residual blocks per stage) with `round_to: 16` and
`recover: {max_steps: 300}`; the
MNIST teacher is built into `--out/cnn/teacher` first (about 1 min). Then the unpruned fp32
ONNX and every pruned fp32 ONNX are timed interleaved in one process, b1 and b8 (text at s128), one alive
at a time. Accuracies are the prune stage's own measurements on the validation split (before, pruned,
recovered). FLOPs = 2 x MACs (text: encoder layers at 128 tokens; CNN: the whole net per image).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from edgepipe.benchmarks.harness import measure_interleaved
from edgepipe.pipeline.artifacts import write_json
from edgepipe.pipeline.data import load_splits
from edgepipe.pipeline.recipe import default_recipe_path, load_recipe, parse_recipe
from edgepipe.pipeline.runner import build, copy_completed_stages
from edgepipe.runtime import Predictor

RATIOS = (0.3, 0.5)
MNIST = default_recipe_path().parent / "mnist.yaml"
EXPORT = {"kind": "export", "fuse": False}


def _build(recipe: Path, stages: list[Any], source: Path | None, run: Path, shared: int = 0) -> Path:
    """Build `recipe` with `stages` into `run`, first copying `source`'s first `shared` completed stages."""
    raw = {**load_recipe(recipe).model_dump(mode="json"), "stages": stages}
    if source is not None:
        copy_completed_stages(source, run, shared)
    build(parse_recipe(raw), run, benchmark=False)
    return run


def _pruned_runs(recipe: Path, keep: int, source: Path, out: Path, steps: int, round_to: int) -> dict[float, Path]:
    """`recipe`'s first `keep` stages + prune(R) + fp32 export for every ratio: the run folder per ratio."""
    stages = load_recipe(recipe).model_dump(mode="json")["stages"][:keep]
    runs = {}
    for ratio in RATIOS:
        recover = {"max_steps": steps}
        prune = {"kind": "prune", "ratio": ratio, "importance": "taylor", "round_to": round_to, "recover": recover}
        runs[ratio] = _build(recipe, [*stages, prune, EXPORT], source, out / f"ratio-{ratio}", keep)
    return runs


def _rows(runs: dict[float, Path], unpruned: Path, inputs: Any, keep: int, text: bool, runs_n: int) -> list[Any]:
    folders = {"unpruned": unpruned} | {
        f"ratio-{r}": run / f"{keep + 2:02d}-export" / "fp32" for r, run in runs.items()
    }

    @contextmanager
    def open_runners(name: str):  # type: ignore[no-untyped-def]
        predictor = Predictor.load(folders[name])
        runners = {}
        for batch in (1, 8):
            feeds = predictor.encode(inputs[:batch], pad_to=128 if text else None)
            runners[batch] = lambda feeds=feeds: predictor.session.run(feeds)
        yield runners

    stats = measure_interleaved(list(folders), open_runners, runs=runs_n, rounds=5, warmup_runs=5, warmup_s=0.5)
    rows = []
    for ratio, run in runs.items():
        m = json.loads((run / f"{keep + 1:02d}-prune" / "metrics.json").read_text())
        macs = ("macs_per_seq128_before", "macs_per_seq128_after") if text else ("macs_before", "macs_after")
        row = {
            "ratio": ratio,
            "params_before": m["params_before"],
            "params_after": m["params_after"],
            "flops_before": 2 * m[macs[0]],
            "flops_after": 2 * m[macs[1]],
            "p50_before_ms": round(stats[("unpruned", 1)].p50, 3),
            "p50_after_ms": round(stats[(f"ratio-{ratio}", 1)].p50, 3),
            "p50_before_b8_ms": round(stats[("unpruned", 8)].p50, 3),
            "p50_after_b8_ms": round(stats[(f"ratio-{ratio}", 8)].p50, 3),
            "acc_before": m["val_accuracy_before"],
            "acc_pruned": m["val_accuracy_pruned"],
            "acc_recovered": m["val_accuracy_recovered"],
        }
        if text:
            row |= {
                "encoder_params_before": m["encoder_params_before"],
                "encoder_params_after": m["encoder_params_after"],
                "heads_after": m["heads_after"],
                "ffn_after": m["ffn_after"],
            }
        else:
            row["channels"] = m["channels"]
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("runs/prune-bench"))
    parser.add_argument("--teacher-run", type=Path, default=Path("runs/demo"))
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args(argv)

    default = default_recipe_path()
    stages = load_recipe(default).model_dump(mode="json")["stages"][:2]  # finetune, distill
    student = _build(default, [*stages, EXPORT], args.teacher_run, args.out / "text" / "student", 2)
    text_runs = _pruned_runs(default, 2, student, args.out / "text", 200, 8)
    recipe = load_recipe(default)
    texts = list(load_splits(recipe.data, recipe.seed).test.inputs)
    text_rows = _rows(text_runs, student / "03-export" / "fp32", texts, 2, True, args.runs)

    mnist = load_recipe(MNIST)
    finetune = mnist.model_dump(mode="json")["stages"][:1]
    teacher = _build(MNIST, [*finetune, EXPORT], None, args.out / "cnn" / "teacher")
    cnn_runs = _pruned_runs(MNIST, 1, teacher, args.out / "cnn", 300, 16)  # 16 fp32 lanes of AVX-512
    images = load_splits(mnist.data, mnist.seed, mnist.task).test.inputs
    cnn_rows = _rows(cnn_runs, teacher / "02-export" / "fp32", images, 1, False, args.runs)

    result = {"transformer": text_rows, "cnn": cnn_rows, "accuracy_split": "val", "runs": args.runs}
    write_json(args.json, result)  # atomic, creates the folder
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
