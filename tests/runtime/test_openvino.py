"""OpenVINO's CPU plugin on our artifacts: fp32 and QDQ int8 ONNX as they are, the IR, what it refuses,
and its rows in a benchmark beside onnxruntime's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgepipe.runtime.backends import BACKENDS
from edgepipe.runtime.predictor import Predictor

pytestmark = pytest.mark.skipif(
    BACKENDS["openvino"].available() is not None, reason=str(BACKENDS["openvino"].available())
)
TEXTS = ["a gripping, beautifully acted film", "dull", "neither good nor bad, just long and forgettable"] * 3


def _logits(folder: Path, backend: str, seq_len: int) -> np.ndarray:
    predictor = Predictor.load(folder, backend=backend)
    return predictor.session.run(predictor.encode(TEXTS, pad_to=seq_len))


@pytest.mark.parametrize(("artifact", "atol"), [("02-export/fp32", 1e-5), ("04-quantize/int8-static", 1e-3)])
def test_fp32_and_qdq_int8_run_as_they_are_and_match_onnxruntime(built_run: Path, artifact: str, atol: float) -> None:
    folder = built_run / artifact
    assert BACKENDS["openvino"].refuses(folder) is None
    for seq_len in (7, 45):  # dynamic shapes, neither the export shape
        ours, theirs = _logits(folder, "ort-cpu", seq_len), _logits(folder, "openvino", seq_len)
        assert theirs.shape == ours.shape
        assert np.abs(theirs - ours).max() < atol
        assert (theirs.argmax(-1) == ours.argmax(-1)).all()


def test_settings_are_pinned_and_recorded(built_run: Path) -> None:
    described = Predictor.load(built_run / "02-export/fp32", backend="openvino").session.describe()
    assert described["inference_precision_hint"] == "f32"  # the artifact's precision, not the CPU's bf16
    assert described["performance_hint"] == "LATENCY" and described["num_streams"] == 1
    assert described["inference_num_threads"] >= 1 and described["openvino"]


def test_what_openvino_cannot_read_is_refused_with_the_reason(built_run: Path, tmp_path: Path) -> None:
    dynamic = built_run / "03-quantize/int8-dynamic"
    reason = BACKENDS["openvino"].refuses(dynamic)
    assert reason is not None and "com.microsoft.QAttention" in reason  # onnxruntime's own int8 attention
    ort_only = tmp_path / "ort-format"
    ort_only.mkdir()
    (ort_only / "model.ort").write_bytes(b"")
    assert BACKENDS["openvino"].refuses(ort_only) == "OpenVINO reads ONNX or its IR, not the ORT format"


def test_the_ir_gives_the_onnx_model_s_logits(built_run: Path, tmp_path: Path) -> None:
    import shutil

    from edgepipe.runtime.openvino_backend import IR_MODEL, save_ir

    folder = tmp_path / "ir"
    shutil.copytree(built_run / "02-export/fp32", folder)
    save_ir(folder / "model.onnx", folder)
    onnx_logits = _logits(folder, "openvino", 16)
    (folder / "model.onnx").unlink()  # the IR alone
    assert (folder / IR_MODEL).is_file() and (folder / "model.bin").is_file()
    assert Predictor.load(folder, backend="openvino").session.describe()["model_file"] == IR_MODEL
    np.testing.assert_allclose(_logits(folder, "openvino", 16), onnx_logits, atol=1e-6)


def test_bench_rows_for_openvino_beside_onnxruntime(built_run: Path) -> None:
    from dataclasses import replace

    from edgepipe.benchmarks.bench import run_bench
    from edgepipe.pipeline.measure import bench_items, bench_settings, open_run

    _, recipe, data, artifacts = open_run(built_run)
    items = bench_items(artifacts, include_torch=False)
    settings = replace(bench_settings(recipe, data), engines=["ort-cpu", "openvino"], runs=3, rounds=1)
    report = run_bench(items, data.test.inputs[:24], data.test.labels[:24], settings, items[0].name)
    rows = {(r["artifact"], r["engine"]): r for r in report["results"] if r["batch"] == 1}
    assert {("fp32", "ort-cpu"), ("fp32@openvino", "openvino"), ("int8-static@openvino", "openvino")} <= set(rows)
    for name in ("fp32", "int8-static"):
        row = rows[(f"{name}@openvino", "openvino")]
        assert row["precision"] == rows[(name, "ort-cpu")]["precision"]
        assert row["agreement"]["argmax_agreement"] >= 0.95 and row["latency_ms"]["p50"] > 0
        assert row["runtime"]["inference_precision_hint"] == "f32"
    skipped = {s["artifact"]: s["reason"] for s in report["skipped"]}
    assert "QAttention" in skipped["int8-dynamic"]
    json.dumps(report)  # the runtime settings are plain JSON


def test_a_mobile_stage_writes_the_ir_and_the_bench_runs_it_on_openvino(
    tmp_path: Path, tiny_model_dir: Path, rt_csv: Path
) -> None:
    from conftest import tiny_recipe

    from edgepipe.benchmarks.bench import run_bench
    from edgepipe.pipeline.measure import bench_items, bench_settings, open_run
    from edgepipe.pipeline.recipe import parse_recipe
    from edgepipe.pipeline.runner import build

    stages = [
        {"kind": "finetune", "max_steps": 10, "batch_size": 16, "max_seq_len": 32},
        {"kind": "export"},
        {"kind": "quantize", "mode": "static", "calibration": {"samples": 32, "batch_size": 8}},
        {"kind": "mobile", "source": "int8", "format": "openvino-ir"},
    ]
    run = tmp_path / "run"
    build(parse_recipe(tiny_recipe(tiny_model_dir, rt_csv, stages=stages)), run, benchmark=False)
    ir = run / "04-mobile" / "int8-static-ir"
    assert (ir / "model.xml").is_file() and (ir / "model.bin").is_file() and not (ir / "model.onnx").exists()
    metrics = json.loads((run / "04-mobile" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["format"] == "openvino-ir" and metrics["max_abs_diff"] < 1e-4
    assert Predictor.load(ir).session.describe()["model_file"] == "model.xml"  # no engine named: OpenVINO reads it
    _, recipe, data, artifacts = open_run(run)
    settings = bench_settings(recipe, data)
    items = bench_items(artifacts, include_torch=False)
    report = run_bench(items, data.test.inputs[:16], data.test.labels[:16], settings, items[0].name)
    engines = {r["artifact"]: r["engine"] for r in report["results"]}
    assert engines["int8-static-ir@openvino"] == "openvino" and engines["int8-static"] == "ort-cpu"
