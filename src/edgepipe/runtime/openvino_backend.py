"""OpenVINO's CPU plugin as a backend: our fp32 and QDQ int8 ONNX models (or their OpenVINO IR) as they are.

OpenVINO reads a QDQ model as its own int8 (the QuantizeLinear/DequantizeLinear pairs become its
FakeQuantize ops, run with int8 kernels), so one static int8 artifact serves ORT and OpenVINO alike.

Settings, and why: the LATENCY performance hint with one stream, as ORT runs (one request at a time);
threads as in `RuntimeOptions`; denormals flushed like ORT's sessions. The CPU plugin runs float ops in
bfloat16 by default where the CPU has it (AVX512-BF16, AMX), which is not the artifact's precision:
`openvino` pins f32, and `openvino-bf16` is OpenVINO's default precision, benchmarked as its own engine.
The settings the compiled model resolved are what `describe` reports.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgepipe.errors import InputError

IR_MODEL = "model.xml"  # + model.bin: OpenVINO's own format, written by `save_ir`
_REPORTED = (
    "PERFORMANCE_HINT",
    "NUM_STREAMS",
    "INFERENCE_NUM_THREADS",
    "INFERENCE_PRECISION_HINT",
    "EXECUTION_DEVICES",
)


def _model_path(folder: Path) -> Path:
    for name in (IR_MODEL, "model.onnx"):
        if (folder / name).is_file():
            return folder / name
    raise InputError(f"{folder} has neither {IR_MODEL} nor model.onnx; OpenVINO reads ONNX or its IR")


def _cause(error: Exception) -> str:
    """The last line of OpenVINO's message; the lines before it are C++ source locations."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip() and "Exception from" not in line]
    return lines[-1] if lines else type(error).__name__


def _plain(value: Any) -> Any:
    """A property as JSON: OpenVINO's enums and element types as their names ("LATENCY", "f32")."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)):
        return value
    return getattr(value, "name", None) or getattr(value, "get_type_name", lambda: str(value))()


class _OpenvinoSession:
    def __init__(self, folder: Path, threads: int, denormal_as_zero: bool, precision: str) -> None:
        import openvino as ov

        path = _model_path(folder)
        config = {
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": "1",
            "INFERENCE_NUM_THREADS": str(threads),
            "INFERENCE_PRECISION_HINT": precision,
            "CPU_DENORMALS_OPTIMIZATION": "YES" if denormal_as_zero else "NO",
        }
        try:
            self._compiled = ov.Core().compile_model(str(path), "CPU", config)
        except RuntimeError as error:
            raise InputError(f"OpenVINO cannot load {path}: {_cause(error)}") from None
        self._denormal_as_zero = denormal_as_zero
        self._request = self._compiled.create_infer_request()
        self._output = self._compiled.output(0)
        self.input_names = tuple(port.get_any_name() for port in self._compiled.inputs)
        self._settings: dict[str, Any] = {
            "model_file": path.name,
            "openvino": ov.get_version().split("-")[0],
            "device": ov.Core().get_property("CPU", "FULL_DEVICE_NAME"),
            "denormal_as_zero": denormal_as_zero,
            **{key.lower(): _plain(self._compiled.get_property(key)) for key in _REPORTED},
        }

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        # OpenVINO 2026.4's CPU plugin infers dynamic shapes on the calling thread, and with flush-to-zero /
        # denormals-are-zero set there (as ORT and torch sessions leave it) it fails on our BERT export's
        # attention-mask Expand: "Broadcast node ... Value -1 not in range". Its own threads keep
        # CPU_DENORMALS_OPTIMIZATION; the caller's mode is cleared for the call and put back after.
        import torch  # its switch sets the thread's MXCSR flags, as `backends.set_caller_denormals` does

        torch.set_flush_denormal(False)
        try:
            result = self._request.infer({name: feeds[name] for name in self.input_names})
        finally:
            torch.set_flush_denormal(self._denormal_as_zero)
        return np.array(result[self._output], copy=True)

    def describe(self) -> dict[str, Any]:
        return dict(self._settings)


@dataclass(frozen=True)
class OpenvinoBackend:
    """OpenVINO on the CPU; `precision` is the CPU plugin's inference precision for float ops."""

    name: str = "openvino"
    precision: str = "f32"
    engine: str = "openvino"
    target: str = "cpu"
    model_format: str = "onnx"

    def refuses(self, folder: Path) -> str | None:
        """The ORT format, and ONNX models with ops OpenVINO's frontend cannot convert (onnxruntime's
        QAttention of the dynamic int8 graph): found by reading the model, as loading it would."""
        import openvino as ov

        if not (folder / IR_MODEL).is_file() and not (folder / "model.onnx").is_file():
            return "OpenVINO reads ONNX or its IR, not the ORT format"
        try:
            ov.Core().read_model(str(_model_path(folder)))
        except RuntimeError as error:
            return f"OpenVINO cannot read it: {_cause(error)}"
        return None

    def available(self) -> str | None:
        try:
            import openvino as ov
        except ImportError:
            return "openvino is not installed: pip install .[openvino]"
        if self.precision == "bf16":
            capabilities = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
            if "BF16" not in capabilities:
                return "this CPU has no bfloat16 support (OpenVINO's CPU plugin lists no BF16 capability)"
        return None

    def load(self, path: Path, options: Any) -> _OpenvinoSession:
        return _OpenvinoSession(path, options.resolved_threads, options.denormal_as_zero, self.precision)


def save_ir(onnx_path: Path, out_dir: Path) -> Path:
    """The ONNX model as OpenVINO IR (`model.xml` + `model.bin`, weights kept as they are) in `out_dir`."""
    import openvino as ov

    out_dir.mkdir(parents=True, exist_ok=True)
    ov.save_model(ov.convert_model(str(onnx_path)), str(out_dir / IR_MODEL), compress_to_fp16=False)
    return out_dir / IR_MODEL
