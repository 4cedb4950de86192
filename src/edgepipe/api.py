"""The Python API beside the CLI, for notebooks: `edgepipe.build(...)` and `edgepipe.load(...)`.

    import edgepipe
    report = edgepipe.build("src/edgepipe/recipes/default.yaml", out="runs/demo", overrides={"bench.runs": 20})
    predictor = edgepipe.load("runs/demo/06-quantize/int8-static")
    predictor.predict(["a quietly devastating film"])

Errors are the CLI's, raised instead of printed: `RecipeError`/`InputError` for bad input (every problem
named), `GateFailedError` when a gate fails (the report is written first), all `EdgepipeError`s.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edgepipe.files import read_json


def build(
    recipe: str | Path | Mapping[str, Any],
    out: str | Path | None = None,
    overrides: Mapping[str, Any] | list[str] | None = None,
    *,
    force: bool = False,
) -> dict[str, Any]:
    """Run a recipe (a YAML path or a mapping) like `edgepipe build`; returns the benchmark report (report.json).

    `overrides` are `--set` values: {"stages.0.max_steps": 50} or ["stages.0.max_steps=50"]."""
    from edgepipe.pipeline.recipe import apply_overrides, parse_recipe, read_recipe_file
    from edgepipe.pipeline.runner import build as run_build

    source = "recipe" if isinstance(recipe, Mapping) else str(recipe)
    raw = dict(recipe) if isinstance(recipe, Mapping) else read_recipe_file(Path(recipe))
    items = (
        list(overrides or [])
        if not isinstance(overrides, Mapping)
        else [
            f"{key}={json.dumps(value)}"
            for key, value in overrides.items()  # JSON is YAML: values keep their types
        ]
    )
    parsed = parse_recipe(apply_overrides(raw, items), source)
    folder = Path(out) if out is not None else Path("runs") / parsed.name
    run_build(parsed, folder, force=force)
    return read_json(folder / "report.json", "out", "rerun the build")


def load(artifact: str | Path, backend: str | None = None) -> Any:
    """An artifact folder as a `Predictor` (on `backend`, else the engine that reads it on the CPU)."""
    from edgepipe.runtime.predictor import Predictor

    return Predictor.load(artifact, backend=backend)
