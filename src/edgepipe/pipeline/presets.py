"""int8 presets per target, and `auto` selection from the CPU flags (no torch, no onnxruntime).

A preset fills the quantize settings the recipe leaves unset; keys the recipe sets explicitly win.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    activation_type: str
    weight_type: str
    per_channel: bool
    reduce_range: bool
    symmetric_activations: bool
    why: str
    # how a transformer's static QDQ graph is prepared: "fused-mha" = onnxruntime's fusion with
    # MultiHeadAttention (the runtime's own contrib ops); "source" = the export as is
    graph: str = "fused-mha"


PRESETS: dict[str, Preset] = {
    # VNNI (vpdpbusd) multiplies u8 x s8 and accumulates in int32 without an int16 step: the full 8-bit
    # range is safe, so no reduce_range; u8 activations because that is the operand order VNNI takes.
    "ort-cpu-vnni": Preset("uint8", "int8", True, False, False, "x86 with AVX512-VNNI or AVX-VNNI"),
    # AVX2 / AVX-512 without VNNI go through vpmaddubsw, which adds u8 x s8 pairs into int16 and can
    # saturate; 7-bit weights (reduce_range) keep the pair sums in range, as onnxruntime's docs advise.
    "ort-cpu-avx2": Preset("uint8", "int8", True, True, False, "x86 with AVX2, no VNNI"),
    # ARM64 (NEON sdot/udot, i8mm) runs u8 x s8 in full range; per-channel weights keep accuracy.
    "ort-arm64": Preset("uint8", "int8", True, False, False, "ARM64 (phones, Jetson CPU, Graviton)"),
    # TensorRT's explicit quantization takes symmetric int8 only (zero point 0) for activations and
    # weights, per-channel weights; it fuses the Q/DQ pairs into its int8 kernels. The plain graph:
    # TensorRT's ONNX parser does not take onnxruntime's com.microsoft fused ops, and fuses attention itself.
    "tensorrt": Preset("int8", "int8", True, False, True, "NVIDIA TensorRT (explicit QDQ)", graph="source"),
}
PRESET_NAMES = ("auto", *PRESETS)


def select_preset(cpu_flags: list[str] | set[str], machine: str | None = None, target: str = "cpu") -> str:
    """The preset for a target: tensorrt for GPUs, else from the CPU architecture and flags."""
    if target in ("cuda", "tensorrt"):
        return "tensorrt"
    arch = (machine or platform.machine()).lower()
    if arch in ("arm64", "aarch64"):
        return "ort-arm64"
    flags = {f.lower() for f in cpu_flags}
    if flags & {"avx512_vnni", "avx_vnni", "avx512vnni", "avxvnni"}:
        return "ort-cpu-vnni"
    return "ort-cpu-avx2"
