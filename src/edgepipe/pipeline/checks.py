"""What `edgepipe validate` and every build check before anything runs: files, columns, the stage chain,
the students and prune specs against the model's architecture, the labels against the data."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from edgepipe.arch import spec_of
from edgepipe.errors import InputError, RecipeError
from edgepipe.files import read_json
from edgepipe.pipeline.data import DataSplits, data_problem, load_splits, transfer_problem
from edgepipe.pipeline.models import BUILTIN_MODELS, model_problem, module_spec, resolve_model, weights_problem
from edgepipe.pipeline.recipe import (
    IMAGE_TASK,
    LM_TASK,
    ArtifactKind,
    DistillConfig,
    PruneConfig,
    Recipe,
    task_problems,
)
from edgepipe.pipeline.stages import registry_problems
from edgepipe.pipeline.stages.prune import prune_problems
from edgepipe.pipeline.students import config_changes, student_problems, student_shape, teacher_shape
from edgepipe.runtime.predictor import model_labels


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


def read_config(folder: Path) -> dict[str, Any] | str:
    """A model folder's config.json as a dict, or the problem with it (naming the file and the fix)."""
    try:
        return read_json(folder / "config.json", "model", "rewrite it with save_pretrained")
    except InputError as error:
        return str(error)


def check_students(recipe: Recipe) -> list[str]:
    """Distill and prune specs against the model's architecture (finetune keeps it), read from config.json."""
    config = read_config(resolve_model(recipe.model))
    if isinstance(config, str):
        return [config]
    path = resolve_model(recipe.model) / "config.json"
    try:
        not_positive = {name: n for name, n in (teacher_shape(config) or {}).items() if n < 1}
        if not_positive:  # 0 heads or layers: no model, and a division by zero below
            return [f"`model`: {path} has shape fields below 1 ({not_positive}); fix it or rewrite it"]
        return _structure_problems(recipe, config)
    except (TypeError, ValueError) as error:  # a shape field of the wrong type ("3 layers", null, a list)
        return [
            f"`model`: {path} has a shape field of the wrong type ({error}); fix it or rewrite with save_pretrained"
        ]


def _structure_problems(recipe: Recipe, config: dict[str, Any]) -> list[str]:
    problems = []
    for i, stage in enumerate(recipe.stages):
        if isinstance(stage, DistillConfig):
            problems += student_problems(stage, config, f"stages.{i}")
            if teacher_shape(config) is not None:  # a later stage starts from this student
                config = {**config, **config_changes(student_shape(stage, config), config)}
        elif isinstance(stage, PruneConfig):
            problems += prune_problems(stage, config, f"stages.{i}")
            keys = arch.keys if (arch := spec_of(config)) else None
            if keys is not None and keys.layers in config:
                config = {**config, keys.layers: int(config[keys.layers]) - len(stage.drop_layers)}
    return problems


def check_lm_students(recipe: Recipe) -> list[str]:
    """Layer-subset specs of a causal-lm recipe against the teacher's config.json (built-ins: once converted)."""
    from edgepipe.pipeline.models import BUILTIN_LMS
    from edgepipe.pipeline.stages.lm import lm_student_problems

    if recipe.model in BUILTIN_LMS:
        config = {
            "model_type": "llama",
            "num_hidden_layers": 30,
        }  # SmolLM2-135M; reading it would mean converting the GGUF first
    else:
        read = read_config(Path(recipe.model))
        if isinstance(read, str):
            return [read]
        config = read
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
    if model is None and (recipe.model in BUILTIN_MODELS or Path(recipe.model).is_dir()):
        problems += [p for p in [weights_problem(resolve_model(recipe.model, recipe.task))] if p]
    problems += check_chain(recipe) + registry_problems(recipe.stages, recipe.task) + task_problems(recipe)
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
    return problems + ([problem] if out is not None and (problem := out_problem(out)) else [])


def out_problem(out: Path) -> str | None:
    """Why a run folder cannot be created or written at `out`, or None."""
    if out.exists() and not out.is_dir():
        return f"`--out`: {out} is a file; pass a folder (it is created if missing)"
    existing = next(p for p in (out, *out.absolute().parents) if p.exists())
    if not existing.is_dir():
        return f"`--out`: {existing} is a file, so {out} cannot be created below it; pass another folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"`--out`: {existing} is not writable, so {out} cannot be written; pass another folder"
    return None


def check_inputs(recipe: Recipe, out: Path | None = None) -> DataSplits:
    """What `validate` and every build check before anything runs: the recipe's problems (all at once),
    then the data read and split, and the model's labels against the data's."""
    problems = check_recipe(recipe, out)
    if problems:
        raise RecipeError(problems)
    data = load_splits(recipe.data, recipe.seed, recipe.task)
    if recipe.task != LM_TASK and module_spec(recipe.model, {}) is None:
        check_labels(resolve_model(recipe.model, recipe.task), recipe, data)
    return data


def check_labels(model_dir: Path, recipe: Recipe, data: DataSplits) -> None:
    if recipe.stages[0].kind == "finetune" or recipe.task == LM_TASK:
        return  # the head is re-created for the data's labels
    labels = model_labels(model_dir)
    if len(labels) != len(data.label_names):
        raise InputError(
            f"`model`: {recipe.model} predicts {len(labels)} labels {labels} but the data has "
            f"{len(data.label_names)} {data.label_names}; add a finetune stage first or fix "
            "`data.label_column`"
        )
