"""The runner: checks the whole chain, runs or reuses each stage, records the manifest, benchmarks.

Each stage runs in a temporary folder that is renamed into place only when it completes, so a
crash leaves no half-written stage. A stage whose key (config, input fingerprints, data, seed) is
unchanged and whose files still hash as recorded is reused; `force` reruns everything.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import edgepipe
from edgepipe.errors import EdgepipeError, GateFailedError, InputError, RecipeError, StageError
from edgepipe.pipeline.artifacts import (
    Artifact,
    config_hash,
    file_records,
    fingerprint,
    folder_fingerprint,
    write_atomic,
    write_json,
)
from edgepipe.pipeline.data import DataSplits, data_problem, load_splits, transfer_problem
from edgepipe.pipeline.distributed import World, join_world
from edgepipe.pipeline.models import materialize_module, model_problem, module_spec, resolve_model
from edgepipe.pipeline.recipe import (
    IMAGE_TASK,
    LM_TASK,
    ArtifactKind,
    DistillConfig,
    PruneConfig,
    Recipe,
    dump_recipe,
    parse_recipe,
    task_problems,
)
from edgepipe.pipeline.stages import TRAINING_STAGES
from edgepipe.pipeline.stages.prune import prune_problems
from edgepipe.pipeline.students import student_problems, student_shape
from edgepipe.runtime.host import git_commit, host_info, versions
from edgepipe.runtime.predictor import model_labels

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"


def check_chain(recipe: Recipe) -> list[str]:
    """Every stage's inputs must be produced by the model or an earlier stage."""
    available = {ArtifactKind.TORCH_MODEL}
    problems = []
    for i, stage in enumerate(recipe.stages):
        missing = [k.value for k in stage.consumes() if k not in available]
        if missing:
            problems.append(
                f"`stages.{i}` ({stage.kind}) needs {', '.join(missing)}, which no earlier stage produces; "
                f"add or reorder stages (e.g. export before quantize, with fuse: true for a fused source)"
            )
        available.update(stage.produces())
    return problems


def check_students(recipe: Recipe) -> list[str]:
    """Distill specs against the model's architecture (finetune keeps it), read from config.json."""
    config = json.loads((resolve_model(recipe.model) / "config.json").read_text(encoding="utf-8"))
    needed = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size")
    if any(k not in config for k in needed):
        return []  # config.json leaves defaults out: the distill stage checks against the loaded config
    problems = []
    for i, stage in enumerate(recipe.stages):
        if isinstance(stage, DistillConfig):
            problems += student_problems(stage, config, f"stages.{i}")
            config = {**config, **student_shape(stage, config)}  # a later distill starts from this student
        elif isinstance(stage, PruneConfig):
            problems += prune_problems(stage, config, f"stages.{i}")
            config = {**config, "num_hidden_layers": int(config["num_hidden_layers"]) - len(stage.drop_layers)}
    return problems


def check_lm_students(recipe: Recipe) -> list[str]:
    """Layer-subset specs of a causal-lm recipe against the teacher's config.json (built-ins: once converted)."""
    from edgepipe.pipeline.models import BUILTIN_LMS
    from edgepipe.pipeline.stages.lm import lm_student_problems

    if recipe.model in BUILTIN_LMS:
        config = {"num_hidden_layers": 30}  # SmolLM2-135M; reading it would mean converting the GGUF first
    else:
        config = json.loads((Path(recipe.model) / "config.json").read_text(encoding="utf-8"))
    return [
        p
        for i, stage in enumerate(recipe.stages)
        if isinstance(stage, DistillConfig)
        for p in lm_student_problems(stage, config, f"stages.{i}")
    ]


def check_recipe(recipe: Recipe, out: Path | None = None) -> list[str]:
    """Everything that needs no computation: files exist, columns exist, chain is complete."""
    model = model_problem(recipe.model, recipe.task)
    problems = [p for p in (model, data_problem(recipe.data, recipe.task)) if p]
    problems += check_chain(recipe) + task_problems(recipe)
    for i, stage in enumerate(recipe.stages):  # image and causal-lm reject `transfer` in task_problems
        if isinstance(stage, DistillConfig) and stage.transfer and recipe.task not in (IMAGE_TASK, LM_TASK):
            problem = transfer_problem(stage.transfer.source, stage.transfer.text_column, f"stages.{i}.transfer")
            problems += [problem] if problem else []
    from edgepipe.runtime.backends import BACKENDS

    unknown = [e for e in recipe.bench.engines or [] if e not in BACKENDS]
    if unknown:
        problems.append(f"`bench.engines`: unknown {unknown}; known: {', '.join(BACKENDS)} (`edgepipe engines`)")
    module = module_spec(recipe.model, {}) is not None
    if (recipe.model_args or recipe.model_weights) and model is None and not module:
        problems.append(
            "`model_args`/`model_weights`: apply to a built-in CNN or a package.module:factory model, "
            f"not to the folder {recipe.model!r}; remove them"
        )
    if recipe.model_weights and not Path(recipe.model_weights).is_file():
        problems.append(f"`model_weights`: file not found: {recipe.model_weights}; pass a .safetensors file")
    if model is None and recipe.task == LM_TASK:
        problems += check_lm_students(recipe)
    elif model is None and recipe.task != IMAGE_TASK:
        problems += check_students(recipe)
    if out is not None and out.exists() and not out.is_dir():
        problems.append(f"`--out`: {out} is a file; pass a folder (it is created if missing)")
    return problems


def _check_labels(model_dir: Path, recipe: Recipe, data: DataSplits) -> None:
    if recipe.stages[0].kind == "finetune" or recipe.task == LM_TASK:
        return  # the head is re-created for the data's labels
    labels = model_labels(model_dir)
    if len(labels) != len(data.label_names):
        raise InputError(
            f"`model`: {recipe.model} predicts {len(labels)} labels {labels} but the data has "
            f"{len(data.label_names)} {data.label_names}; add a finetune stage first or fix "
            "`data.label_column`"
        )


@dataclass(frozen=True)
class RunPaths:
    root: Path

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    def stage(self, index: int, kind: str) -> Path:
        return self.root / f"{index + 1:02d}-{kind}"


def _load_manifest(paths: RunPaths) -> dict[str, Any]:
    if paths.manifest.is_file():
        try:
            data = json.loads(paths.manifest.read_text(encoding="utf-8"))
            if isinstance(data, dict):
                return data
        except json.JSONDecodeError:
            log.warning("ignoring unreadable %s", paths.manifest)
    return {}


def _reusable(stage_dir: Path, key: str) -> dict[str, Any] | None:
    record_file = stage_dir / "stage.json"
    if not record_file.is_file():
        return None
    try:
        record = json.loads(record_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None
    if record.get("key") != key:
        return None
    current = file_records(stage_dir)
    if any(current.get(name) != meta for name, meta in record["files"].items()):
        log.warning("%s: files changed since they were written; rerunning the stage", stage_dir.name)
        return None
    return record


def _run_stage(
    index: int,
    stage: Any,
    inputs: dict[ArtifactKind, Artifact],
    key: str,
    paths: RunPaths,
    recipe: Recipe,
    data: DataSplits,
    world: World,
) -> dict[str, Any] | None:
    """Run one stage into a temporary folder and rename it into place; None on ranks other than 0."""
    from edgepipe.pipeline.stages import StageContext, load_stages

    final = paths.stage(index, stage.kind)
    tmp = paths.root / f".{final.name}.partial" if world.is_main else Path(tempfile.mkdtemp(prefix="edgepipe-"))
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    ctx = StageContext(stage_dir=tmp, seed=recipe.seed, task=recipe.task, data=data, cache_dir=paths.cache, world=world)
    started = time.perf_counter()
    try:
        result = load_stages()[stage.kind](inputs, stage, ctx)
    except EdgepipeError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except Exception as error:
        shutil.rmtree(tmp, ignore_errors=True)
        raise StageError(final.name, paths.root, f"{type(error).__name__}: {error}") from error
    if not world.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        return None
    duration = time.perf_counter() - started
    write_json(tmp / "metrics.json", result.metrics)
    files = file_records(tmp)
    artifacts = []
    for a in result.artifacts:
        relative = a.path.relative_to(tmp)
        artifacts.append(Artifact(a.name, a.kind, final / relative, a.precision, fingerprint(files, f"{relative}/")))
    record = {
        "index": index,
        "kind": stage.kind,
        "dir": final.name,
        "key": key,
        "config": stage.model_dump(mode="json"),
        "config_hash": config_hash(stage.model_dump(mode="json")),
        "duration_s": round(duration, 2),
        "world_size": world.size,
        "metrics": result.metrics,
        "gate_failure": result.gate_failure,
        "artifacts": [a.to_json(paths.root) for a in artifacts],
        "files": files,
    }
    write_json(tmp / "stage.json", record)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return record


def _bench_items(artifacts: list[Artifact], include_torch: bool) -> list[Any]:
    from edgepipe.benchmarks.bench import BenchItem

    items = []
    for a in artifacts:
        if a.kind == ArtifactKind.TORCH_MODEL:
            if include_torch:
                items.append(BenchItem(a.name, a.path, a.precision, "torch"))
        else:
            items.append(BenchItem(a.name, a.path, a.precision, "onnx"))
    return items


def _settings(recipe: Recipe, data: DataSplits) -> Any:
    """The recipe's bench settings; image models are timed at their input size (seq_len = image height)."""
    from edgepipe.benchmarks.bench import BenchSettings

    cfg = recipe.bench.model_dump()
    cfg.pop("include_torch")
    cfg.pop("new_tokens")
    shape = data.input_shape
    cfg["seq_lens"] = [shape[1]] if shape else (recipe.bench.seq_lens or [128])
    return BenchSettings(**cfg, input_shape=shape, label_names=tuple(data.label_names))


def _agreement_gate(recipe: Recipe, report: dict[str, Any]) -> list[str]:
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


def _gate(recipe: Recipe, report: dict[str, Any]) -> list[str]:
    """Lines describing each gate check; failing lines start with FAIL."""
    limit = recipe.gates.max_accuracy_drop
    if limit is None:
        return _agreement_gate(recipe, report)
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
    return lines + _agreement_gate(recipe, report)


def write_report(paths: RunPaths, recipe: Recipe, report: dict[str, Any]) -> list[str]:
    from edgepipe.benchmarks.generation import perplexity_gate, render_generation_markdown
    from edgepipe.benchmarks.report import render_markdown

    if recipe.task == LM_TASK:
        limit = recipe.gates.max_perplexity_increase
        gate_lines = [] if limit is None else perplexity_gate(report, limit, recipe.gates.artifacts)
        report["gates"] = gate_lines
        write_json(paths.root / REPORT_JSON, report)
        write_atomic(paths.root / REPORT_MD, render_generation_markdown(report, recipe.name, gate_lines))
        return gate_lines
    gate_lines = _gate(recipe, report)
    report["gates"] = gate_lines
    if paths.manifest.is_file():  # what the prune stages removed, shown beside the measurements
        stages = _load_manifest(paths).get("stages", [])
        report["pruning"] = [{"stage": r["dir"], **r["metrics"]} for r in stages if r["kind"] == "prune"]
    write_json(paths.root / REPORT_JSON, report)
    write_atomic(paths.root / REPORT_MD, render_markdown(report, recipe.name, gate_lines))
    return gate_lines


def _raise_on_gates(gate_lines: list[str], paths: RunPaths) -> None:
    failed = [line for line in gate_lines if line.startswith("FAIL")]
    if failed:
        raise GateFailedError("gate failed:\n  " + "\n  ".join(failed) + f"\nreport: {paths.root / REPORT_MD}")


def prepare(recipe: Recipe, out: Path, world: World | None = None) -> tuple[RunPaths, DataSplits, Path]:
    problems = check_recipe(recipe, out)
    if problems:
        raise RecipeError(problems)
    data = load_splits(recipe.data, recipe.seed, recipe.task)
    paths = RunPaths(out.resolve())
    main = world is None or world.is_main
    if module_spec(recipe.model, {}) is not None:
        # a built-in CNN or a factory becomes a module folder in the run, once (seeded init or given
        # weights); its labels are the data's by construction
        model_dir = paths.root / "00-model"
        if main:
            out.mkdir(parents=True, exist_ok=True)
            materialize_module(
                recipe.model,
                recipe.model_args,
                recipe.model_weights,
                labels=data.label_names,
                input_shape=data.input_shape or (),
                seed=recipe.seed,
                folder=model_dir,
            )
        if world is not None:
            world.barrier()
        return paths, data, model_dir
    model_dir = resolve_model(recipe.model, recipe.task)
    _check_labels(model_dir, recipe, data)
    if main:
        out.mkdir(parents=True, exist_ok=True)
    return paths, data, model_dir


def build(recipe: Recipe, out: Path, *, force: bool = False, benchmark: bool = True) -> Path | None:
    """Run every stage (or reuse it), benchmark, gate. Returns the path of report.md (None on ranks > 0).

    `benchmark=False` stops after the stages (the search measures its own way) and returns the run folder."""
    world = join_world()
    if not world.is_main:
        logging.getLogger("edgepipe").setLevel(logging.WARNING)  # rank 0 tells the story
    try:
        report = _build(recipe, out, force, world, benchmark)
    except BaseException:
        world.close(wait=False)
        raise
    world.close(wait=True)
    return report


def _build(recipe: Recipe, out: Path, force: bool, world: World, benchmark: bool = True) -> Path | None:
    paths, data, model_dir = prepare(recipe, out, world)
    manifest = _load_manifest(paths) if world.is_main else {}
    resolved = recipe.model_dump(mode="json")
    manifest.update(
        {
            "schema_version": 1,
            "edgepipe": edgepipe.__version__,
            "git_commit": git_commit(),
            "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "recipe": resolved,
            "versions": versions(),
            "host": host_info(),
            "world_size": world.size,
            "distributed_backend": world.backend,
            "data": {
                "source": recipe.data.source,
                "fingerprint": data.fingerprint,
                "sizes": data.sizes(),
                "labels": data.label_names,
            },
        }
    )
    if world.is_main:
        write_atomic(paths.root / "recipe.resolved.yaml", dump_recipe(recipe))
    source = Artifact("model", ArtifactKind.TORCH_MODEL, model_dir, "fp32", folder_fingerprint(model_dir))
    current = {ArtifactKind.TORCH_MODEL: source}
    produced: list[Artifact] = []
    records = []
    for index, stage in enumerate(recipe.stages):
        inputs = {kind: current[kind] for kind in stage.consumes()}
        key = config_hash(
            [
                stage.kind,
                stage.model_dump(mode="json"),
                {k.value: a.fingerprint for k, a in inputs.items()},
                data.fingerprint,
                recipe.seed,
                recipe.task,
                edgepipe.__version__,
            ]
        )
        stage_dir = paths.stage(index, stage.kind)
        # rank 0 decides and the others follow, so every rank runs the same plan
        record = world.share(None if force or not world.is_main else _reusable(stage_dir, key))
        if record is not None:
            log.info("%s: unchanged, reusing it", stage_dir.name)
            record["reused"] = True
        else:
            log.info("%s: running", stage_dir.name)
            local = None
            if world.is_main or stage.kind in TRAINING_STAGES:
                local = _run_stage(index, stage, inputs, key, paths, recipe, data, world)
            record = world.share(local)
            record["reused"] = False
            log.info("%s: done in %.1f s", stage_dir.name, record["duration_s"])
        records.append(record)
        for item in record["artifacts"]:
            artifact = Artifact.from_json(item, paths.root)
            current[artifact.kind] = artifact
            produced = [a for a in produced if a.name != artifact.name] + [artifact]
        manifest["stages"] = records
        if world.is_main:
            write_json(paths.manifest, manifest)
        if record.get("gate_failure"):  # the stage kept its best result but missed its own budget
            raise GateFailedError(f"{stage_dir.name}: {record['gate_failure']}")
    if not world.is_main:
        return None  # the benchmark and the gates are rank 0's

    # every PyTorch model (teacher, students) and every ONNX artifact, teacher first: it is the reference
    hf = [a for a in produced if a.kind == ArtifactKind.TORCH_MODEL] or [current[ArtifactKind.TORCH_MODEL]]
    if recipe.task == LM_TASK:  # no finetune stage: the given model is the teacher every artifact is compared with
        hf = [replace(source, name="teacher"), *(a for a in hf if a is not source)]
    artifacts = [*hf, *[a for a in produced if a.kind != ArtifactKind.TORCH_MODEL]]
    manifest["artifacts"] = [a.to_json(paths.root) for a in artifacts]
    if not benchmark:
        write_json(paths.manifest, manifest)
        return paths.root
    bench_key = config_hash([[a.fingerprint for a in artifacts], recipe.bench.model_dump(), data.fingerprint])
    report_file = paths.root / REPORT_JSON
    previous = manifest.get("bench", {})
    if not force and previous.get("key") == bench_key and report_file.is_file():
        log.info(
            "benchmark: artifacts and settings unchanged, keeping %s (rerun with `edgepipe bench`)",
            report_file.name,
        )
        report = json.loads(report_file.read_text(encoding="utf-8"))
        gate_lines = write_report(paths, recipe, report)
    elif any(not r["reused"] for r in records):
        # Stages ran in this process: measure in a fresh one. Measured right after the stages, ORT fp32 ran
        # 23% and static int8 31% slower: the parity check's and calibration's sessions had left the
        # caller thread without flush-to-zero (now set per session, backends.set_caller_denormals); a
        # fresh process also leaves behind whatever else training changed in this one (RESULTS.md).
        manifest.pop("bench", None)
        write_json(paths.manifest, manifest)
        _bench_in_subprocess(paths)
        report = json.loads(report_file.read_text(encoding="utf-8"))
        gate_lines = report.get("gates", [])
        manifest["bench"] = {"key": bench_key, "report": REPORT_JSON}
    else:
        gate_lines = _bench(paths, recipe, artifacts, data)
        manifest["bench"] = {"key": bench_key, "report": REPORT_JSON}
    write_json(paths.manifest, manifest)
    _raise_on_gates(gate_lines, paths)
    return paths.root / REPORT_MD


def copy_completed_stages(source: Path, run: Path, count: int) -> None:
    """Copy `source`'s first `count` stage folders and its cache into `run`, where not there yet.

    A run that shares those stages then reuses them: the runner still checks each one's inputs and
    config hash, so a copy that does not fit is rebuilt, never used."""
    for part in sorted(source.iterdir()) if source.is_dir() else []:
        stage = part.name[:2].isdigit() and int(part.name[:2]) <= count
        if part.is_dir() and (stage or part.name == "cache") and not (run / part.name).exists():
            shutil.copytree(part, run / part.name)


def _bench_in_subprocess(paths: RunPaths) -> None:
    """`edgepipe bench RUN` in a new interpreter (outside any torchrun world); gates are applied by the caller."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")}
    command = [sys.executable, "-m", "edgepipe.pipeline.cli", "bench", str(paths.root), "--no-gates"]
    result = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, check=False)  # its log goes to stderr
    if result.returncode != 0:
        raise EdgepipeError(f"the benchmark process failed (exit {result.returncode}); its error is above")


def _bench(paths: RunPaths, recipe: Recipe, artifacts: list[Artifact], data: DataSplits) -> list[str]:
    from edgepipe.benchmarks.bench import run_bench

    items = _bench_items(artifacts, recipe.bench.include_torch)
    reference = items[0].name if items else None
    settings = _settings(recipe, data)
    if recipe.task == LM_TASK:
        return _bench_generation(paths, recipe, items, data, settings)
    log.info(
        "benchmark: %d artifacts, batch %s x %s, %d runs each",
        len(items),
        settings.batch_sizes,
        ", ".join(settings.describe_input(s) for s in settings.seq_lens),
        settings.runs,
    )
    started = time.perf_counter()
    report = run_bench(items, data.test.inputs, data.test.labels, settings, reference)
    report["bench_seconds"] = round(time.perf_counter() - started, 1)
    return write_report(paths, recipe, report)


def _bench_generation(paths: RunPaths, recipe: Recipe, items: list[Any], data: DataSplits, settings: Any) -> list[str]:
    from transformers import AutoTokenizer

    from edgepipe.benchmarks.generation import run_generation_bench

    log.info(
        "benchmark (causal-lm): %d artifacts, batch %s x prompt %s, %d new tokens, %d runs each",
        len(items),
        settings.batch_sizes,
        settings.seq_lens,
        recipe.bench.new_tokens,
        settings.runs,
    )
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(items[0].path)
    report = run_generation_bench(items, list(data.test.inputs), tokenizer, settings, recipe.bench.new_tokens)
    report["bench_seconds"] = round(time.perf_counter() - started, 1)
    return write_report(paths, recipe, report)


def _open_run(run_dir: Path) -> tuple[RunPaths, Recipe, DataSplits, list[Artifact]]:
    paths = RunPaths(run_dir.resolve())
    if not run_dir.is_dir() or not paths.manifest.is_file():
        raise InputError(f"{run_dir} is not a run folder (no {MANIFEST}); pass the --out folder of `edgepipe build`")
    manifest = _load_manifest(paths)
    if "artifacts" not in manifest or "recipe" not in manifest:
        raise InputError(f"{paths.manifest} is incomplete (the build did not finish); rerun `edgepipe build`")
    recipe = parse_recipe(manifest["recipe"], str(paths.manifest))
    data = load_splits(recipe.data, recipe.seed, recipe.task)
    if data.fingerprint != manifest["data"]["fingerprint"]:
        raise InputError(
            f"the data behind {recipe.data.source} changed since the build (fingerprint "
            f"{data.fingerprint} != {manifest['data']['fingerprint']}); rerun `edgepipe build`"
        )
    artifacts = [Artifact.from_json(a, paths.root) for a in manifest["artifacts"]]
    for a in artifacts:
        if not a.path.exists():
            raise InputError(f"artifact `{a.name}` is missing at {a.path}; rerun `edgepipe build`")
    return paths, recipe, data, artifacts


def bench(run_dir: Path, gates: bool = True) -> Path:
    """Re-measure every artifact of an existing run (e.g. on another machine); rewrites the report and,
    with `gates`, raises GateFailedError when one of the recipe's gates fails."""
    paths, recipe, data, artifacts = _open_run(run_dir)
    gate_lines = _bench(paths, recipe, artifacts, data)
    if gates:
        _raise_on_gates(gate_lines, paths)
    return paths.root / REPORT_MD


BASELINE_PREFIX = "baseline/"


def bench_against(run_dir: Path, baseline_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Measure a run's artifacts and a baseline run's artifacts interleaved in one process (A/B).

    Machine drift then hits both sides alike, so the comparison needs only the within-run noise.
    Each side runs with its own recipe's runtime settings. Returns (baseline report, current report);
    the current report is also written to the run folder.
    """
    from edgepipe.benchmarks.bench import run_bench
    from edgepipe.runtime.backends import RuntimeOptions

    paths, recipe, data, artifacts = _open_run(run_dir)
    _, base_recipe, base_data, base_artifacts = _open_run(baseline_dir)
    if base_data.fingerprint != data.fingerprint:
        raise InputError(
            f"{baseline_dir} was built on other data (fingerprint {base_data.fingerprint} != {data.fingerprint}); "
            "an A/B comparison needs the same test split"
        )

    def options(r: Recipe) -> RuntimeOptions:
        b = r.bench
        return RuntimeOptions(threads=b.threads, optimization=b.graph_optimization, denormal_as_zero=b.denormal_as_zero)

    items = [replace(i, options=options(recipe)) for i in _bench_items(artifacts, recipe.bench.include_torch)]
    base_items = [
        replace(i, name=BASELINE_PREFIX + i.name, options=options(base_recipe))
        for i in _bench_items(base_artifacts, recipe.bench.include_torch)
    ]
    log.info("A/B benchmark: %d artifacts against %d of %s, interleaved", len(items), len(base_items), baseline_dir)
    both = run_bench([*items, *base_items], data.test.inputs, data.test.labels, _settings(recipe, data), items[0].name)
    current = {**both, "results": [r for r in both["results"] if not r["artifact"].startswith(BASELINE_PREFIX)]}
    baseline = {
        **both,
        "reference": BASELINE_PREFIX + str(both["reference"]),
        "results": [
            {**r, "artifact": r["artifact"].removeprefix(BASELINE_PREFIX)}
            for r in both["results"]
            if r["artifact"].startswith(BASELINE_PREFIX)
        ],
    }
    write_report(paths, recipe, current)
    return baseline, current
