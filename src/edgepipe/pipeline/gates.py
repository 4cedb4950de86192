"""The recipe's gates on a benchmark report (accuracy drop, agreement, perplexity) and the report files."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from edgepipe.errors import GateFailedError
from edgepipe.pipeline.artifacts import write_atomic, write_json
from edgepipe.pipeline.manifest import RunPaths, load_manifest
from edgepipe.pipeline.recipe import LM_TASK, Recipe

REPORT_JSON = "report.json"
REPORT_MD = "report.md"


def agreement_gate(recipe: Recipe, report: dict[str, Any]) -> list[str]:
    """Every engine against the fp32 ONNX reference on the same inputs (argmax agreement; fp32 logits)."""
    gates, lines, seen = recipe.gates, [], set()
    for row in report["results"]:
        found = row.get("agreement")
        if found is None or (row["artifact"], row["target"]) in seen:
            continue
        seen.add((row["artifact"], row["target"]))
        where = f"`{row['artifact']}` on {row['target']} ({row['engine']}) vs `{found['reference']}`"
        if gates.min_argmax_agreement is not None:
            verdict = "FAIL" if found["argmax_agreement"] < gates.min_argmax_agreement else "pass"
            lines.append(
                f"{verdict}: {where}: predictions agree on {100 * found['argmax_agreement']:.2f}% "
                f"(min {100 * gates.min_argmax_agreement:.2f}%)"
            )
        if gates.max_abs_diff is not None and row["precision"] == "fp32":
            verdict = "FAIL" if found["max_abs_diff"] > gates.max_abs_diff else "pass"
            lines.append(
                f"{verdict}: {where}: logits differ by {found['max_abs_diff']:.3g} (max {gates.max_abs_diff:g})"
            )
    return lines


def gate(recipe: Recipe, report: dict[str, Any]) -> list[str]:
    """Lines describing each gate check; failing lines start with FAIL."""
    limit = recipe.gates.max_accuracy_drop
    if limit is None:
        return agreement_gate(recipe, report)
    acc = {(r["artifact"], r["target"]): r["accuracy"] for r in report["results"]}
    ref_name = report["reference"]
    lines = []
    for (name, target), value in acc.items():
        ref = acc.get((ref_name, target))
        if name == ref_name or ref is None:
            continue
        if recipe.gates.artifacts is not None and name not in recipe.gates.artifacts:
            continue
        drop = ref - value
        verdict = "FAIL" if drop > limit else "pass"
        lines.append(
            f"{verdict}: `{name}` on {target} {report.get('metric', 'accuracy')} {100 * value:.2f}% vs "
            f"`{ref_name}` {100 * ref:.2f}% "
            f"(drop {100 * drop:.2f} pt, limit {100 * limit:.2f} pt)"
        )
    return lines + agreement_gate(recipe, report)


def write_report(paths: RunPaths, recipe: Recipe, report: dict[str, Any]) -> list[str]:
    from edgepipe.benchmarks.generation import generation_gate, render_generation_markdown
    from edgepipe.benchmarks.recommend import recommend
    from edgepipe.benchmarks.recommend import render as render_choices
    from edgepipe.benchmarks.report import PLOT_PNG, plot_accuracy_latency, render_markdown

    if recipe.task == LM_TASK:
        limits = recipe.gates
        gate_lines = generation_gate(
            report, limits.max_perplexity_increase, limits.max_kl_divergence, recipe.gates.artifacts
        )
        report["gates"] = gate_lines
        write_json(paths.root / REPORT_JSON, report)
        write_atomic(paths.root / REPORT_MD, render_generation_markdown(report, recipe.name, gate_lines))
        return gate_lines
    gate_lines = gate(recipe, report)
    report["gates"] = gate_lines
    manifest = load_manifest(paths)  # {} before the first build writes it
    if manifest:  # what the prune stages removed, shown beside the measurements
        stages = manifest.get("stages", [])
        report["pruning"] = [{"stage": r["dir"], **r["metrics"]} for r in stages if r["kind"] == "prune"]
    limit = recipe.gates.max_accuracy_drop if recipe.gates.max_accuracy_drop is not None else 0.01
    choices = recommend(report, limit)
    report["recommended"] = [asdict(c) for c in choices]
    write_json(paths.root / REPORT_JSON, report)
    plot = plot_accuracy_latency(report, paths.root / PLOT_PNG)
    markdown = render_markdown(report, recipe.name, gate_lines, plot.name if plot else None)
    folders = {a["name"]: paths.root / a["path"] for a in manifest.get("artifacts", [])}
    markdown += "\n## What to ship\n\n" + "\n".join(render_choices(choices, limit, folders)) + "\n"
    write_atomic(paths.root / REPORT_MD, markdown)
    return gate_lines


def raise_on_gates(gate_lines: list[str], paths: RunPaths) -> None:
    failed = [line for line in gate_lines if line.startswith("FAIL")]
    if failed:
        raise GateFailedError("gate failed:\n  " + "\n  ".join(failed) + f"\nreport: {paths.root / REPORT_MD}")
