"""Measuring a run: its artifacts benchmarked (in this process or a fresh one), alone or A/B against a baseline."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from edgepipe.errors import EdgepipeError, InputError
from edgepipe.pipeline.artifacts import Artifact
from edgepipe.pipeline.data import DataSplits, load_splits
from edgepipe.pipeline.gates import REPORT_MD, raise_on_gates, write_report
from edgepipe.pipeline.manifest import MANIFEST, RunPaths, load_manifest, locked_run
from edgepipe.pipeline.recipe import LM_TASK, ArtifactKind, Recipe, parse_recipe

log = logging.getLogger(__name__)


def bench_items(artifacts: list[Artifact], include_torch: bool) -> list[Any]:
    from edgepipe.benchmarks.bench import BenchItem

    items = []
    for a in artifacts:
        if a.kind == ArtifactKind.TORCH_MODEL:
            if include_torch:
                items.append(BenchItem(a.name, a.path, a.precision, "torch"))
        else:
            items.append(BenchItem(a.name, a.path, a.precision, "onnx"))
    return items


def bench_settings(recipe: Recipe, data: DataSplits) -> Any:
    """The recipe's bench settings; image models are timed at their input size (seq_len = image height)."""
    from edgepipe.benchmarks.bench import BenchSettings

    cfg = recipe.bench.model_dump()
    cfg.pop("include_torch")
    cfg.pop("new_tokens")
    shape = data.input_shape
    cfg["seq_lens"] = [shape[1]] if shape else (recipe.bench.seq_lens or [128])
    return BenchSettings(**cfg, input_shape=shape, label_names=tuple(data.label_names))


def bench_in_subprocess(paths: RunPaths) -> None:
    """`edgepipe bench RUN` in a new interpreter (outside any torchrun world); gates are applied by the caller."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")}
    command = [sys.executable, "-m", "edgepipe.pipeline.cli", "bench", str(paths.root), "--no-gates"]
    # its log goes to stderr; it dies with this process, so a killed build leaves no writer in the run folder
    result = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, check=False, preexec_fn=_die_with_parent)
    if result.returncode != 0:
        raise EdgepipeError(f"the benchmark process failed (exit {result.returncode}); its error is above")


def _die_with_parent() -> None:
    """In the child, before exec: Linux sends it SIGKILL when its parent dies (prctl PR_SET_PDEATHSIG)."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        parent = os.getppid()
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before the call
            os._exit(1)


def measure(paths: RunPaths, recipe: Recipe, artifacts: list[Artifact], data: DataSplits) -> list[str]:
    from edgepipe.benchmarks.bench import run_bench

    items = bench_items(artifacts, recipe.bench.include_torch)
    reference = items[0].name if items else None
    settings = bench_settings(recipe, data)
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


def _finished_run(run_dir: Path) -> tuple[RunPaths, dict[str, Any], Recipe]:
    """A finished run's paths, manifest and recipe; InputError for a folder that is not one."""
    paths = RunPaths(run_dir.resolve())
    if not run_dir.is_dir() or not paths.manifest.is_file():
        raise InputError(f"{run_dir} is not a run folder (no {MANIFEST}); pass the --out folder of `edgepipe build`")
    manifest = load_manifest(paths)
    if "artifacts" not in manifest or "recipe" not in manifest:
        raise InputError(f"{paths.manifest} is incomplete (the build did not finish); rerun `edgepipe build`")
    return paths, manifest, parse_recipe(manifest["recipe"], str(paths.manifest))


def open_run(run_dir: Path) -> tuple[RunPaths, Recipe, DataSplits, list[Artifact]]:
    paths, manifest, recipe = _finished_run(run_dir)
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


def run_folders(run_dir: Path) -> tuple[Any, dict[str, Path]]:
    """A finished run's recipe gates and its artifact folders by name (`edgepipe recommend`)."""
    paths, manifest, recipe = _finished_run(run_dir)
    return recipe.gates, {a["name"]: Artifact.from_json(a, paths.root).path for a in manifest["artifacts"]}


def bench(run_dir: Path, gates: bool = True) -> Path:
    """Re-measure every artifact of an existing run (e.g. on another machine); rewrites the report and,
    with `gates`, raises GateFailedError when one of the recipe's gates fails."""
    paths, recipe, data, artifacts = open_run(run_dir)
    with locked_run(paths.root, "bench"):
        gate_lines = measure(paths, recipe, artifacts, data)
    if gates:
        raise_on_gates(gate_lines, paths)
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

    paths, recipe, data, artifacts = open_run(run_dir)
    _, base_recipe, base_data, base_artifacts = open_run(baseline_dir)
    if base_data.fingerprint != data.fingerprint:
        raise InputError(
            f"{baseline_dir} was built on other data (fingerprint {base_data.fingerprint} != {data.fingerprint}); "
            "an A/B comparison needs the same test split"
        )

    def options(r: Recipe) -> RuntimeOptions:
        b = r.bench
        return RuntimeOptions(threads=b.threads, optimization=b.graph_optimization, denormal_as_zero=b.denormal_as_zero)

    items = [replace(i, options=options(recipe)) for i in bench_items(artifacts, recipe.bench.include_torch)]
    base_items = [
        replace(i, name=BASELINE_PREFIX + i.name, options=options(base_recipe))
        for i in bench_items(base_artifacts, recipe.bench.include_torch)
    ]
    log.info("A/B benchmark: %d artifacts against %d of %s, interleaved", len(items), len(base_items), baseline_dir)
    both = run_bench(
        [*items, *base_items], data.test.inputs, data.test.labels, bench_settings(recipe, data), items[0].name
    )
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
    with locked_run(paths.root, "bench"):
        write_report(paths, recipe, current)
    return baseline, current
