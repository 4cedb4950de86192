"""Student models for distillation: a subset of the teacher's layers (weights copied) or a narrower
configuration (fresh, or started from a folder).

`student_problems` checks a spec against the teacher's config as a plain dict, without torch, so
`edgepipe validate` reports them before anything loads.
"""

from __future__ import annotations

import copy
import re
from typing import Any

from edgepipe.errors import InputError
from edgepipe.pipeline.recipe import DistillConfig

_LAYER_KEY = re.compile(r"^(.*\.layer\.)(\d+)(\..*)$")  # bert.encoder.layer.3.attention... and kin
SUBSET_MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "electra")


def teacher_layers(config: dict[str, Any]) -> int:
    return int(config["num_hidden_layers"])


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
    spec = cfg.student
    return {
        "num_hidden_layers": len(student_layer_ids(cfg, teacher_config)),
        "hidden_size": spec.hidden_size or int(teacher_config["hidden_size"]),
        "num_attention_heads": spec.num_heads or int(teacher_config["num_attention_heads"]),
        "intermediate_size": spec.intermediate_size or int(teacher_config["intermediate_size"]),
    }


def layer_map(cfg: DistillConfig, teacher_config: dict[str, Any]) -> dict[int, int]:
    """Student layer -> teacher layer for the hidden and attention losses."""
    if cfg.layer_map is not None:
        return dict(cfg.layer_map)
    if cfg.student.init == "subset":
        return dict(enumerate(student_layer_ids(cfg, teacher_config)))
    count, total = student_shape(cfg, teacher_config)["num_hidden_layers"], teacher_layers(teacher_config)
    return {i: round((i + 1) * total / count) - 1 for i in range(count)}


def student_problems(cfg: DistillConfig, teacher_config: dict[str, Any], key: str) -> list[str]:
    """Problems with a distill spec given the teacher's config, each naming its recipe key."""
    problems = []
    total = teacher_layers(teacher_config)
    spec = cfg.student
    shape = student_shape(cfg, teacher_config)
    if spec.init == "subset":
        if teacher_config.get("model_type") not in SUBSET_MODEL_TYPES:
            problems.append(
                f"`{key}.student.init`: a layer subset needs an encoder with numbered layers; model_type "
                f"{teacher_config.get('model_type')!r} is not supported (supported: {', '.join(SUBSET_MODEL_TYPES)})"
            )
        bad = [i for i in student_layer_ids(cfg, teacher_config) if not 0 <= i < total]
        if bad:
            problems.append(
                f"`{key}.student.layers`: layer index {bad} out of range; "
                f"the teacher has {total} layers (0-{total - 1})"
            )
        if spec.num_layers is not None and spec.num_layers > total:
            problems.append(f"`{key}.student.num_layers`: {spec.num_layers} is more than the teacher's {total} layers")
        for field, name in (
            ("hidden_size", "hidden_size"),
            ("num_heads", "num_attention_heads"),
            ("intermediate_size", "intermediate_size"),
        ):
            mine, theirs = getattr(spec, field), int(teacher_config[name])
            if mine is not None and mine != theirs:
                wider = "wider than" if mine > theirs else "different from"
                problems.append(
                    f"`{key}.student.{field}`: {mine} is {wider} the teacher's {theirs}; a subset copies the "
                    f"teacher's weights, so widths must match (use init: fresh for a narrower student)"
                )
    if shape["hidden_size"] % shape["num_attention_heads"]:
        problems.append(
            f"`{key}.student.num_heads`: hidden_size {shape['hidden_size']} is not divisible by "
            f"{shape['num_attention_heads']} heads"
        )
    mapping = layer_map(cfg, teacher_config)
    for s, t in mapping.items():
        if not 0 <= s < shape["num_hidden_layers"] or not 0 <= t < total:
            problems.append(
                f"`{key}.layer_map`: {s} -> {t} is out of range (student layers 0-{shape['num_hidden_layers'] - 1}, "
                f"teacher layers 0-{total - 1})"
            )
    widths_differ = shape["hidden_size"] != int(teacher_config["hidden_size"])
    if cfg.loss.hidden > 0 and widths_differ and not cfg.hidden_projection:
        problems.append(
            f"`{key}.loss.hidden`: student width {shape['hidden_size']} differs from the teacher's "
            f"{teacher_config['hidden_size']} and hidden_projection is false; set hidden_projection: true "
            f"(a learned linear map) or loss.hidden: 0"
        )
    if cfg.loss.attention > 0 and shape["num_attention_heads"] != int(teacher_config["num_attention_heads"]):
        problems.append(
            f"`{key}.loss.attention`: the student has {shape['num_attention_heads']} heads and the teacher "
            f"{teacher_config['num_attention_heads']}; attention maps only compare with equal head counts"
        )
    return problems


def build_student(teacher: Any, cfg: DistillConfig, seed: int) -> Any:
    """A new student model: copied layer subset, fresh narrow config, or loaded from `init_from`."""
    import torch

    from edgepipe.runtime.text import load_text_model

    spec = cfg.student
    teacher_config = teacher.config.to_dict()
    if spec.init == "folder":
        return load_text_model(str(spec.init_from))
    config = copy.deepcopy(teacher.config)
    for name, value in student_shape(cfg, teacher_config).items():
        setattr(config, name, value)
    torch.manual_seed(seed)
    student = type(teacher)(config)
    if spec.init == "fresh":
        return student
    keep = student_layer_ids(cfg, teacher_config)
    state = {}
    for name, tensor in teacher.state_dict().items():
        match = _LAYER_KEY.match(name)
        if match is None:
            state[name] = tensor.clone()
        elif int(match.group(2)) in keep:
            state[f"{match.group(1)}{keep.index(int(match.group(2)))}{match.group(3)}"] = tensor.clone()
    result = student.load_state_dict(state, strict=False)
    if result.missing_keys:
        raise InputError(
            f"cannot build a layer subset of model_type {teacher.config.model_type!r}: no teacher weights "
            f"for {result.missing_keys[:3]}; use init: fresh"
        )
    return student
