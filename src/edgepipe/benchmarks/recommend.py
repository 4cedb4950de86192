"""What to ship: per target and shape, the fastest artifact x engine within the accuracy gate, and how to run it.

The candidates are a report's rows (every artifact on every engine it was measured on); a row qualifies when
its accuracy is at most `max_drop` below the reference's (the teacher) on the same target. The snippet is the
engine's own API with the settings the benchmark ran it with, so the deployed model runs as it was measured.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Choice:
    target: str
    batch: int
    seq_len: int
    input: str
    artifact: str  # the report's label: name, or name@engine off the target's default engine
    engine: str
    precision: str
    p50_ms: float
    speedup: float | None  # the reference's p50 / this p50, same shape
    accuracy: float
    drop: float  # reference accuracy - this accuracy
    size_mb: float
    runtime: dict[str, Any]

    @property
    def name(self) -> str:
        return self.artifact.split("@")[0]


def recommend(report: dict[str, Any], max_drop: float) -> list[Choice]:
    """One choice per (target, batch, seq_len) of the report, fastest first within the gate."""
    ref_name = report["reference"]
    reference = {r["target"]: r["accuracy"] for r in report["results"] if r["artifact"] == ref_name}
    groups: dict[tuple[str, int, int], list[dict[str, Any]]] = {}
    for row in report["results"]:
        groups.setdefault((row["target"], row["batch"], row["seq_len"]), []).append(row)
    choices = []
    for (target, batch, seq_len), rows in sorted(groups.items()):
        ref_acc = reference.get(target)
        fits = [r for r in rows if ref_acc is None or ref_acc - r["accuracy"] <= max_drop + 1e-12]
        if not fits:
            continue
        best = min(fits, key=lambda r: r["latency_ms"]["p50"])
        ref_p50 = next((r["latency_ms"]["p50"] for r in rows if r["artifact"] == ref_name), None)
        choices.append(
            Choice(
                target=target,
                batch=batch,
                seq_len=seq_len,
                input=best.get("input", f"sequence {seq_len}"),
                artifact=best["artifact"],
                engine=best["engine"],
                precision=best["precision"],
                p50_ms=best["latency_ms"]["p50"],
                speedup=None if ref_p50 is None else ref_p50 / best["latency_ms"]["p50"],
                accuracy=best["accuracy"],
                drop=0.0 if ref_acc is None else ref_acc - best["accuracy"],
                size_mb=best["size_mb"],
                runtime=best.get("runtime", {}),
            )
        )
    return choices


def _model(folder: Path) -> Path:
    return next((folder / n for n in ("model.xml", "model.onnx", "model.ort") if (folder / n).is_file()), folder)


def deploy_snippet(choice: Choice, folder: Path) -> str:
    """Python (or, for the ORT format, the mobile build line) that loads `folder` as the benchmark ran it."""
    model, threads = _model(folder), choice.runtime.get("intra_op_threads") or choice.runtime.get("threads") or 1
    if choice.engine == "ort-cpu" and model.suffix == ".ort":
        return (
            "# ORT Mobile: the app links onnxruntime-android / onnxruntime-objc (or a reduced build:\n"
            f"#   build.py --minimal_build --include_ops_by_config {folder / 'required_operators.config'})\n"
            "import onnxruntime as ort\n"
            f'session = ort.InferenceSession("{model}", providers=["CPUExecutionProvider"])\n'
            "logits = session.run(None, feeds)[0]  # feeds: the tokenizer's int64 arrays (or float32 pixels)"
        )
    if choice.engine == "ort-cpu":
        disabled = choice.runtime.get("disabled_optimizers") or []
        flush = "1" if choice.runtime.get("denormal_as_zero", True) else "0"
        return (
            "import onnxruntime as ort\n"
            "so = ort.SessionOptions()\n"
            f"so.intra_op_num_threads = {threads}\n"
            f'so.add_session_config_entry("session.set_denormal_as_zero", "{flush}")\n'
            f'session = ort.InferenceSession("{model}", so, providers=["CPUExecutionProvider"], '
            f"disabled_optimizers={disabled!r})\n"
            "logits = session.run(None, feeds)[0]  # feeds: the tokenizer's int64 arrays (or float32 pixels)"
        )
    if choice.engine.startswith("openvino"):
        precision = choice.runtime.get("inference_precision_hint", "f32")
        return (
            "import openvino as ov\n"
            f'compiled = ov.Core().compile_model("{model}", "CPU", {{"PERFORMANCE_HINT": "LATENCY", '
            f'"INFERENCE_NUM_THREADS": "{choice.runtime.get("inference_num_threads", threads)}", '
            f'"INFERENCE_PRECISION_HINT": "{precision}"}})\n'
            "logits = compiled(feeds)[0]  # feeds: the tokenizer's int64 arrays (or float32 pixels)"
        )
    return (
        "from edgepipe.runtime import Predictor\n"
        f'predictor = Predictor.load("{folder}", backend="{choice.engine}")\n'
        "predictor.predict(texts)  # or an image array (N, C, H, W) in [0, 1]"
    )


def render(choices: list[Choice], max_drop: float, folders: dict[str, Path]) -> list[str]:
    """Markdown: the table of choices, then the deploy snippet of each target's batch-1 (or smallest) choice."""
    if not choices:
        return [f"No artifact is within {100 * max_drop:.2f} pt of the reference."]
    out = [
        f"Fastest artifact x engine within {100 * max_drop:.2f} pt of the reference, per target and shape:",
        "",
        "| target | batch | input | artifact | engine | precision | p50 ms | x reference | accuracy | drop pt | MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in choices:
        speed = "" if c.speedup is None else f"{c.speedup:.2f}"
        out.append(
            f"| {c.target} | {c.batch} | {c.input} | {c.artifact} | {c.engine} | {c.precision} | {c.p50_ms:.2f} | "
            f"{speed} | {100 * c.accuracy:.2f}% | {100 * c.drop:.2f} | {c.size_mb:.1f} |"
        )
    for target in dict.fromkeys(c.target for c in choices):
        first = min((c for c in choices if c.target == target), key=lambda c: (c.batch, c.seq_len))
        folder = folders.get(first.name)
        if folder is None:
            continue
        out += ["", f"Deploy `{first.artifact}` ({target}, batch {first.batch}):", "", "```python"]
        out += [deploy_snippet(first, folder), "```"]
    return out
