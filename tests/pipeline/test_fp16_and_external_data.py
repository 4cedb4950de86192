"""fp16 artifacts (a quantize-stage mode, parity-gated) and ONNX external data for models past 2 GiB."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import tiny_recipe

from edgepipe.errors import RecipeError
from edgepipe.pipeline.recipe import parse_recipe
from edgepipe.pipeline.runner import build
from edgepipe.runtime.predictor import Predictor

STAGES = [
    {"kind": "finetune", "max_steps": 20, "batch_size": 16, "max_seq_len": 32, "lr": 1e-3},
    {"kind": "export", "parity_shapes": [[1, 7], [3, 45]]},
    {"kind": "quantize", "mode": "dynamic"},
    {"kind": "quantize", "mode": "static", "calibration": {"samples": 32, "batch_size": 8}},
    {"kind": "quantize", "mode": "fp16", "source": "fp32"},
]
TEXTS = ["a tender, funny and wise film", "two hours I will not get back", "fine"]


def _logits(folder: Path) -> np.ndarray:
    predictor = Predictor.load(folder)
    return predictor.session.run(predictor.encode(TEXTS, pad_to=24))


def _artifacts(run: Path) -> dict[str, Path]:
    manifest = json.loads((run / "manifest.json").read_text(encoding="utf-8"))
    return {a["name"]: run / a["path"] for a in manifest["artifacts"] if a["kind"] != "torch-model"}


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, rt_csv: Path) -> Path:
    run = tmp_path_factory.mktemp("plain") / "run"
    build(parse_recipe(tiny_recipe(tiny_model_dir, rt_csv, stages=STAGES)), run, benchmark=False)
    return run


def test_fp16_halves_the_weights_and_keeps_the_predictions(plain_run: Path) -> None:
    fp16, fp32 = _artifacts(plain_run)["fp16"], _artifacts(plain_run)["fp32"]
    model = onnx.load(str(fp16 / "model.onnx"))
    types = {t.data_type for t in model.graph.initializer if len(t.dims) == 2}
    assert types == {onnx.TensorProto.FLOAT16}  # every weight matrix
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # outputs kept fp32
    dtype = {t.name: t.data_type for t in model.graph.initializer}
    norms = [n for n in model.graph.node if n.op_type == "LayerNormalization"]
    assert norms and all(dtype[n.input[1]] == onnx.TensorProto.FLOAT for n in norms)  # kept fp32
    ratio = (fp16 / "model.onnx").stat().st_size / (fp32 / "model.onnx").stat().st_size
    assert 0.45 < ratio < 0.6
    np.testing.assert_allclose(_logits(fp16), _logits(fp32), atol=2e-3)
    metrics = json.loads((plain_run / "05-quantize" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["parity"]["argmax_agreement"] >= 0.99 and metrics["parity"]["val_examples"] > 0
    assert json.loads((fp16 / "edgepipe.json").read_text(encoding="utf-8"))["precision"] == "fp16"


def test_fp16_refuses_the_int8_only_keys(tiny_model_dir: Path, rt_csv: Path) -> None:
    stages = [*STAGES[:2], {"kind": "quantize", "mode": "fp16", "calibration": {"samples": 8}}]
    with pytest.raises(RecipeError, match="fp16 converts every float op"):
        parse_recipe(tiny_recipe(tiny_model_dir, rt_csv, stages=stages))


def test_models_past_the_limit_are_written_with_external_data(
    plain_run: Path, tmp_path: Path, tiny_model_dir: Path, rt_csv: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The 2 GiB limit lowered to 100 kB: every artifact of the same build is then model.onnx + model.onnx.data
    through export, fusion, dynamic and static int8 (pre-processing included) and fp16, and predicts the same."""
    from edgepipe.export import onnx_export

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 100_000)
    run = tmp_path / "run"
    build(parse_recipe(tiny_recipe(tiny_model_dir, rt_csv, stages=STAGES)), run, benchmark=False)
    plain = _artifacts(plain_run)
    for name, folder in _artifacts(run).items():
        assert (folder / "model.onnx.data").stat().st_size > 100_000, name
        assert (folder / "model.onnx").stat().st_size < 100_000, name
        assert sorted(p.name for p in folder.glob("*.data")) == ["model.onnx.data"]
        np.testing.assert_allclose(_logits(folder), _logits(plain[name]), atol=1e-4, err_msg=name)
    manifest = json.loads((run / "manifest.json").read_text(encoding="utf-8"))
    files = {name for stage in manifest["stages"] for name in stage["files"]}
    assert "fp32/model.onnx.data" in files  # hashed with the model, so reuse checks it too
    assert not list(run.rglob(".*.onnx*"))  # no temporary graph left behind


@pytest.mark.slow
def test_a_model_over_2_gib_exports_quantizes_and_runs(tmp_path: Path) -> None:
    """One 2.2 GB initializer, by construction: saved with external data, int8-quantized, run by ORT."""
    import onnxruntime as ort
    from onnx import helper

    from edgepipe.export.onnx_export import needs_external_data, save_onnx
    from edgepipe.pipeline.stages.quantize import _quantizer

    rows, cols = 1024, 540_000  # 2.21e9 bytes of float32
    weight = np.random.default_rng(0).random((rows, cols), dtype=np.float32) - 0.5
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="big")],
        "big",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None, rows])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [None, cols])],
    )
    x = np.random.default_rng(1).standard_normal((2, rows), dtype=np.float32)
    expected = x @ weight
    path = tmp_path / "model.onnx"
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)  # what ORT reads
    # filled in place, as onnx.load fills external tensors: a >2 GiB message cannot be copied (serialized)
    tensor = model.graph.initializer.add()
    tensor.name, tensor.data_type = "w", onnx.TensorProto.FLOAT
    tensor.dims.extend(weight.shape)
    tensor.raw_data = weight.tobytes()
    del weight, tensor
    save_onnx(model, path)
    del model
    del graph
    assert path.stat().st_size < 1_000_000 and needs_external_data(path)
    int8 = tmp_path / "int8" / "model.onnx"
    int8.parent.mkdir()
    settings = {"mode": "dynamic", "op_types": ["MatMul"], "per_channel": False, "reduce_range": False,
                "weight_type": "int8", "nodes_to_exclude": []}  # fmt: skip
    _quantizer(path, settings, None)([], None, int8)
    got = ort.InferenceSession(str(int8), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.abs(got - expected).max() < 0.05 * np.abs(expected).max()
