"""`edgepipe recommend`: the fastest artifact x engine within the accuracy gate, and a snippet that runs it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgepipe.benchmarks.recommend import Choice, deploy_snippet, recommend
from edgepipe.pipeline.cli import main


def _row(artifact: str, engine: str, accuracy: float, p50: float, batch: int = 1, target: str = "cpu") -> dict:
    return {
        "artifact": artifact,
        "engine": engine,
        "precision": "int8-static" if "int8" in artifact else "fp32",
        "target": target,
        "batch": batch,
        "seq_len": 128,
        "size_mb": 10.0,
        "accuracy": accuracy,
        "latency_ms": {"p50": p50},
    }


def test_the_fastest_row_within_the_gate_per_target_and_shape() -> None:
    report: dict[str, Any] = {
        "reference": "teacher",
        "results": [
            _row("teacher", "torch", 0.90, 20.0),
            _row("fp32", "ort-cpu", 0.90, 8.0),
            _row("int8-static@openvino", "openvino", 0.89, 3.0),  # within 1 pt
            _row("int8-dynamic", "ort-cpu", 0.85, 2.0),  # fastest, but 5 pt down
            _row("teacher", "torch", 0.90, 60.0, batch=8),
            _row("fp32", "ort-cpu", 0.90, 30.0, batch=8),
            _row("int8-static@openvino", "openvino", 0.89, 31.0, batch=8),
        ],
    }
    choices = {c.batch: c for c in recommend(report, max_drop=0.01)}
    assert choices[1].artifact == "int8-static@openvino" and choices[1].name == "int8-static"
    assert choices[1].speedup == pytest.approx(20.0 / 3.0) and choices[1].drop == pytest.approx(0.01)
    assert choices[8].artifact == "fp32" and choices[8].engine == "ort-cpu"
    assert recommend(report, max_drop=0.06)[0].artifact == "int8-dynamic"


def test_recommend_on_a_run_prints_a_snippet_that_runs_the_artifact(
    run_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from edgepipe.runtime.predictor import Predictor

    assert main(["recommend", str(run_copy)]) == 0
    out = capsys.readouterr().out
    assert "| cpu | 1 |" in out and "Deploy `" in out
    snippet = out.split("```python\n", 1)[1].split("```", 1)[0]
    shipped = next(line for line in out.splitlines() if line.startswith("Deploy `")).split("`")[1].split("@")[0]
    assert "What to ship" in (run_copy / "report.md").read_text()
    folder = next(p for p in run_copy.glob(f"*/{shipped}") if p.is_dir())
    predictor = Predictor.load(folder)
    feeds = predictor.encode(["a fine, funny film"], pad_to=16)
    scope: dict[str, Any] = {"feeds": feeds, "texts": ["a fine, funny film"]}
    exec(snippet, scope)  # the user's copy-paste, as printed
    assert "logits" in scope or "Predictor.load" in snippet
    if "logits" in scope:
        np.testing.assert_allclose(scope["logits"], predictor.session.run(feeds), atol=1e-5)


def test_recommend_without_a_report_is_one_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["recommend", str(tmp_path)]) == 2
    assert "report not found" in capsys.readouterr().err


def test_an_openvino_snippet_names_the_precision_it_ran_with(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"")
    choice = Choice("cpu", 1, 128, "sequence 128", "fp32@openvino", "openvino", "fp32", 1.0, 2.0, 0.9, 0.0, 1.0,
                    {"inference_precision_hint": "f32", "inference_num_threads": 2})  # fmt: skip
    snippet = deploy_snippet(choice, tmp_path)
    assert '"INFERENCE_PRECISION_HINT": "f32"' in snippet and str(tmp_path / "model.onnx") in snippet
