"""Crash safety and determinism, proven on real builds: a build killed with SIGKILL in any stage (or in its
benchmark) resumes, reuses what completed, leaves nothing behind, and ends with the bytes of a build that
was never interrupted; two builds of one recipe and seed write the same bytes; a second process on the same
run folder is refused while the first holds it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import tiny_recipe, write_recipe

from edgepipe.pipeline.cli import main
from edgepipe.pipeline.manifest import locked_run
from edgepipe.pipeline.recipe import parse_recipe
from edgepipe.pipeline.runner import build

STAGES = [
    {"kind": "finetune", "max_steps": 30, "batch_size": 16, "max_seq_len": 32, "lr": 1e-3},
    {"kind": "distill", "student": {"num_layers": 1}, "max_steps": 20, "batch_size": 16, "max_seq_len": 32},
    {"kind": "prune", "ratio": 0.25, "importance": "taylor", "recover": {"max_steps": 10}},
    {"kind": "export", "parity_shapes": [[1, 7], [3, 45]]},
    {"kind": "quantize", "mode": "dynamic"},
    {"kind": "quantize", "mode": "static", "calibration": {"samples": 32, "batch_size": 8}},
    {"kind": "mobile", "source": "int8"},
]


def _recipe(tmp_path: Path, model: Path, data: Path) -> Path:
    return write_recipe(tmp_path / "every-stage.yaml", tiny_recipe(model, data, stages=STAGES))


def _stage_files(run: Path) -> dict[str, str]:
    """sha256 of every reproducible stage file (not metrics.json: it holds timings), by path in the run."""
    import json

    manifest = json.loads((run / "manifest.json").read_text(encoding="utf-8"))
    return {
        f"{stage['dir']}/{name}": record["sha256"]
        for stage in manifest["stages"]
        if stage["reproducible"] is True
        for name, record in stage["files"].items()
        if name != "metrics.json"
    }


def _leftovers(folder: Path) -> list[str]:
    return sorted(
        str(p.relative_to(folder))
        for p in folder.rglob("*")
        if p.name.endswith((".partial", ".tmp")) or p.name.startswith("edgepipe-error-")
    )


def test_same_recipe_and_seed_give_the_same_bytes(tmp_path: Path, tiny_model_dir: Path, rt_csv: Path) -> None:
    recipe = parse_recipe(tiny_recipe(tiny_model_dir, rt_csv, stages=STAGES))
    first, second = tmp_path / "first", tmp_path / "second"
    build(recipe, first, benchmark=False)
    build(recipe, second, benchmark=False)
    files = _stage_files(first)
    assert files == _stage_files(second)
    assert any(name.endswith("model.onnx") for name in files) and any("int8" in name for name in files)
    # the one stage that says it is not reproducible, and why
    import json

    stages = json.loads((first / "manifest.json").read_text(encoding="utf-8"))["stages"]
    assert [s["kind"] for s in stages if s["reproducible"] is not True] == ["mobile"]


def test_a_second_process_on_a_run_folder_is_refused(
    tmp_path: Path, tiny_model_dir: Path, rt_csv: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = _recipe(tmp_path, tiny_model_dir, rt_csv)
    run = tmp_path / "run"
    holder = subprocess.Popen(  # another process holds the run folder's lock, as a running build does
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from edgepipe.pipeline.manifest import locked_run\n"
            "with locked_run(Path(sys.argv[1]), 'build'):\n    print('locked', flush=True); time.sleep(60)",
            str(run),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        assert main(["build", str(recipe), "--out", str(run)]) == 2
        err = capsys.readouterr().err
        assert f"{run.resolve()} is in use by edgepipe build (pid {holder.pid}" in err
        assert "wait for it to finish or pass another --out" in err
        assert not (run / "manifest.json").exists() and not (run / "01-finetune").exists()
    finally:
        holder.kill()
        holder.wait()
    with locked_run(run, "build"):  # released with its holder's death: no stale lock to clear by hand
        pass


def _start(recipe: Path, run: Path, log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "edgepipe.pipeline.cli", "build", str(recipe), "--out", str(run)]
    with log.open("ab") as handle:
        return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=handle)


def _wait_for(proc: subprocess.Popen[bytes], ready: Any, what: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        assert proc.poll() is None, f"the build ended (exit {proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout_s} s"
        time.sleep(0.001)


def _bench_child(parent: psutil.Process) -> psutil.Process | None:
    for child in parent.children():
        try:
            if "bench" in child.cmdline():
                return child
        except psutil.NoSuchProcess:  # a short-lived child (git rev-parse) that just ended
            continue
    return None


@pytest.mark.slow
def test_kill_9_in_every_stage_and_the_benchmark_then_resume(
    tmp_path: Path, tiny_model_dir: Path, rt_csv: Path
) -> None:
    recipe = _recipe(tmp_path, tiny_model_dir, rt_csv)
    reference = tmp_path / "reference"
    build(parse_recipe(tiny_recipe(tiny_model_dir, rt_csv, stages=STAGES)), reference, benchmark=False)
    run, log, scratch = tmp_path / "run", tmp_path / "build.log", tmp_path / "system-tmp"
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch)}
    names = [f"{i + 1:02d}-{s['kind']}" for i, s in enumerate(STAGES)]
    for k, name in enumerate(names):
        start = log.stat().st_size if log.exists() else 0
        proc = _start(recipe, run, log, env)
        partial = run / f".{name}.partial"
        _wait_for(proc, partial.exists, f"stage {name}")
        os.kill(proc.pid, signal.SIGSTOP)  # frozen mid-stage: it cannot finish the stage before the kill
        assert partial.exists() and not (run / name).exists(), f"{name} completed before the kill"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        text = log.read_text(encoding="utf-8")[start:]
        assert all(f"{done}: unchanged, reusing it" in text for done in names[: max(0, k - 1)]), text
        assert not (run / name).exists()
    # the benchmark: only the parent is killed; its child (measuring in a fresh process) must die with it
    proc = _start(recipe, run, log, env)
    parent = psutil.Process(proc.pid)
    _wait_for(proc, lambda: _bench_child(parent), "the benchmark process")
    child = _bench_child(parent)
    assert child is not None
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    _, alive = psutil.wait_procs([child], timeout=10)
    assert not alive, "the benchmark process outlived its parent"
    assert not (run / "report.json").exists()

    result = subprocess.run(
        [sys.executable, "-m", "edgepipe.pipeline.cli", "build", str(recipe), "--out", str(run)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert all(f"{name}: unchanged, reusing it" in result.stderr for name in names), result.stderr
    assert (run / "report.json").is_file() and (run / "report.md").is_file()
    assert _leftovers(run) == [] and not (run / ".tmp").exists()
    assert list(scratch.iterdir()) == [], "temporary files outside the run folder"
    assert _stage_files(run) == _stage_files(reference)
