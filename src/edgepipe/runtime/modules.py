"""PyTorch modules that are not transformers models: built from a `package.module:factory` and weights.

A module folder holds `model.safetensors` and `edgepipe.json`, which records the factory, its
arguments and the input shape, so the folder reloads anywhere the factory imports:

    factory(num_classes=N, in_channels=C, **model_args) -> torch.nn.Module

The module takes one float32 tensor (batch, channels, height, width) and returns logits. Weights
are read with safetensors only (no pickle).
"""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path
from typing import Any

from edgepipe.errors import InputError
from edgepipe.files import read_json

MODULE_FORMAT = "torch-module"
WEIGHTS_FILE = "model.safetensors"
META_FILE = "edgepipe.json"
_FACTORY = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*$")


def is_factory_spec(name: str) -> bool:
    return bool(_FACTORY.match(name))


def import_factory(spec: str, key: str = "model") -> Any:
    """Resolve `package.module:factory` to a callable; InputError naming `key` when it does not."""
    if not is_factory_spec(spec):
        raise InputError(f"`{key}`: {spec!r} is not of the form package.module:factory")
    module_name, attr = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise InputError(
            f"`{key}`: cannot import {module_name!r} ({error}); is it installed or on PYTHONPATH?"
        ) from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise InputError(f"`{key}`: {module_name} has no callable {attr!r}")
    return factory


def build_module(factory: str, kwargs: dict[str, Any], key: str = "model") -> Any:
    import torch

    try:
        model = import_factory(factory, key)(**kwargs)
    except TypeError as error:
        raise InputError(f"`{key}`: {factory}(**{kwargs}) failed: {error}; check `model_args`") from None
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"`{key}`: {factory} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def load_weights(model: Any, path: Path, key: str = "model_weights") -> None:
    """Load a safetensors file into `model`; every tensor must match by name and shape."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise InputError(f"`{key}`: weights file not found: {path}")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise InputError(f"`{key}`: {path} is not a readable safetensors file ({error})") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}")
        if wrong:
            parts.append(f"shape mismatch {wrong[:5]} (a different number of labels or model_args?)")
        raise InputError(f"`{key}`: {path.name} does not fit the model: " + "; ".join(parts))
    model.load_state_dict(state)


def read_module_meta(folder: Path) -> dict[str, Any]:
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        raise InputError(f"{folder} has no {META_FILE}; it is not an edgepipe module folder")
    meta = read_json(meta_path, "model", "write the module folder again")
    if meta.get("format") != MODULE_FORMAT or "module" not in meta:
        raise InputError(f"{meta_path} does not describe a {MODULE_FORMAT} folder")
    return dict(meta)


def is_module_folder(folder: Path) -> bool:
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        return False
    try:
        return read_json(meta_path, "model", "").get("format") == MODULE_FORMAT
    except InputError:
        return False  # not one; model_problem names what the folder lacks


def fit_to_weights(model: Any, path: Path) -> None:
    """Resize the Conv2d/Linear/BatchNorm2d layers of `model` to the shapes stored in `path`.

    A channel-pruned module (edgepipe.json `"pruned": true`) is rebuilt by its factory at the original
    widths; its layers are then replaced by ones of the stored widths before the strict load."""
    from safetensors import safe_open
    from torch import nn

    with safe_open(str(path), framework="pt") as stored:
        shapes = {name: tuple(stored.get_slice(name).get_shape()) for name in stored.keys()}  # noqa: SIM118
    for name, module in list(model.named_modules()):
        shape = shapes.get(f"{name}.weight")
        if shape is None or shape == tuple(module.weight.shape):
            continue
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        bias = module.bias is not None
        if isinstance(module, nn.Conv2d):
            depthwise = module.groups > 1 and module.groups == module.in_channels
            groups = shape[0] if depthwise else module.groups
            new: nn.Module = nn.Conv2d(
                shape[1] * groups,
                shape[0],
                module.kernel_size,  # type: ignore[arg-type]
                module.stride,  # type: ignore[arg-type]
                module.padding,  # type: ignore[arg-type]
                module.dilation,  # type: ignore[arg-type]
                groups,
                bias,
            )
        elif isinstance(module, nn.Linear):
            new = nn.Linear(shape[1], shape[0], bias)
        elif isinstance(module, nn.BatchNorm2d):
            new = nn.BatchNorm2d(shape[0], module.eps, module.momentum, module.affine, module.track_running_stats)
        else:
            continue  # load_weights names the mismatch
        setattr(parent, name.rpartition(".")[2], new)
    _fit_other_tensors(model, shapes)


def _fit_other_tensors(model: Any, shapes: dict[str, tuple[int, ...]]) -> None:
    """Any other parameter or buffer stored at another shape (a LayerNorm's weight, ConvNeXt's layer
    scale) is re-created at it; the strict load then fills it. A norm records its new width."""
    import torch

    for name, module in list(model.named_modules()):
        prefix = f"{name}." if name else ""
        tensors = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        for attr, tensor in tensors:
            shape = shapes.get(prefix + attr)
            if shape is None or shape == tuple(tensor.shape):
                continue
            fresh = torch.empty(shape, dtype=tensor.dtype)
            if isinstance(tensor, torch.nn.Parameter):
                setattr(module, attr, torch.nn.Parameter(fresh, requires_grad=tensor.requires_grad))
            else:
                module.register_buffer(attr, fresh)
            if hasattr(module, "normalized_shape") and len(shape) == 1:
                module.normalized_shape = shape


def load_module(folder: Path) -> Any:
    """Rebuild the module a folder describes and load its weights, in eval mode."""
    meta = read_module_meta(folder)
    model = build_module(meta["module"]["factory"], meta["module"]["kwargs"])
    if meta.get("pruned"):
        fit_to_weights(model, folder / WEIGHTS_FILE)
    load_weights(model, folder / WEIGHTS_FILE, key=str(folder / WEIGHTS_FILE))
    return model.eval()


def save_module(
    model: Any,
    folder: Path,
    *,
    factory: str,
    kwargs: dict[str, Any],
    input_shape: tuple[int, ...],
    labels: list[str],
    **extra: Any,
) -> None:
    """Write `model.safetensors` and the edgepipe.json that lets `load_module` rebuild it.

    `folder` is new and inside a stage's temporary folder, which the runner renames when complete."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / WEIGHTS_FILE))
    meta = {
        "task": "image-classification",
        "labels": labels,
        "precision": "fp32",
        "format": MODULE_FORMAT,
        "module": {"factory": factory, "kwargs": kwargs},
        "input": {"shape": list(input_shape)},
        **extra,
    }
    (folder / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
