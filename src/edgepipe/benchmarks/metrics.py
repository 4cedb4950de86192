"""Accuracy metrics of every task, computed the same way in training, quantization, search and bench.

- text/image classification: accuracy of the argmax.
- token classification (NER): precision/recall/F1 over exact entity spans (type, first word, last word),
  micro-averaged over all sentences, as conlleval and seqeval's default mode count them: an `I-X` that
  does not continue an entity of type X starts one. Logits and labels are per word (batch, words, labels)
  and (batch, words), label -100 past a sentence's end; the headline number is F1. Spans are read from
  BIO tags by `edgepipe.runtime.text.entity_spans`, which the Predictor's `entities` also uses.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from edgepipe.errors import InputError
from edgepipe.runtime.text import entity_spans

IGNORE = -100


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


def word_entity_scores(logits: np.ndarray, labels: np.ndarray, label_names: list[str]) -> EntityScores:
    """Entity scores of per-word logits (batch, words, labels) against per-word label ids (batch, words)."""
    width = min(logits.shape[1], labels.shape[1])
    if (labels[:, width:] != IGNORE).any():
        raise InputError(f"logits cover {logits.shape[1]} words but some sentences have more labeled words")
    predicted = logits[:, :width].argmax(-1)
    gold_tags, pred_tags = [], []
    for gold_row, pred_row in zip(labels[:, :width], predicted, strict=True):
        keep = gold_row != IGNORE
        gold_tags.append([label_names[i] for i in gold_row[keep]])
        pred_tags.append([label_names[i] for i in pred_row[keep]])
    return entity_f1(gold_tags, pred_tags)


def score(logits: np.ndarray, labels: np.ndarray, label_names: list[str]) -> float:
    """The task's headline metric: accuracy for (batch,) labels, entity F1 for per-word (batch, words) labels."""
    if labels.ndim == 2:
        return word_entity_scores(logits, labels, label_names).f1
    return float((logits.argmax(-1) == labels).mean())


def metric_name(labels: np.ndarray) -> str:
    return "entity F1" if labels.ndim == 2 else "accuracy"


def argmax_agreement(logits: np.ndarray, reference: np.ndarray, labels: np.ndarray | None = None) -> float:
    """Share of equal predictions; per-word predictions count real words only (labels != -100)."""
    same = logits.argmax(-1) == reference.argmax(-1)
    if labels is not None and labels.ndim == 2 and same.ndim == 2:
        width = min(same.shape[1], labels.shape[1])
        return float(same[:, :width][labels[:, :width] != IGNORE].mean())
    return float(same.mean())
