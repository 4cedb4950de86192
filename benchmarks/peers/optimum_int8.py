"""Optimum's ORTQuantizer on an edgepipe fp32 export: static (minmax calibration) and dynamic int8.

Runs in its own virtual environment (`make .venv-optimum`): optimum-onnx 0.1.0 requires
transformers<4.58, which cannot share edgepipe's environment (transformers 5). bench_int8.py calls it:

    .venv-optimum/bin/python benchmarks/peers/optimum_int8.py FP32_DIR CALIBRATION.json OUT_DIR

CALIBRATION.json is a JSON list of the calibration sentences. Writes OUT_DIR/optimum-static and
OUT_DIR/optimum-dynamic, each a copy of FP32_DIR with model.onnx replaced by Optimum's output, with the
settings of Optimum's own `avx512_vnni` preset (what its docs use for this CPU family).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path


def main(fp32: Path, calibration: Path, out: Path) -> None:
    from datasets import Dataset
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoCalibrationConfig, AutoQuantizationConfig
    from transformers import AutoTokenizer

    texts = json.loads(calibration.read_text(encoding="utf-8"))
    tokenizer = AutoTokenizer.from_pretrained(fp32)
    encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=128)
    dataset = Dataset.from_dict({k: encoded[k] for k in ("input_ids", "attention_mask", "token_type_ids")})
    settings = {}
    for static in (True, False):
        name = "optimum-static" if static else "optimum-dynamic"
        folder = out / name
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(fp32, folder)
        (folder / "model.onnx").unlink()
        quantizer = ORTQuantizer.from_pretrained(fp32, file_name="model.onnx")
        config = AutoQuantizationConfig.avx512_vnni(is_static=static, per_channel=True)
        ranges = None
        if static:
            calibration_config = AutoCalibrationConfig.minmax(dataset)
            ranges = quantizer.fit(
                dataset=dataset,
                calibration_config=calibration_config,
                operators_to_quantize=config.operators_to_quantize,
                batch_size=16,
                onnx_augmented_model_name=out / "augmented_model.onnx",  # default: the working directory
            )
            (out / "augmented_model.onnx").unlink(missing_ok=True)
        work = out / f".{name}"
        quantizer.quantize(save_dir=work, quantization_config=config, calibration_tensors_range=ranges)
        produced = next(p for p in work.glob("*.onnx"))
        shutil.move(str(produced), folder / "model.onnx")
        shutil.rmtree(work)
        settings[name] = {k: str(v) for k, v in vars(config).items()}
    (out / "optimum-settings.json").write_text(json.dumps(settings, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
