import subprocess
import sys
from pathlib import Path

import pytest

from edgepipe.errors import RecipeError
from edgepipe.pipeline.recipe import apply_overrides, load_recipe, parse_recipe
from edgepipe.pipeline.runner import check_recipe

RECIPES = sorted((Path(__file__).parents[2] / "src" / "edgepipe" / "recipes").glob("*.yaml"))


def _base() -> dict:
    return {"schema_version": 1, "model": "minilm-l6", "stages": [{"kind": "export"}]}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path: Path) -> None:
    recipe = load_recipe(path)
    assert check_recipe(recipe) == []


def test_every_problem_is_reported_at_once_naming_its_key() -> None:
    raw = _base()
    raw["colour"] = "blue"
    raw["stages"] = [
        {"kind": "finetune", "max_seq_len": 0, "lr": "fast"},
        {"kind": "export", "opset": 11},
        {"kind": "quantise"},
    ]
    with pytest.raises(RecipeError) as info:
        parse_recipe(raw)
    problems = info.value.problems
    assert "`colour`: unknown key; remove it or check its spelling" in problems
    assert "`stages.0.max_seq_len`: sequence length must be > 0 (got 0)" in problems
    assert any(p.startswith("`stages.0.lr`: Input should be a valid number") for p in problems)
    assert any(p.startswith("`stages.1.opset`: Input should be greater than or equal to 17") for p in problems)
    kinds = "'finetune', 'distill', 'prune', 'vocab', 'export', 'quantize'"
    assert any(p.startswith("`stages.2`") and kinds in p for p in problems)
    assert len(problems) == 5


def test_calibration_on_dynamic_is_rejected() -> None:
    raw = _base()
    raw["stages"] = [{"kind": "export"}, {"kind": "quantize", "mode": "dynamic", "calibration": {}}]
    with pytest.raises(RecipeError, match="calibration applies to mode: static only"):
        parse_recipe(raw)


def test_dynamic_gather_on_the_fused_export_is_rejected() -> None:
    raw = _base()
    quantize = {"kind": "quantize", "mode": "dynamic", "op_types": ["MatMul", "Gather"], "source": "fp32-fused"}
    raw["stages"] = [{"kind": "export"}, quantize]
    with pytest.raises(RecipeError, match="hides the embedding table's Gather in EmbedLayerNormalization"):
        parse_recipe(raw)


def test_chain_is_checked_before_anything_runs() -> None:
    raw = _base()
    raw["stages"] = [{"kind": "quantize", "mode": "static"}, {"kind": "export", "fuse": False}]
    problems = check_recipe(parse_recipe(raw))
    assert problems == [
        "`stages.0` (quantize) needs onnx-fp32, which no earlier stage produces; add or reorder stages "
        "(e.g. export before quantize, with fuse: true for a fused source)"
    ]


def test_overrides_go_through_the_same_validation() -> None:
    raw = apply_overrides(_base(), ["stages.0.opset=18", "bench.runs=100", "seed=7"])
    recipe = parse_recipe(raw)
    assert recipe.stages[0].opset == 18 and recipe.bench.runs == 100 and recipe.seed == 7
    with pytest.raises(RecipeError, match=r"`stages.0.opset`: Input should be greater than or equal to 17"):
        parse_recipe(apply_overrides(_base(), ["stages.0.opset=9"]))
    with pytest.raises(RecipeError, match=r"`stages.5` is not an index of a 1-item list"):
        apply_overrides(_base(), ["stages.5.opset=18"])
    with pytest.raises(RecipeError, match="expected KEY=VALUE"):
        apply_overrides(_base(), ["stages.0.opset"])


def test_missing_model_folder_names_the_key(tmp_path: Path) -> None:
    raw = _base()
    raw["model"] = str(tmp_path / "nope")
    problems = check_recipe(parse_recipe(raw))
    assert problems == [
        f"`model`: {str(tmp_path / 'nope')!r} is neither a built-in model (minilm-l6) nor an existing folder"
    ]


def test_validate_does_not_import_torch() -> None:
    code = (
        "import sys; from edgepipe.pipeline.cli import main; "
        f"rc = main(['validate', {str(RECIPES[0])!r}]); "
        "sys.exit(rc or (3 if 'torch' in sys.modules else 0))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_distill_on_cuda_is_refused_by_name_where_only_causal_lm_has_it_and_autocast_is_not() -> None:
    raw = _base()
    raw["stages"] = [{"kind": "distill", "student": {"num_layers": 2}, "device": "cuda", "autocast": "bf16"}]
    problems = check_recipe(parse_recipe(raw))
    assert problems == [
        "`stages.0.device`: only causal-lm distillation runs on CUDA so far; this task trains on the CPU; remove it"
    ]  # every task's training loop has bf16 autocast
