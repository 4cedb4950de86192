"""int8 against its peers on the default recipe's model (the demo's distilled student), b1 s128.

    python benchmarks/bench_int8.py --run runs/demo --json runs/bench/int8.json \
        [--optimum-python .venv-optimum/bin/python]

Side by side, one process, one artifact alive at a time, interleaved over 5 rounds: the student's ORT
fp32 and fused fp32 (also in a session with onnxruntime's default optimizers, which re-fuse the slow
SkipLayerNormalization), edgepipe's static (QDQ) and dynamic int8 from the run, and the peers built
here from the same fp32 model and the same 256 calibration sentences:

- `ort-static-defaults`: `quantize_static` with onnxruntime's defaults (QDQ, every op, s8 activations
  and weights, per tensor, MinMax), on the plain fp32 export after `quant_pre_process`;
- `ort-dynamic-defaults`: `quantize_dynamic` with its defaults (every op it supports, per tensor s8);
- `torch-dynamic-int8`: PyTorch's `torch.ao.quantization.quantize_dynamic` on the student's nn.Linear layers;
- `optimum-static` / `optimum-dynamic`: Optimum's `ORTQuantizer` with its `avx512_vnni` preset, run in
  its own environment (`make .venv-optimum/.installed`; it requires transformers<4.58) by
  `benchmarks/peers/optimum_int8.py`; without `--optimum-python` the row says why it is missing.

Accuracy is on the whole test split (1,275 reviews).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from edgepipe.benchmarks.harness import measure_interleaved
from edgepipe.pipeline.artifacts import write_json
from edgepipe.pipeline.calibration import CalibrationSet, ort_reader
from edgepipe.pipeline.data import load_splits
from edgepipe.pipeline.recipe import parse_recipe
from edgepipe.runtime import Predictor
from edgepipe.runtime.backends import RuntimeOptions

OPTIMUM_REASON = (
    "not run: pass --optimum-python (make .venv-optimum/.installed); optimum-onnx 0.1.0 requires "
    "transformers<4.58, so it cannot share edgepipe's environment (transformers 5)"
)
OPTIMUM_SCRIPT = Path(__file__).parent / "peers" / "optimum_int8.py"


class _TorchInt8Session:
    """PyTorch dynamic int8 (nn.Linear -> quantized Linear) of a transformers folder, as a Session."""

    def __init__(self, folder: Path, threads: int) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification

        torch.set_num_threads(threads)
        model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
        self._model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        self._torch = torch
        self.input_names = ("input_ids", "attention_mask", "token_type_ids")

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        with self._torch.inference_mode():
            tensors = {k: self._torch.from_numpy(v) for k, v in feeds.items() if k in self.input_names}
            return self._model(**tensors).logits.numpy()

    def describe(self) -> dict[str, Any]:
        return {"engine": "pytorch", "quantization": "torch.ao dynamic qint8 Linear"}


def _peer_folders(fp32: Path, calibration: list[str], work: Path) -> dict[str, Path]:
    """ORT's quantizers with their default settings, each in an artifact folder beside the fp32 companions."""
    import onnx
    from onnxruntime.quantization import QuantFormat, quant_pre_process, quantize_dynamic, quantize_static
    from transformers import AutoTokenizer

    folders = {}
    for name in ("ort-static-defaults", "ort-dynamic-defaults"):
        folder = work / name
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(fp32, folder)
        folders[name] = folder
    pre = work / "preprocessed.onnx"
    quant_pre_process(str(fp32 / "model.onnx"), str(pre), auto_merge=True)
    names = tuple(i.name for i in onnx.load(str(pre), load_external_data=False).graph.input)
    calib = CalibrationSet(calibration, AutoTokenizer.from_pretrained(fp32), names, 16, 128)
    quantize_static(pre, folders["ort-static-defaults"] / "model.onnx", ort_reader(calib), quant_format=QuantFormat.QDQ)
    quantize_dynamic(fp32 / "model.onnx", folders["ort-dynamic-defaults"] / "model.onnx")
    pre.unlink()
    return folders


def _optimum_folders(python: Path, fp32: Path, calibration: list[str], work: Path) -> dict[str, Path]:
    """Optimum's static and dynamic int8 of the same fp32 model, built in Optimum's own environment."""
    texts = work / "calibration.json"
    texts.write_text(json.dumps(calibration), encoding="utf-8")
    subprocess.run([str(python), str(OPTIMUM_SCRIPT), str(fp32), str(texts), str(work)], check=True)
    return {name: work / name for name in ("optimum-static", "optimum-dynamic")}


def layernorm_kernels_us(threads: int, hidden: int = 384, tokens: int = 128, runs: int = 500) -> dict[str, float]:
    """One residual + LayerNorm at the student's width, timed as onnxruntime's SkipLayerNormalization
    (contrib op) and as Add + LayerNormalization (with the session's SkipLayerNormFusion disabled), on the
    same random inputs: microseconds per call, p50 over interleaved rounds."""
    from onnx import TensorProto, helper, numpy_helper

    from edgepipe.runtime.backends import ort_cpu_session

    rng = np.random.default_rng(0)
    feeds = {n: rng.normal(size=(1, tokens, hidden)).astype(np.float32) for n in ("x", "r")}
    params = [
        numpy_helper.from_array(v.astype(np.float32), n) for n, v in (("g", np.ones(hidden)), ("b", np.zeros(hidden)))
    ]
    graphs = {
        "skiplayernorm": [
            helper.make_node("SkipLayerNormalization", ["x", "r", "g", "b"], ["y"], domain="com.microsoft")
        ],
        "add+layernorm": [
            helper.make_node("Add", ["x", "r"], ["s"]),
            helper.make_node("LayerNormalization", ["s", "g", "b"], ["y"], axis=-1),
        ],
    }

    @contextmanager
    def open_runners(name: str):  # type: ignore[no-untyped-def]
        io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, tokens, hidden]) for n in ("x", "r", "y")]
        graph = helper.make_graph(graphs[name], name, io[:2], io[2:], params)
        opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
        model = helper.make_model(graph, opset_imports=opsets).SerializeToString()
        session = ort_cpu_session(model, RuntimeOptions(threads=threads))
        yield {"call": lambda: session.run(None, feeds)}

    stats = measure_interleaved(list(graphs), open_runners, runs=runs, rounds=5, warmup_runs=50, warmup_s=0.2)
    return {name: round(stats[(name, "call")].p50 * 1000, 1) for name in graphs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=Path("runs/demo"))
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--optimum-python", type=Path, help="python of the Optimum environment")
    args = parser.parse_args(argv)
    manifest = json.loads((args.run / "manifest.json").read_text())
    recipe = parse_recipe(manifest["recipe"])
    paths = {a["name"]: args.run / a["path"] for a in manifest["artifacts"]}
    data = load_splits(recipe.data, recipe.seed, recipe.task)
    texts, labels = list(data.test.inputs), data.test.labels
    work = args.run.parent / f"{args.run.name}-int8-peers"
    work.mkdir(exist_ok=True)
    calibration = list(data.calibration.inputs[:256])
    peers = _peer_folders(paths["fp32"], calibration, work)
    if args.optimum_python:
        peers.update(_optimum_folders(args.optimum_python, paths["fp32"], calibration, work))

    loaders: dict[str, Callable[[], Predictor]] = {
        name: (lambda p=paths[name]: Predictor.load(p))
        for name in ("fp32", "fp32-fused", "int8-static", "int8-dynamic")
    }
    ort_default = RuntimeOptions(cpu_disabled_optimizers=())  # SkipLayerNormFusion on, as in a bare session
    loaders["fp32-fused-skiplayernorm"] = lambda: Predictor.load(paths["fp32-fused"], options=ort_default)
    loaders.update({name: (lambda p=folder: Predictor.load(p)) for name, folder in peers.items()})

    def torch_int8() -> Predictor:
        base = Predictor.load(paths["fp32"])
        return Predictor(_TorchInt8Session(paths["student"], 2), base.tokenizer, base.labels)

    loaders["torch-dynamic-int8"] = torch_int8

    accuracy = {}
    for name, load in loaders.items():
        accuracy[name] = float((load().logits(texts).argmax(-1) == labels).mean())

    @contextmanager
    def open_runners(name: str):  # type: ignore[no-untyped-def]
        predictor = loaders[name]()
        feeds = predictor.encode(texts[:1], pad_to=128)
        yield {"b1s128": lambda: predictor.session.run(feeds)}

    stats = measure_interleaved(list(loaders), open_runners, runs=args.runs, rounds=5, warmup_runs=5, warmup_s=0.5)
    row = {n: {"p50_ms": round(stats[(n, "b1s128")].p50, 3), "cv": round(stats[(n, "b1s128")].cv, 3)} for n in loaders}
    result = {
        "fp32_acc": accuracy["fp32"],
        "fp32_p50_ms": row["fp32"]["p50_ms"],
        "fp32_fused_p50_ms": row["fp32-fused"]["p50_ms"],
        "fp32_fused_skiplayernorm_p50_ms": row["fp32-fused-skiplayernorm"]["p50_ms"],
        "static": {**row["int8-static"], "acc": accuracy["int8-static"]},
        "dynamic": {**row["int8-dynamic"], "acc": accuracy["int8-dynamic"]},
        "peers": [{"name": n, **row[n], "acc": accuracy[n]} for n in [*peers, "torch-dynamic-int8"]]
        + (
            []
            if args.optimum_python
            else [{"name": "optimum-ortquantizer", "p50_ms": None, "acc": None, "not_run": OPTIMUM_REASON}]
        ),
        "runs": args.runs,
        "layernorm_kernel_us_b1s128": {f"{t}_threads": layernorm_kernels_us(t) for t in (1, 2)},
    }
    write_json(args.json, result)  # atomic, creates the folder
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
