"""The run folder: its paths, the manifest, and running or reusing one stage atomically.

Each stage runs in a temporary folder that is renamed into place only when it completes, so a
crash leaves no half-written stage. A stage whose key (config, input fingerprints, data, seed) is
unchanged and whose files still hash as recorded is reused.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepipe.errors import EdgepipeError, InputError, StageError
from edgepipe.pipeline.artifacts import TEMP_SUFFIX, Artifact, config_hash, file_records, fingerprint, write_json
from edgepipe.pipeline.data import DataSplits
from edgepipe.pipeline.distributed import World
from edgepipe.pipeline.recipe import ArtifactKind, Recipe

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
LOCK_FILE = ".lock"
SCRATCH = ".tmp"  # this process's temporary files (onnxruntime's quantizer, the exporter): inside the run
# set for a child process (the benchmark) that works in its parent's locked run folder
LOCK_ENV = "EDGEPIPE_LOCKED_RUN"
# A stage's files (all but metrics.json, which holds timings) are byte-identical between two runs of one
# recipe and seed on one machine with the same torch thread count (tests/pipeline/test_crash.py), except:
NOT_REPRODUCIBLE = {
    "mobile": "onnxruntime's .ort serializer writes some tables in hash order: the same ONNX model converts to "
    "differently ordered bytes (same size, same graph) on every call",
}


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


@contextmanager
def locked_run(root: Path, command: str) -> Iterator[None]:
    """Hold `root`'s lock while a command works in it: a second edgepipe process on the same folder is
    refused with a message instead of interleaving writes. Under the lock, what a killed process left
    (partial stage folders, temp files) is removed, and temporary files go to `root/.tmp`."""
    root = root.resolve()
    if os.environ.get(LOCK_ENV) == str(root):  # our parent holds it
        yield
        return
    root.mkdir(parents=True, exist_ok=True)
    with (root / LOCK_FILE).open("a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise InputError(f"{root} is in use by {holder}; wait for it to finish or pass another --out") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"edgepipe {command} (pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')})\n")
        handle.flush()
        remove_leftovers(root)
        scratch = root / SCRATCH
        scratch.mkdir()
        saved = tempfile.tempdir, os.environ.get("TMPDIR"), os.environ.get(LOCK_ENV)
        tempfile.tempdir = str(scratch)
        os.environ["TMPDIR"] = str(scratch)
        os.environ[LOCK_ENV] = str(root)
        try:
            yield
        finally:
            tempfile.tempdir = saved[0]
            for name, value in (("TMPDIR", saved[1]), (LOCK_ENV, saved[2])):
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
            shutil.rmtree(scratch, ignore_errors=True)


def remove_leftovers(root: Path) -> None:
    """What a killed process leaves in a run folder: its scratch folder, partial stages, temp files."""
    shutil.rmtree(root / SCRATCH, ignore_errors=True)
    for partial in root.glob(".*.partial"):
        shutil.rmtree(partial, ignore_errors=True)
    for tmp in root.rglob(f".*{TEMP_SUFFIX}"):
        tmp.unlink(missing_ok=True)


def load_manifest(paths: RunPaths) -> dict[str, Any]:
    if paths.manifest.is_file():
        try:
            data = json.loads(paths.manifest.read_text(encoding="utf-8"))
            if isinstance(data, dict):
                return data
        except json.JSONDecodeError:
            log.warning("ignoring unreadable %s", paths.manifest)
    return {}


def reusable(stage_dir: Path, key: str) -> dict[str, Any] | None:
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


def run_stage(
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
    from edgepipe.pipeline.stages import StageContext, stage_fn

    final = paths.stage(index, stage.kind)
    tmp = paths.root / f".{final.name}.partial" if world.is_main else Path(tempfile.mkdtemp(prefix="edgepipe-"))
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    seed = recipe.seed if getattr(stage, "seed", None) is None else stage.seed
    ctx = StageContext(stage_dir=tmp, seed=seed, task=recipe.task, data=data, cache_dir=paths.cache, world=world)
    started = time.perf_counter()
    try:
        result = stage_fn(stage.kind, recipe.task)(inputs, stage, ctx)
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
        "reproducible": NOT_REPRODUCIBLE.get(stage.kind, True),
        "metrics": result.metrics,
        "gate_failure": result.gate_failure,
        "artifacts": [a.to_json(paths.root) for a in artifacts],
        "files": files,
    }
    write_json(tmp / "stage.json", record)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return record


def copy_completed_stages(source: Path, run: Path, count: int) -> None:
    """Copy `source`'s first `count` stage folders and its cache into `run`, where not there yet.

    A run that shares those stages then reuses them: the runner still checks each one's inputs and
    config hash, so a copy that does not fit is rebuilt, never used."""
    for part in sorted(source.iterdir()) if source.is_dir() else []:
        stage = part.name[:2].isdigit() and int(part.name[:2]) <= count
        if part.is_dir() and (stage or part.name == "cache") and not (run / part.name).exists():
            shutil.copytree(part, run / part.name)
