"""The ORT format (.ort) for ONNX Runtime Mobile, and the operator config of a minimal mobile build.

`convert_to_ort` runs onnxruntime's own converter (`onnxruntime.tools.convert_onnx_models_to_ort`):
the model is optimized, saved as a FlatBuffers `.ort` file, and the operators it needs are written to
`required_operators.config`, the file a reduced-size ONNX Runtime build takes
(`build.sh --minimal_build --include_ops_by_config required_operators.config`).

Optimization level `extended`, not onnxruntime's default `all`: `all` adds layout transforms to
x86-only NCHWc kernels when converted on an x86 machine, which an ARM phone's runtime does not have.
`target_platform: arm` lets the QDQ int8 fusions pick the signed-int8 kernels ARM runs.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
from pathlib import Path

ORT_MODEL = "model.ort"
OPS_CONFIG = "required_operators.config"


def convert_to_ort(onnx_path: Path, out_dir: Path, *, level: str = "extended", target_platform: str = "arm") -> Path:
    """Write `out_dir/model.ort` and `out_dir/required_operators.config`; returns the .ort path."""
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    out_dir.mkdir(parents=True, exist_ok=True)
    previous = os.environ.get("ORT_CONVERT_ONNX_MODELS_TO_ORT_OPTIMIZATION_LEVEL")
    os.environ["ORT_CONVERT_ONNX_MODELS_TO_ORT_OPTIMIZATION_LEVEL"] = level
    try:
        with tempfile.TemporaryDirectory(dir=out_dir) as work, contextlib.redirect_stdout(io.StringIO()):
            source = Path(work) / "model.onnx"  # the converter names its outputs after the input file
            shutil.copyfile(onnx_path, source)
            convert_onnx_models_to_ort(
                source,
                output_dir=Path(work) / "out",
                optimization_styles=[OptimizationStyle.Fixed],
                target_platform=target_platform,
            )
            produced = {p.suffix if p.suffix == ".ort" else "config": p for p in (Path(work) / "out").iterdir()}
            shutil.move(str(produced[".ort"]), out_dir / ORT_MODEL)
            config = produced["config"].read_text(encoding="utf-8").splitlines()
            lines = [f"# - {ORT_MODEL}" if line.startswith("# - ") else line for line in config]  # not the tmp path
            (out_dir / OPS_CONFIG).write_text("\n".join(lines) + "\n", encoding="utf-8")
    finally:
        if previous is None:
            os.environ.pop("ORT_CONVERT_ONNX_MODELS_TO_ORT_OPTIMIZATION_LEVEL", None)
        else:
            os.environ["ORT_CONVERT_ONNX_MODELS_TO_ORT_OPTIMIZATION_LEVEL"] = previous
    return out_dir / ORT_MODEL


def required_operators(config: Path) -> dict[str, list[str]]:
    """`domain;opset;Op1,Op2` lines of a reduced-build config, as {"domain;opset": [ops]}."""
    ops: dict[str, list[str]] = {}
    for line in config.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            domain, opset, names = line.split(";", 2)
            ops[f"{domain};{opset}"] = sorted(names.split(","))
    return ops
