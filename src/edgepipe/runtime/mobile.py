"""The ORT format (.ort) for ONNX Runtime Mobile, and the operator config of a minimal mobile build.

`convert_to_ort` does what onnxruntime's converter (`onnxruntime.tools.convert_onnx_models_to_ort`)
does: a CPU session optimizes the model and saves it as a FlatBuffers `.ort` file, and onnxruntime's
`create_config_from_models` writes the operators it needs to `required_operators.config`, the file a
reduced-size build takes (`build.sh --minimal_build --include_ops_by_config required_operators.config`).
The session is ours so that it has the same disabled optimizers as every CPU session edgepipe creates
(`runtime.backends.CPU_DISABLED_OPTIMIZERS`): the converter cannot leave Add + LayerNormalization
unfused, and its SkipLayerNormalization both ran slower and flipped int8 roundings against the ONNX model.

Optimization level `extended`, not onnxruntime's default `all`: `all` adds layout transforms to
x86-only NCHWc kernels when converted on an x86 machine, which an ARM phone's runtime does not have.
`target_platform: arm` lets the QDQ int8 fusions pick the signed-int8 kernels ARM runs.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

ORT_MODEL = "model.ort"
OPS_CONFIG = "required_operators.config"


def convert_to_ort(onnx_path: Path, out_dir: Path, *, level: str = "extended", target_platform: str = "arm") -> Path:
    """Write `out_dir/model.ort` and `out_dir/required_operators.config`; returns the .ort path."""
    from onnxruntime.tools.ort_format_model import create_config_from_models

    from edgepipe.runtime.backends import RuntimeOptions, ort_cpu_session, ort_session_options

    out_dir.mkdir(parents=True, exist_ok=True)
    partial = out_dir / f".{ORT_MODEL}.partial"
    options = RuntimeOptions(optimization=level)
    so = ort_session_options(options)
    so.optimized_model_filepath = str(partial)
    so.add_session_config_entry("session.save_model_format", "ORT")
    so.add_session_config_entry("session.qdqisint8allowed", "1" if target_platform == "arm" else "0")
    ort_cpu_session(onnx_path, options, so)
    partial.replace(out_dir / ORT_MODEL)
    config = out_dir / f".{OPS_CONFIG}.partial"
    with contextlib.redirect_stdout(io.StringIO()):
        create_config_from_models([out_dir / ORT_MODEL], config, False)
    lines = [f"# - {ORT_MODEL}" if x.startswith("# - ") else x for x in config.read_text(encoding="utf-8").splitlines()]
    config.write_text("\n".join(lines) + "\n", encoding="utf-8")  # the model's name, not its absolute path
    config.replace(out_dir / OPS_CONFIG)
    return out_dir / ORT_MODEL


def required_operators(config: Path) -> dict[str, list[str]]:
    """`domain;opset;Op1,Op2` lines of a reduced-build config, as {"domain;opset": [ops]}."""
    ops: dict[str, list[str]] = {}
    for line in config.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            domain, opset, names = line.split(";", 2)
            ops[f"{domain};{opset}"] = sorted(names.split(","))
    return ops
