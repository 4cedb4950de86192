"""The image side of the training stages: train a module classifier (finetune) and distill a smaller
module student from it (distill), with the same losses, schedules and teacher cache as text.

Models are torch modules rebuilt from their folder (`edgepipe.runtime.modules`); the student of an
image distill is a fresh module of a named architecture (a built-in CNN or a factory) or a folder.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from edgepipe.errors import InputError
from edgepipe.pipeline.adapters import ImageClassification
from edgepipe.pipeline.artifacts import Artifact
from edgepipe.pipeline.loop import fit
from edgepipe.pipeline.models import module_spec
from edgepipe.pipeline.recipe import ArtifactKind, DistillConfig, FinetuneConfig
from edgepipe.pipeline.stages import TRAINED_ON_CPU, UNGROUPED, StageContext, StageResult, register
from edgepipe.pipeline.stages.distill import (
    HISTORY_KEYS,
    DistillRun,
    distill_result,
    logit_objective,
    record,
    teacher_logits,
)
from edgepipe.pipeline.stages.training import finetune_result
from edgepipe.runtime.modules import build_module, load_module, read_module_meta, save_module
from edgepipe.tasks import Task

log = logging.getLogger(__name__)


def _save(model: Any, out: Path, factory: str, kwargs: dict[str, Any], ctx: StageContext) -> None:
    shape = ctx.data.input_shape or ()
    save_module(model, out, factory=factory, kwargs=kwargs, input_shape=shape, labels=ctx.data.label_names)


def _check_labels(meta: dict[str, Any], ctx: StageContext, key: str) -> None:
    if list(meta["labels"]) != list(ctx.data.label_names):
        raise InputError(
            f"`{key}`: the model predicts labels {meta['labels']} but the data has {ctx.data.label_names}; "
            "start from a model trained on these labels"
        )


@register("finetune", Task.IMAGE, refuses=UNGROUPED)
def run_image_finetune(inputs: dict[ArtifactKind, Artifact], cfg: FinetuneConfig, ctx: StageContext) -> StageResult:
    source = inputs[ArtifactKind.TORCH_MODEL]
    import torch

    meta = read_module_meta(source.path)
    _check_labels(meta, ctx, "model")
    torch.manual_seed(ctx.seed)
    model = load_module(source.path)
    task, train = ImageClassification(cfg.eval_batch_size), ctx.data.train

    def step_loss(trained: Any, step: int, index: np.ndarray) -> Any:
        batch = task.batch(train, index)
        return task.loss(task.logits(task.forward(trained, batch), batch), batch)

    fitted = fit(model, step_loss, cfg, len(train), ctx.seed, world=ctx.world, desc="finetune")
    if not ctx.writes:
        return StageResult([])
    val_accuracy = task.metric(model, ctx.data.val)
    log.info("finetune: %d steps in %.0f s, val accuracy %.4f", cfg.max_steps, fitted.seconds, val_accuracy)
    out = ctx.stage_dir / "model"
    _save(model, out, meta["module"]["factory"], meta["module"]["kwargs"], ctx)
    return finetune_result(model, out, cfg, ctx, fitted.losses, val_accuracy, fitted.seconds)


def _student(cfg: DistillConfig, ctx: StageContext, teacher_meta: dict[str, Any]) -> tuple[Any, str, dict[str, Any]]:
    """(student module, factory, kwargs) from `student.model` (fresh, seeded) or `student.init_from`."""
    import torch

    spec = cfg.student
    if spec.init == "folder":
        folder = Path(spec.init_from or "")
        meta = read_module_meta(folder)
        _check_labels(meta, ctx, "student.init_from")
        return load_module(folder), meta["module"]["factory"], meta["module"]["kwargs"]
    if spec.model is None:
        raise InputError("`student.model`: an image student needs an architecture, e.g. model: cnn-small")
    resolved = module_spec(spec.model, spec.model_args)
    if resolved is None:
        raise InputError(f"`student.model`: {spec.model!r} is neither a built-in CNN nor a package.module:factory")
    factory, kwargs = resolved
    teacher_kwargs = teacher_meta["module"]["kwargs"]
    kwargs = {"num_classes": teacher_kwargs["num_classes"], "in_channels": teacher_kwargs["in_channels"], **kwargs}
    torch.manual_seed(ctx.seed)
    return build_module(factory, kwargs, key="student.model"), factory, kwargs


class _Captured:
    """Outputs of a module's `stages` during its forward pass (forward hooks, so DDP's forward is kept)."""

    def __init__(self, model: Any) -> None:
        self.outputs: list[Any] = []
        self._handles = [stage.register_forward_hook(self._hook) for stage in model.stages]

    def _hook(self, module: Any, args: Any, output: Any) -> None:
        self.outputs.append(output)

    def take(self) -> list[Any]:
        outputs, self.outputs = self.outputs, []
        return outputs

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def _feature_pairs(cfg: DistillConfig, student: Any, teacher: Any) -> dict[int, int]:
    """Student stage -> teacher stage for the hidden loss (evenly spaced unless `layer_map` is given)."""
    import torch

    for who, model in (("student", student), ("teacher", teacher)):
        if not isinstance(getattr(model, "stages", None), torch.nn.ModuleList):
            raise InputError(
                f"`loss.hidden`: the {who} ({type(model).__name__}) has no `stages` ModuleList whose outputs "
                "are its feature maps; the built-in CNNs have one. Set loss.hidden: 0 for other modules"
            )
    s_count, t_count = len(student.stages), len(teacher.stages)
    mapping = (
        dict(cfg.layer_map) if cfg.layer_map else {i: round((i + 1) * t_count / s_count) - 1 for i in range(s_count)}
    )
    bad = {s: t for s, t in mapping.items() if not (0 <= s < s_count and 0 <= t < t_count)}
    if bad:
        raise InputError(f"`layer_map`: {bad} out of range; the student has {s_count} stages and the teacher {t_count}")
    return mapping


def _hidden_setup(
    cfg: DistillConfig, student: Any, teacher: Any, captures: list[_Captured], probe: Any, seed: int
) -> tuple[dict[int, int], Any]:
    """Stage map and, when channels differ, 1x1-conv projections; checked on one real image."""
    import torch

    mapping = _feature_pairs(cfg, student, teacher)
    with torch.no_grad():
        student.eval()(probe), teacher(probe)
    s_feats, t_feats = captures[0].take(), captures[1].take()
    for s, t in mapping.items():
        if s_feats[s].shape[2:] != t_feats[t].shape[2:]:
            raise InputError(
                f"`layer_map`: student stage {s} is {tuple(s_feats[s].shape[2:])} and teacher stage {t} is "
                f"{tuple(t_feats[t].shape[2:])} (height, width); map stages of the same resolution"
            )
    if all(s_feats[s].shape[1] == t_feats[t].shape[1] for s, t in mapping.items()):
        return mapping, None
    if not cfg.hidden_projection:
        raise InputError(
            "`hidden_projection`: student and teacher stages differ in channels; set "
            "hidden_projection: true (a learned 1x1 convolution) or loss.hidden: 0"
        )
    torch.manual_seed(seed)
    projections = torch.nn.ModuleList(
        torch.nn.Conv2d(s_feats[s].shape[1], t_feats[t].shape[1], 1) for s, t in mapping.items()
    )
    return mapping, projections


@register("distill", Task.IMAGE, refuses=TRAINED_ON_CPU | UNGROUPED)
def run_image_distill(inputs: dict[ArtifactKind, Artifact], cfg: DistillConfig, ctx: StageContext) -> StageResult:
    source = inputs[ArtifactKind.TORCH_MODEL]
    import torch

    from edgepipe.pipeline import kd

    teacher_meta = read_module_meta(source.path)
    teacher = load_module(source.path)
    for param in teacher.parameters():
        param.requires_grad_(False)
    student, factory, kwargs = _student(cfg, ctx, teacher_meta)
    task, train = ImageClassification(cfg.eval_batch_size), ctx.data.train
    cached, reused = teacher_logits(lambda split: task.predict(teacher, split), source, cfg, ctx)

    mapping: dict[int, int] = {}
    projections = None
    captures: list[_Captured] = []  # student's, then teacher's stage outputs (hidden loss only)
    if cfg.loss.hidden > 0:
        captures = [_Captured(student), _Captured(teacher)]
        probe = torch.from_numpy(np.asarray(ctx.data.train.take([0])))
        mapping, projections = _hidden_setup(cfg, student, teacher, captures, probe, ctx.seed)
    history: dict[str, list[float]] = {k: [] for k in HISTORY_KEYS}
    temperature = cfg.temperature

    def step_loss(trained: Any, step: int, index: np.ndarray) -> Any:
        nonlocal temperature
        batch = task.batch(train, index)
        logits = task.logits(task.forward(trained, batch), batch)
        loss, terms, weights, temperature = logit_objective(
            cfg, step, logits, cached[torch.from_numpy(index)], batch.labels
        )
        if cfg.loss.hidden > 0:
            s_feats = captures[0].take()
            with torch.no_grad():
                task.forward(teacher, batch)
            t_feats = captures[1].take()
            terms["hidden"] = kd.feature_loss(
                [s_feats[s] for s in mapping], [t_feats[t] for t in mapping.values()], projections
            )
            loss = loss + cfg.loss.hidden * terms["hidden"]
        record(history, loss, terms, weights)
        return loss

    extra = list(projections.parameters()) if projections is not None else []
    fitted = fit(
        student,
        step_loss,
        cfg,
        len(train),
        ctx.seed,
        outside=extra,
        world=ctx.world,
        desc="distill",
    )
    for capture in captures:
        capture.close()
    if not ctx.writes:
        return StageResult([])
    val_accuracy = task.metric(student, ctx.data.val)
    teacher_val = task.metric(teacher, ctx.data.val)
    out = ctx.stage_dir / "model"
    _save(student, out, factory, kwargs, ctx)
    run = DistillRun(fitted.seconds, val_accuracy, teacher_val, mapping, reused, temperature, history)
    return distill_result(student, teacher, out, cfg, ctx, run)
