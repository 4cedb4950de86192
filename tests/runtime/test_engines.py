"""Engines: the registry and its reasons, the .ort mobile format, TensorRT engine naming and refusal,
every engine compared with the fp32 ONNX reference (a doctored artifact fails the build)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import tiny_recipe, write_recipe
from onnx import helper

from edgepipe.errors import InputError
from edgepipe.pipeline.cli import main
from edgepipe.runtime.backends import BACKENDS
from edgepipe.runtime.predictor import Predictor
from edgepipe.runtime.tensorrt import EngineSpec, check_engine, engine_name, profile_shapes

ENGINES = {
    "ort-cpu",
    "ort-cuda",
    "ort-tensorrt",
    "tensorrt",
    "torch-tensorrt",
    "torch",
    "torch-compile",
    "torch-cuda",
    "torch-cuda-fp16",
    "torch-cuda-bf16",
    "openvino",
    "openvino-bf16",
}


def test_registry_lists_every_backend_with_its_reason(capsys: pytest.CaptureFixture[str]) -> None:
    assert set(BACKENDS) == ENGINES
    assert BACKENDS["ort-cpu"].available() is None and BACKENDS["torch"].available() is None
    if not torch.cuda.is_available():
        for name in ("torch-cuda", "torch-cuda-fp16", "torch-cuda-bf16"):
            assert "sees no CUDA GPU" in (BACKENDS[name].available() or "")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert "no CUDAExecutionProvider (pip install .[gpu]" in (BACKENDS["ort-cuda"].available() or "")
    assert main(["engines"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in ENGINES) and "available (default)" in listed


def test_profile_shapes_from_the_timed_shapes() -> None:
    shapes = profile_shapes({"input_ids": (-1, -1), "pixel_values": (-1, 1, 28, 28)}, [1, 8], [64, 128])
    assert shapes["input_ids"] == ((1, 64), (8, 128), (8, 128))
    assert shapes["pixel_values"] == ((1, 1, 28, 28), (8, 1, 28, 28), (8, 1, 28, 28))


def test_engine_name_follows_model_settings_version_and_gpu(built_run: Path, tmp_path: Path) -> None:
    model = built_run / "02-export" / "fp32" / "model.onnx"
    name = engine_name(model, EngineSpec(), "10.13.0", "NVIDIA H100 80GB HBM3")
    assert name.endswith("-trt10.13.0-nvidia-h100-80gb-hbm3.engine")
    assert name == engine_name(model, EngineSpec(), "10.13.0", "NVIDIA H100 80GB HBM3")  # deterministic
    others = {
        engine_name(model, EngineSpec(fp16=False), "10.13.0", "NVIDIA H100 80GB HBM3"),
        engine_name(model, EngineSpec(), "10.14.1", "NVIDIA H100 80GB HBM3"),
        engine_name(model, EngineSpec(), "10.13.0", "NVIDIA H200"),
        engine_name(built_run / "03-quantize" / "int8-dynamic" / "model.onnx", EngineSpec(), "10.13.0", "H100"),
    }
    assert name not in others and len(others) == 4


def test_an_engine_from_another_tensorrt_or_gpu_is_refused(tmp_path: Path) -> None:
    engine = tmp_path / "x.engine"
    engine.write_bytes(b"serialized")
    engine.with_suffix(".json").write_text(json.dumps({"tensorrt": "10.13.0", "gpu": "NVIDIA H100"}))
    assert check_engine(engine, "10.13.0", "NVIDIA H100")["gpu"] == "NVIDIA H100"
    with pytest.raises(InputError) as error:
        check_engine(engine, "10.14.1", "NVIDIA A10G")
    assert str(error.value) == (
        "x.engine cannot run here (TensorRT: built with '10.13.0', this machine has '10.14.1'; GPU: built with "
        "'NVIDIA H100', this machine has 'NVIDIA A10G'): TensorRT engines are tied to the version and GPU that "
        "built them; rebuild it on this machine from the ONNX model"
    )


def test_mobile_stage_writes_an_ort_model_that_agrees_and_is_benchmarked(
    run_copy: Path, tiny_model_dir: Path, rt_csv: Path, tmp_path: Path
) -> None:
    raw = tiny_recipe(tiny_model_dir, rt_csv)
    raw["stages"].append({"kind": "mobile", "source": "int8"})
    raw["bench"]["batch_sizes"] = [1]
    assert main(["build", str(write_recipe(tmp_path / "r.yaml", raw)), "--out", str(run_copy)]) == 0
    folder = run_copy / "05-mobile" / "int8-static-ort"
    assert (folder / "model.ort").is_file() and not (folder / "model.onnx").exists()
    config = (folder / "required_operators.config").read_text()
    assert "ai.onnx" in config and "MatMul" in config
    metrics = json.loads((run_copy / "05-mobile" / "metrics.json").read_text())
    assert metrics["max_abs_diff"] <= 1e-4
    texts = ["a gripping film", "dull and far too long"]
    source = Predictor.load(run_copy / "04-quantize" / "int8-static").logits(texts)
    assert np.allclose(Predictor.load(folder).logits(texts), source, atol=1e-4)
    report = json.loads((run_copy / "report.json").read_text())
    row = next(r for r in report["results"] if r["artifact"] == "int8-static-ort")
    assert row["runtime"]["model_file"] == "model.ort" and row["agreement"]["reference"] == "fp32"


def _negate_output(path: Path) -> None:
    """Doctor a model: its logits come out negated, so every prediction flips."""
    model = onnx.load(str(path))
    out = model.graph.output[0]
    node = model.graph.node
    for n in node:
        n.output[:] = [f"{o}_raw" if o == out.name else o for o in n.output]
    node.append(helper.make_node("Neg", [f"{out.name}_raw"], [out.name]))
    onnx.save(model, str(path))


def test_agreement_gate_fails_on_a_doctored_artifact_and_engines_are_skipped_with_reasons(
    run_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _negate_output(run_copy / "03-quantize" / "int8-dynamic" / "model.onnx")
    manifest = json.loads((run_copy / "manifest.json").read_text())
    manifest["recipe"]["gates"] = {"min_argmax_agreement": 0.9, "max_abs_diff": 1e-3}
    manifest["recipe"]["bench"].update(batch_sizes=[1], engines=["ort-cpu", "torch", "ort-cuda", "tensorrt"])
    (run_copy / "manifest.json").write_text(json.dumps(manifest))
    assert main(["bench", str(run_copy)]) == 3
    report = json.loads((run_copy / "report.json").read_text())
    failed = [g for g in report["gates"] if g.startswith("FAIL")]
    assert len(failed) == 1 and "`int8-dynamic` on cpu (ort-cpu) vs `fp32`: predictions agree on" in failed[0]
    assert any(g.startswith("pass: `fp32-fused`") and "logits differ by" in g for g in report["gates"])
    skipped = {(s["artifact"], s["target"], s["reason"]) for s in report["skipped"]}
    assert skipped == {  # named, never silently dropped
        ("*", "cuda", "ort-cuda: runs on cuda, which bench.targets (cpu) does not list"),
        ("*", "cuda", "tensorrt: runs on cuda, which bench.targets (cpu) does not list"),
    }
    assert "FAIL: `int8-dynamic`" in capsys.readouterr().err
    # --no-gates (how `edgepipe build` runs its bench subprocess, then gates once itself): same report, exit 0
    assert main(["bench", str(run_copy), "--no-gates"]) == 0
    again = json.loads((run_copy / "report.json").read_text())
    assert [g for g in again["gates"] if g.startswith("FAIL")] == failed
    assert "FAIL" not in capsys.readouterr().err


def test_cuda_engines_unavailable_here_are_skipped_with_the_reason(run_copy: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: the cuda engines run (make test-gpu)")
    manifest = json.loads((run_copy / "manifest.json").read_text())
    manifest["recipe"]["bench"].update(targets=["cpu", "cuda"], batch_sizes=[1], engines=["ort-cpu", "ort-cuda"])
    (run_copy / "manifest.json").write_text(json.dumps(manifest))
    assert main(["bench", str(run_copy)]) == 0
    report = json.loads((run_copy / "report.json").read_text())
    reasons = {s["reason"] for s in report["skipped"] if s["target"] == "cuda"}
    assert any(r.startswith("ort-cuda: this onnxruntime build has no CUDAExecutionProvider") for r in reasons)
    assert "skipped `fp32` on cuda: ort-cuda:" in (run_copy / "report.md").read_text()


def test_tensorrt_ep_options_cache_engines_and_cover_the_timed_shapes(built_run: Path) -> None:
    options = BACKENDS["ort-tensorrt"].provider_options(built_run / "02-export" / "fp32")  # type: ignore[attr-defined]
    assert options["trt_engine_cache_enable"] and options["trt_engine_cache_path"].endswith("fp32/trt-ep-cache")
    assert options["trt_profile_min_shapes"].startswith("input_ids:1x1,attention_mask:1x1")
    assert options["trt_profile_max_shapes"].startswith("input_ids:8x128,attention_mask:8x128")
