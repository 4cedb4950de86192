"""The prepared GPU run (benchmarks/gpu_check.sh, bench_gpu.py) is ready before a GPU is: the shell script
parses, and the benchmark runs its whole measurement on the CPU engine here."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_gpu_script_parses_and_refuses_to_run_without_its_kit(tmp_path: Path) -> None:
    script = REPO / "benchmarks" / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    copy = tmp_path / "repo"
    (copy / "benchmarks").mkdir(parents=True)
    (copy / "benchmarks" / "gpu_check.sh").write_text(script.read_text())
    done = subprocess.run(["bash", str(copy / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True)
    assert done.returncode == 2 and "run benchmarks/gpu_kit.py here first" in done.stderr


def test_bench_gpu_measures_the_cpu_engine_without_a_gpu(tiny_model_dir: Path, tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("bench_gpu", REPO / "benchmarks" / "bench_gpu.py")
    assert spec is not None and spec.loader is not None
    bench_gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_gpu)
    out = tmp_path / "gpu.json"
    args = ["--model", str(tiny_model_dir), "--json", str(out), "--device", "cpu", "--runs", "3", "--texts", "24"]
    assert bench_gpu.main(args) == 0
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    assert row["engine"] == "torch" and row["argmax_agreement"] == 1.0 and row["max_abs_diff"] < 1e-5
    assert set(row["latency"]) == {"b1_s128", "b8_s128"} and row["latency"]["b8_s128"]["e2e_ms"]["p50"] > 0
    assert result["texts"] == 24 and "torch" in result["host"]
