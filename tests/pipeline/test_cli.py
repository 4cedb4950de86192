import json
from pathlib import Path

import pytest
from conftest import tiny_recipe, write_recipe

from edgepipe.errors import GateFailedError
from edgepipe.pipeline.cli import main
from edgepipe.pipeline.gates import gate
from edgepipe.pipeline.recipe import parse_recipe


@pytest.mark.parametrize("command", ["validate", "build", "bench", "search"])
def test_help_shows_an_example(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([command, "--help"]) == 0
    assert f"edgepipe {command} " in capsys.readouterr().out


def test_usage_error_is_exit_2() -> None:
    assert main(["frobnicate"]) == 2


def test_bad_recipe_exit_2_one_message_no_traceback(tmp_path: Path, capsys) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("schema_version: 1\nmodel: minilm-l6\nstages: [{kind: export, opset: x}]\nbench: {seq_lens: [0]}\n")
    assert main(["build", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "`stages.0.opset`: Input should be a valid integer" in err
    assert "`bench.seq_lens`: every value must be > 0, got [0]" in err
    assert not (tmp_path / "out").exists()


def test_output_path_that_is_a_file(tmp_path: Path, tiny_model_dir: Path, rt_csv: Path, capsys) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_model_dir, rt_csv))
    out = tmp_path / "taken"
    out.write_text("not a folder")
    assert main(["build", str(recipe), "--out", str(out)]) == 2
    assert f"`--out`: {out} is a file; pass a folder" in capsys.readouterr().err
    assert out.read_text() == "not a folder"


def test_missing_model_and_data_reported_together(tmp_path: Path, capsys) -> None:
    raw = tiny_recipe(tmp_path / "no-model", tmp_path / "no-data.csv")
    recipe = write_recipe(tmp_path / "r.yaml", raw)
    assert main(["validate", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "has 2 problem(s)" in err
    assert "`model`: " in err and "`data.source`: " in err


def test_labels_that_do_not_match_the_model(tmp_path: Path, tiny_model_dir: Path, capsys) -> None:
    data = tmp_path / "three.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"text {i}", "label": i % 3}) for i in range(300)))
    raw = tiny_recipe(tiny_model_dir, data, stages=[{"kind": "export"}])
    recipe = write_recipe(tmp_path / "r.yaml", raw)
    assert main(["build", str(recipe), "--out", str(tmp_path / "out")]) == 2
    assert "predicts 2 labels ['LABEL_0', 'LABEL_1'] but the data has 3" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_corrupt_onnx_given_to_bench(run_copy: Path, capsys) -> None:
    (run_copy / "02-export" / "fp32" / "model.onnx").write_bytes(b"\x08\x07garbage")
    assert main(["bench", str(run_copy)]) == 2
    err = capsys.readouterr().err
    assert "02-export/fp32/model.onnx is not a valid ONNX model" in err and "Traceback" not in err


def test_bench_on_a_folder_that_is_not_a_run(tmp_path: Path, capsys) -> None:
    assert main(["bench", str(tmp_path)]) == 2
    assert "is not a run folder (no manifest.json)" in capsys.readouterr().err


def test_accuracy_gate_fails_with_exit_3(tmp_path: Path) -> None:
    recipe = parse_recipe(
        {
            "schema_version": 1,
            "model": "minilm-l6",
            "stages": [{"kind": "export"}],
            "gates": {"max_accuracy_drop": 0.01},
        }
    )
    report = {
        "reference": "teacher",
        "results": [
            {"artifact": "teacher", "target": "cpu", "accuracy": 0.86},
            {"artifact": "int8-static", "target": "cpu", "accuracy": 0.84},
            {"artifact": "int8-dynamic", "target": "cpu", "accuracy": 0.855},
        ],
    }
    lines = gate(recipe, report)
    assert lines[0].startswith("FAIL: `int8-static` on cpu accuracy 84.00% vs `teacher` 86.00% (drop 2.00 pt")
    assert lines[1].startswith("pass: `int8-dynamic`")
    assert GateFailedError.exit_code == 3


def test_an_internal_error_is_one_line_and_a_log_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bug (not bad input) still shows no traceback: one line naming the log file that holds it, exit 1."""
    import tempfile

    from edgepipe.pipeline import cli

    def broken(args: object) -> int:
        raise RuntimeError("a bug in a command")

    monkeypatch.setattr(cli, "_engines", broken)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert main(["engines"]) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("edgepipe: internal error: RuntimeError: a bug in a command; the traceback is in ")
    (log,) = tmp_path.glob("edgepipe-error-*.log")
    assert str(log) in err
    assert "Traceback (most recent call last)" in log.read_text() and "a bug in a command" in log.read_text()
