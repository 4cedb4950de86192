"""Stage registry: one function per stage kind, `run(inputs, cfg, ctx) -> StageResult`.

A stage writes only inside `ctx.stage_dir` (a temporary folder the runner renames when the stage
completes), never mutates its inputs, is deterministic for a seed and does not print.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgepipe.errors import InputError
from edgepipe.pipeline.artifacts import Artifact
from edgepipe.pipeline.data import DataSplits
from edgepipe.pipeline.distributed import World
from edgepipe.pipeline.recipe import ArtifactKind
from edgepipe.tasks import TASKS


@dataclass(frozen=True)
class StageContext:
    stage_dir: Path
    seed: int
    task: str
    data: DataSplits
    cache_dir: Path  # run-wide cache shared by stages (e.g. calibration ranges), keyed by content hash
    world: World = field(default_factory=World)  # the torchrun world; training stages shard batches over it

    @property
    def writes(self) -> bool:
        """Only rank 0's stage folder becomes the artifact; other ranks only train."""
        return self.world.is_main


@dataclass
class StageResult:
    artifacts: list[Artifact]
    metrics: dict[str, Any] = field(default_factory=dict)
    # set when the stage kept its best result but missed its own budget (accuracy-aware quantization):
    # the runner records the stage, then stops with exit 3
    gate_failure: str | None = None


TRAINING_STAGES = ("finetune", "distill")  # the stages every torchrun rank runs
StageFn = Callable[[dict[ArtifactKind, Artifact], Any, StageContext], StageResult]


@dataclass(frozen=True)
class StageEntry:
    """One (stage kind, task) implementation and the config keys it has no use for (key -> why):
    `validate` refuses those by name when a recipe sets them, so nothing is ignored silently."""

    run: StageFn
    refuses: Mapping[str, str] = field(default_factory=dict)


# (stage kind, task) -> its implementation: a task without an entry does not have that stage
STAGES: dict[tuple[str, str], StageEntry] = {}


# distill keys only the causal-lm distillation implements: the other tasks refuse them by name
TRAINED_ON_CPU = {
    "device": "only causal-lm distillation runs on CUDA so far; this task trains on the CPU",
}
UNGROUPED = {"group_by_length": "only text and token classification group their batches by length so far"}


def register(kind: str, *tasks: str, refuses: Mapping[str, str] | None = None) -> Callable[[StageFn], StageFn]:
    """Register a stage function for `tasks` (every task when none is named)."""

    def decorate(fn: StageFn) -> StageFn:
        for task in tasks or TASKS:
            STAGES[kind, str(task)] = StageEntry(fn, dict(refuses or {}))
        return fn

    return decorate


def load_stages() -> dict[tuple[str, str], StageEntry]:
    """Import the stage modules and return the registry (torch loads lazily, inside the stages)."""
    from edgepipe.pipeline.stages import (  # noqa: F401
        distill,
        export,
        finetune,
        image,
        lm,
        mobile,
        prune,
        prune_cnn,
        quantize,
        vocab,
    )

    return STAGES


def registry_problems(stages: list[Any], task: str) -> list[str]:
    """Stages the task does not have, and keys its implementation has no use for, each naming its key."""
    registry = load_stages()
    problems = []
    for i, stage in enumerate(stages):
        entry = registry.get((stage.kind, task))
        if entry is None:
            kinds = ", ".join(sorted(k for k, t in registry if t == task))
            problems.append(f"`stages.{i}`: {stage.kind} does not apply to {task}; its stages are {kinds}")
            continue
        problems += [
            f"`stages.{i}.{key}`: {why}; remove it"
            for key, why in entry.refuses.items()
            # set to something other than its default (a search variant writes every key out)
            if key in stage.model_fields_set and getattr(stage, key) != type(stage).model_fields[key].default
        ]
    return problems


def stage_fn(kind: str, task: str) -> StageFn:
    registry = load_stages()
    if (kind, task) not in registry:
        done = sorted(t for k, t in registry if k == kind)
        raise InputError(f"`stages`: {kind} has no implementation for task {task!r} (it has: {', '.join(done)})")
    return registry[kind, task].run
