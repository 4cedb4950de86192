"""Calibration data for static quantization: an iterable of feed dicts with a length and a fingerprint.

This is the only thing quantizers see of the data (as onnxruntime's `CalibrationDataReader`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import numpy as np


class CalibrationSet:
    def __init__(
        self,
        texts: list[str],
        tokenizer: Any,
        input_names: tuple[str, ...],
        batch_size: int,
        max_seq_len: int,
        fixed_length: bool = False,
    ) -> None:
        """`fixed_length` pads every batch to `max_seq_len` instead of to its longest text: the histogram
        calibrators (entropy, percentile) stack activations across batches and need equal shapes."""
        self.texts = texts
        self.fixed_length = fixed_length
        self.tokenizer = tokenizer
        self.input_names = input_names
        self.batch_size = batch_size
        self.max_seq_len = max_seq_len

    def __len__(self) -> int:
        return -(-len(self.texts) // self.batch_size)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for i in range(0, len(self.texts), self.batch_size):
            enc = self.tokenizer(
                self.texts[i : i + self.batch_size],
                padding="max_length" if self.fixed_length else "longest",
                truncation=True,
                max_length=self.max_seq_len,
                return_tensors="np",
            )
            yield {n: np.asarray(enc[n], dtype=np.int64) for n in self.input_names}

    @property
    def fingerprint(self) -> str:
        padding = ":fixed-length" if self.fixed_length else ""
        digest = hashlib.sha256(f"{self.batch_size}:{self.max_seq_len}:{self.input_names}{padding}".encode())
        for text in self.texts:
            digest.update(text.encode() + b"\n")
        return digest.hexdigest()[:16]


class ImageCalibrationSet:
    """Real images in batches, fed as `input_name` (float32, already scaled like the training data)."""

    def __init__(self, images: np.ndarray, input_name: str, batch_size: int) -> None:
        # Histogram calibrators stack activations across batches: every batch has the same size, so a
        # last partial batch is dropped (unless it is the only one).
        self.batch_size = min(batch_size, len(images))
        usable = len(images) - len(images) % self.batch_size
        self.images = np.ascontiguousarray(images[:usable], dtype=np.float32)
        self.input_name = input_name

    def __len__(self) -> int:
        return len(self.images) // self.batch_size

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for i in range(0, len(self.images), self.batch_size):
            yield {self.input_name: self.images[i : i + self.batch_size]}

    @property
    def fingerprint(self) -> str:
        digest = hashlib.sha256(f"{self.batch_size}:{self.input_name}:{self.images.shape}".encode())
        digest.update(self.images.tobytes())
        return digest.hexdigest()[:16]


def ort_reader(calibration: CalibrationSet | ImageCalibrationSet) -> Any:
    """Adapt a `CalibrationSet` to onnxruntime's `CalibrationDataReader`."""
    from onnxruntime.quantization import CalibrationDataReader

    from edgepipe.progress import bar

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.rewind()

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

        def rewind(self) -> None:
            self._it = iter(bar(calibration, desc="calibrate", total=len(calibration), unit="batch"))

        def __len__(self) -> int:
            return len(calibration)

    return _Reader()
