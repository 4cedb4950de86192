"""`Predictor`: an artifact folder (ONNX, transformers or module) plus its input encoding and labels.

Predictor.load("runs/demo/05-quantize/int8-dynamic").predict(["great film"])
Predictor.load("runs/mnist/04-quantize/int8-static").predict(images)  # float32 (N, 1, 28, 28) in [0, 1]
Predictor.load("runs/ner/04-quantize/int8-dynamic").entities(["Paul Walker lives in New York"])  # NER
Predictor.load("runs/smollm2/03-quantize/int8-dynamic").generate(["The film is"], 32, do_sample=True, seed=0)

A token classifier's `logits` are per word (texts, words, labels): each word's first sub-word token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgepipe.errors import InputError
from edgepipe.files import read_json
from edgepipe.runtime.backends import RuntimeOptions, Session, backend_for, get_backend
from edgepipe.runtime.text import (
    LM_TASK,
    TOKEN_TASK,
    entity_spans,
    folder_task,
    gather_words,
    max_words,
    word_positions,
)

META_FILE = "edgepipe.json"


@dataclass(frozen=True)
class Prediction:
    label: str
    score: float
    probabilities: dict[str, float]


@dataclass(frozen=True)
class Entity:
    type: str
    text: str  # the entity's words joined by spaces
    start: int  # first word
    end: int  # last word (inclusive)
    score: float  # mean probability of its words' tags


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def model_labels(folder: Path) -> list[str]:
    """Label names in id order, from edgepipe's metadata or the transformers config."""
    meta = folder / META_FILE
    if meta.is_file():
        labels = read_json(meta, "model", "write the artifact again with `edgepipe build`").get("labels")
        if not isinstance(labels, list):
            raise InputError(f"`model`: {meta} has no `labels` list; write the artifact again with `edgepipe build`")
        return [str(label) for label in labels]
    if (folder / "config.json").is_file():
        from transformers import AutoConfig

        try:
            id2label = AutoConfig.from_pretrained(folder).id2label  # fills defaults config.json omits
            return [str(id2label[k]) for k in sorted(id2label)]
        except (ValueError, TypeError, KeyError, AttributeError, OSError) as error:
            raise InputError(
                f"`model`: {folder / 'config.json'} cannot be read as a transformers config "
                f"({type(error).__name__}: {error}); fix the field or write it again with save_pretrained"
            ) from None
    raise InputError(f"{folder} has neither {META_FILE} nor config.json; it is not an artifact folder")


def model_task(folder: Path) -> str:
    """The task recorded in edgepipe's metadata, else read from a transformers config."""
    meta = folder / META_FILE
    if meta.is_file():
        task = read_json(meta, "model", "write the artifact again with `edgepipe build`").get("task")
        if task:
            return str(task)
    return folder_task(folder)


def image_shape(folder: Path) -> tuple[int, ...] | None:
    """(channels, height, width) an image model takes, from its metadata; None for text models."""
    meta = folder / META_FILE
    if not meta.is_file():
        return None
    shape = read_json(meta, "model", "write the artifact again with `edgepipe build`").get("input", {}).get("shape")
    return tuple(shape) if shape else None


class Predictor:
    """Text models take a list of strings; image models a float32 array (N, C, H, W) in [0, 1]."""

    def __init__(
        self,
        session: Session | None,
        tokenizer: Any,
        labels: list[str],
        max_seq_len: int = 128,
        input_shape: tuple[int, ...] | None = None,
        task: str = "text-classification",
        generator: Any = None,
    ) -> None:
        self._session = session
        self.generator = generator  # causal LMs: OnnxCausalLM or TorchCausalLM (edgepipe.runtime.generate)
        self.tokenizer = tokenizer
        self.labels = labels
        self.max_seq_len = max_seq_len
        self.input_shape = input_shape
        self.task = task

    @classmethod
    def load(
        cls,
        folder: str | Path,
        *,
        options: RuntimeOptions | None = None,
        target: str = "cpu",
        backend: str | None = None,
    ) -> Predictor:
        """An artifact folder on `backend` (a registry name), else on the target's default backend."""
        folder = Path(folder)
        if not folder.is_dir():
            raise InputError(f"artifact folder not found: {folder}")
        onnx_files = ("model.onnx", "model.ort", "model.xml")  # model.xml: OpenVINO's IR of an ONNX model
        fmt = "onnx" if any((folder / name).exists() for name in onnx_files) else "torch"
        if model_task(folder) == LM_TASK:
            from transformers import AutoTokenizer

            from edgepipe.runtime.generate import load_causal_lm

            generator = load_causal_lm(folder, fmt, options or RuntimeOptions())
            return cls(None, AutoTokenizer.from_pretrained(folder), [], task=LM_TASK, generator=generator)
        labels = model_labels(folder)
        chosen = get_backend(backend) if backend is not None else backend_for(fmt, target, folder)
        session = chosen.load(folder, options or RuntimeOptions())
        shape = image_shape(folder)
        if shape is not None:
            return cls(session, None, labels, input_shape=shape)
        from transformers import AutoTokenizer

        return cls(session, AutoTokenizer.from_pretrained(folder), labels, task=model_task(folder))

    @property
    def session(self) -> Session:
        if self._session is None:
            raise InputError("this artifact is a causal LM: use Predictor.generate(prompts)")
        return self._session

    def generate(
        self,
        prompts: Sequence[str],
        max_new_tokens: int = 32,
        *,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        seed: int | None = None,
    ) -> list[str]:
        """Continuations of `prompts` (greedy, or sampled with a seed), each up to its end-of-sequence token."""
        if self.generator is None:
            raise InputError(f"generate() needs a causal-lm artifact; this one is {self.task}")
        tokenizer = self.tokenizer
        tokenizer.padding_side = "left"  # batch rows end together, so each new token continues its row
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        encoded = tokenizer(list(prompts), padding="longest", return_tensors="np")
        ids = np.asarray(encoded["input_ids"], dtype=np.int64)
        mask = np.asarray(encoded["attention_mask"], dtype=np.int64)
        result = self.generator.generate(
            ids,
            mask,
            max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_k=top_k,
            seed=seed,
            eos_token_id=tokenizer.eos_token_id,
        )
        texts = []
        for row in result.tokens.tolist():
            if tokenizer.eos_token_id in row:
                row = row[: row.index(tokenizer.eos_token_id)]
            texts.append(tokenizer.decode(row, skip_special_tokens=True))
        return texts

    def encode(self, inputs: Sequence[str] | np.ndarray, *, pad_to: int | None = None) -> dict[str, np.ndarray]:
        """Feeds for a batch: tokens padded to the longest text or to exactly `pad_to`; or checked images."""
        if self.input_shape is not None:
            return {self.session.input_names[0]: self._images(inputs)}
        return self._feeds(self._tokenize(list(inputs), pad_to))

    def _tokenize(self, texts: list[str], pad_to: int | None = None, offsets: bool = False) -> Any:
        return self.tokenizer(
            texts,
            padding="max_length" if pad_to else "longest",
            truncation=True,
            max_length=pad_to or self.max_seq_len,
            return_tensors="np",
            return_offsets_mapping=offsets,
        )

    def _feeds(self, encoded: Any) -> dict[str, np.ndarray]:
        return {k: np.asarray(encoded[k], dtype=np.int64) for k in self.session.input_names if k in encoded}

    def _images(self, inputs: Sequence[str] | np.ndarray) -> np.ndarray:
        expected = self.input_shape or ()
        if not isinstance(inputs, np.ndarray) or inputs.ndim != 4 or tuple(inputs.shape[1:]) != expected:
            got = inputs.shape if isinstance(inputs, np.ndarray) else type(inputs).__name__
            raise InputError(
                f"this model takes images of shape (batch, {', '.join(map(str, expected))}) scaled to [0, 1], "
                f"got {got}; resize or reshape the images"
            )
        return np.ascontiguousarray(inputs, dtype=np.float32)

    def logits(self, inputs: Sequence[str] | np.ndarray, batch_size: int = 32) -> np.ndarray:
        """(inputs, labels); a token classifier's per word (texts, most words of a text, labels). Texts run
        in batches of similar length (by characters), which pad less, and come back in their order."""
        if self.input_shape is not None:
            return np.concatenate(
                [self.session.run(self.encode(inputs[i : i + batch_size])) for i in range(0, len(inputs), batch_size)]
            )
        texts = list(inputs)
        width = max_words(texts)
        order = np.argsort([len(t) for t in texts], kind="stable")
        outputs = []
        for i in range(0, len(texts), batch_size):
            chunk = [texts[j] for j in order[i : i + batch_size]]
            if self.task != TOKEN_TASK:
                outputs.append(self.session.run(self.encode(chunk)))
                continue
            encoded = self._tokenize(chunk, offsets=True)  # one tokenization gives the feeds and the offsets
            positions = word_positions(chunk, encoded["offset_mapping"], width)
            outputs.append(gather_words(self.session.run(self._feeds(encoded)), positions))
        return np.concatenate(outputs, axis=0)[np.argsort(order)]

    def entities(self, texts: Sequence[str]) -> list[list[Entity]]:
        """Entities of each sentence (words separated by spaces) from its BIO tags (token classifiers)."""
        if self.task != TOKEN_TASK:
            raise InputError(f"entities() needs a token-classification model; this one is {self.task}")
        found = []
        for text, row in zip(texts, softmax(self.logits(list(texts))), strict=True):
            words = text.split(" ")
            best = row[: len(words)].argmax(-1)
            spans = entity_spans([self.labels[i] for i in best])
            probability = row[np.arange(len(best)), best]
            ordered = sorted(spans, key=lambda span: span[1])
            found.append(
                [
                    Entity(k, " ".join(words[a : b + 1]), a, b, float(probability[a : b + 1].mean()))
                    for k, a, b in ordered
                ]
            )
        return found

    def predict(self, inputs: Sequence[str] | np.ndarray) -> list[Prediction]:
        probs = softmax(self.logits(inputs))
        results = []
        for row in probs:
            best = int(row.argmax())
            results.append(
                Prediction(self.labels[best], float(row[best]), dict(zip(self.labels, row.tolist(), strict=True)))
            )
        return results
