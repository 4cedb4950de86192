"""`edgepipe search`: budget respected, resumable, Pareto front without dominated points, bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import tiny_recipe, write_recipe

from edgepipe.pipeline.cli import main
from edgepipe.pipeline.recipe import parse_recipe
from edgepipe.pipeline.search import pareto_front, variant, variant_name, variants_of


def _search_recipe(tiny_model_dir: Path, rt_csv: Path) -> dict:
    raw = tiny_recipe(tiny_model_dir, rt_csv)
    raw["stages"] = [
        {**raw["stages"][0], "max_steps": 20},
        {"kind": "distill", "student": {"num_layers": 1}, "max_steps": 10, "batch_size": 16, "max_seq_len": 32},
        {"kind": "export", "fuse": False},
        {"kind": "quantize", "mode": "dynamic"},
    ]
    raw["search"] = {"student_layers": [1, 2], "int8": ["none", "dynamic"], "seq_len": 16, "runs": 10}
    raw["data"]["max_examples"] = 300
    return raw


@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, rt_csv: Path) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("search")
    recipe = write_recipe(root / "r.yaml", _search_recipe(tiny_model_dir, rt_csv))
    out = root / "out"
    assert main(["search", str(recipe), "--latency-budget-ms", "1000", "--out", str(out)]) == 0
    return recipe, out


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]


def test_search_measures_every_candidate_and_keeps_the_best_within_budget(searched) -> None:  # type: ignore[no-untyped-def]
    _, out = searched
    rows = _rows(out)
    assert sorted(r["label"] for r in rows) == [
        "layers-1/dynamic",
        "layers-1/none",
        "layers-2/dynamic",
        "layers-2/none",
    ]
    best = json.loads((out / "best" / "search.json").read_text())
    assert best["p90_ms"] <= 1000 and best["accuracy"] == max(r["accuracy"] for r in rows)
    assert (out / "best" / "model.onnx").is_file() and (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert "![Pareto front](pareto.png)" in (out / "search.md").read_text()


def test_a_tight_budget_is_respected(searched, capsys) -> None:  # type: ignore[no-untyped-def]
    recipe, out = searched
    rows = _rows(out)
    budget = sorted(r["p90_ms"] for r in rows)[1]  # only the two fastest candidates fit
    assert main(["search", str(recipe), "--latency-budget-ms", str(budget), "--out", str(out)]) == 0
    within = [r for r in rows if r["p90_ms"] <= budget]
    best = json.loads((out / "best" / "search.json").read_text())
    assert best["p90_ms"] <= budget and best["accuracy"] == max(r["accuracy"] for r in within)
    assert len(_rows(out)) == len(rows)  # resumed: nothing measured again
    assert "0 candidate(s) to measure" in capsys.readouterr().err
    tiny = min(r["p90_ms"] for r in rows) / 2  # nothing fits: the previous budget's best does not stay
    assert main(["search", str(recipe), "--latency-budget-ms", str(tiny), "--out", str(out)]) == 0
    assert not (out / "best").exists() and "No candidate is within the budget" in (out / "search.md").read_text()


def test_prune_ratio_is_a_knob_and_variants_share_the_teacher(
    tmp_path: Path, tiny_model_dir: Path, rt_csv: Path
) -> None:
    raw = _search_recipe(tiny_model_dir, rt_csv)
    raw["stages"].insert(2, {"kind": "prune", "ratio": 0.3, "samples": 16, "latency": False})
    raw["search"] = {"prune_ratios": [0, 0.5], "int8": ["none"], "seq_len": 16, "runs": 10}
    out = tmp_path / "out"
    assert (
        main(["search", str(write_recipe(tmp_path / "r.yaml", raw)), "--out", str(out), "--latency-budget-ms", "1e3"])
        == 0
    )
    rows = {r["label"]: r for r in _rows(out)}
    assert set(rows) == {"prune-0/none", "prune-0.5/none"}
    assert rows["prune-0.5/none"]["size_mb"] < rows["prune-0/none"]["size_mb"]
    assert not (out / "prune-0" / "03-prune").exists()  # ratio 0: no prune stage
    manifest = json.loads((out / "prune-0.5" / "manifest.json").read_text())
    assert [s["reused"] for s in manifest["stages"][:2]] == [True, True]  # teacher and student copied
    assert manifest["stages"][2]["config"]["ratio"] == 0.5


def test_preset_and_fallback_knobs_set_the_static_quantize_stage(tiny_model_dir: Path, rt_csv: Path) -> None:
    raw = tiny_recipe(tiny_model_dir, rt_csv)
    raw["search"] = {"presets": ["ort-cpu-vnni", "ort-cpu-avx2"], "fallback_drops": [0.01], "int8": ["static"]}
    recipe = parse_recipe(raw)
    variants = variants_of(recipe.search)
    assert [variant_name(v) for v in variants] == [
        "preset-ort-cpu-vnni-fallback-0.01",
        "preset-ort-cpu-avx2-fallback-0.01",
    ]
    static = [s for s in variant(recipe, variants[1]).stages if getattr(s, "mode", None) == "static"]
    assert [(s.preset, s.max_accuracy_drop) for s in static] == [("ort-cpu-avx2", 0.01)]  # type: ignore[union-attr]
    dynamic = [s for s in variant(recipe, variants[1]).stages if getattr(s, "mode", None) == "dynamic"]
    assert [(s.preset, s.max_accuracy_drop) for s in dynamic] == [(None, None)]  # type: ignore[union-attr]


def test_pareto_front_has_no_dominated_point(searched) -> None:  # type: ignore[no-untyped-def]
    _, out = searched
    with (out / "pareto.csv").open() as handle:
        table = list(csv.DictReader(handle))
    front = [r for r in table if r["pareto"] == "True"]
    assert front
    for a in front:
        for b in table:
            better = float(b["p90_ms"]) <= float(a["p90_ms"]) and float(b["accuracy"]) >= float(a["accuracy"])
            strictly = float(b["p90_ms"]) < float(a["p90_ms"]) or float(b["accuracy"]) > float(a["accuracy"])
            assert not (better and strictly), (a, b)
    rows = [{"p90_ms": 1.0, "accuracy": 0.8}, {"p90_ms": 2.0, "accuracy": 0.7}, {"p90_ms": 3.0, "accuracy": 0.9}]
    assert pareto_front(rows) == [rows[0], rows[2]]


def test_bad_search_input(tmp_path: Path, tiny_model_dir: Path, rt_csv: Path, capsys) -> None:
    raw = _search_recipe(tiny_model_dir, rt_csv)
    recipe = write_recipe(tmp_path / "r.yaml", raw)
    assert main(["search", str(recipe), "--latency-budget-ms", "0", "--out", str(tmp_path / "o")]) == 2
    assert "`--latency-budget-ms`: must be > 0, got 0" in capsys.readouterr().err
    raw["search"] = {"int8": ["dynamic"]}
    recipe = write_recipe(tmp_path / "r.yaml", raw)
    assert main(["search", str(recipe), "--latency-budget-ms", "5", "--out", str(tmp_path / "o")]) == 2
    assert "`search`: the search space has no knob" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
