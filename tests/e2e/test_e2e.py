"""validate -> build -> bench through the CLI, in-process, on a tiny model and real data."""

import json
from pathlib import Path

from conftest import tiny_recipe, write_recipe

from edgepipe.pipeline.cli import main


def test_validate_build_bench(tmp_path: Path, tiny_model_dir: Path, rt_csv: Path, capsys) -> None:
    raw = tiny_recipe(tiny_model_dir, rt_csv)
    raw["stages"] = raw["stages"][:3]  # finetune, export, dynamic int8
    recipe = write_recipe(tmp_path / "r.yaml", raw)
    out = tmp_path / "run"
    assert main(["validate", str(recipe)]) == 0
    assert main(["build", str(recipe), "--out", str(out), "--set", "bench.batch_sizes=[1]"]) == 0
    printed = capsys.readouterr().out
    assert f"report: {out.resolve() / 'report.md'}" in printed
    first = json.loads((out / "report.json").read_text())
    table = printed[printed.index("batch 1, sequence") :].splitlines()  # the terminal summary, one row each
    assert table[1].split() == ["artifact", "engine", "MB", "accuracy", "p50", "ms", "x", "teacher", "1/size"]
    rows = {line.split()[0]: line.split() for line in table[3:] if line and not line.startswith("report")}
    assert set(rows) == {"teacher", "fp32", "fp32-fused", "int8-dynamic"}
    b1 = {r["artifact"]: r for r in first["results"] if r["batch"] == 1}
    for name, cells in rows.items():
        assert float(cells[4]) == round(b1[name]["latency_ms"]["p50"], 2)
        speedup = b1["teacher"]["latency_ms"]["p50"] / b1[name]["latency_ms"]["p50"]
        assert float(cells[5]) == round(speedup, 2) and cells[3] == f"{100 * b1[name]['accuracy']:.2f}%"
    assert main(["bench", str(out)]) == 0
    second = json.loads((out / "report.json").read_text())
    assert {r["artifact"] for r in second["results"]} == {"teacher", "fp32", "fp32-fused", "int8-dynamic"}
    assert [r["accuracy"] for r in second["results"]] == [r["accuracy"] for r in first["results"]]
    metrics = json.loads((out / "01-finetune" / "metrics.json").read_text())
    assert metrics["train_loss_end"] < metrics["train_loss_start"]
