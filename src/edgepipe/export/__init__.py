"""Export: PyTorch -> ONNX with per-task specs, parity checks against PyTorch, transformer fusion."""

from edgepipe.export.onnx_export import (
    ExportSpec,
    ParityResult,
    check_parity,
    export_onnx,
    fuse_transformer,
    spec_for,
)

__all__ = ["ExportSpec", "ParityResult", "check_parity", "export_onnx", "fuse_transformer", "spec_for"]
