"""Student models for distillation: a subset of the teacher's layers (weights copied) or a narrower
configuration (fresh, or started from a folder).

`student_problems` checks a spec against the teacher's config as a plain dict, without torch, so
`edgepipe validate` reports them before anything loads.
"""

from __future__ import annotations

import copy
from typing import Any

from edgepipe.arch import SHAPE, Capability, ConfigKeys, refusal, spec_of
from edgepipe.errors import InputError
from edgepipe.pipeline.recipe import DistillConfig

# student spec field -> the shape name it sets
_FIELDS = {"hidden_size": "hidden", "num_heads": "heads", "intermediate_size": "ffn"}


def teacher_shape(config: dict[str, Any]) -> dict[str, int] | None:
    """(layers, hidden, heads, ffn) of a teacher's config.json, through its spec's key names; None when
    the file leaves one out (transformers' defaults apply: the distill stage checks the loaded config)."""
    spec = spec_of(config)
    if spec is not None:
        return spec.shape(config)
    keys = ConfigKeys()
    values = [config.get(k) for k in (keys.layers, keys.hidden, keys.heads, keys.ffn)]
    return None if None in values else dict(zip(SHAPE, map(int, values), strict=True))  # type: ignore[arg-type]


def teacher_layers(config: dict[str, Any]) -> int:
    shape = teacher_shape(config)
    return int(shape["layers"] if shape else config["num_hidden_layers"])


def student_layer_ids(cfg: DistillConfig, teacher_config: dict[str, Any]) -> list[int]:
    """Teacher layer kept at each student position (subset), evenly spaced when only a count is given."""
    spec = cfg.student
    if spec.layers is not None:
        return list(spec.layers)
    total = teacher_layers(teacher_config)
    count = spec.num_layers or total
    # evenly spaced, always ending at the last layer: 6 -> 3 keeps 1, 3, 5
    return [round((i + 1) * total / count) - 1 for i in range(count)]


def student_shape(cfg: DistillConfig, teacher_config: dict[str, Any]) -> dict[str, int]:
    """The student's (layers, hidden, heads, ffn)."""
    spec, teacher = cfg.student, teacher_shape(teacher_config) or {}
    shape = {"layers": len(student_layer_ids(cfg, teacher_config))}
    for field, name in _FIELDS.items():
        shape[name] = getattr(spec, field) or int(teacher[name])
    return shape


def config_changes(shape: dict[str, int], config: Any) -> dict[str, int]:
    """The config attributes to set for `shape`, in the family's own key names."""
    spec = spec_of(config)
    keys = spec.keys if spec is not None else ConfigKeys()
    return {getattr(keys, name): value for name, value in shape.items()}


def layer_map(cfg: DistillConfig, teacher_config: dict[str, Any]) -> dict[int, int]:
    """Student layer -> teacher layer for the hidden and attention losses."""
    if cfg.layer_map is not None:
        return dict(cfg.layer_map)
    if cfg.student.init == "subset":
        return dict(enumerate(student_layer_ids(cfg, teacher_config)))
    count, total = student_shape(cfg, teacher_config)["layers"], teacher_layers(teacher_config)
    return {i: round((i + 1) * total / count) - 1 for i in range(count)}


def student_problems(cfg: DistillConfig, teacher_config: dict[str, Any], key: str) -> list[str]:
    """Problems with a distill spec given the teacher's config, each naming its recipe key."""
    spec = cfg.student
    refused = refusal(teacher_config, Capability.LAYER_SUBSET, f"{key}.student.init")
    problems = [f"{refused}; use init: fresh"] if refused and spec.init == "subset" else []
    teacher = teacher_shape(teacher_config)
    if teacher is None:
        return problems  # config.json leaves defaults out: the distill stage checks against the loaded config
    total = teacher["layers"]
    shape = student_shape(cfg, teacher_config)
    if spec.init == "subset":
        ids = student_layer_ids(cfg, teacher_config)
        bad = [i for i in ids if not 0 <= i < total]
        if bad:
            problems.append(
                f"`{key}.student.layers`: layer index {bad} out of range; "
                f"the teacher has {total} layers (0-{total - 1})"
            )
        arch = spec_of(teacher_config)
        if arch is not None and arch.first_layer_fixed and ids and ids[0] != 0:
            problems.append(
                f"`{key}.student.layers`: {arch.family}'s first layer is built unlike the others (no attention "
                f"norm); start the subset with layer 0 (got {ids})"
            )
        if spec.num_layers is not None and spec.num_layers > total:
            problems.append(f"`{key}.student.num_layers`: {spec.num_layers} is more than the teacher's {total} layers")
        for field, name in _FIELDS.items():
            mine, theirs = getattr(spec, field), teacher[name]
            if mine is not None and mine != theirs:
                wider = "wider than" if mine > theirs else "different from"
                problems.append(
                    f"`{key}.student.{field}`: {mine} is {wider} the teacher's {theirs}; a subset copies the "
                    f"teacher's weights, so widths must match (use init: fresh for a narrower student)"
                )
    if shape["hidden"] % shape["heads"]:
        problems.append(
            f"`{key}.student.num_heads`: hidden_size {shape['hidden']} is not divisible by {shape['heads']} heads"
        )
    mapping = layer_map(cfg, teacher_config)
    for s, t in mapping.items():
        if not 0 <= s < shape["layers"] or not 0 <= t < total:
            problems.append(
                f"`{key}.layer_map`: {s} -> {t} is out of range (student layers 0-{shape['layers'] - 1}, "
                f"teacher layers 0-{total - 1})"
            )
    if cfg.loss.hidden > 0 and shape["hidden"] != teacher["hidden"] and not cfg.hidden_projection:
        problems.append(
            f"`{key}.loss.hidden`: student width {shape['hidden']} differs from the teacher's "
            f"{teacher['hidden']} and hidden_projection is false; set hidden_projection: true "
            f"(a learned linear map) or loss.hidden: 0"
        )
    if cfg.loss.attention > 0 and shape["heads"] != teacher["heads"]:
        problems.append(
            f"`{key}.loss.attention`: the student has {shape['heads']} heads and the teacher "
            f"{teacher['heads']}; attention maps only compare with equal head counts"
        )
    return problems


def build_student(teacher: Any, cfg: DistillConfig, seed: int) -> Any:
    """A new student model: copied layer subset, fresh narrow config, or loaded from `init_from`."""
    import torch

    from edgepipe.arch.ops import layer_subset
    from edgepipe.runtime.text import load_text_model

    spec = cfg.student
    teacher_config = teacher.config.to_dict()
    if spec.init == "folder":
        return load_text_model(str(spec.init_from))
    if spec.init == "subset":
        arch = spec_of(teacher.config)
        if arch is None or not arch.can(Capability.LAYER_SUBSET):
            raise InputError(str(refusal(teacher_config, Capability.LAYER_SUBSET, "student.init")))
        return layer_subset(teacher, arch, student_layer_ids(cfg, teacher_config))
    config = copy.deepcopy(teacher.config)
    for name, value in config_changes(student_shape(cfg, teacher_config), config).items():
        setattr(config, name, value)
    if getattr(config, "layer_types", None) is not None:  # per-layer types follow the new depth
        config.layer_types = [config.layer_types[t] for t in student_layer_ids(cfg, teacher_config)]
    torch.manual_seed(seed)
    return type(teacher)(config)
