"""ExecuTorch (.pte, XNNPACK delegate) against the run's ONNX Runtime artifacts, on the host, b1 s128.

    .venv-executorch/bin/python benchmarks/bench_executorch.py --run runs/demo --json runs/bench/executorch.json

ExecuTorch is what a PyTorch user ships to phones; its wheel lives in its own environment
(`make .venv-executorch/.installed`: torch 2.13.0 + executorch 1.5.1 + edgepipe) so the main one stays as
measured. The run's final PyTorch student (`pruned`) is exported with `torch.export` at batch 1 x 128 tokens
(a static shape: one program per shape), lowered with `to_edge_transform_and_lower(XnnpackPartitioner())`,
written as `.pte`, and run by ExecuTorch's Python runtime (the same C++ runtime and XNNPACK kernels an app
links). Measured in one process, interleaved over 5 rounds with the run's ORT fp32 and int8 artifacts of the
same student; accuracy on the whole test split, agreement with ORT fp32. XNNPACK int8 through PT2E
(`XNNPACKQuantizer` + `prepare_pt2e`) is attempted and its failure, if any, recorded in the JSON.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from edgepipe.benchmarks.harness import measure_interleaved
from edgepipe.pipeline.artifacts import write_json
from edgepipe.pipeline.measure import open_run
from edgepipe.runtime.host import host_info, versions
from edgepipe.runtime.predictor import Predictor

SEQ_LEN = 128


def _logits_module(folder: Path) -> Any:
    import torch

    from edgepipe.runtime.text import load_text_model

    class Logits(torch.nn.Module):
        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    return Logits(load_text_model(folder)).eval()


def export_pte(folder: Path, example: tuple[Any, ...], out: Path, int8_texts: list[Any] | None = None) -> float:
    """Write `out` (.pte, XNNPACK-delegated); with `int8_texts`, PT2E dynamic int8 of the Linear layers first."""
    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    started = time.perf_counter()
    module = _logits_module(folder)
    if int8_texts is not None:
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
            XNNPACKQuantizer,
            get_symmetric_quantization_config,
        )
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

        config = get_symmetric_quantization_config(is_per_channel=True, is_dynamic=True)
        quantizer = XNNPACKQuantizer().set_module_type(torch.nn.Linear, config)
        prepared = prepare_pt2e(torch.export.export(module, example).module(), quantizer)
        for batch in int8_texts:
            prepared(*batch)
        module = convert_pt2e(prepared)
    program = torch.export.export(module, example)
    lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch()
    out.write_bytes(lowered.buffer)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    import torch
    from executorch.runtime import Runtime

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=Path("runs/demo"))
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args(argv)
    _, _, data, artifacts = open_run(args.run)
    by_name = {a.name: a.path for a in artifacts}
    student = by_name["pruned"] if "pruned" in by_name else by_name["student"]
    reference = Predictor.load(by_name["fp32"])
    texts, labels = list(data.test.inputs), data.test.labels

    def tensors(batch: list[str]) -> tuple[Any, ...]:
        feeds = reference.encode(batch, pad_to=SEQ_LEN)
        return tuple(torch.from_numpy(feeds[n]) for n in ("input_ids", "attention_mask"))

    work = args.run.parent / f"{args.run.name}-executorch"
    work.mkdir(parents=True, exist_ok=True)
    programs: dict[str, Path] = {}
    notes: dict[str, Any] = {}
    fp32 = work / "student-xnnpack-fp32.pte"
    notes["fp32_export_s"] = round(export_pte(student, tensors(texts[:1]), fp32), 1)
    programs["executorch-xnnpack-fp32"] = fp32
    int8 = work / "student-xnnpack-int8.pte"
    try:
        calibration = [tensors([t]) for t in list(data.calibration.inputs)[:32]]
        notes["int8_export_s"] = round(export_pte(student, tensors(texts[:1]), int8, calibration), 1)
        programs["executorch-xnnpack-int8"] = int8
    except Exception as error:  # recorded, not raised: the fp32 program is still measured
        notes["int8_not_built"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
    methods = {name: Runtime.get().load_program(str(path)).load_method("forward") for name, path in programs.items()}

    def pte_logits(name: str) -> np.ndarray:
        return np.concatenate([methods[name].execute(list(tensors([t])))[0].numpy() for t in texts])

    ort_names = [n for n in ("fp32", "int8-dynamic", "int8-static", "int8-static-ort") if n in by_name]
    predictors = {n: Predictor.load(by_name[n]) for n in ort_names}
    logits = {n: p.logits(texts) for n, p in predictors.items()} | {n: pte_logits(n) for n in methods}
    example = texts[:1]

    @contextmanager
    def open_runners(name: str):  # type: ignore[no-untyped-def]
        if name in methods:
            inputs = list(tensors(example))
            yield {"b1s128": lambda: methods[name].execute(inputs)}
        else:
            feeds = predictors[name].encode(example, pad_to=SEQ_LEN)
            yield {"b1s128": lambda: predictors[name].session.run(feeds)}

    names = [*ort_names, *methods]
    stats = measure_interleaved(names, open_runners, runs=args.runs, rounds=5, warmup_runs=5, warmup_s=0.5)
    rows = []
    for name in names:
        s = stats[(name, "b1s128")]
        path = programs.get(name) or (by_name[name] / ("model.onnx" if name != "int8-static-ort" else "model.ort"))
        rows.append(
            {
                "name": name,
                "engine": "executorch" if name in methods else "onnxruntime",
                "p50_ms": round(s.p50, 3),
                "cv": round(s.cv, 3),
                "x_ort_fp32": round(stats[("fp32", "b1s128")].p50 / s.p50, 3),
                "accuracy": round(float((logits[name].argmax(-1) == labels).mean()), 5),
                "argmax_agreement_vs_ort_fp32": round(
                    float((logits[name].argmax(-1) == logits["fp32"].argmax(-1)).mean()), 5
                ),
                "max_abs_diff_vs_ort_fp32": round(float(np.abs(logits[name] - logits["fp32"]).max()), 6),
                "size_mb": round(path.stat().st_size / 1e6, 2),
            }
        )
    result = {
        "machine": host_info(),
        "versions": versions(),  # executorch among them
        "shape": "batch 1 x 128 tokens",
        "runs": args.runs,
        "test_examples": len(texts),
        "rows": rows,
        **notes,
    }
    write_json(args.json, result)
    for row in rows:
        print(
            f"{row['name']:<28}{row['engine']:<13}p50 {row['p50_ms']:7.2f} ms  x{row['x_ort_fp32']:.2f}  "
            f"acc {100 * row['accuracy']:.2f}%  agree {100 * row['argmax_agreement_vs_ort_fp32']:.2f}%  "
            f"{row['size_mb']:.1f} MB"
        )
    for key, value in notes.items():
        print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
