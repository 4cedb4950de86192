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


def test_a_real_slowdown_fails_the_gate(run_copy: Path, built_run: Path, capsys) -> None:
    """The same artifacts with ORT graph optimizations disabled, measured A/B against the original: exit 3."""
    recipe = run_copy / "recipe.resolved.yaml"
    overrides = ["--set", "bench.graph_optimization=disable", "--set", "bench.runs=20"]
    assert main(["build", str(recipe), "--out", str(run_copy), *overrides]) == 0
    capsys.readouterr()
    assert main(["bench", str(run_copy), "--baseline", str(built_run)]) == 3
    out, err = capsys.readouterr()
    slower = [line for line in out.splitlines() if line.endswith("| slower |")]
    # without graph optimizations the Q/DQ pairs stay unfused: the static int8 model slows down most
    assert any(line.startswith("| int8-static | cpu |") for line in slower), out
    assert not any(line.startswith("| teacher |") for line in slower), out  # PyTorch is not affected
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
