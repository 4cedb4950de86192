"""What machine and library versions produced a result: recorded in manifests and reports."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

# CPU flags that decide which int8/fp16 kernels a runtime can use.
RELEVANT_FLAGS = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_int8",
    "amx_bf16",
    "asimd",
    "asimddp",
    "sve",
    "i8mm",
)
PACKAGES = (
    "edgepipe",
    "torch",
    "transformers",
    "onnx",
    "onnxruntime",
    "onnxruntime-gpu",
    "numpy",
    "tensorrt",
    "openvino",
    "nncf",
    "executorch",
)


def _cpuinfo() -> tuple[str, list[str]]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "Model") and value.strip():
                model = value.strip()
            elif key in ("flags", "Features"):
                flags.update(value.split())
    except OSError:
        pass
    return model, sorted(f for f in RELEVANT_FLAGS if f in flags)


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def git_commit() -> str | None:
    """The edgepipe source commit (with `-dirty` when modified), or None outside a checkout."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}-dirty" if dirty else commit


def host_info() -> dict[str, Any]:
    model, flags = _cpuinfo()
    try:
        import psutil

        memory_gb = round(psutil.virtual_memory().total / 2**30, 1)
        physical = psutil.cpu_count(logical=False)
    except ImportError:  # pragma: no cover
        memory_gb, physical = None, None
    return {
        "hostname": platform.node(),
        "os": f"{platform.system()} {platform.release()}",
        "arch": platform.machine(),
        "cpu": model,
        "cpu_flags": flags,
        "logical_cores": os.cpu_count(),
        "physical_cores": physical,
        "memory_gb": memory_gb,
        "gpu": None,  # filled by GPU backends when one is present
    }
