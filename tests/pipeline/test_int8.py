"""Presets, per-node sensitivity and accuracy-aware fallback of int8 quantization."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import digits_recipe, write_recipe
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, create_calibrator
from onnxruntime.quantization.calibrate import save_tensors_data

from edgepipe.pipeline import accuracy_aware
from edgepipe.pipeline.cli import main
from edgepipe.pipeline.presets import select_preset
from edgepipe.pipeline.recipe import parse_recipe
from edgepipe.pipeline.stages.quantize import _quantizer, resolve_settings


@pytest.mark.parametrize(
    ("flags", "machine", "target", "expected"),
    [
        (["avx2", "avx512f", "avx512_vnni"], "x86_64", "cpu", "ort-cpu-vnni"),
        (["avx2", "avx_vnni"], "x86_64", "cpu", "ort-cpu-vnni"),
        (["avx2", "fma", "avx512f"], "x86_64", "cpu", "ort-cpu-avx2"),
        (["asimd", "asimddp"], "aarch64", "cpu", "ort-arm64"),
        (["avx2"], "x86_64", "cuda", "tensorrt"),
    ],
)
def test_auto_preset_from_cpu_flags(flags: list[str], machine: str, target: str, expected: str) -> None:
    assert select_preset(flags, machine, target) == expected


def _quantize_cfg(**keys):  # type: ignore[no-untyped-def]
    raw = {"schema_version": 1, "model": "minilm-l6", "stages": [{"kind": "quantize", "mode": "static", **keys}]}
    return parse_recipe(raw).stages[0]


def test_preset_fills_unset_keys_and_explicit_keys_win() -> None:
    avx2 = resolve_settings(_quantize_cfg(preset="ort-cpu-avx2"), "text-classification", [])
    assert (avx2["reduce_range"], avx2["activation_type"], avx2["preset"]) == (True, "uint8", "ort-cpu-avx2")
    mine = resolve_settings(_quantize_cfg(preset="ort-cpu-avx2", reduce_range=False), "text-classification", [])
    assert mine["reduce_range"] is False
    trt = resolve_settings(_quantize_cfg(preset="tensorrt"), "text-classification", [])
    assert (trt["activation_type"], trt["weight_type"], trt["symmetric"]) == ("int8", "int8", True)
    auto = resolve_settings(_quantize_cfg(preset="auto"), "text-classification", ["avx512_vnni"])
    assert auto["preset"] == "ort-cpu-vnni" and auto["reduce_range"] is False


@pytest.fixture(scope="module")
def outlier_model(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """x -> mm1 -> + bias -> Relu -> mm2 -> logits, where the bias puts 10^4 on one channel (and mm2's
    weights scale it back): fine in float, but quantizing mm2's input per tensor wipes out every other
    channel. mm2 is the deliberately sensitive node; mm1 sees ordinary inputs and weights."""
    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(8, 16)).astype(np.float32)
    w2 = rng.normal(size=(16, 3)).astype(np.float32)
    bias = np.zeros(16, dtype=np.float32)
    bias[0] = 1e4
    w2[0, :] *= 1e-4
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
            helper.make_node("Add", ["h", "bias"], ["hb"], name="add"),
            helper.make_node("Relu", ["hb"], ["r"], name="relu"),
            helper.make_node("MatMul", ["r", "w2"], ["logits"], name="mm2"),
        ],
        "outlier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"), numpy_helper.from_array(bias, "bias")],
    )
    root = tmp_path_factory.mktemp("outlier")
    path = root / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    data = rng.normal(size=(256, 8)).astype(np.float32)
    feeds = [{"x": data[i : i + 32]} for i in range(0, 256, 32)]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(feeds)

        def get_next(self):  # type: ignore[no-untyped-def]
            return next(self.it, None)

    calibrator = create_calibrator(
        path, [], augmented_model_path=str(root / "aug.onnx"), calibrate_method=CalibrationMethod.MinMax
    )
    calibrator.collect_data(Reader())
    save_tensors_data(calibrator.compute_data(), root / "ranges.json")
    reference = accuracy_aware.run_model(path, feeds)
    settings = resolve_settings(_quantize_cfg(op_types=["MatMul"]), "text-classification", [])
    return path, _quantizer(path, settings, root / "ranges.json"), feeds, reference, root


def test_sensitivity_covers_every_node_and_finds_the_sensitive_one(outlier_model) -> None:  # type: ignore[no-untyped-def]
    _, quantize, feeds, reference, root = outlier_model
    labels = reference.argmax(-1)
    rows = accuracy_aware.sensitivity(quantize, [("mm1", "MatMul"), ("mm2", "MatMul")], feeds, labels, reference, root)
    assert [r.node for r in rows] == ["mm2", "mm1"]
    assert rows[0].sqnr_db < 10 < rows[1].sqnr_db
    assert rows[1].argmax_agreement > 0.95 and rows[0].accuracy < 0.8


def test_fallback_excludes_the_sensitive_node_and_keeps_the_rest_int8(outlier_model, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, quantize, feeds, reference, _root = outlier_model
    labels = reference.argmax(-1)
    out = tmp_path / "model.onnx"
    result = accuracy_aware.fallback(quantize, ["mm2", "mm1"], feeds, labels, 1.0, 0.02, out, tmp_path)
    assert result.met and result.excluded == ["mm2"]
    assert [t["excluded"] for t in result.trials] == [0, 1] and not result.trials[0]["met"]
    nodes = {n.name: n for n in onnx.load(str(out)).graph.node}
    producers = {o: n.op_type for n in nodes.values() for o in n.output}
    assert producers[nodes["mm1"].input[0]] == "DequantizeLinear"  # still int8
    assert producers.get(nodes["mm2"].input[1]) != "DequantizeLinear"  # left in float


def test_fallback_that_cannot_meet_the_budget_keeps_the_closest(outlier_model, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, quantize, feeds, reference, _root = outlier_model
    labels = reference.argmax(-1)

    def ignores_exclusions(exclude, include, out):  # type: ignore[no-untyped-def]
        quantize([], include, out)  # stands for ops outside the candidates that break accuracy anyway

    out = tmp_path / "model.onnx"
    result = accuracy_aware.fallback(ignores_exclusions, ["mm2", "mm1"], feeds, labels, 1.0, 0.02, out, tmp_path)
    assert not result.met and out.is_file() and len(result.trials) == 3
    assert result.excluded == []  # every trial was equally bad: the first (fewest nodes in float) is kept


def test_fallback_steps_grow_and_end_with_every_node() -> None:
    assert accuracy_aware.fallback_steps(0) == [0]
    assert accuracy_aware.fallback_steps(10) == [0, 1, 2, 3, 4, 6, 9, 10]


def test_missed_budget_is_exit_3_with_the_stage_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the runner: a quantize stage that misses its max_accuracy_drop records its best model and
    stops the build with exit 3; the rerun reuses the stage and stops again."""
    real = accuracy_aware.fallback

    def never_met(*args, **kwargs):  # type: ignore[no-untyped-def]
        result = real(*args, **kwargs)
        return accuracy_aware.FallbackResult(False, result.fp32_accuracy, 0.1, result.excluded, result.trials)

    monkeypatch.setattr(accuracy_aware, "fallback", never_met)
    raw = digits_recipe()
    raw["stages"] = [
        {**raw["stages"][0], "max_steps": 30},
        {"kind": "export", "fuse": False},
        {"kind": "quantize", "mode": "static", "max_accuracy_drop": 0.01, "calibration": {"samples": 32}},
    ]
    recipe = write_recipe(tmp_path / "r.yaml", raw)
    assert main(["build", str(recipe), "--out", str(tmp_path / "run")]) == 3
    stage = tmp_path / "run" / "03-quantize"
    assert (stage / "int8-static" / "model.onnx").is_file() and (stage / "sensitivity.md").is_file()
    assert (stage / "sensitivity.png").read_bytes()[:4] == b"\x89PNG"
    # every quantizable weight op of the model is in the table (the CNN: its convolutions and the head)
    graph = onnx.load(str(tmp_path / "run" / "02-export" / "fp32" / "model.onnx")).graph
    weight_ops = [n for n in graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    rows = json.loads((stage / "sensitivity.json").read_text())
    assert len(rows) == len(weight_ops) and len((stage / "sensitivity.md").read_text().splitlines()) == 4 + len(rows)
    record = json.loads((stage / "stage.json").read_text())
    assert "no int8 model within max_accuracy_drop 0.01" in record["gate_failure"]
    assert main(["build", str(recipe), "--out", str(tmp_path / "run")]) == 3


@pytest.mark.parametrize(
    ("preset", "zero_point_type", "symmetric"),
    [("tensorrt", TensorProto.INT8, True), ("ort-cpu-vnni", TensorProto.UINT8, False)],
)
def test_preset_decides_the_qdq_types(outlier_model, tmp_path: Path, preset, zero_point_type, symmetric) -> None:  # type: ignore[no-untyped-def]
    path, _, _, _, root = outlier_model
    settings = resolve_settings(_quantize_cfg(preset=preset, op_types=["MatMul"]), "text-classification", [])
    out = tmp_path / "q.onnx"
    _quantizer(path, settings, root / "ranges.json")([], None, out)
    model = onnx.load(str(out))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    activations = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert activations  # activations of mm1 and mm2 (inputs and outputs)
    zero_points = [inits[n.input[2]] for n in activations]
    assert {int(i.data_type) for i in model.graph.initializer if i.name in {n.input[2] for n in activations}} == {
        zero_point_type
    }
    assert all(int(z) == 0 for z in zero_points) == symmetric
