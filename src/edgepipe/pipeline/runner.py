"""The runner: checks the whole chain, runs or reuses each stage, records the manifest, benchmarks, gates.

The jobs live beside it: `checks` (validation before anything runs), `manifest` (the run folder, atomic
stages and their reuse), `measure` (benchmarks, A/B) and `gates` (the recipe's gates and the report).
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import edgepipe
from edgepipe.errors import GateFailedError
from edgepipe.pipeline.artifacts import Artifact, config_hash, folder_fingerprint, write_atomic, write_json
from edgepipe.pipeline.checks import check_inputs, check_recipe
from edgepipe.pipeline.data import DataSplits
from edgepipe.pipeline.distributed import World, join_world
from edgepipe.pipeline.gates import REPORT_JSON, REPORT_MD, raise_on_gates, write_report
from edgepipe.pipeline.manifest import (
    RunPaths,
    copy_completed_stages,
    load_manifest,
    locked_run,
    reusable,
    run_stage,
)
from edgepipe.pipeline.measure import bench, bench_against, bench_in_subprocess, measure
from edgepipe.pipeline.models import materialize_module, module_spec, resolve_model
from edgepipe.pipeline.recipe import LM_TASK, ArtifactKind, Recipe, dump_recipe
from edgepipe.pipeline.stages import TRAINING_STAGES
from edgepipe.runtime.host import git_commit, host_info, versions

__all__ = ["bench", "bench_against", "build", "check_recipe", "copy_completed_stages", "prepare"]
log = logging.getLogger(__name__)


def prepare(recipe: Recipe, out: Path, data: DataSplits, world: World | None = None) -> tuple[RunPaths, Path]:
    """The run's paths and model folder (a module model is written into the run first)."""
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
        return paths, model_dir
    return paths, resolve_model(recipe.model, recipe.task)


def _torch_threads() -> int:
    import torch

    return int(torch.get_num_threads())


def build(recipe: Recipe, out: Path, *, force: bool = False, benchmark: bool = True) -> Path | None:
    """Run every stage (or reuse it), benchmark, gate. Returns the path of report.md (None on ranks > 0).

    `benchmark=False` stops after the stages (the search measures its own way) and returns the run folder."""
    world = join_world()
    if not world.is_main:
        logging.getLogger("edgepipe").setLevel(logging.WARNING)  # rank 0 tells the story
    try:
        data = check_inputs(recipe, out)  # before the lock creates the run folder
        if world.is_main:  # the other ranks write only into their own temporary folders
            with locked_run(out, "build"):
                report = _build(recipe, out, data, force, world, benchmark)
        else:
            report = _build(recipe, out, data, force, world, benchmark)
    except BaseException:
        world.close(wait=False)
        raise
    world.close(wait=True)
    return report


def _build(
    recipe: Recipe, out: Path, data: DataSplits, force: bool, world: World, benchmark: bool = True
) -> Path | None:
    paths, model_dir = prepare(recipe, out, data, world)
    manifest = load_manifest(paths) if world.is_main else {}
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
            # float sums depend on how threads split them: a rerun reproduces the bytes with the same count
            "determinism": {"torch_threads": _torch_threads(), "per_stage": "stages[].reproducible"},
            "world_size": world.size,
            "distributed_backend": world.backend,
            "data": {
                "source": recipe.data.source,
                "fingerprint": data.fingerprint,
                "sizes": data.sizes(),
                "labels": data.label_names,
                "dropped": data.dropped,
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
        record = world.share(None if force or not world.is_main else reusable(stage_dir, key))
        if record is not None:
            log.info("%s: unchanged, reusing it", stage_dir.name)
            record["reused"] = True
        else:
            log.info("%s: running", stage_dir.name)
            local = None
            if world.is_main or stage.kind in TRAINING_STAGES:
                local = run_stage(index, stage, inputs, key, paths, recipe, data, world)
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
        bench_in_subprocess(paths)
        report = json.loads(report_file.read_text(encoding="utf-8"))
        gate_lines = report.get("gates", [])
        manifest["bench"] = {"key": bench_key, "report": REPORT_JSON}
    else:
        gate_lines = measure(paths, recipe, artifacts, data)
        manifest["bench"] = {"key": bench_key, "report": REPORT_JSON}
    write_json(paths.manifest, manifest)
    raise_on_gates(gate_lines, paths)
    return paths.root / REPORT_MD
