"""Backends share one protocol and a registry by name.

Each backend says why it cannot run here (`available()`), loads an artifact folder into a `Session`
and describes the settings it ran with, so reports record the execution provider, threads and
optimization level actually used. Heavy or optional libraries are imported inside the backend.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edgepipe.errors import BackendUnavailableError, InputError


def physical_cores() -> int:
    try:
        import psutil

        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:  # pragma: no cover - psutil is a dependency
        return os.cpu_count() or 1


@dataclass(frozen=True)
class RuntimeOptions:
    threads: int | None = None  # intra-op threads; None = physical cores
    optimization: str = "all"  # ORT graph optimization level: disable | basic | extended | all
    # Flush denormals to zero in ORT's thread pool. Padded positions drive exp() in Softmax and the
    # int8 attention path into the denormal range, where x86 arithmetic is ~10x slower: on MiniLM at
    # b1 s128 with a short sentence this took int8-dynamic from 10.6 to 7.9 ms (benchmarks/RESULTS.md).
    denormal_as_zero: bool = True

    @property
    def resolved_threads(self) -> int:
        return self.threads or physical_cores()


class Session(Protocol):
    input_names: tuple[str, ...]

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """Logits for a batch of feeds (int64 token ids, or float32 pixel values)."""
        ...

    def describe(self) -> dict[str, Any]: ...


class Backend(Protocol):
    name: str
    engine: str
    target: str
    model_format: str  # "onnx" or "torch" (a transformers folder or an edgepipe module folder)

    def available(self) -> str | None: ...

    def load(self, path: Path, options: RuntimeOptions) -> Session: ...


_ORT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED"}


def ort_session_options(options: RuntimeOptions) -> Any:
    """onnxruntime SessionOptions for `options`: threads, optimization level, denormals."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = options.resolved_threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = getattr(
        ort.GraphOptimizationLevel, _ORT_LEVELS.get(options.optimization, "ORT_ENABLE_ALL")
    )
    so.log_severity_level = 3
    so.add_session_config_entry("session.set_denormal_as_zero", "1" if options.denormal_as_zero else "0")
    return so


def set_caller_denormals(flush: bool) -> None:
    """Flush-to-zero / denormals-are-zero on the calling thread, which runs part of every ORT call.

    onnxruntime applies `session.set_denormal_as_zero` to its pool threads for every session, but to the
    calling thread only for the first session created in the process (a `call_once`). Whatever ran first
    (a parity check, onnxruntime.quantization's calibration or pre-processing, all with default options)
    therefore decided it for every later session: fp32 ran 24% and static int8 29% slower after
    quantization had run in the same process (benchmarks/RESULTS.md). Set it on the thread explicitly.
    """
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return
    torch.set_flush_denormal(flush)


class _OrtSession:
    def __init__(self, path: Path, options: RuntimeOptions, provider: str) -> None:
        import onnxruntime as ort

        set_caller_denormals(options.denormal_as_zero)
        so = ort_session_options(options)
        if not path.is_file():
            raise InputError(f"ONNX model not found: {path}; rebuild the run with `edgepipe build --force`")
        try:
            self._session = ort.InferenceSession(str(path), so, providers=[provider])
        except Exception as error:  # ORT raises its own pybind exception types
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise InputError(
                f"{path} is not a valid ONNX model ({first}); rebuild it with `edgepipe build --force`"
            ) from None
        self.input_names = tuple(i.name for i in self._session.get_inputs())
        self._settings = {
            "providers": self._session.get_providers(),
            "intra_op_threads": options.resolved_threads,
            "graph_optimization": options.optimization,
            "denormal_as_zero": options.denormal_as_zero,
            "onnxruntime": ort.__version__,
        }

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self._session.run(None, {k: feeds[k] for k in self.input_names})[0]

    def describe(self) -> dict[str, Any]:
        return dict(self._settings)


class OrtCpuBackend:
    name = "ort-cpu"
    engine = "onnxruntime"
    target = "cpu"
    model_format = "onnx"

    def available(self) -> str | None:
        try:
            import onnxruntime as ort
        except ImportError:
            return "onnxruntime is not installed: pip install onnxruntime"
        if "CPUExecutionProvider" not in ort.get_available_providers():
            return "this onnxruntime build has no CPUExecutionProvider"
        return None

    def load(self, path: Path, options: RuntimeOptions) -> Session:
        model = path / "model.onnx" if path.is_dir() else path
        return _OrtSession(model, options, "CPUExecutionProvider")


class _TorchSession:
    def __init__(self, path: Path, options: RuntimeOptions) -> None:
        import torch

        from edgepipe.runtime.modules import is_module_folder, load_module

        torch.set_num_threads(options.resolved_threads)
        set_caller_denormals(options.denormal_as_zero)  # the same floating-point mode as the ORT sessions
        self._torch = torch
        self._settings: dict[str, Any] = {
            "device": "cpu",
            "dtype": "float32",
            "threads": options.resolved_threads,
            "torch": torch.__version__,
        }
        self._module = is_module_folder(path)
        if self._module:
            self._model = load_module(path)
            self.input_names: tuple[str, ...] = ("pixel_values",)
            self._settings["module"] = type(self._model).__name__
            return
        from edgepipe.runtime.text import load_text_model

        self._model = load_text_model(path)
        forward_args = inspect.signature(self._model.forward).parameters
        self.input_names = tuple(n for n in ("input_ids", "attention_mask", "token_type_ids") if n in forward_args)
        self._settings["attn_implementation"] = self._model.config._attn_implementation

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            if self._module:  # a module takes its one tensor positionally
                return self._model(torch.from_numpy(feeds[self.input_names[0]])).numpy()
            inputs = {k: torch.from_numpy(feeds[k]) for k in self.input_names if k in feeds}
            return self._model(**inputs).logits.numpy()

    def describe(self) -> dict[str, Any]:
        return dict(self._settings)


class TorchCpuBackend:
    name = "torch"
    engine = "pytorch"
    target = "cpu"
    model_format = "torch"

    def available(self) -> str | None:
        try:
            import torch  # noqa: F401
        except ImportError:
            return "torch is not installed: pip install torch==2.13.0"
        return None

    def load(self, path: Path, options: RuntimeOptions) -> Session:
        return _TorchSession(path, options)


BACKENDS: dict[str, Backend] = {b.name: b for b in (OrtCpuBackend(), TorchCpuBackend())}


def get_backend(name: str) -> Backend:
    backend = BACKENDS.get(name)
    if backend is None:
        raise BackendUnavailableError(f"unknown backend {name!r}; known: {sorted(BACKENDS)}")
    reason = backend.available()
    if reason:
        raise BackendUnavailableError(f"backend {name!r} cannot run here: {reason}")
    return backend


def backend_for(model_format: str, target: str) -> Backend:
    for backend in BACKENDS.values():
        if backend.model_format == model_format and backend.target == target:
            return get_backend(backend.name)
    raise BackendUnavailableError(f"no backend runs {model_format} models on {target}")
