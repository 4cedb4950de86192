"""One adapter per task: what a stage needs to know about the task and nothing about the stage.

An adapter turns train examples into a batch (model inputs and hard labels), runs a model on it, reads
the task's logits from the output, picks the labeled samples a loss counts, gives the hard-label loss
and the task's metric, and for the classifiers the teacher's logits of many examples, the export spec,
the real feeds of an export and the calibration feeds of static quantization. The training stages
(`finetune`, `distill`, pruning's recovery, causal-LM distill) are one loop (`edgepipe.pipeline.loop`)
over these methods; `adapter_for(task, ...)` gives the adapter of a task.

Token classification is per word: a sentence is its words joined by spaces, and a word's logits are
those of its first sub-word (`words_of`), so a word the tokenizer truncated away has none.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from edgepipe.benchmarks.metrics import IGNORE
from edgepipe.pipeline.data import Split
from edgepipe.tasks import Task


@dataclass(frozen=True)
class Batch:
    """Model inputs of some examples and their hard labels.

    `inputs`: keyword tensors of a transformers model, or an image tensor; `labels`: per example (n,),
    per word (n, words) with IGNORE where a word has none, or the token ids of causal LM;
    `positions`: token classification only, each word's first sub-word (n, words), -1 where none."""

    inputs: Any
    labels: Any
    positions: Any = None


class TaskAdapter(Protocol):
    """What every task has (classifiers and causal LM)."""

    task: Task

    def batch(self, split: Split, index: np.ndarray) -> Batch: ...

    def forward(self, model: Any, batch: Batch, **options: Any) -> Any: ...

    def logits(self, output: Any, batch: Batch) -> Any: ...

    def loss(self, logits: Any, batch: Batch) -> Any: ...

    def metric(self, model: Any, split: Split) -> float: ...


def encode(tokenizer: Any, texts: list[str], max_seq_len: int) -> Any:
    return tokenizer(texts, padding=True, truncation=True, max_length=max_seq_len, return_tensors="pt")


def encode_words(tokenizer: Any, texts: list[str], max_seq_len: int, width: int) -> tuple[Any, Any]:
    """Tokens of sentences given as words joined by spaces, and each word's first sub-word position
    (batch, width) as a tensor (-1: no token)."""
    import torch

    from edgepipe.runtime.text import word_positions

    enc = tokenizer(
        texts, padding=True, truncation=True, max_length=max_seq_len, return_tensors="pt", return_offsets_mapping=True
    )
    positions = word_positions(texts, enc.pop("offset_mapping").numpy(), width)
    return enc, torch.from_numpy(positions)


PART_OVERHEAD = 64
"""What running one more part of a batch costs, in tokens of work: the value of the sweep in
benchmarks/bench_padding.py that trained the demo's batches fastest (RESULTS.md, "One batch in parts")."""


def padding_parts(lengths: np.ndarray, overhead: int = PART_OVERHEAD) -> list[np.ndarray]:
    """The rows of a batch of texts with `lengths` tokens, sorted by length and cut into the parts that run
    the fewest tokens: a part pads to its longest text and costs `overhead` more (an exact dynamic program over
    the sorted rows)."""
    order = np.argsort(lengths, kind="stable")
    ordered = lengths[order]
    best, cut = np.zeros(len(ordered) + 1), np.zeros(len(ordered) + 1, dtype=int)
    for end in range(1, len(ordered) + 1):
        costs = [best[start] + overhead + (end - start) * ordered[end - 1] for start in range(end)]
        cut[end] = int(np.argmin(costs))
        best[end] = costs[cut[end]]
    parts, end = [], len(ordered)
    while end:
        parts.append(order[cut[end] : end])
        end = cut[end]
    return parts[::-1]


def words_of(token_logits: Any, positions: Any) -> Any:
    """Per-word logits (batch, width, labels) read at each word's first sub-word; 0 where it has none."""
    picked = token_logits.gather(1, positions.clamp_min(0)[..., None].expand(-1, -1, token_logits.shape[-1]))
    return picked * (positions[..., None] >= 0)


@dataclass(frozen=True)
class TextClassification:
    """One label per text; a transformers sequence classifier."""

    tokenizer: Any
    max_seq_len: int
    eval_batch_size: int = 64
    task: Task = Task.TEXT

    def encode(self, texts: list[str], width: int | None = None) -> tuple[Any, Any]:
        """Model inputs of `texts` and, per word, its first sub-word (token classification; None here)."""
        return encode(self.tokenizer, texts, self.max_seq_len), None

    def lengths(self, split: Split) -> np.ndarray:
        """Tokens per text of `split` (at most `max_seq_len`): what a batch of it pads to."""
        ids = self.tokenizer(list(split.inputs), truncation=True, max_length=self.max_seq_len)["input_ids"]
        return np.asarray([len(i) for i in ids])

    def batch(self, split: Split, index: np.ndarray) -> Batch:
        import torch

        inputs, positions = self.encode(list(split.take(index)), word_width(split))
        return Batch(inputs, torch.from_numpy(split.labels[index]), positions)

    def forward(self, model: Any, batch: Batch, **options: Any) -> Any:
        return model(**batch.inputs, **options)

    def logits(self, output: Any, batch: Batch) -> Any:
        return output.logits.float()  # fp32 losses under bf16 autocast (a no-op otherwise)

    def batch_logits(self, model: Any, batch: Batch, overhead: int = PART_OVERHEAD) -> Any:
        """The task's logits of `batch`, run in parts of similar length (`padding_parts`), each cut to its own
        longest text: the same logits as one padded batch (a text's do not depend on the padding after it),
        for fewer tokens. Random batches of the demo's reviews pad to 1.9x their mean length. One part under
        DDP (it allows one forward per backward) and for left padding (a cut would drop real tokens)."""
        import torch

        mask = batch.inputs["attention_mask"]
        lengths = mask.sum(1).numpy()
        parts = padding_parts(lengths, overhead)
        ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
        if len(parts) == 1 or ddp or self.tokenizer.padding_side != "right":
            return self.logits(self.forward(model, batch), batch)
        outputs = []
        for rows in parts:
            picked, width = torch.from_numpy(rows), int(lengths[rows].max())
            inputs = {key: value[picked, :width] for key, value in batch.inputs.items()}
            part = Batch(inputs, None, None if batch.positions is None else batch.positions[picked])
            outputs.append(self.logits(self.forward(model, part), part))
        return torch.cat(outputs)[torch.from_numpy(np.argsort(np.concatenate(parts)))]

    def samples(self, batch: Batch, *per_example: Any) -> tuple[Any, ...]:
        """`per_example` tensors and the labels, restricted to the samples a loss counts (all of them)."""
        return (*per_example, batch.labels)

    def loss(self, logits: Any, batch: Batch) -> Any:
        import torch.nn.functional as F

        logits, labels = self.samples(batch, logits)
        return F.cross_entropy(logits, labels)

    def predict(self, model: Any, split: Split) -> Any:
        """Logits of every example of `split` in its order (eval mode, no gradients), in batches of
        `eval_batch_size` texts of similar length (less padding)."""
        import torch

        texts, width = list(split.inputs), word_width(split)
        order = np.argsort(self.lengths(split), kind="stable")
        model.eval()
        outputs = []
        with torch.inference_mode():
            for i in range(0, len(texts), self.eval_batch_size):
                enc, positions = self.encode([texts[j] for j in order[i : i + self.eval_batch_size]], width)
                outputs.append(self.logits(model(**enc), Batch(enc, None, positions)))
        return torch.cat(outputs)[torch.from_numpy(np.argsort(order))]

    def metric(self, model: Any, split: Split) -> float:
        """Accuracy (entity F1 for token classification) on `split`."""
        from edgepipe.benchmarks.metrics import score

        logits = self.predict(model, split).numpy()
        return score(logits, split.labels, [model.config.id2label[i] for i in range(model.config.num_labels)])

    def export_spec(self, model: Any) -> Any:
        from edgepipe.export import spec_for

        return spec_for(model, self.task)

    def feeds(self, examples: Any, input_names: tuple[str, ...]) -> Any:
        """Real examples at any (batch, seq_len) an export or a latency measurement asks for."""
        from edgepipe.export import text_feeds

        return text_feeds(self.tokenizer, list(examples), input_names)

    def calibration(self, examples: Any, input_names: tuple[str, ...], batch_size: int, fixed_length: bool) -> Any:
        from edgepipe.pipeline.calibration import CalibrationSet

        return CalibrationSet(
            list(examples), self.tokenizer, input_names, batch_size, self.max_seq_len, fixed_length=fixed_length
        )


@dataclass(frozen=True)
class TokenClassification(TextClassification):
    """One label per word (NER); a transformers token classifier read at each word's first sub-word."""

    task: Task = Task.TOKEN

    def encode(self, texts: list[str], width: int | None = None) -> tuple[Any, Any]:
        """`width` words per sentence (the labels' width; the longest sentence's when None)."""
        texts = [" ".join(t.split()) for t in texts]  # the words joined by single spaces, as in tagged data
        width = width or max(len(t.split()) for t in texts)
        return encode_words(self.tokenizer, texts, self.max_seq_len, width)

    def logits(self, output: Any, batch: Batch) -> Any:
        return words_of(output.logits.float(), batch.positions)

    def samples(self, batch: Batch, *per_word: Any) -> tuple[Any, ...]:
        """Every labeled word that kept a token is one sample: `per_word` tensors (n, words, ...) and
        the labels, flattened to those words."""
        labeled = batch.positions >= 0
        if batch.labels is not None:
            labeled = labeled & (batch.labels != IGNORE)
        labels = batch.labels[labeled] if batch.labels is not None else None
        return (*(t[labeled] for t in per_word), labels)


@dataclass(frozen=True)
class ImageClassification:
    """One label per image; a torch module taking (n, channels, height, width) float32."""

    eval_batch_size: int = 64
    task: Task = Task.IMAGE

    def batch(self, split: Split, index: np.ndarray) -> Batch:
        import torch

        return Batch(torch.from_numpy(np.asarray(split.take(index))), torch.from_numpy(split.labels[index]))

    def forward(self, model: Any, batch: Batch, **options: Any) -> Any:
        return model(batch.inputs)

    def logits(self, output: Any, batch: Batch) -> Any:
        return output.float()

    def batch_logits(self, model: Any, batch: Batch) -> Any:
        """The logits of `batch` (images are all one size: one part)."""
        return self.logits(self.forward(model, batch), batch)

    def samples(self, batch: Batch, *per_example: Any) -> tuple[Any, ...]:
        return (*per_example, batch.labels)

    def loss(self, logits: Any, batch: Batch) -> Any:
        import torch.nn.functional as F

        return F.cross_entropy(logits, batch.labels)

    def predict(self, model: Any, split: Split) -> Any:
        import torch

        images = np.asarray(split.inputs)
        model.eval()
        with torch.inference_mode():
            return torch.cat(
                [
                    model(torch.from_numpy(images[i : i + self.eval_batch_size]))
                    for i in range(0, len(images), self.eval_batch_size)
                ]
            )

    def metric(self, model: Any, split: Split) -> float:
        return float((self.predict(model, split).argmax(-1).numpy() == split.labels).mean())

    def export_spec(self, model: Any) -> Any:
        from edgepipe.export import spec_for

        return spec_for(model, self.task)

    def feeds(self, examples: Any, input_names: tuple[str, ...]) -> Any:
        from edgepipe.export import image_feeds

        return image_feeds(np.asarray(examples))

    def calibration(self, examples: Any, input_names: tuple[str, ...], batch_size: int, fixed_length: bool) -> Any:
        from edgepipe.pipeline.calibration import ImageCalibrationSet

        return ImageCalibrationSet(np.asarray(examples), input_names[0], batch_size)


def encode_lm(tokenizer: Any, texts: list[str], max_len: int, padding_side: str = "right") -> tuple[Any, Any]:
    """Token ids and attention mask (int64 arrays), padded to the longest text (at most `max_len` tokens)."""
    tokenizer.padding_side = padding_side
    encoded = tokenizer(texts, padding="longest", truncation=True, max_length=max_len, return_tensors="np")
    return encoded["input_ids"].astype(np.int64), encoded["attention_mask"].astype(np.int64)


def text_batches(tokenizer: Any, texts: list[str], batch_size: int, max_len: int) -> Iterator[tuple[Any, Any]]:
    """`encode_lm` of consecutive chunks of `batch_size` texts."""
    for start in range(0, len(texts), batch_size):
        yield encode_lm(tokenizer, texts[start : start + batch_size], max_len)


def next_token_ce(logits: Any, ids: Any, mask: Any) -> Any:
    """Mean cross-entropy of each real token given the real tokens before it (perplexity's own count)."""
    import torch.nn.functional as F

    counted = (mask[:, 1:] * mask[:, :-1]).bool()
    return F.cross_entropy(logits[:, :-1][counted], ids[:, 1:][counted])


@dataclass(frozen=True)
class CausalLM:
    """Next-token prediction on texts; the labels are the texts' own tokens, the metric perplexity."""

    tokenizer: Any
    max_seq_len: int
    eval_batch_size: int = 16
    task: Task = Task.LM

    def batch(self, split: Split, index: np.ndarray) -> Batch:
        return self.batch_of_texts([split.inputs[i] for i in index])

    def batch_of_texts(self, texts: list[str]) -> Batch:
        import torch

        from edgepipe.runtime.generate import position_ids

        ids, mask = encode_lm(self.tokenizer, texts, self.max_seq_len)
        inputs = {
            "input_ids": torch.from_numpy(ids),
            "attention_mask": torch.from_numpy(mask),
            "position_ids": torch.from_numpy(position_ids(mask)),
            "use_cache": False,
        }
        return Batch(inputs, inputs["input_ids"])

    def forward(self, model: Any, batch: Batch, **options: Any) -> Any:
        return model(**batch.inputs, **options)

    def logits(self, output: Any, batch: Batch) -> Any:
        return output.logits

    def loss(self, logits: Any, batch: Batch) -> Any:
        return next_token_ce(logits, batch.labels, batch.inputs["attention_mask"])

    def metric(self, model: Any, split: Split) -> float:
        """Perplexity of `model` on the texts of `split` (lower is better)."""
        from edgepipe.runtime.generate import perplexity, torch_logits

        batches = text_batches(self.tokenizer, list(split.inputs), self.eval_batch_size, self.max_seq_len)
        return perplexity(torch_logits(model), batches)


Classifier = TextClassification | ImageClassification


def word_width(split: Split) -> int | None:
    """Words per sentence of per-word labels (token classification); None for one label per example."""
    return int(split.labels.shape[1]) if split.labels.ndim == 2 else None


def adapter_for(task: Task | str, tokenizer: Any = None, max_seq_len: int = 128, eval_batch_size: int = 64) -> Any:
    """The adapter of `task`: a tokenizer for the text tasks, none for images."""
    task = Task(task)
    if task is Task.IMAGE:
        return ImageClassification(eval_batch_size)
    if tokenizer is None:
        raise ValueError(f"a {task.value} adapter needs the model's tokenizer")
    if task is Task.LM:
        return CausalLM(tokenizer, max_seq_len, eval_batch_size)
    if task is Task.TOKEN:
        return TokenClassification(tokenizer, max_seq_len, eval_batch_size)
    return TextClassification(tokenizer, max_seq_len, eval_batch_size)
