"""Distillation benchmark: the default recipe's teacher and data, one step budget per row, over seeds.

    python benchmarks/bench_distill.py --json runs/bench/distill.json [--out runs/distill-bench]
        [--seeds 0 1 2] [--variants kd hidden lr-2e-4 ...] [--no-speed]

Rows (VARIANTS): the default recipe's 3-layer student with KD (ce 0.5 + kd 0.5, T 2), the same student trained
on labels only (no KD), the adaptive methods (annealed temperature from 4, weighted soft labels), hidden-state
KD, a transfer batch of augmented train reviews (Tang et al. 2019), KD with the budget that hidden-state KD
spends, 2, 3 and 5 times the learning rate, and length-grouped batches. Each runs once per `--seeds` value (the
distill stage's own seed: batch order, dropout and augmentation; the data split and the teacher do not move).
Accuracy is on the test split. The speed-up compares the teacher's and the KD student's fp32 ONNX models
at batch 1, sequence 128, timed interleaved in one process. The teacher comes from the demo run
(--teacher-run, default runs/demo): its completed fine-tune stage and cached teacher logits are copied in
and reused after the runner verifies their hashes, so the teacher is trained once.

`cnn`: the same comparison on images (src/edgepipe/recipes/mnist.yaml): the cnn-base teacher trained
on MNIST-5k, the cnn-small student with KD and with labels only, test accuracy, same seed and budget.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from edgepipe.benchmarks.harness import measure_interleaved
from edgepipe.pipeline.artifacts import write_json
from edgepipe.pipeline.cli import main as edgepipe
from edgepipe.pipeline.data import load_splits
from edgepipe.pipeline.recipe import parse_recipe
from edgepipe.runtime import Predictor

RECIPES = Path(__file__).resolve().parents[1] / "src" / "edgepipe" / "recipes"
RECIPE = RECIPES / "default.yaml"
VARIANTS = {  # the KD row runs last so that its student's ONNX export stays in the run folder
    "nokd": ["stages.1.loss={ce: 1.0, kd: 0.0}"],
    "anneal": ["stages.1.adaptive=anneal", "stages.1.temperature=4.0"],
    "wsl": ["stages.1.adaptive=wsl"],
    # hidden states of student layers 0-2 against teacher layers 1, 3, 5 (MSE), a teacher pass per step
    "hidden": ["stages.1.loss={ce: 0.5, kd: 0.5, hidden: 1.0}"],
    # a second batch per step: train reviews cut to n-grams and masked (Tang et al. 2019), KD only
    "augment": ["stages.1.transfer={source: train, mask: 0.1, ngram: 0.25}"],
    # the default's own budget raised to about what hidden spends
    "kd-560": ["stages.1.max_steps=560"],
    "lr-2e-4": ["stages.1.lr=2.0e-4"],
    "lr-3e-4": ["stages.1.lr=3.0e-4"],
    "lr-5e-4": ["stages.1.lr=5.0e-4"],
    # batches of reviews of similar length (transformers' group_by_length): fewer parts a step
    "grouped": ["stages.1.group_by_length=true"],
    "kd": [],
}
DEFAULT_VARIANTS = ["nokd", "anneal", "wsl", "kd"]


def _build(out: Path, overrides: list[str], recipe_file: Path = RECIPE, distill: bool = True) -> dict:
    """Fine-tune (reused), distill, export; test accuracy of teacher and student, the distill stage's
    training seconds."""
    raw = yaml.safe_load(recipe_file.read_text())
    raw["stages"] = [*raw["stages"][: 2 if distill else 1], {"kind": "export", "fuse": False}]
    raw["bench"]["batch_sizes"] = [1]
    raw["gates"] = {}
    out.mkdir(parents=True, exist_ok=True)
    recipe = out / "bench-distill.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    sets = [item for o in overrides for item in ("--set", o)]
    code = edgepipe(["build", str(recipe), "--out", str(out), *sets])
    if code != 0:
        raise SystemExit(f"edgepipe build failed with exit code {code}")
    report = json.loads((out / "report.json").read_text())
    accuracy = {r["artifact"]: r["accuracy"] for r in report["results"]}
    if distill:
        accuracy["train_seconds"] = json.loads((out / "02-distill" / "metrics.json").read_text())["train_seconds"]
    return accuracy


def _over_seeds(out: Path, overrides: list[str], seeds: list[int]) -> dict:
    """One variant trained with each seed (the distill stage's own: batch order and dropout; the data
    split and the teacher stay the recipe's): the student's test accuracy per seed, mean and spread."""
    runs = {seed: _build(out, [*overrides, f"stages.1.seed={seed}"]) for seed in seeds}
    accuracy = [r["student"] for r in runs.values()]
    return {
        "student_acc": {str(seed): r["student"] for seed, r in runs.items()},
        "mean": round(float(np.mean(accuracy)), 5),
        "std": round(float(np.std(accuracy, ddof=1)), 5) if len(accuracy) > 1 else None,
        "train_seconds": round(float(np.mean([r["train_seconds"] for r in runs.values()])), 1),
        "teacher_acc": next(iter(runs.values()))["teacher"],
    }


def _speedup(teacher: Path, student: Path, texts: list[str], runs: int) -> dict:
    paths = {"teacher": teacher, "student": student}

    @contextmanager
    def open_runners(name: str):  # type: ignore[no-untyped-def]
        predictor = Predictor.load(paths[name])
        feeds = predictor.encode(texts[:1], pad_to=128)
        yield {"b1s128": lambda: predictor.session.run(feeds)}

    stats = measure_interleaved(list(paths), open_runners, runs=runs, rounds=5, warmup_runs=5, warmup_s=0.5)
    t, s = stats[("teacher", "b1s128")], stats[("student", "b1s128")]
    return {
        "teacher_p50_ms": round(t.p50, 3),
        "student_p50_ms": round(s.p50, 3),
        "teacher_cv": round(t.cv, 3),
        "student_cv": round(s.cv, 3),
        "speedup_b1_s128": round(t.p50 / s.p50, 3),
    }


def _cnn(out: Path) -> dict:
    """MNIST-5k: cnn-base teacher, cnn-small student with KD and with labels only (mnist.yaml's budget)."""
    recipe = RECIPES / "mnist.yaml"
    kd = _build(out, [], recipe)
    nokd = _build(out, ["stages.1.loss={ce: 1.0, kd: 0.0}"], recipe)
    metrics = json.loads((out / "02-distill" / "metrics.json").read_text())
    return {
        "teacher_acc": kd["teacher"],
        "student_kd_acc": kd["student"],
        "student_nokd_acc": nokd["student"],
        "retention": round(kd["student"] / kd["teacher"], 4),
        "student_parameters": metrics["student_parameters"],
        "teacher_parameters": metrics["teacher_parameters"],
        "steps": metrics["steps"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("runs/distill-bench"))
    parser.add_argument("--teacher-run", type=Path, default=Path("runs/demo"))
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="the distill stage's training seeds")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=DEFAULT_VARIANTS)
    parser.add_argument("--no-speed", action="store_true", help="accuracy only: skip the ONNX speed-up and the CNN")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for part in ("01-finetune", "cache"):
        if (args.teacher_run / part).is_dir() and not (args.out / part).exists():
            shutil.copytree(args.teacher_run / part, args.out / part)

    if "kd" not in args.variants and not args.no_speed:
        parser.error("the speed-up times the kd student: add kd to --variants or pass --no-speed")
    names = sorted(args.variants, key=lambda n: n == "kd")  # kd last: its export is the one timed
    variants = {name: _over_seeds(args.out, VARIANTS[name], args.seeds) for name in names}
    teacher_acc = next(iter(variants.values()))["teacher_acc"]
    result: dict = {"teacher_acc": teacher_acc, "seeds": args.seeds, "variants": variants}
    if "kd" in variants:
        result.update(student_kd_acc=variants["kd"]["mean"], retention=round(variants["kd"]["mean"] / teacher_acc, 4))
    if not args.no_speed:
        recipe = parse_recipe(json.loads((args.out / "manifest.json").read_text())["recipe"])
        texts = load_splits(recipe.data, recipe.seed).test.inputs
        teacher_run = args.out / "teacher"  # the teacher exported on its own, for the speed-up
        for part in ("01-finetune", "cache"):
            if not (teacher_run / part).exists():
                shutil.copytree(args.out / part, teacher_run / part)
        _build(teacher_run, [], distill=False)
        speed = _speedup(teacher_run / "02-export" / "fp32", args.out / "03-export" / "fp32", texts, args.runs)
        metrics = json.loads((args.out / "02-distill" / "metrics.json").read_text())
        result.update(
            speed,
            student_parameters=metrics["student_parameters"],
            teacher_parameters=metrics["teacher_parameters"],
            steps=metrics["steps"],
            cnn=_cnn(args.out / "cnn"),
        )
    write_json(args.json, result)  # atomic, creates the folder
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
