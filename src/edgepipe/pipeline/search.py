"""`edgepipe search`: the most accurate artifact under a latency budget measured on the target.

The knobs come from the recipe's `search:` section: the distill stage's student depth, the prune
stage's ratio, the static quantize stage's preset and accuracy budget (fallback to float), and which
artifact of each build is a candidate (fp32, dynamic or static int8). Each combination is built into
`OUT/layers-N-prune-R-.../` (stages reused as usual, so an interrupted search resumes where it
stopped; a new variant starts from copies of the completed stages it shares with one built before);
every candidate of that build is measured here: accuracy on the validation split, latency p90 at the search's batch and
sequence length, timed interleaved with one artifact alive at a time.

Every measured candidate is appended to `trials.jsonl` (the resume log). After each step the search
rewrites `pareto.csv`, `pareto.png` (accuracy against p90, marker size = model size), `search.md`
and copies the best candidate within budget so far to `OUT/best/`.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import shutil
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from edgepipe.errors import GateFailedError, InputError, RecipeError
from edgepipe.pipeline.artifacts import write_atomic, write_json
from edgepipe.pipeline.manifest import locked_run
from edgepipe.pipeline.recipe import DistillConfig, PruneConfig, QuantizeConfig, Recipe, parse_recipe

log = logging.getLogger(__name__)
TRIALS = "trials.jsonl"
PRECISION_OF = {"none": "fp32", "dynamic": "int8-dynamic", "static": "int8-static"}


def search_problems(recipe: Recipe, budget_ms: float) -> list[str]:
    problems = []
    if recipe.task == "causal-lm":
        problems.append("`task`: the search ranks classifiers by accuracy; causal-lm is not searchable yet")
    if budget_ms <= 0:
        problems.append(f"`--latency-budget-ms`: must be > 0, got {budget_ms:g}")
    cfg = recipe.search
    if not (cfg.student_layers or cfg.prune_ratios or cfg.presets or cfg.fallback_drops) and len(cfg.int8) < 2:
        problems.append(
            "`search`: the search space has no knob; give search.student_layers (e.g. [1, 2, 3]), "
            "search.prune_ratios (e.g. [0, 0.3, 0.5]), search.presets, search.fallback_drops and/or two or "
            "more search.int8 choices (none, dynamic, static)"
        )
    if cfg.student_layers and not any(isinstance(s, DistillConfig) for s in recipe.stages):
        problems.append("`search.student_layers`: the recipe has no distill stage whose depth could vary")
    if cfg.prune_ratios and not any(isinstance(s, PruneConfig) for s in recipe.stages):
        problems.append("`search.prune_ratios`: the recipe has no prune stage whose ratio could vary; add one")
    if (cfg.presets or cfg.fallback_drops) and not any(
        isinstance(s, QuantizeConfig) and s.mode == "static" for s in recipe.stages
    ):
        problems.append(
            "`search.presets`/`search.fallback_drops`: apply to a static quantize stage; the recipe has none"
        )
    wanted = {PRECISION_OF[c] for c in cfg.int8} - {"fp32"}
    made = {f"int8-{s.mode}" for s in recipe.stages if isinstance(s, QuantizeConfig)}
    if wanted - made:
        problems.append(f"`search.int8`: the recipe has no quantize stage for {sorted(wanted - made)}")
    return problems


Variant = tuple[tuple[str, Any], ...]  # ((knob, value), ...) for the knobs the search varies
KNOB_PREFIX = {"depth": "layers-", "prune": "prune-", "preset": "preset-", "fallback": "fallback-"}


def variants_of(cfg: Any) -> list[Variant]:
    """Every combination of the knob values the `search:` section gives (depth outermost)."""
    axes = [
        (name, values)
        for name, values in (
            ("depth", cfg.student_layers),
            ("prune", cfg.prune_ratios),
            ("preset", cfg.presets),
            ("fallback", cfg.fallback_drops),
        )
        if values
    ]
    combos: list[Variant] = [()]
    for name, values in axes:
        combos = [(*combo, (name, value)) for combo in combos for value in values]
    return combos


def variant(recipe: Recipe, knobs: Variant) -> Recipe:
    """The recipe with the knobs set: student depth, prune ratio (0 removes the prune stage), the static
    quantize stages' preset and accuracy budget (`max_accuracy_drop`: nodes fall back to float)."""
    if not knobs:
        return recipe
    raw = recipe.model_dump(mode="json")
    stages = raw["stages"]
    for name, value in knobs:
        if name == "depth":
            index = next(i for i, s in enumerate(recipe.stages) if isinstance(s, DistillConfig))
            stages[index]["student"].update(num_layers=value, layers=None)
        elif name == "prune":
            index = next(i for i, s in enumerate(recipe.stages) if isinstance(s, PruneConfig))
            stages[index].update(ratio=value, head_ratio=None, ffn_ratio=None, heads=None)
        else:
            key = "preset" if name == "preset" else "max_accuracy_drop"
            for stage in stages:
                if stage["kind"] == "quantize" and stage["mode"] == "static":
                    stage[key] = value
    raw["stages"] = [s for s in stages if not (s["kind"] == "prune" and s.get("ratio") == 0)]
    return parse_recipe(raw, f"search variant {variant_name(knobs)}")


def variant_name(knobs: Variant) -> str:
    return (
        "-".join(
            f"{KNOB_PREFIX[name]}{value:g}" if isinstance(value, float) else f"{KNOB_PREFIX[name]}{value}"
            for name, value in knobs
        )
        or "recipe"
    )


def _seed_from_siblings(recipe: Recipe, knobs: Variant, built: list[Variant], out: Path) -> None:
    """Copy into a new variant's run the completed stages it shares with variants built before.

    A variant shares with another every stage before the first whose config differs (the teacher for
    another depth; teacher and student for another prune ratio; everything before quantize for another
    preset). The runner reuses a copied stage only if its inputs and config hash match, so a wrong
    copy costs a rebuild, never a wrong artifact."""
    from edgepipe.pipeline.runner import copy_completed_stages

    run = out / variant_name(knobs)
    if run.exists():
        return
    mine = [s.model_dump(mode="json") for s in variant(recipe, knobs).stages]
    for other in built:
        theirs = [s.model_dump(mode="json") for s in variant(recipe, other).stages]
        shared = next(
            (i for i, (a, b) in enumerate(zip(mine, theirs, strict=False)) if a != b), min(len(mine), len(theirs))
        )
        copy_completed_stages(out / variant_name(other), run, shared)


def pareto_front(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Candidates no other candidate beats on both p90 (lower) and accuracy (higher)."""
    front, best_acc = [], -1.0
    for row in sorted(rows, key=lambda r: (r["p90_ms"], -r["accuracy"])):
        if row["accuracy"] > best_acc:
            front.append(row)
            best_acc = row["accuracy"]
    return front


def _measure(run: Path, recipe: Recipe, names: list[str], data: Any, cfg: Any) -> list[dict[str, Any]]:
    from edgepipe.benchmarks.harness import measure_interleaved
    from edgepipe.benchmarks.metrics import score
    from edgepipe.runtime.predictor import Predictor

    manifest = json.loads((run / "manifest.json").read_text(encoding="utf-8"))
    folders = {a["name"]: run / a["path"] for a in manifest["artifacts"]}
    inputs, labels = data.val.inputs, data.val.labels
    if cfg.eval_examples is not None:
        inputs, labels = inputs[: cfg.eval_examples], labels[: cfg.eval_examples]
    accuracy = {n: score(Predictor.load(folders[n]).logits(inputs), labels, data.label_names) for n in names}
    index = np.arange(cfg.batch_size) % len(inputs)
    batch = inputs[index] if isinstance(inputs, np.ndarray) else [inputs[i] for i in index]

    @contextmanager
    def open_runners(name: str) -> Iterator[dict[Hashable, Callable[[], object]]]:
        predictor = Predictor.load(folders[name])
        feeds = predictor.encode(batch, pad_to=cfg.seq_len)
        yield {"x": lambda: predictor.session.run(feeds)}

    stats = measure_interleaved(names, open_runners, runs=cfg.runs, rounds=5, warmup_runs=5, warmup_s=0.5)
    rows = []
    for name in names:
        s = stats[(name, "x")]
        size = (folders[name] / "model.onnx").stat().st_size / 1e6
        rows.append(
            {
                "artifact": name,
                "folder": str(folders[name]),
                "accuracy": round(accuracy[name], 5),
                "p50_ms": round(s.p50, 3),
                "p90_ms": round(s.p90, 3),
                "cv": round(s.cv, 3),
                "size_mb": round(size, 2),
            }
        )
    return rows


def _plot(rows: list[dict[str, Any]], front: list[dict[str, Any]], budget_ms: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter(
        [r["p90_ms"] for r in rows],
        [100 * r["accuracy"] for r in rows],
        s=[20 + 4 * r["size_mb"] for r in rows],
        alpha=0.6,
        label="candidates (size = model MB)",
    )
    ax.plot([r["p90_ms"] for r in front], [100 * r["accuracy"] for r in front], "k--", label="Pareto front")
    ax.axvline(budget_ms, color="red", linestyle=":", label=f"budget {budget_ms:g} ms")
    for r in rows:
        ax.annotate(
            r["label"], (r["p90_ms"], 100 * r["accuracy"]), fontsize=7, xytext=(3, 3), textcoords="offset points"
        )
    ax.set_xlabel("p90 latency (ms)")
    ax.set_ylabel("validation accuracy (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _write_outputs(out: Path, rows: list[dict[str, Any]], budget_ms: float, best: dict[str, Any] | None) -> None:
    front = pareto_front(rows)
    keys = [
        "label",
        "depth",
        "prune",
        "preset",
        "fallback",
        "int8",
        "artifact",
        "accuracy",
        "p50_ms",
        "p90_ms",
        "cv",
        "size_mb",
        "pareto",
    ]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=keys, extrasaction="ignore")
    writer.writeheader()
    for row in sorted(rows, key=lambda r: r["p90_ms"]):
        writer.writerow({**row, "pareto": row in front})
    write_atomic(out / "pareto.csv", buffer.getvalue())
    _plot(rows, front, budget_ms, out / "pareto.png")
    lines = [f"# Search: most accurate artifact with p90 <= {budget_ms:g} ms", ""]
    if best is None:
        lines.append("No candidate is within the budget yet.")
    else:
        lines.append(
            f"Best: `{best['label']}`, val accuracy {100 * best['accuracy']:.2f}%, p90 {best['p90_ms']:.2f} ms, "
            f"{best['size_mb']:.1f} MB; copied to `best/`."
        )
    lines += [
        "",
        "![Pareto front](pareto.png)",
        "",
        "| candidate | accuracy | p50 ms | p90 ms | MB | Pareto | in budget |",
    ]
    lines.append("|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: r["p90_ms"]):
        pareto = "yes" if r in front else ""
        within = "yes" if r["p90_ms"] <= budget_ms else ""
        lines.append(
            f"| {r['label']} | {100 * r['accuracy']:.2f}% | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} | "
            f"{r['size_mb']:.1f} | {pareto} | {within} |"
        )
    write_atomic(out / "search.md", "\n".join(lines) + "\n")


def _save_best(out: Path, best: dict[str, Any]) -> None:
    tmp = out / ".best.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(best["folder"], tmp)
    write_json(tmp / "search.json", {k: v for k, v in best.items() if k != "folder"})
    shutil.rmtree(out / "best", ignore_errors=True)
    tmp.replace(out / "best")


def search(recipe: Recipe, budget_ms: float, out: Path, target: str = "cpu") -> Path:
    """Explore the recipe's knobs; returns `search.md`. Resumes from `OUT/trials.jsonl`."""
    from edgepipe.pipeline.runner import check_recipe

    problems = search_problems(recipe, budget_ms) + check_recipe(recipe, out)
    if target != "cpu":
        problems.append(f"`--target`: the search measures on cpu only for now, got {target!r}")
    if problems:
        raise RecipeError(problems)
    cfg = recipe.search
    variants = variants_of(cfg)
    for knobs in variants:  # every variant must be valid before anything is built
        variant_problems = check_recipe(variant(recipe, knobs))
        if variant_problems:
            raise RecipeError(variant_problems, f"search variant {variant_name(knobs)}")
    with locked_run(out, "search"):
        return _search(recipe, budget_ms, out, variants)


def _read_trials(trials_file: Path) -> list[dict[str, Any]]:
    """The measured trials; a last line cut short by a killed search is dropped (it is measured again)."""
    rows = []
    lines = trials_file.read_text(encoding="utf-8").splitlines() if trials_file.is_file() else []
    for number, line in enumerate(lines, start=1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise InputError(f"{trials_file}:{number} is not a JSON trial; delete the line or the file") from None
            write_atomic(trials_file, "".join(json.dumps(row) + "\n" for row in rows))  # appends start clean
    return rows


def _search(recipe: Recipe, budget_ms: float, out: Path, variants: list[Any]) -> Path:
    from edgepipe.pipeline.data import load_splits
    from edgepipe.pipeline.runner import build

    cfg = recipe.search
    trials_file = out / TRIALS
    rows = _read_trials(trials_file)
    done = {r["label"] for r in rows}
    data = load_splits(recipe.data, recipe.seed, recipe.task)
    best = max((r for r in rows if r["p90_ms"] <= budget_ms), key=lambda r: r["accuracy"], default=None)
    for step, knobs in enumerate(variants, start=1):
        prefix = variant_name(knobs)
        labels = {f"{prefix}/{choice}": choice for choice in cfg.int8}
        todo = {label: choice for label, choice in labels.items() if label not in done}
        log.info("search %d/%d: %s (%d candidate(s) to measure)", step, len(variants), prefix, len(todo))
        if not todo:
            continue
        run = out / prefix
        _seed_from_siblings(recipe, knobs, variants[: step - 1], out)
        try:
            build(variant(recipe, knobs), run, benchmark=False)
        except GateFailedError as error:  # a fallback budget not met: its closest model is kept and measured
            log.warning("  %s: %s", prefix, error)
        manifest = json.loads((run / "manifest.json").read_text(encoding="utf-8"))
        onnx_kinds = ("onnx-fp32", "onnx-fp32-fused", "onnx-int8")  # not the .ort copy of the same model
        by_precision = {a["precision"]: a["name"] for a in manifest["artifacts"] if a["kind"] in onnx_kinds}
        names = {label: by_precision[PRECISION_OF[c]] for label, c in todo.items() if PRECISION_OF[c] in by_precision}
        for label in sorted(set(todo) - set(names)):
            log.warning("  %s: not built (a stage before it failed its gate); skipped", label)
        measured = _measure(run, recipe, list(names.values()), data, cfg) if names else []
        with trials_file.open("a", encoding="utf-8") as handle:
            for label, name in names.items():
                row = next(r for r in measured if r["artifact"] == name)
                row = {**row, "label": label, **dict(knobs), "int8": todo[label]}
                rows.append(row)
                handle.write(json.dumps(row) + "\n")
                log.info("  %s: accuracy %.4f, p90 %.2f ms", label, row["accuracy"], row["p90_ms"])
                if row["p90_ms"] <= budget_ms and (best is None or row["accuracy"] > best["accuracy"]):
                    best = row
                    _save_best(out, best)
        _write_outputs(out, rows, budget_ms, best)
    if not rows:
        raise InputError("the search measured nothing")
    _write_outputs(out, rows, budget_ms, best)
    saved = out / "best" / "search.json"
    saved_label = json.loads(saved.read_text(encoding="utf-8"))["label"] if saved.is_file() else None
    if best is None:
        shutil.rmtree(out / "best", ignore_errors=True)  # a resumed search with a tighter budget
    elif saved_label != best["label"]:
        _save_best(out, best)
    return out / "search.md"
