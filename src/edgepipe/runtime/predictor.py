"""`Predictor`: an artifact folder (ONNX or transformers) plus its tokenizer and labels, ready to call.

Predictor.load("runs/demo/03-quantize/int8-dynamic").predict(["great film"])
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgepipe.errors import InputError
from edgepipe.runtime.backends import RuntimeOptions, Session, backend_for

META_FILE = "edgepipe.json"


@dataclass(frozen=True)
class Prediction:
    label: str
    score: float
    probabilities: dict[str, float]


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def model_labels(folder: Path) -> list[str]:
    """Label names in id order, from edgepipe's metadata or the transformers config."""
    meta = folder / META_FILE
    if meta.is_file():
        return list(json.loads(meta.read_text(encoding="utf-8"))["labels"])
    if (folder / "config.json").is_file():
        from transformers import AutoConfig

        id2label = AutoConfig.from_pretrained(folder).id2label  # fills defaults config.json omits
        return [id2label[k] for k in sorted(id2label)]
    raise InputError(f"{folder} has neither {META_FILE} nor config.json; it is not an artifact folder")


class Predictor:
    def __init__(self, session: Session, tokenizer: object, labels: list[str], max_seq_len: int = 128) -> None:
        self.session = session
        self.tokenizer = tokenizer
        self.labels = labels
        self.max_seq_len = max_seq_len

    @classmethod
    def load(cls, folder: str | Path, *, options: RuntimeOptions | None = None, target: str = "cpu") -> Predictor:
        from transformers import AutoTokenizer

        folder = Path(folder)
        if not folder.is_dir():
            raise InputError(f"artifact folder not found: {folder}")
        fmt = "onnx" if (folder / "model.onnx").exists() else "transformers"
        labels = model_labels(folder)
        session = backend_for(fmt, target).load(folder, options or RuntimeOptions())
        return cls(session, AutoTokenizer.from_pretrained(folder), labels)

    def encode(self, texts: list[str], *, pad_to: int | None = None) -> dict[str, np.ndarray]:
        """Tokenize to int64 arrays: padded to the longest text, or to exactly `pad_to` tokens."""
        length = pad_to or self.max_seq_len
        encoded = self.tokenizer(  # type: ignore[operator]
            texts,
            padding="max_length" if pad_to else "longest",
            truncation=True,
            max_length=length,
            return_tensors="np",
        )
        return {k: np.asarray(encoded[k], dtype=np.int64) for k in self.session.input_names if k in encoded}

    def logits(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        outputs = [self.session.run(self.encode(texts[i : i + batch_size])) for i in range(0, len(texts), batch_size)]
        return np.concatenate(outputs, axis=0)

    def predict(self, texts: list[str]) -> list[Prediction]:
        probs = softmax(self.logits(texts))
        results = []
        for row in probs:
            best = int(row.argmax())
            results.append(
                Prediction(self.labels[best], float(row[best]), dict(zip(self.labels, row.tolist(), strict=True)))
            )
        return results
