import json
from pathlib import Path

import yaml

from edgepipe.pipeline.cli import main


def _stage_mtimes(run: Path) -> dict[str, float]:
    return {p.parent.name: p.stat().st_mtime_ns for p in sorted(run.glob("0*/stage.json"))}


def _rebuild(run: Path, *extra: str) -> int:
    recipe = run / "recipe.resolved.yaml"
    return main(["build", str(recipe), "--out", str(run), *extra])


def test_manifest_records_versions_host_and_hashed_files(built_run: Path) -> None:
    manifest = json.loads((built_run / "manifest.json").read_text())
    assert {"torch", "transformers", "onnx", "onnxruntime", "python"} <= set(manifest["versions"])
    assert manifest["host"]["cpu"] and isinstance(manifest["host"]["cpu_flags"], list)
    assert manifest["recipe"]["name"] == "tiny"
    assert [s["kind"] for s in manifest["stages"]] == ["finetune", "export", "quantize", "quantize"]
    for stage in manifest["stages"]:
        assert stage["duration_s"] >= 0 and stage["config_hash"] and stage["metrics"]
        assert stage["files"] and all(len(f["sha256"]) == 64 and f["size"] > 0 for f in stage["files"].values())
    assert not list(built_run.glob(".*.partial"))


def test_report_json_schema(built_run: Path) -> None:
    report = json.loads((built_run / "report.json").read_text())
    assert report["schema_version"] == 1 and report["machine"]["cpu"]
    names = {r["artifact"] for r in report["results"]}
    assert names == {"teacher", "fp32", "fp32-fused", "int8-dynamic", "int8-static"}
    assert len(report["results"]) == 5 * 2  # two batch sizes, one sequence length
    for row in report["results"]:
        assert row["precision"] in ("fp32", "int8-dynamic", "int8-static") and row["target"] == "cpu"
        assert set(row["latency_ms"]) >= {"p50", "p90", "p99", "mean", "std"}
        assert row["latency_ms"]["p50"] <= row["latency_ms"]["p90"] <= row["latency_ms"]["p99"]
        assert row["latency_ms"]["n"] == 6 and row["throughput_per_s"] > 0 and 0 <= row["accuracy"] <= 1
    markdown = (built_run / "report.md").read_text()
    assert "| artifact | p50 | p90 | p99 |" in markdown
    assert "![accuracy against latency, every artifact](accuracy_latency.png)" in markdown
    assert (built_run / "accuracy_latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(built_run.glob(".*partial*"))


def test_rerun_skips_completed_stages_and_reruns_a_changed_one(run_copy: Path) -> None:
    before = _stage_mtimes(run_copy)
    assert _rebuild(run_copy) == 0
    assert _stage_mtimes(run_copy) == before
    manifest = json.loads((run_copy / "manifest.json").read_text())
    assert all(s["reused"] for s in manifest["stages"])

    assert _rebuild(run_copy, "--set", "stages.3.per_channel=false") == 0
    after = _stage_mtimes(run_copy)
    changed = {name for name in before if before[name] != after[name]}
    assert changed == {"04-quantize"}
    settings = json.loads((run_copy / "04-quantize" / "quantization.json").read_text())
    assert settings["per_channel"] is False and settings["calibration"]["reused"] is True


def test_a_tampered_artifact_is_rebuilt(run_copy: Path) -> None:
    model = run_copy / "03-quantize" / "int8-dynamic" / "model.onnx"
    model.write_bytes(model.read_bytes()[:1000])
    before = _stage_mtimes(run_copy)
    assert _rebuild(run_copy) == 0
    after = _stage_mtimes(run_copy)
    assert {n for n in before if before[n] != after[n]} == {"03-quantize"}


def test_force_reruns_everything(run_copy: Path) -> None:
    recipe = yaml.safe_load((run_copy / "recipe.resolved.yaml").read_text())
    recipe["stages"] = recipe["stages"][:2]  # keep it short: finetune + export
    path = run_copy.parent / "short.yaml"
    path.write_text(yaml.safe_dump(recipe))
    before = _stage_mtimes(run_copy)
    assert main(["build", str(path), "--out", str(run_copy), "--force"]) == 0
    after = _stage_mtimes(run_copy)
    assert after["01-finetune"] != before["01-finetune"] and after["02-export"] != before["02-export"]


def test_a_failed_stage_leaves_nothing_half_written_and_the_rerun_resumes(tmp_path: Path, built_run: Path) -> None:
    recipe = yaml.safe_load((built_run / "recipe.resolved.yaml").read_text())
    recipe["stages"] = recipe["stages"][:2]
    recipe["stages"][1]["parity_atol"] = 1e-15  # no float32 export matches PyTorch that closely
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run = tmp_path / "run"
    assert main(["build", str(path), "--out", str(run)]) == 1
    # .lock stays: an flock on a file that is never unlinked cannot be held by two processes at once
    assert sorted(p.name for p in run.iterdir()) == [".lock", "01-finetune", "manifest.json", "recipe.resolved.yaml"]
    finetuned = _stage_mtimes(run)["01-finetune"]
    assert main(["build", str(path), "--out", str(run), "--set", "stages.1.parity_atol=1e-4"]) == 0
    assert _stage_mtimes(run)["01-finetune"] == finetuned  # resumed after the last completed stage
    assert (run / "02-export" / "fp32" / "model.onnx").is_file()
