"""NNCF's post-training int8 of an fp32 ONNX artifact, as a peer of edgepipe's own int8 (bench_engines.py).

Two peers from the same fp32 model and the same calibration texts, each written as an artifact folder
(tokenizer, config and edgepipe.json copied) so every engine loads it like ours:

- `nncf-ov-int8`: the model read by OpenVINO and quantized by NNCF's OpenVINO backend, saved as IR
  (model.xml/.bin): what an OpenVINO user gets from `nncf.quantize`;
- `nncf-onnx-int8`: NNCF's ONNX backend on the ONNX model itself, saved as a QDQ ONNX model that ORT
  and OpenVINO both run.

Both with `model_type=TRANSFORMER` (NNCF's setting for BERT-like models: it keeps the attention's softmax
inputs and the LayerNorms in float), the default MIXED-free preset and 300-sample calibration.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from edgepipe.pipeline.calibration import CalibrationSet


def _folder(fp32: Path, work: Path, name: str) -> Path:
    folder = work / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for item in fp32.iterdir():
        if item.is_file() and item.name not in ("model.onnx", "model.onnx.data"):
            shutil.copy2(item, folder / item.name)
    meta = json.loads((folder / "edgepipe.json").read_text(encoding="utf-8"))
    (folder / "edgepipe.json").write_text(json.dumps({**meta, "precision": "int8-static"}), encoding="utf-8")
    return folder


def nncf_folders(fp32: Path, calibration: list[str], work: Path) -> dict[str, Path]:
    """{peer name: artifact folder} of NNCF's int8 models of the ONNX model in `fp32`."""
    import nncf
    import onnx
    import openvino as ov
    from transformers import AutoTokenizer

    names = tuple(i.name for i in onnx.load(str(fp32 / "model.onnx"), load_external_data=False).graph.input)
    batches: list[dict[str, Any]] = list(
        CalibrationSet(calibration, AutoTokenizer.from_pretrained(fp32), names, 1, 128)
    )
    folders = {}

    ov_model = ov.Core().read_model(str(fp32 / "model.onnx"))
    quantized = nncf.quantize(
        ov_model, nncf.Dataset(batches), model_type=nncf.ModelType.TRANSFORMER, subset_size=len(batches)
    )
    folders["nncf-ov-int8"] = _folder(fp32, work, "nncf-ov-int8")
    ov.save_model(quantized, str(folders["nncf-ov-int8"] / "model.xml"))

    onnx_model = onnx.load(str(fp32 / "model.onnx"))
    quantized_onnx = nncf.quantize(
        onnx_model, nncf.Dataset(batches), model_type=nncf.ModelType.TRANSFORMER, subset_size=len(batches)
    )
    folders["nncf-onnx-int8"] = _folder(fp32, work, "nncf-onnx-int8")
    onnx.save(quantized_onnx, str(folders["nncf-onnx-int8"] / "model.onnx"))
    return folders
