"""The training stages under torchrun: 2 processes on gloo give the same run layout as one process."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import digits_recipe, tiny_recipe, write_recipe

from edgepipe.pipeline.cli import main
from edgepipe.pipeline.distributed import World


def _layout(run: Path) -> set[str]:
    # cache files are named by content hash, and the DDP-trained teacher differs in its last bits
    return {re.sub(r"-[0-9a-f]{16}\.", "-<hash>.", str(p.relative_to(run))) for p in run.rglob("*") if p.is_file()}


def test_world_of_one_is_a_no_op() -> None:
    world = World()
    assert world.is_main and not world.distributed
    assert world.shard([1, 2, 3]) == [1, 2, 3] and world.share("x") == "x"


def test_shard_splits_a_batch_between_ranks() -> None:
    batch = list(range(10))
    shards = [World(rank=r, size=2).shard(batch) for r in range(2)]
    assert sorted(shards[0] + shards[1]) == batch and len(shards[0]) == len(shards[1])


def _text_recipe(tiny_model_dir: Path, rt_csv: Path) -> dict:
    raw = tiny_recipe(tiny_model_dir, rt_csv)
    raw["stages"] = [
        {**raw["stages"][0], "max_steps": 8},
        {"kind": "distill", "student": {"num_layers": 1}, "max_steps": 6, "batch_size": 16, "max_seq_len": 32},
        {"kind": "export", "fuse": False},
    ]
    return raw


def _image_recipe(tiny_model_dir: Path, rt_csv: Path) -> dict:
    raw = digits_recipe()  # CNN teacher and student, feature-map KD with projections (averaged over ranks)
    raw["stages"] = [{**raw["stages"][0], "max_steps": 8}, {**raw["stages"][1], "max_steps": 6}, raw["stages"][2]]
    raw["gates"] = {}  # a few steps train nothing worth gating; this test is about the layout
    return raw


@pytest.mark.parametrize("make_recipe", [_text_recipe, _image_recipe], ids=["text", "image"])
def test_two_process_gloo_run_matches_one_process_layout(
    tmp_path: Path, tiny_model_dir: Path, rt_csv: Path, make_recipe
) -> None:
    raw = make_recipe(tiny_model_dir, rt_csv)
    raw["bench"]["batch_sizes"] = [1]
    recipe = write_recipe(tmp_path / "r.yaml", raw)
    single, double = tmp_path / "one", tmp_path / "two"
    assert main(["build", str(recipe), "--out", str(single)]) == 0
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "edgepipe.pipeline.cli",
        "build",
        str(recipe),
        "--out",
        str(double),
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert result.returncode == 0, "\n".join(
        line for line in result.stderr.splitlines() if "rror" in line or "terminate" in line or "what()" in line
    )
    assert result.stdout.count("report: ") == 1  # rank 0 alone reports
    assert _layout(double) == _layout(single)
    manifest = json.loads((double / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["distributed_backend"] == "gloo"
    assert [s.get("world_size") for s in manifest["stages"]] == [2, 2, 2]
    metrics = json.loads((double / "02-distill" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["loss_total_end"] > 0
