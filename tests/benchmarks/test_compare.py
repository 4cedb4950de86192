import copy
import json
from pathlib import Path

import pytest

from edgepipe.benchmarks.compare import Tolerance, compare, mismatches
from edgepipe.pipeline.cli import main


def _report(run: Path) -> dict:
    return json.loads((run / "report.json").read_text())


def test_identical_reports_pass_and_an_inflated_one_fails() -> None:
    row = {
        "artifact": "fp32",
        "target": "cpu",
        "batch": 1,
        "seq_len": 128,
        "accuracy": 0.8,
        "latency_ms": {"p50": 10.0, "std": 0.5, "n": 50},
    }
    base = {"results": [row]}
    assert [r.verdict for r in compare(base, copy.deepcopy(base), Tolerance())] == ["ok"]
    slow = copy.deepcopy(base)
    slow["results"][0]["latency_ms"]["p50"] = 11.4  # 14 % slower: inside the 15 % floor
    assert compare(base, slow, Tolerance())[0].verdict == "ok"
    slow["results"][0]["latency_ms"]["p50"] = 12.0
    [r] = compare(base, slow, Tolerance())
    assert r.verdict == "slower" and r.ratio == pytest.approx(1.2) and r.allowed_ratio == pytest.approx(1.15)
    noisy = copy.deepcopy(slow)
    for report in (base, noisy):
        report["results"][0]["latency_ms"]["std"] = 5.0  # noise widens the tolerance past 1.2
    assert compare(base, noisy, Tolerance())[0].verdict == "ok"
    worse = copy.deepcopy(base)
    worse["results"][0]["accuracy"] = 0.79
    assert compare(base, worse, Tolerance())[0].verdict == "less accurate"
    gone = {"results": []}
    assert compare(base, gone, Tolerance())[0].verdict == "missing"


def test_mismatch_names_what_differs(built_run: Path) -> None:
    base = _report(built_run)
    other = copy.deepcopy(base)
    other["versions"]["onnxruntime"] = "1.99.0"
    other["machine"]["cpu"] = "Some Other CPU"
    assert mismatches(base, other) == [
        f"machine.cpu: baseline {base['machine']['cpu']!r}, current 'Some Other CPU'",
        f"versions.onnxruntime: baseline {base['versions']['onnxruntime']!r}, current '1.99.0'",
    ]


def test_cli_refuses_a_mismatch_and_another_schema(built_run: Path, tmp_path: Path, capsys) -> None:
    other = _report(built_run)
    other["versions"]["onnxruntime"] = "1.99.0"
    path = tmp_path / "other.json"
    path.write_text(json.dumps(other))
    assert main(["compare", str(built_run / "report.json"), str(path)]) == 2
    err = capsys.readouterr().err
    assert "versions.onnxruntime: baseline" in err and "--allow-mismatch" in err
    assert main(["compare", str(built_run / "report.json"), str(path), "--allow-mismatch"]) == 0
    other["schema_version"] = 2
    path.write_text(json.dumps(other))
    assert main(["compare", str(built_run / "report.json"), str(path)]) == 2
    assert "report schema_version 2 is not 1" in capsys.readouterr().err
    other["schema_version"], other["machine"] = 1, None  # a case the fuzzer found: a traceback before
    path.write_text(json.dumps(other))
    assert main(["compare", str(built_run / "report.json"), str(path), "--allow-mismatch"]) == 2
    assert "`machine` is a NoneType, not an object" in capsys.readouterr().err


def _add_dead_work(model_path: Path) -> None:
    """Make an ONNX classifier really slower with the same outputs: logits + 0 * sum(x @ W1 @ W2), x from the
    input ids, so nothing folds it away; ~130 MFLOP a token, tens of times the tiny model's own work."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(model_path))
    graph = model.graph
    rng = np.random.default_rng(0)
    graph.initializer.extend(
        [
            numpy_helper.from_array(rng.standard_normal((1, 2048)).astype(np.float32), "dead_w1"),
            numpy_helper.from_array(rng.standard_normal((2048, 2048)).astype(np.float32) / 64, "dead_w2"),
            numpy_helper.from_array(np.array([-1, 1], dtype=np.int64), "dead_shape"),
            numpy_helper.from_array(np.zeros((), dtype=np.float32), "dead_zero"),
        ]
    )
    logits = graph.output[0].name
    for node in graph.node:  # the producer of logits now writes an intermediate
        node.output[:] = ["dead_logits_in" if o == logits else o for o in node.output]
    graph.node.extend(
        [
            helper.make_node("Cast", ["input_ids"], ["dead_x"], to=onnx.TensorProto.FLOAT),
            helper.make_node("Reshape", ["dead_x", "dead_shape"], ["dead_col"]),
            helper.make_node("MatMul", ["dead_col", "dead_w1"], ["dead_h1"]),
            helper.make_node("MatMul", ["dead_h1", "dead_w2"], ["dead_h2"]),
            helper.make_node("ReduceSum", ["dead_h2"], ["dead_sum"], keepdims=0),
            helper.make_node("Mul", ["dead_sum", "dead_zero"], ["dead_nothing"]),
            helper.make_node("Add", ["dead_logits_in", "dead_nothing"], [logits]),
        ]
    )
    onnx.save(model, str(model_path))


def test_a_real_slowdown_fails_the_gate(run_copy: Path, built_run: Path, capsys) -> None:
    """The fp32 model made really slower (same outputs), measured A/B against the original: exit 3, and only
    that artifact is flagged. (Disabling graph optimizations was the slowdown before: on the tiny model its
    effect drowned in noise on some machines.)"""
    _add_dead_work(run_copy / "02-export" / "fp32" / "model.onnx")
    assert main(["bench", str(run_copy), "--baseline", str(built_run)]) == 3
    out, err = capsys.readouterr()
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| ") and " | cpu | " in line]
    ratios = {(r[0].strip("| "), r[2]): float(r[6]) for r in rows}  # (artifact, batch) -> current / baseline p50
    fp32 = [ratio for (name, _), ratio in ratios.items() if name == "fp32"]
    assert len(fp32) == 2 and min(fp32) > 3, out  # the dead work dominates at both batch sizes
    assert [line for line in out.splitlines() if line.startswith("| fp32 | cpu |") and line.endswith("| slower |")]
    # the worst ONNX artifact is fp32; the torch teacher is left out: under the test run's other worker its
    # threads contend for the 2 cores, and it once timed 118x its baseline (0.73 -> 86.8 ms) on a busy host
    onnx = [r for (name, _), r in ratios.items() if name not in ("fp32", "teacher")]
    assert max(onnx) < min(fp32), out
    assert "regression(s) against" in err


@pytest.mark.slow
def test_identical_artifacts_pass_twenty_times_in_a_row(run_copy: Path, capsys) -> None:
    """Interleaved A/B runs of the same artifacts (a copy of the run against itself): no flakes."""
    recipe = run_copy / "recipe.resolved.yaml"
    assert (
        main(["build", str(recipe), "--out", str(run_copy), "--set", "bench.runs=20", "--set", "bench.rounds=5"]) == 0
    )
    for attempt in range(20):
        code = main(["bench", str(run_copy), "--baseline", str(run_copy)])
        out = capsys.readouterr().out
        assert code == 0, f"attempt {attempt}:\n" + "\n".join(line for line in out.splitlines() if "| ok |" not in line)
