"""The Python API: edgepipe.build returns the report, edgepipe.load the predictor; errors are raised."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import tiny_recipe

import edgepipe
from edgepipe.errors import RecipeError


def test_build_returns_the_report_and_load_the_predictor(tmp_path: Path, tiny_model_dir: Path, rt_csv: Path) -> None:
    recipe = tiny_recipe(tiny_model_dir, rt_csv)
    recipe["stages"] = recipe["stages"][:3]  # finetune, export, dynamic int8
    report = edgepipe.build(recipe, out=tmp_path / "run", overrides={"bench.batch_sizes": [1], "bench.runs": 5})
    assert {r["artifact"] for r in report["results"]} >= {"teacher", "fp32", "int8-dynamic"}
    assert {r["batch"] for r in report["results"]} == {1}  # the override reached the recipe
    predictor = edgepipe.load(tmp_path / "run" / "03-quantize" / "int8-dynamic")
    (prediction,) = predictor.predict(["a warm and funny film"])
    assert prediction.label in ("fresh", "rotten")


def test_bad_input_is_raised_with_every_problem(tiny_model_dir: Path, rt_csv: Path, tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"stages\.0\.max_steps"):
        edgepipe.build(tiny_recipe(tiny_model_dir, rt_csv), out=tmp_path / "run", overrides=["stages.0.max_steps=-1"])
