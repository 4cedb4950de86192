"""CUDA paths (skipped without a GPU, with the reason; `make test-gpu` runs them): the torch CUDA
backends agree with the CPU, fp16/bf16 stay close, CUDA-event timing measures the device."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgepipe.benchmarks.harness import cuda_event_ms
from edgepipe.runtime.predictor import Predictor

pytestmark = pytest.mark.cuda
TEXTS = ["a gripping, beautifully shot film", "dull and far too long", "the cast does what it can"]


@pytest.mark.parametrize(
    ("backend", "atol"), [("torch-cuda", 1e-4), ("torch-cuda-fp16", 2e-2), ("torch-cuda-bf16", 1e-1)]
)
def test_torch_cuda_backends_agree_with_the_cpu(built_run: Path, backend: str, atol: float) -> None:
    folder = built_run / "01-finetune" / "model"
    cpu = Predictor.load(folder).logits(TEXTS)
    gpu = Predictor.load(folder, target="cuda", backend=backend)
    assert gpu.session.describe()["device"].startswith("cuda")
    assert np.allclose(gpu.logits(TEXTS), cpu, atol=atol)


def test_cuda_event_timing_separates_device_time_and_copies(built_run: Path) -> None:
    predictor = Predictor.load(built_run / "01-finetune" / "model", target="cuda", backend="torch-cuda-fp16")
    session = predictor.session
    feeds = predictor.encode(TEXTS * 3, pad_to=128)
    tensors = session.to_device(feeds)  # type: ignore[attr-defined]
    device = cuda_event_ms(lambda: session.run_on_device(tensors), 20)  # type: ignore[attr-defined]
    copies = cuda_event_ms(lambda: session.to_device(feeds), 10)  # type: ignore[attr-defined]
    assert len(device) == 20 and min(device) > 0 and min(copies) > 0


def test_bench_on_cuda_reports_device_time_and_agreement(run_copy: Path) -> None:
    import json

    from edgepipe.pipeline.cli import main

    manifest = json.loads((run_copy / "manifest.json").read_text())
    manifest["recipe"]["bench"].update(
        targets=["cuda"], batch_sizes=[1], engines=["torch-cuda", "torch-cuda-fp16"], runs=10
    )
    (run_copy / "manifest.json").write_text(json.dumps(manifest))
    assert main(["bench", str(run_copy)]) == 0
    rows = json.loads((run_copy / "report.json").read_text())["results"]
    fp16 = next(r for r in rows if r["engine"] == "torch-cuda-fp16")
    assert fp16["target"] == "cuda" and fp16["device_ms"]["p50"] > 0 and fp16["h2d_ms"]["p50"] > 0
    assert fp16["agreement"]["argmax_agreement"] > 0.95
