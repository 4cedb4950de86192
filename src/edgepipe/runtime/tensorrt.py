"""Native TensorRT engines from ONNX, and torch-tensorrt from the PyTorch model.

`build_engine` parses the ONNX model with TensorRT's ONNX parser and builds a serialized engine:
- int8 only by explicit quantization: a QDQ model (the static quantize stage with the `tensorrt`
  preset) carries its own scales and TensorRT fuses the Q/DQ pairs into int8 kernels. TensorRT 10
  deprecated and 11 removed the implicit-int8 calibrators, so there is no calibrator here;
- fp16 where asked (`BuilderFlag.FP16`: TensorRT picks fp16 kernels where they are faster);
- one optimization profile per dynamic input, min/opt/max shapes from the recipe's batch sizes and
  sequence lengths (`profile_shapes`);
- a timing cache persisted beside the engines, so a rebuild skips the kernel timing it already did.
An engine only runs on the TensorRT version and GPU it was built with: its file is named by the hash
of the ONNX model and build settings plus the TensorRT version and GPU (`engine_name`), a JSON sidecar
records them, and `check_engine` refuses a mismatch with a message saying what differs.

Nothing here imports TensorRT at module level: `edgepipe --help`, `validate` and the CPU tests run
without it. What needs no GPU (profile shapes, naming, the mismatch check) is tested on CPU; the
rest runs where `tensorrt` and a CUDA GPU are present (`make test-gpu`).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgepipe.errors import BackendUnavailableError, InputError

Shape = tuple[int, ...]


@dataclass(frozen=True)
class EngineSpec:
    fp16: bool = True
    int8: bool = False  # set when the ONNX model is QDQ (explicit quantization); never calibrated here
    workspace_mb: int = 4096
    profiles: dict[str, tuple[Shape, Shape, Shape]] = field(default_factory=dict)  # name -> (min, opt, max)


def profile_shapes(
    inputs: dict[str, Shape], batch_sizes: list[int], seq_lens: list[int]
) -> dict[str, tuple[Shape, Shape, Shape]]:
    """min/opt/max per input from the shapes the recipe times; -1 marks a dynamic axis in `inputs`.

    Axis 0 is the batch, axis 1 (text) the sequence; opt is the largest batch and sequence timed,
    since TensorRT tunes kernels for opt and larger shapes dominate throughput."""
    shapes = {}
    for name, shape in inputs.items():
        low, opt, high = list(shape), list(shape), list(shape)
        for axis, size in enumerate(shape):
            if size != -1:
                continue
            values = batch_sizes if axis == 0 else seq_lens
            low[axis], opt[axis], high[axis] = min(values), max(values), max(values)
        shapes[name] = (tuple(low), tuple(opt), tuple(high))
    return shapes


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def engine_name(onnx_path: Path, spec: EngineSpec, trt_version: str, gpu: str) -> str:
    """`<hash of model + settings>-trt<version>-<gpu>.engine`: a new model, setting, TensorRT or GPU
    gives a new file, never a stale engine."""
    digest = hashlib.sha256(onnx_path.read_bytes())
    digest.update(json.dumps(asdict(spec), sort_keys=True).encode())
    return f"{digest.hexdigest()[:16]}-trt{trt_version}-{_slug(gpu)}.engine"


def check_engine(engine_path: Path, trt_version: str, gpu: str) -> dict[str, Any]:
    """The engine's sidecar metadata, or InputError when it was built for another TensorRT or GPU."""
    meta_path = engine_path.with_suffix(".json")
    if not engine_path.is_file() or not meta_path.is_file():
        raise InputError(f"{engine_path} (and its .json) not found; build the engine with `edgepipe build`")
    meta = dict(json.loads(meta_path.read_text(encoding="utf-8")))
    differs = [
        f"{what}: built with {meta.get(key)!r}, this machine has {mine!r}"
        for what, key, mine in (("TensorRT", "tensorrt", trt_version), ("GPU", "gpu", gpu))
        if meta.get(key) != mine
    ]
    if differs:
        raise InputError(
            f"{engine_path.name} cannot run here ({'; '.join(differs)}): TensorRT engines are tied to the "
            "version and GPU that built them; rebuild it on this machine from the ONNX model"
        )
    return meta


def _trt() -> Any:
    try:
        import tensorrt as trt
    except ImportError:
        raise BackendUnavailableError("tensorrt is not installed: pip install .[gpu] (tensorrt>=10)") from None
    return trt


def build_engine(onnx_path: Path, spec: EngineSpec, out_dir: Path) -> Path:
    """Build (or reuse) the engine for `onnx_path`; returns its path inside `out_dir`."""
    import torch

    trt = _trt()
    gpu = torch.cuda.get_device_name()
    engine_path = out_dir / engine_name(onnx_path, spec, trt.__version__, gpu)
    if engine_path.is_file():
        check_engine(engine_path, trt.__version__, gpu)
        return engine_path
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise InputError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, spec.workspace_mb << 20)
    if spec.fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if spec.int8:
        config.set_flag(trt.BuilderFlag.INT8)  # the Q/DQ nodes carry the scales (explicit quantization)
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in spec.profiles.items():
        profile.set_shape(name, low, opt, high)
    config.add_optimization_profile(profile)
    cache_path = out_dir / "timing.cache"
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise InputError(f"TensorRT failed to build an engine for {onnx_path} (see its log above)")
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = engine_path.with_suffix(".partial")
    tmp.write_bytes(bytes(serialized))
    tmp.replace(engine_path)
    cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    meta = {"tensorrt": trt.__version__, "gpu": gpu, "onnx": str(onnx_path), "spec": asdict(spec)}
    engine_path.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return engine_path


class _TensorrtSession:
    """Runs an engine on torch CUDA buffers: `run` includes the host-device copies, `run_on_device` not."""

    def __init__(self, engine_path: Path) -> None:
        import torch

        trt = _trt()
        check_engine(engine_path, trt.__version__, torch.cuda.get_device_name())
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
        self._context = self._engine.create_execution_context()
        self._torch, self._trt = torch, trt
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.input_names = tuple(n for n in names if self._engine.get_tensor_mode(n) == mode)
        self._output = next(n for n in names if self._engine.get_tensor_mode(n) != mode)
        self.device = "cuda"
        self._settings = {"engine": engine_path.name, "tensorrt": trt.__version__}

    def to_device(self, feeds: dict[str, np.ndarray]) -> dict[str, Any]:
        return {k: self._torch.from_numpy(feeds[k]).cuda() for k in self.input_names}

    def run_on_device(self, tensors: dict[str, Any]) -> Any:
        torch = self._torch
        for name, tensor in tensors.items():
            self._context.set_input_shape(name, tuple(tensor.shape))
            self._context.set_tensor_address(name, tensor.data_ptr())
        shape = tuple(self._context.get_tensor_shape(self._output))
        output = torch.empty(shape, dtype=torch.float32, device="cuda")
        self._context.set_tensor_address(self._output, output.data_ptr())
        stream = torch.cuda.current_stream()
        self._context.execute_async_v3(stream.cuda_stream)
        return output

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self.run_on_device(self.to_device(feeds)).cpu().numpy()

    def describe(self) -> dict[str, Any]:
        return dict(self._settings)


def _cuda_reason() -> str | None:
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    return None if torch.cuda.is_available() else "no CUDA GPU visible to torch"


@dataclass(frozen=True)
class TensorrtBackend:
    """Native TensorRT: the artifact's ONNX model built into an engine (cached in the artifact folder)."""

    name: str = "tensorrt"
    engine: str = "tensorrt"
    target: str = "cuda"
    model_format: str = "onnx"

    def refuses(self, folder: Path) -> str | None:
        return None if (folder / "model.onnx").is_file() else "TensorRT reads model.onnx, not the ORT format"

    def available(self) -> str | None:
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            return "tensorrt is not installed (pip install .[gpu]: tensorrt>=10)"
        return _cuda_reason()

    def load(self, path: Path, options: Any) -> Any:
        import onnx

        model = path / "model.onnx"
        graph = onnx.load(str(model), load_external_data=False).graph
        dims = {i.name: tuple(d.dim_value or -1 for d in i.type.tensor_type.shape.dim) for i in graph.input}
        quantized = any(n.op_type == "QuantizeLinear" for n in graph.node)
        spec = EngineSpec(fp16=True, int8=quantized, profiles=profile_shapes(dims, [1, 8], [128]))
        return _TensorrtSession(build_engine(model, spec, path / "tensorrt"))
