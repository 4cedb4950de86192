"""Loading transformers text models (head-pruned ones included) and reading token logits back as words.

Every stage and backend loads a text model through `load_text_model`. A folder whose config.json
has per-layer `layer_heads` is a pruned BERT (`edgepipe.runtime.pruned_bert`) and loads with that
class directly, never through the modeling file copied beside it.

Token classification (NER) takes sentences as words joined by single spaces, so every text path
(tokenizing, calibration, export feeds, timing) stays one list of strings. A word's prediction is
read from its first sub-word token, found from the tokenizer's character offsets (`word_positions`).
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgepipe.tasks import Task

TEXT_TASK, TOKEN_TASK, LM_TASK = Task.TEXT.value, Task.TOKEN.value, Task.LM.value


def is_pruned_bert(config: dict[str, Any]) -> bool:
    return "layer_heads" in config


def folder_task(path: Path | str) -> str:
    """token-classification for a folder whose config names a *ForTokenClassification architecture."""
    config_path = Path(path) / "config.json"
    if config_path.is_file():
        architectures = json.loads(config_path.read_text(encoding="utf-8")).get("architectures") or []
        if any(a.endswith("ForTokenClassification") for a in architectures):
            return TOKEN_TASK
    return TEXT_TASK


def load_text_model(path: Path | str, task: str | None = None, **kwargs: Any) -> Any:
    """`AutoModelFor{Sequence,Token}Classification.from_pretrained(path, **kwargs)` in eval mode.

    `task` None reads it from the folder's config (a base encoder loads as a sequence classifier)."""
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    safe = {"use_safetensors": True, **kwargs}  # never a pickle (pytorch_model.bin) on a load path
    config_path = Path(path) / "config.json"
    token = (task or folder_task(path)) == TOKEN_TASK
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    if is_pruned_bert(config):
        from edgepipe.runtime import pruned_bert

        head = "TokenClassification" if token else "SequenceClassification"
        return pruned_bert.pruned_class(config["model_type"], head).from_pretrained(path, **safe).eval()
    auto = AutoModelForTokenClassification if token else AutoModelForSequenceClassification
    return auto.from_pretrained(path, **safe).eval()


def word_positions(texts: list[str], offsets: np.ndarray, width: int) -> np.ndarray:
    """(batch, width) index of each word's first sub-word token; -1 for a word with no token (truncated)
    and past a sentence's last word. `offsets` (batch, tokens, 2) are the tokenizer's character spans."""
    positions = np.full((len(texts), width), -1, dtype=np.int64)
    for row, text in enumerate(texts):
        starts, at = [], 0
        for piece in text.split(" "):
            starts.append(at)
            at += len(piece) + 1
        for token, (begin, end) in enumerate(offsets[row].tolist()):
            if end <= begin:  # special and padding tokens have an empty span
                continue
            word = bisect.bisect_right(starts, begin) - 1
            if word < width and positions[row, word] < 0:
                positions[row, word] = token
    return positions


def gather_words(token_logits: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """(batch, tokens, labels) -> (batch, words, labels): each word's first sub-word; 0 where it has none."""
    picked = np.take_along_axis(token_logits, np.maximum(positions, 0)[..., None], axis=1)
    return np.where(positions[..., None] >= 0, picked, 0.0).astype(token_logits.dtype)


def max_words(texts: list[str]) -> int:
    return max((len(t.split(" ")) for t in texts), default=0)


def entity_spans(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """(type, first word, last word) of each entity in a BIO sequence; an `I-X` that does not continue an
    entity of type X starts one (conlleval)."""
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
