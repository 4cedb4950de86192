"""Beyond classification: NER (token classification) and causal LM, each teacher against its compressed
student in one run.

    python benchmarks/bench_tasks.py --json runs/bench/tasks.json [--only ner|lm]

NER: builds `recipes/ner.yaml` into --ner-out (MiniLM-L6 teacher fine-tuned on the shipped Twitter NER
data, a distilled 3-layer student, int8 dynamic and static), then a second run whose only artifacts are
the teacher and its ONNX export (its finetune stage is copied, not retrained), and measures both runs'
artifacts interleaved in one process (`edgepipe.pipeline.runner.bench_against`): entity F1 on the test
split and latency at batch 1 and 8. `speedup_b1` is the teacher's fused fp32 ONNX p50 over the best
student int8 p50 at batch 1 (same engine, same process); the torch teacher is in the table too.

LM: `benchmarks/bench_lm.py` (SmolLM2-135M teacher, layer-subset student, KD, KV-cache ONNX, int8/int4).

Targets (issue 8): NER student >= 95% of the teacher's F1; LM student int8 >= 3x the teacher's fp32
tokens/s with perplexity within 15% of the teacher's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from edgepipe.pipeline.artifacts import write_json
from edgepipe.pipeline.cli import main as edgepipe
from edgepipe.pipeline.recipe import default_recipe_path, dump_recipe, load_recipe
from edgepipe.pipeline.runner import bench_against, copy_completed_stages

NER_RECIPE = default_recipe_path().parent / "ner.yaml"


def _teacher_recipe(out: Path) -> Path:
    """The NER recipe cut to its finetune stage plus an export: the teacher as ONNX, for the baseline."""
    recipe = load_recipe(NER_RECIPE)
    export = next(s for s in recipe.stages if s.kind == "export")
    teacher = recipe.model_copy(update={"name": "ner-teacher", "stages": [recipe.stages[0], export]})
    path = out / "ner-teacher.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump_recipe(teacher), encoding="utf-8")
    return path


def _p50(report: dict[str, Any], artifact: str, batch: int) -> float:
    return next(r["latency_ms"]["p50"] for r in report["results"] if r["artifact"] == artifact and r["batch"] == batch)


def run_ner(out: Path) -> dict[str, Any]:
    started = time.perf_counter()
    code = edgepipe(["build", str(NER_RECIPE), "--out", str(out)])
    if code not in (0, 3):
        raise SystemExit(code)
    teacher_run = out.with_name(out.name + "-teacher")
    teacher_run.mkdir(parents=True, exist_ok=True)
    copy_completed_stages(out, teacher_run, 1)  # the same fine-tuned teacher, reused by its stage key
    code = edgepipe(["build", str(_teacher_recipe(teacher_run)), "--out", str(teacher_run)])
    if code not in (0, 3):
        raise SystemExit(code)
    build_s = time.perf_counter() - started
    baseline, current = bench_against(out, teacher_run)
    f1 = {r["artifact"]: r["accuracy"] for r in current["results"]}
    teacher_f1 = f1["teacher"]
    int8 = {name: _p50(current, name, 1) for name in f1 if name.startswith("int8-")}
    best = min(int8, key=lambda name: int8[name])
    teacher_onnx = _p50(baseline, "fp32-fused", 1)
    rows = []
    for side, report in (("teacher", baseline), ("student", current)):
        for r in report["results"]:
            rows.append(
                {
                    "run": side,
                    "artifact": r["artifact"],
                    "precision": r["precision"],
                    "batch": r["batch"],
                    "seq_len": r["seq_len"],
                    "p50_ms": r["latency_ms"]["p50"],
                    "p90_ms": r["latency_ms"]["p90"],
                    "cv": round(r["latency_ms"]["std"] / r["latency_ms"]["mean"], 3),
                    "entity_f1": r["accuracy"],
                    "size_mb": r["size_mb"],
                }
            )
    return {
        "teacher_f1": teacher_f1,
        "student_f1": f1["student"],
        "int8_f1": f1[best],
        "int8_artifact": best,
        "int8_f1_all": {name: f1[name] for name in int8},
        "student_retention": round(f1["student"] / teacher_f1, 4) if teacher_f1 else None,
        "speedup_b1": round(teacher_onnx / int8[best], 3),
        "speedup_b1_vs_torch_teacher": round(_p50(baseline, "teacher", 1) / int8[best], 3),
        "teacher_onnx_p50_b1_ms": teacher_onnx,
        "student_int8_p50_b1_ms": int8[best],
        "target_student_f1_retention": 0.95,
        "build_s": round(build_s, 1),
        "machine": current["machine"],
        "versions": current["versions"],
        "rows": rows,
    }


def ner_markdown(ner: dict[str, Any]) -> str:
    lines = [
        "| run | artifact | precision | batch | p50 ms | p90 ms | std/mean | entity F1 | size MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in ner["rows"]:
        lines.append(
            f"| {r['run']} | {r['artifact']} | {r['precision']} | {r['batch']} | {r['p50_ms']:.2f} | "
            f"{r['p90_ms']:.2f} | {r['cv']:.2f} | {100 * r['entity_f1']:.2f}% | {r['size_mb']:.1f} |"
        )
    return "\n".join(lines)


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--only", choices=["ner", "lm"], default=None)
    parser.add_argument("--ner-out", type=Path, default=Path("runs/ner"))
    parser.add_argument("--lm-work", type=Path, default=Path("runs/lm"))
    args = parser.parse_args(argv)
    result: dict[str, Any] = json.loads(args.json.read_text()) if args.json.is_file() else {}
    if args.only in (None, "ner"):
        result["ner"] = run_ner(args.ner_out)
        print(ner_markdown(result["ner"]))
        print({k: v for k, v in result["ner"].items() if k not in ("rows", "machine", "versions")})
    if args.only in (None, "lm"):
        sys.path.insert(0, str(Path(__file__).parent))
        from bench_lm import run_lm  # type: ignore[import-not-found]

        result["lm"] = run_lm(args.lm_work)
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(run())
