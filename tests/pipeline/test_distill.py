import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_recipe, write_recipe
from transformers import AutoModelForSequenceClassification

from edgepipe.errors import RecipeError
from edgepipe.pipeline import kd
from edgepipe.pipeline.cli import main
from edgepipe.pipeline.recipe import parse_recipe
from edgepipe.pipeline.runner import check_recipe
from edgepipe.pipeline.students import build_student


def _distill(**changes) -> dict:
    stage = {
        "kind": "distill",
        "student": {"num_layers": 1},
        "max_steps": 30,
        "batch_size": 16,
        "max_seq_len": 32,
        "lr": 1e-3,
    }
    stage.update(changes)
    return stage


def test_kd_loss_matches_hand_computed_kl_times_t_squared() -> None:
    student, teacher, t = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]]), 2.0
    p_t = torch.softmax(teacher / t, -1)
    p_s = torch.softmax(student / t, -1)
    expected = float((p_t * (p_t.log() - p_s.log())).sum() * t * t)
    assert kd.kd_loss(student, teacher, t).item() == pytest.approx(expected, rel=1e-6)
    assert kd.kd_loss(teacher, teacher, t).item() == pytest.approx(0.0, abs=1e-7)


def test_seed_formula_is_expressible() -> None:
    """lambda * KD + (1 - lambda) * CE + beta * hidden, with lambda 0.7 and beta 2."""
    recipe = parse_recipe(
        {"schema_version": 1, "model": "minilm-l6", "stages": [_distill(loss={"kd": 0.7, "ce": 0.3, "hidden": 2.0})]}
    )
    loss = recipe.stages[0].loss
    assert (loss.kd, loss.ce, loss.hidden, loss.attention) == (0.7, 0.3, 2.0, 0.0)


def test_layer_subset_copies_exactly_the_right_tensors(tiny_model_dir: Path) -> None:
    teacher = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir)
    cfg = parse_recipe(
        {"schema_version": 1, "model": "minilm-l6", "stages": [_distill(student={"layers": [1]})]}
    ).stages[0]
    student = build_student(teacher, cfg, seed=0)
    assert student.config.num_hidden_layers == 1
    t, s = teacher.state_dict(), student.state_dict()
    assert len(s) == len(t) - len([k for k in t if ".layer.0." in k])
    for name, tensor in s.items():
        source = name.replace("encoder.layer.0.", "encoder.layer.1.")
        assert torch.equal(tensor, t[source]), name


def test_hidden_loss_projects_a_narrower_student() -> None:
    torch.manual_seed(0)
    student = [torch.randn(2, 5, 16)]
    teacher = [torch.randn(2, 5, 32)]
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    proj = torch.nn.ModuleList([torch.nn.Linear(16, 32)])
    value = kd.hidden_loss(student, teacher, mask, proj)
    projected = proj[0](student[0])
    manual = (((projected - teacher[0]) ** 2) * mask[..., None]).sum() / (mask.sum() * 32)
    assert value.item() == pytest.approx(manual.item(), rel=1e-6)
    teacher[0][0, 3:] += 100.0  # padding positions do not count
    assert kd.hidden_loss(student, teacher, mask, proj).item() == pytest.approx(value.item(), rel=1e-6)


def test_annealed_temperature_goes_from_start_to_one() -> None:
    values = [kd.annealed_temperature(4.0, step, 10) for step in range(10)]
    assert values[0] == 4.0 and values[-1] == 1.0
    assert all(a > b for a, b in itertools.pairwise(values))


def test_wsl_weights_track_how_much_better_the_teacher_fits() -> None:
    labels = torch.tensor([0, 0, 0])
    student = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])  # unsure everywhere
    teacher = torch.tensor([[6.0, 0.0], [1.0, 0.0], [0.0, 3.0]])  # confident-right, unsure-right, wrong
    w = kd.wsl_weights(student, teacher, labels)
    assert w[0] > w[1] > w[2]
    assert w[0].item() == pytest.approx(1 - math.exp(-math.log(2) / -math.log(torch.softmax(teacher[0], 0)[0].item())))
    assert w[2] < 0.5


def test_distill_stage_kd_loss_falls_and_student_is_smaller(tmp_path: Path, tiny_model_dir: Path, rt_csv: Path) -> None:
    raw = tiny_recipe(tiny_model_dir, rt_csv)
    narrow = {"init": "fresh", "num_layers": 1, "hidden_size": 16, "num_heads": 2, "intermediate_size": 32}
    raw["stages"] = [
        {**raw["stages"][0], "max_steps": 120, "lr": 3e-3},
        _distill(student=narrow, loss={"ce": 0.3, "kd": 0.7, "hidden": 1.0}, adaptive="wsl", max_steps=60),
        {"kind": "export"},
    ]
    out = tmp_path / "run"
    assert main(["build", str(write_recipe(tmp_path / "r.yaml", raw)), "--out", str(out)]) == 0
    metrics = json.loads((out / "02-distill" / "metrics.json").read_text())
    assert metrics["loss_kd_end"] < 0.9 * metrics["loss_kd_start"]  # 0.83 (tiny teacher, 120 steps)
    assert metrics["loss_hidden_end"] < metrics["loss_hidden_start"]
    assert 0 < metrics["kd_weight_end"] < 1
    assert metrics["student_parameters"] < metrics["teacher_parameters"] / 2
    assert metrics["layer_map"] == {"0": 1} and metrics["teacher_logits_reused"] is False
    from safetensors.torch import load_file

    projections = load_file(out / "02-distill" / "hidden_projections.safetensors")
    assert projections["0.weight"].shape == (32, 16)  # student width 16 -> teacher width 32
    report = json.loads((out / "report.json").read_text())
    assert {r["artifact"] for r in report["results"]} == {"teacher", "student", "fp32", "fp32-fused"}
    assert report["reference"] == "teacher"
    student = AutoModelForSequenceClassification.from_pretrained(out / "02-distill" / "model")
    assert (student.config.num_hidden_layers, student.config.hidden_size) == (1, 16)
    # another student setting reuses the cached teacher logits
    overrides = ["--set", "stages.1.adaptive=anneal", "--set", "stages.1.temperature=3"]
    assert main(["build", str(tmp_path / "r.yaml"), "--out", str(out), *overrides]) == 0
    assert json.loads((out / "02-distill" / "metrics.json").read_text())["teacher_logits_reused"] is True


def test_text_stages_train_under_bf16_autocast_and_say_so(tmp_path: Path, tiny_model_dir: Path, rt_csv: Path) -> None:
    raw = tiny_recipe(tiny_model_dir, rt_csv)
    raw["stages"] = [
        {**raw["stages"][0], "max_steps": 20, "autocast": "bf16"},
        _distill(autocast="bf16"),
        {"kind": "distill", "name": "fp32", "student": {"num_layers": 1}, "max_steps": 1},
    ]
    out = tmp_path / "run"
    assert main(["build", str(write_recipe(tmp_path / "r.yaml", raw)), "--out", str(out)]) == 0
    finetune, distill, fp32 = (
        json.loads((out / d / "metrics.json").read_text())
        for d in sorted(p.name for p in out.iterdir() if p.is_dir() and p.name[:2].isdigit())
    )
    assert (finetune["autocast"], distill["autocast"], fp32["autocast"]) == ("bf16", "bf16", "none")
    # the teacher's logits were computed in bf16 for the first student: the fp32 one does not reuse them
    assert distill["teacher_logits_reused"] is False and fp32["teacher_logits_reused"] is False
    student = AutoModelForSequenceClassification.from_pretrained(out / "02-distill" / "model")
    assert student.dtype == torch.float32  # the weights stay fp32


@pytest.mark.parametrize(
    ("stage", "message"),
    [
        (
            _distill(student={"layers": [0, 7]}),
            "`stages.0.student.layers`: layer index [7] out of range; the teacher has 6 layers (0-5)",
        ),
        (
            _distill(student={"num_layers": 2, "hidden_size": 768}),
            "`stages.0.student.hidden_size`: 768 is wider than the teacher's 384; a subset copies",
        ),
        (
            _distill(
                student={"init": "fresh", "num_layers": 2, "hidden_size": 128, "num_heads": 4},
                loss={"hidden": 1.0},
                hidden_projection=False,
            ),
            "`stages.0.loss.hidden`: student width 128 differs from the teacher's 384 and hidden_projection is false",
        ),
        (
            _distill(
                student={"init": "fresh", "num_layers": 2, "hidden_size": 128, "num_heads": 4}, loss={"attention": 1.0}
            ),
            "`stages.0.loss.attention`: the student has 4 heads and the teacher 12",
        ),
        (_distill(temperature=0), "`stages.0.temperature`: Input should be greater than 0"),
        (_distill(temperature=-1.5), "`stages.0.temperature`: Input should be greater than 0"),
    ],
)
def test_bad_distill_specs(stage: dict, message: str) -> None:
    raw = {"schema_version": 1, "model": "minilm-l6", "stages": [stage]}
    try:
        problems = check_recipe(parse_recipe(raw))
    except RecipeError as error:
        problems = error.problems
    assert any(p.startswith(message) for p in problems), problems


def test_bad_distill_spec_exits_2_from_validate(tmp_path: Path, capsys) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("schema_version: 1\nmodel: minilm-l6\nstages: [{kind: distill, student: {layers: [9]}}]\n")
    assert main(["validate", str(path)]) == 2
    assert "layer index [9] out of range" in capsys.readouterr().err


def test_transfer_loss_is_zero_only_when_the_student_is_the_teacher(tiny_model_dir: Path) -> None:
    """The transfer term needs no labels: the teacher's own outputs on unlabeled sentences are the targets."""
    from transformers import AutoTokenizer

    from edgepipe.pipeline.adapters import TextClassification
    from edgepipe.pipeline.recipe import DistillConfig
    from edgepipe.pipeline.stages.distill import transfer_loss

    teacher = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = DistillConfig(kind="distill", student={"num_layers": 1}, loss={"kd": 1.0, "ce": 0.0, "hidden": 1.0})
    texts = ["an unlabeled   review snippet", "another one"]
    task = TextClassification(tokenizer, cfg.max_seq_len)
    same = transfer_loss(teacher, teacher, task, texts, cfg, 2.0, {0: 0, 1: 1}, None)
    assert same.item() == pytest.approx(0.0, abs=1e-6)
    student = build_student(teacher, cfg, seed=0)
    other = transfer_loss(student, teacher, task, texts, cfg, 2.0, {0: 1}, None)
    assert other.item() > 1e-4 and other.requires_grad


def test_augment_cuts_to_an_ngram_and_masks_words() -> None:
    import numpy as np

    from edgepipe.pipeline.data import augment

    text = "a  gripping , funny and moving film"
    words = text.split()
    assert augment(text, np.random.default_rng(0), "[MASK]", 0.0, 0.0) == " ".join(words)
    masked = augment(text, np.random.default_rng(0), "[MASK]", 0.999, 0.0).split()
    assert masked == ["[MASK]"] * len(words)
    for seed in range(20):
        cut = augment(text, np.random.default_rng(seed), "[MASK]", 0.0, 1.0)
        assert 1 <= len(cut.split()) <= 5 and cut in " ".join(words)  # one contiguous n-gram of the words
    assert augment("one", np.random.default_rng(0), "[MASK]", 0.0, 1.0) == "one"  # a single word stays


def test_stage_seed_and_an_augmented_transfer_set_of_the_train_texts(
    tmp_path: Path, tiny_model_dir: Path, rt_csv: Path
) -> None:
    raw = tiny_recipe(tiny_model_dir, rt_csv)
    transfer = {"source": "train", "mask": 0.1, "ngram": 0.25}
    raw["stages"] = [{**raw["stages"][0], "max_steps": 10}, _distill(max_steps=8, transfer=transfer)]
    out = tmp_path / "run"
    path = write_recipe(tmp_path / "r.yaml", raw)
    assert main(["build", str(path), "--out", str(out)]) == 0
    metrics = json.loads((out / "02-distill" / "metrics.json").read_text())
    assert metrics["loss_transfer_start"] > 0
    # a distill seed of its own retrains the student only: the split and the teacher stay
    assert main(["build", str(path), "--out", str(out), "--set", "stages.1.seed=5"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["reused"] for s in manifest["stages"]] == [True, False]
    assert json.loads((out / "02-distill" / "metrics.json").read_text())["loss_transfer_start"] != pytest.approx(
        metrics["loss_transfer_start"]
    )
