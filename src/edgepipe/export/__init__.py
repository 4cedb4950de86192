"""Export: PyTorch -> ONNX with per-task specs, parity checks against PyTorch, transformer fusion."""

from edgepipe.export.onnx_export import (
    ExportSpec,
    Feeds,
    ParityResult,
    check_parity,
    export_onnx,
    fuse_transformer,
    image_feeds,
    spec_for,
    text_feeds,
)

__all__ = [
    "ExportSpec",
    "Feeds",
    "ParityResult",
    "check_parity",
    "export_onnx",
    "fuse_transformer",
    "image_feeds",
    "spec_for",
    "text_feeds",
]
