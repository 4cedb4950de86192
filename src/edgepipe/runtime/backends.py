"""Backends share one protocol and a registry by name.

Each backend says why it cannot run here (`available()`), loads an artifact folder into a `Session`
and describes the settings it ran with, so reports record the execution provider, threads and
optimization level actually used. Heavy or optional libraries are imported inside the backend.
"""

from __future__ import annotations

import functools
import inspect
import os
import shutil
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


# onnxruntime 1.32's CPU SkipLayerNormalization kernel ran slower here than the Add + LayerNormalization it
# replaces (289 vs 42 us at 1x128x384 on one thread, 150 vs 49 on two: benchmarks/bench_int8.py), and ORT
# fuses that pair itself when a session is created, whatever the file holds. CPU sessions therefore leave
# the pair unfused: on the demo student fused fp32 went 4.74 -> 4.07 ms and int8-dynamic 3.01 -> 2.30 ms
# at b1 s128 (benchmarks/RESULTS.md).
CPU_DISABLED_OPTIMIZERS = ("SkipLayerNormFusion",)


@dataclass(frozen=True)
class RuntimeOptions:
    threads: int | None = None  # intra-op threads; None = physical cores
    optimization: str = "all"  # ORT graph optimization level: disable | basic | extended | all
    # Flush denormals to zero in ORT's thread pool. Padded positions drive exp() in Softmax and the
    # int8 attention path into the denormal range, where x86 arithmetic is ~10x slower: on MiniLM at
    # b1 s128 with a short sentence this took int8-dynamic from 10.6 to 7.9 ms (benchmarks/RESULTS.md).
    denormal_as_zero: bool = True
    cpu_disabled_optimizers: tuple[str, ...] = CPU_DISABLED_OPTIMIZERS  # ORT graph optimizers off on CPU

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
    @property
    def name(self) -> str: ...

    @property
    def engine(self) -> str: ...

    @property
    def target(self) -> str: ...  # cpu | cuda

    @property
    def model_format(self) -> str: ...  # "onnx" or "torch" (a transformers or edgepipe module folder)

    def refuses(self, folder: Path) -> str | None: ...  # why it cannot load this artifact folder, or None

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


def ort_cpu_session(model: Path | bytes, options: RuntimeOptions, so: Any = None) -> Any:
    """An onnxruntime CPU InferenceSession with `options` (or the given SessionOptions) and their
    disabled optimizers."""
    import onnxruntime as ort

    return ort.InferenceSession(
        model if isinstance(model, bytes) else str(model),
        so or ort_session_options(options),
        providers=["CPUExecutionProvider"],
        disabled_optimizers=list(options.cpu_disabled_optimizers),
    )


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


def model_file(folder: Path) -> Path:
    """The ONNX Runtime model of an artifact folder: model.onnx, or model.ort (ORT format)."""
    if folder.is_file():
        return folder
    onnx_file = folder / "model.onnx"
    return onnx_file if onnx_file.exists() or not (folder / "model.ort").exists() else folder / "model.ort"


class _OrtSession:
    def __init__(
        self, path: Path, options: RuntimeOptions, provider: str, provider_options: dict[str, Any] | None = None
    ) -> None:
        import onnxruntime as ort

        set_caller_denormals(options.denormal_as_zero)
        so = ort_session_options(options)
        if not path.is_file():
            raise InputError(f"ONNX model not found: {path}; rebuild the run with `edgepipe build --force`")
        providers: list[Any] = [(provider, provider_options or {})]
        if provider != "CPUExecutionProvider":
            providers.append("CPUExecutionProvider")  # for the nodes the accelerator does not take
        try:
            disabled = list(options.cpu_disabled_optimizers) if provider == "CPUExecutionProvider" else []
            self._session = ort.InferenceSession(str(path), so, providers=providers, disabled_optimizers=disabled)
        except Exception as error:  # ORT raises its own pybind exception types
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise InputError(
                f"{path} is not a valid ONNX model ({first}); rebuild it with `edgepipe build --force`"
            ) from None
        self.input_names = tuple(i.name for i in self._session.get_inputs())
        self._settings = {
            "providers": self._session.get_providers(),
            "provider_options": self._session.get_provider_options().get(provider, {}),
            "model_file": path.name,
            "intra_op_threads": options.resolved_threads,
            "graph_optimization": options.optimization,
            "denormal_as_zero": options.denormal_as_zero,
            "disabled_optimizers": disabled,
            "onnxruntime": ort.__version__,
        }

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self._session.run(None, {k: feeds[k] for k in self.input_names})[0]

    def describe(self) -> dict[str, Any]:
        return dict(self._settings)


@dataclass(frozen=True)
class OrtBackend:
    """onnxruntime with one execution provider (plus CPU for the nodes an accelerator does not take)."""

    name: str
    provider: str
    target: str
    install: str
    engine: str = "onnxruntime"
    model_format: str = "onnx"

    def refuses(self, folder: Path) -> str | None:
        if (folder / "model.onnx").is_file() or (folder / "model.ort").is_file():
            return None
        return "onnxruntime reads model.onnx or model.ort (this folder holds another engine's format)"

    def available(self) -> str | None:
        try:
            import onnxruntime as ort
        except ImportError:
            return "onnxruntime is not installed: pip install onnxruntime"
        if self.provider not in ort.get_available_providers():
            return f"this onnxruntime build has no {self.provider} ({self.install})"
        return None

    def provider_options(self, folder: Path) -> dict[str, Any]:
        if self.provider != "TensorrtExecutionProvider":
            return {}
        import onnx

        from edgepipe.runtime.tensorrt import profile_shapes

        # engines built once and cached beside the model (the first load builds for minutes); fp16 where
        # TensorRT finds it faster (a QDQ model runs its int8 kernels either way); one profile covering
        # batch 1-8 and sequences up to 128, so changing shapes do not rebuild the engine
        model = model_file(folder)
        graph = onnx.load(str(model), load_external_data=False).graph
        dims = {i.name: tuple(d.dim_value or -1 for d in i.type.tensor_type.shape.dim) for i in graph.input}
        shapes = profile_shapes(dims, [1, 8], [1, 128])

        def spec(which: int) -> str:
            return ",".join(f"{name}:{'x'.join(map(str, s[which]))}" for name, s in shapes.items())

        return {
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(model.parent / "trt-ep-cache"),
            "trt_timing_cache_enable": True,
            "trt_fp16_enable": True,
            "trt_profile_min_shapes": spec(0),
            "trt_profile_opt_shapes": spec(1),
            "trt_profile_max_shapes": spec(2),
        }

    def load(self, path: Path, options: RuntimeOptions) -> Session:
        return _OrtSession(model_file(path), options, self.provider, self.provider_options(path))


OrtCpuBackend = functools.partial(OrtBackend, "ort-cpu", "CPUExecutionProvider", "cpu", "pip install onnxruntime")


class _TorchSession:
    """A transformers folder or module folder in PyTorch eager (optionally torch.compile), CPU or CUDA.

    `run` takes numpy feeds and returns numpy logits, so on CUDA it includes the host-to-device copy
    and the synchronising copy back; `run_on_device` times the model alone on inputs already there."""

    def __init__(self, path: Path, options: RuntimeOptions, device: str, dtype: str, compile: bool) -> None:
        import torch

        from edgepipe.runtime.modules import is_module_folder, load_module

        torch.set_num_threads(options.resolved_threads)
        set_caller_denormals(options.denormal_as_zero)  # the same floating-point mode as the ORT sessions
        self._torch = torch
        self.device, self._dtype = device, getattr(torch, dtype)
        self._settings: dict[str, Any] = {
            "device": device if device == "cpu" else f"{device} ({torch.cuda.get_device_name()})",
            "dtype": dtype,
            "compile": compile,
            "threads": options.resolved_threads,
            "torch": torch.__version__,
        }
        self._module = is_module_folder(path)
        if self._module:
            model = load_module(path)
            self.input_names: tuple[str, ...] = ("pixel_values",)
            self._settings["module"] = type(model).__name__
        else:
            from edgepipe.runtime.text import load_text_model

            model = load_text_model(path)
            forward_args = inspect.signature(model.forward).parameters
            self.input_names = tuple(n for n in ("input_ids", "attention_mask", "token_type_ids") if n in forward_args)
            self._settings["attn_implementation"] = model.config._attn_implementation
        model = model.to(device=device, dtype=self._dtype)
        self._model = torch.compile(model, dynamic=True) if compile else model

    def to_device(self, feeds: dict[str, np.ndarray]) -> dict[str, Any]:
        torch = self._torch
        tensors = {k: torch.from_numpy(feeds[k]).to(self.device) for k in self.input_names if k in feeds}
        if self._module:  # pixel values in the model's dtype; token ids stay int64
            tensors = {k: v.to(self._dtype) for k, v in tensors.items()}
        return tensors

    def run_on_device(self, tensors: dict[str, Any]) -> Any:
        with self._torch.inference_mode():
            if self._module:  # a module takes its one tensor positionally
                return self._model(tensors[self.input_names[0]])
            return self._model(**tensors).logits

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self.run_on_device(self.to_device(feeds)).float().cpu().numpy()

    def describe(self) -> dict[str, Any]:
        return dict(self._settings)


@dataclass(frozen=True)
class TorchBackend:
    name: str
    target: str  # cpu | cuda
    dtype: str = "float32"
    compile: bool = False
    engine: str = "pytorch"
    model_format: str = "torch"

    def refuses(self, folder: Path) -> str | None:
        return None

    def available(self) -> str | None:
        try:
            import torch
        except ImportError:
            return "torch is not installed: pip install torch==2.13.0"
        if self.target == "cuda" and not torch.cuda.is_available():
            return f"torch {torch.__version__} sees no CUDA GPU (a CUDA build of torch and a GPU are needed)"
        if self.dtype == "bfloat16" and self.target == "cuda" and not torch.cuda.is_bf16_supported():
            return "this GPU has no bfloat16 support"
        if self.compile and not (shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")):
            return "torch.compile (inductor) needs a C compiler on PATH"
        return None

    def load(self, path: Path, options: RuntimeOptions) -> Session:
        return _TorchSession(path, options, self.target, self.dtype, self.compile)


TorchCpuBackend = functools.partial(TorchBackend, "torch", "cpu")


@dataclass(frozen=True)
class TorchTensorrtBackend:
    """torch-tensorrt: the PyTorch model compiled by TensorRT (dynamo), fp16 enabled, from the torch folder."""

    name: str = "torch-tensorrt"
    engine: str = "torch-tensorrt"
    target: str = "cuda"
    model_format: str = "torch"

    def refuses(self, folder: Path) -> str | None:
        return None

    def available(self) -> str | None:
        try:
            import torch_tensorrt  # noqa: F401
        except ImportError:
            return "torch-tensorrt is not installed (pip install torch-tensorrt matching torch 2.13)"
        from edgepipe.runtime.tensorrt import _cuda_reason

        return _cuda_reason()

    def load(self, path: Path, options: Any) -> Any:
        import torch
        import torch_tensorrt

        from edgepipe.runtime.modules import is_module_folder, read_module_meta

        session = _TorchSession(path, options, "cuda", "float32", compile=False)
        if is_module_folder(path):
            shape = tuple(read_module_meta(path)["input"]["shape"])
            inputs = [torch_tensorrt.Input(min_shape=(1, *shape), opt_shape=(8, *shape), max_shape=(8, *shape))]
        else:  # token ids, attention mask (and token types): (batch, sequence) int64, up to 8 x 128
            inputs = [
                torch_tensorrt.Input(min_shape=(1, 1), opt_shape=(8, 128), max_shape=(8, 128), dtype=torch.int64)
                for _ in session.input_names
            ]
        session._model = torch_tensorrt.compile(
            session._model, ir="dynamo", inputs=inputs, enabled_precisions={torch.float16, torch.float32}
        )
        return session


def _registry() -> dict[str, Backend]:
    from edgepipe.runtime.openvino_backend import OpenvinoBackend
    from edgepipe.runtime.tensorrt import TensorrtBackend

    backends: list[Backend] = [
        OrtCpuBackend(),
        TorchCpuBackend(),
        OpenvinoBackend(),
        OpenvinoBackend("openvino-bf16", "bf16"),
        OrtBackend("ort-cuda", "CUDAExecutionProvider", "cuda", "pip install .[gpu]: onnxruntime-gpu"),
        OrtBackend("ort-tensorrt", "TensorrtExecutionProvider", "cuda", "onnxruntime-gpu built with TensorRT"),
        TensorrtBackend(),
        TorchTensorrtBackend(),
        TorchBackend("torch-compile", "cpu", compile=True),
        TorchBackend("torch-cuda", "cuda"),
        TorchBackend("torch-cuda-fp16", "cuda", "float16"),
        TorchBackend("torch-cuda-bf16", "cuda", "bfloat16"),
    ]
    return {b.name: b for b in backends}


BACKENDS: dict[str, Backend] = _registry()
# what a target runs by default, per model format (the rest run when `bench.engines` names them)
DEFAULT_BACKENDS = {
    ("onnx", "cpu"): "ort-cpu",
    ("torch", "cpu"): "torch",
    ("onnx", "cuda"): "ort-cuda",
    ("torch", "cuda"): "torch-cuda",
}


# the distribution behind each `Backend.engine`, for `edgepipe engines` (read without importing it)
_DISTRIBUTIONS = {
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
    "pytorch": ("torch",),
    "openvino": ("openvino",),
    "tensorrt": ("tensorrt", "tensorrt-cu12"),
    "torch-tensorrt": ("torch-tensorrt", "torch_tensorrt"),
}


def engine_version(engine: str) -> str | None:
    """The installed version of an engine's library, or None."""
    from importlib import metadata

    for distribution in _DISTRIBUTIONS.get(engine, ()):
        try:
            return metadata.version(distribution)
        except metadata.PackageNotFoundError:
            continue
    return None


def get_backend(name: str) -> Backend:
    backend = BACKENDS.get(name)
    if backend is None:
        raise BackendUnavailableError(f"unknown backend {name!r}; known: {sorted(BACKENDS)}")
    reason = backend.available()
    if reason:
        raise BackendUnavailableError(f"backend {name!r} cannot run here: {reason}")
    return backend


def default_backend(model_format: str, target: str, folder: Path | None = None) -> str | None:
    """The target's default backend for the format; for a folder it refuses (an OpenVINO IR on the CPU),
    the first registered backend of that target that is available and reads it."""
    name = DEFAULT_BACKENDS.get((model_format, target))
    if name is None or folder is None or BACKENDS[name].refuses(folder) is None:
        return name
    for other, backend in BACKENDS.items():
        fits = backend.model_format == model_format and backend.target == target
        if fits and backend.available() is None and backend.refuses(folder) is None:
            return other
    return name


def backend_for(model_format: str, target: str, folder: Path | None = None) -> Backend:
    name = default_backend(model_format, target, folder)
    if name is None:
        raise BackendUnavailableError(f"no backend runs {model_format} models on {target}")
    return get_backend(name)
