"""Image classification through every stage: built-in image data, built-in CNNs and a user's
`package.module:factory` with safetensors weights, CNN distillation, export, static int8, bench."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from conftest import digits_recipe, write_recipe
from safetensors.torch import save_file

from edgepipe.errors import InputError
from edgepipe.pipeline.cli import main
from edgepipe.pipeline.data import load_splits
from edgepipe.pipeline.recipe import DataConfig, parse_recipe
from edgepipe.pipeline.runner import check_recipe
from edgepipe.runtime.cnn import conv_net
from edgepipe.runtime.modules import load_module
from edgepipe.runtime.predictor import Predictor

IMAGE = "image-classification"


@pytest.fixture(scope="module")
def image_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("digits")
    run = root / "run"
    assert main(["build", str(write_recipe(root / "digits.yaml", digits_recipe())), "--out", str(run)]) == 0
    return run


def _stage(run: Path, name: str) -> dict[str, Any]:
    return json.loads((run / name / "stage.json").read_text())


def test_builtin_image_datasets_load_scaled_and_disjoint() -> None:
    for source, shape in (("digits", (1, 8, 8)), ("mnist-5k", (1, 28, 28))):
        splits = load_splits(DataConfig(source=source), seed=0, task=IMAGE)
        assert splits.input_shape == shape
        assert splits.label_names == [str(d) for d in range(10)]
        parts = [splits.train, splits.val, splits.test, splits.calibration]
        images = np.concatenate([np.asarray(p.inputs) for p in parts])
        assert images.dtype == np.float32 and images.min() == 0.0 and images.max() == 1.0
        keys = [{img.tobytes() for img in np.asarray(p.inputs)} for p in parts]
        assert sum(len(k) for k in keys) == len(set().union(*keys))  # no image in two splits
    again = load_splits(DataConfig(source="digits"), seed=0, task=IMAGE)
    assert again.fingerprint == load_splits(DataConfig(source="digits"), seed=0, task=IMAGE).fingerprint
    assert again.fingerprint != load_splits(DataConfig(source="digits"), seed=1, task=IMAGE).fingerprint


def test_npz_images_load_without_pickle(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    good = tmp_path / "good.npz"
    np.savez(good, images=rng.integers(0, 256, (300, 6, 6), dtype=np.uint8), labels=np.arange(300) % 3)
    splits = load_splits(DataConfig(source=str(good)), seed=0, task=IMAGE)
    assert splits.input_shape == (1, 6, 6) and splits.label_names == ["0", "1", "2"]
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, images=np.array([object()] * 3, dtype=object), labels=np.arange(3))
    with pytest.raises(InputError, match=r"cannot read .*pickled\.npz as \.npz without pickle"):
        load_splits(DataConfig(source=str(pickled)), seed=0, task=IMAGE)
    unlabeled = tmp_path / "unlabeled.npz"
    np.savez(unlabeled, images=np.zeros((30, 4, 4), dtype=np.uint8))
    with pytest.raises(InputError, match=r"has no \['labels'\] array"):
        load_splits(DataConfig(source=str(unlabeled)), seed=0, task=IMAGE)


def test_image_run_trains_distills_exports_and_quantizes(image_run: Path) -> None:
    teacher, student = _stage(image_run, "01-finetune"), _stage(image_run, "02-distill")
    assert teacher["metrics"]["val_accuracy"] > 0.9
    metrics = student["metrics"]
    assert metrics["student_parameters"] < metrics["teacher_parameters"] / 3
    assert (
        metrics["loss_kd_end"] < metrics["loss_kd_start"] and metrics["loss_hidden_end"] < metrics["loss_hidden_start"]
    )
    assert metrics["layer_map"] == {"0": 0, "1": 1, "2": 2}
    assert (image_run / "02-distill" / "model" / "model.safetensors").is_file()
    parity = _stage(image_run, "03-export")["metrics"]["parity"]
    assert [p["batch"] for p in parity] == [1, 3] and all(p["max_abs_diff"] < 1e-4 for p in parity)


def test_static_int8_cnn_is_qdq_on_every_conv_and_keeps_accuracy(image_run: Path) -> None:
    model = onnx.load(str(image_run / "04-quantize" / "int8-static" / "model.onnx"))
    producers = {out: node.op_type for node in model.graph.node for out in node.output}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert convs and all(producers.get(n.input[0]) == "DequantizeLinear" for n in convs)
    assert all(producers.get(n.input[1]) == "DequantizeLinear" for n in convs)  # weights are int8 too
    report = json.loads((image_run / "report.json").read_text())
    acc = {r["artifact"]: r["accuracy"] for r in report["results"]}
    assert acc["fp32"] == acc["student"]
    assert abs(acc["int8-static"] - acc["fp32"]) <= 0.03
    assert {r["input"] for r in report["results"]} == {"image 1x8x8"}


def test_module_artifacts_reload_and_agree_with_onnx(image_run: Path) -> None:
    images = np.asarray(load_splits(DataConfig(source="digits", calibration_size=64), 0, IMAGE).test.inputs[:16])
    torch_logits = Predictor.load(image_run / "02-distill" / "model").logits(images)
    onnx_logits = Predictor.load(image_run / "03-export" / "fp32").logits(images)
    assert np.abs(torch_logits - onnx_logits).max() < 1e-4
    with pytest.raises(InputError, match=r"takes images of shape \(batch, 1, 8, 8\) .* got \(16, 8, 8\)"):
        Predictor.load(image_run / "03-export" / "fp32").logits(images[:, 0])


def test_rerun_reuses_every_stage_and_the_initial_model(image_run: Path, tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "digits.yaml", digits_recipe())
    before = (image_run / "00-model" / "model.safetensors").stat().st_mtime_ns
    assert main(["build", str(recipe), "--out", str(image_run)]) == 0
    manifest = json.loads((image_run / "manifest.json").read_text())
    assert all(stage["reused"] for stage in manifest["stages"])
    assert (image_run / "00-model" / "model.safetensors").stat().st_mtime_ns == before


FACTORY_MODULE = """
import torch

class Net(torch.nn.Module):
    def __init__(self, num_classes, in_channels, hidden=12):
        super().__init__()
        self.conv = torch.nn.Conv2d(in_channels, hidden, 3, padding=1)
        self.fc = torch.nn.Linear(hidden, num_classes)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))

def build(num_classes, in_channels, hidden=12):
    return Net(num_classes, in_channels, hidden)
"""


@pytest.fixture
def user_factory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    package = tmp_path / "usernets"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "small.py").write_text(FACTORY_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # the benchmark runs in a fresh interpreter
    yield "usernets.small:build"
    for name in [m for m in sys.modules if m.startswith("usernets")]:
        del sys.modules[name]


def test_user_factory_with_safetensors_weights_runs_through_the_stages(user_factory: str, tmp_path: Path) -> None:
    net = __import__("usernets.small", fromlist=["build"]).build(10, 1, hidden=6)
    weights = tmp_path / "net.safetensors"
    save_file(net.state_dict(), str(weights))
    recipe = digits_recipe(model=user_factory, model_args={"hidden": 6}, model_weights=str(weights))
    recipe["stages"] = [{"kind": "export", "fuse": False}]
    recipe["gates"] = {}
    run = tmp_path / "run"
    assert main(["build", str(write_recipe(tmp_path / "r.yaml", recipe)), "--out", str(run)]) == 0
    loaded = load_module(run / "00-model")
    for name, tensor in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor)
    meta = json.loads((run / "00-model" / "edgepipe.json").read_text())
    assert meta["module"] == {"factory": user_factory, "kwargs": {"num_classes": 10, "in_channels": 1, "hidden": 6}}


def test_weights_that_do_not_fit_the_factory(user_factory: str, tmp_path: Path, capsys) -> None:
    weights = tmp_path / "net.safetensors"
    save_file(__import__("usernets.small", fromlist=["build"]).build(3, 1).state_dict(), str(weights))
    recipe = digits_recipe(model=user_factory, model_weights=str(weights))
    assert main(["build", str(write_recipe(tmp_path / "r.yaml", recipe)), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert (
        "`model_weights`: net.safetensors does not fit the model: shape mismatch ['fc.weight (3, 12) != (10, 12)'"
        in err
    )
    assert "Traceback" not in err


def test_cnn_feature_projections_map_student_channels_to_the_teacher() -> None:
    from edgepipe.pipeline.stages.image import _Captured, _hidden_setup

    cfg = parse_recipe(digits_recipe()).stages[1]
    teacher, student = conv_net(10, widths=[32, 64, 128]), conv_net(10, widths=[8, 16, 32])
    captures = [_Captured(student), _Captured(teacher)]
    mapping, projections = _hidden_setup(cfg, student, teacher, captures, torch.zeros(1, 1, 8, 8), seed=0)
    assert mapping == {0: 0, 1: 1, 2: 2}
    assert [(p.in_channels, p.out_channels, p.kernel_size) for p in projections] == [
        (8, 32, (1, 1)),
        (16, 64, (1, 1)),
        (32, 128, (1, 1)),
    ]
    _, none = _hidden_setup(cfg, teacher, teacher, [_Captured(teacher), _Captured(teacher)], torch.zeros(1, 1, 8, 8), 0)
    assert none is None


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"data": {"source": "rotten-tomatoes"}}, "`data.source`: 'rotten-tomatoes' is text data"),
        ({"model": "minilm-l6"}, "`model`: 'minilm-l6' is not an image model"),
        ({"task": "text-classification"}, "`model`: 'cnn-small' is an image model; set `task: image-classification`"),
        ({"model_weights": "missing.safetensors"}, "`model_weights`: file not found: missing.safetensors"),
        ({"bench": {"seq_lens": [16]}}, "`bench.seq_lens`: applies to text tasks"),
    ],
)
def test_bad_image_recipes_name_the_key(changes: dict[str, Any], message: str) -> None:
    problems = check_recipe(parse_recipe(digits_recipe(**changes)))
    assert any(p.startswith(message) for p in problems), problems


def test_bad_image_stages_name_the_key() -> None:
    recipe = digits_recipe()
    recipe["stages"][1] = {**recipe["stages"][1], "student": {"num_layers": 2}, "loss": {"attention": 1.0}}
    recipe["stages"][2] = {"kind": "export", "fuse": True}
    problems = check_recipe(parse_recipe(recipe))
    assert "`stages.1.loss.attention`: attention maps exist in transformers only; set it to 0" in problems
    assert any(p.startswith("`stages.1.student.init`: an image student is `fresh`") for p in problems)
    assert "`stages.2.fuse`: transformer fusion applies to text models; set fuse: false" in problems
