"""The task adapters and the one training loop: each task's loss counts exactly its samples, its metric is
the task's own, and `fit` is seeded, trains what it is given and nothing else."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_llama
from transformers import AutoTokenizer, BertConfig, BertForTokenClassification

from edgepipe.benchmarks.metrics import IGNORE
from edgepipe.pipeline.adapters import (
    CausalLM,
    ImageClassification,
    TextClassification,
    TokenClassification,
    adapter_for,
    next_token_ce,
    padding_parts,
)
from edgepipe.pipeline.data import Split
from edgepipe.pipeline.loop import Schedule, autocast_mode, batches, fit
from edgepipe.runtime.generate import perplexity, torch_logits
from edgepipe.tasks import TASKS, Task


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> object:
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_every_task_has_an_adapter(tokenizer: object) -> None:
    kinds = {task: type(adapter_for(task, tokenizer)) for task in TASKS}
    assert kinds == {
        Task.TEXT: TextClassification,
        Task.TOKEN: TokenClassification,
        Task.IMAGE: ImageClassification,
        Task.LM: CausalLM,
    }


def test_token_loss_counts_each_labeled_word_that_kept_a_token_once(tokenizer: object) -> None:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    model = BertForTokenClassification(config).eval()
    # sentence 0: 3 words, the last unlabeled; sentence 1: 4 words, truncated to its first 2 by max_seq_len
    split = Split(["walking dogs here", "a b c d"], np.array([[1, 0, IGNORE, IGNORE], [0, 1, 1, 0]]))
    task = TokenClassification(tokenizer, max_seq_len=4)
    batch = task.batch(split, np.array([0, 1]))
    assert batch.positions.tolist()[1][2:] == [-1, -1]  # [CLS] a b [SEP]: c and d lost their tokens
    logits = task.logits(task.forward(model, batch), batch)
    assert logits.shape == (2, 4, 2)
    picked, labels = task.samples(batch, logits)
    assert labels.tolist() == [1, 0, 0, 1]  # 2 labeled words of sentence 0, the 2 kept words of sentence 1
    token_logits = model(**batch.inputs).logits
    by_hand = [token_logits[r, batch.positions[r, w]] for r, w in ((0, 0), (0, 1), (1, 0), (1, 1))]
    assert torch.allclose(picked, torch.stack(by_hand))
    assert task.loss(logits, batch).item() == pytest.approx(F.cross_entropy(torch.stack(by_hand), labels).item())


def test_text_metric_is_the_accuracy_of_the_models_own_predictions(tiny_model_dir: Path, tokenizer: object) -> None:
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir).eval()
    texts = ["a fine film", "dull and long", "I loved it", "not for me", "fine"]
    task = TextClassification(tokenizer, max_seq_len=16, eval_batch_size=2)
    with torch.no_grad():
        predicted = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits.argmax(-1).numpy()
    labels = predicted.copy()
    labels[:2] = 1 - labels[:2]  # two of five wrong
    assert task.metric(model, Split(texts, labels)) == pytest.approx(3 / 5)


def test_image_loss_and_metric() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3)).eval()
    images = np.random.default_rng(0).standard_normal((7, 3, 2, 2)).astype(np.float32)
    with torch.no_grad():
        predicted = model(torch.from_numpy(images)).argmax(-1).numpy()
    split = Split(images, predicted)
    task = ImageClassification(eval_batch_size=3)
    assert task.metric(model, split) == 1.0
    batch = task.batch(split, np.array([4, 1]))
    assert torch.equal(batch.inputs, torch.from_numpy(images[[4, 1]]))
    logits = task.logits(task.forward(model, batch), batch)
    assert task.loss(logits, batch).item() == pytest.approx(F.cross_entropy(logits, batch.labels).item())


def test_causal_lm_loss_is_next_token_ce_and_its_metric_perplexity(tokenizer: object) -> None:
    model = tiny_llama(vocab=tokenizer.vocab_size).eval()
    texts = ["the film was fine", "a long dull film with no end", "fine"]
    task = CausalLM(tokenizer, max_seq_len=8, eval_batch_size=2)
    batch = task.batch(Split(texts, np.zeros(3, dtype=np.int64)), np.arange(3))
    with torch.no_grad():
        logits = task.logits(task.forward(model, batch), batch)
        ids, mask = batch.inputs["input_ids"], batch.inputs["attention_mask"]
        assert task.loss(logits, batch).item() == pytest.approx(next_token_ce(logits, ids, mask).item())
    expected = perplexity(
        torch_logits(model), [(ids[:2].numpy(), mask[:2].numpy()), (ids[2:].numpy(), mask[2:].numpy())]
    )
    assert task.metric(model, Split(texts, np.zeros(3, dtype=np.int64))) == pytest.approx(expected, rel=1e-4)


def test_batches_are_reshuffled_epochs() -> None:
    plan = batches(10, 3, 7, seed=0)
    assert len(plan) == 7 and all(len(b) == 3 for b in plan)
    first_epoch = np.concatenate(plan[:3])
    assert len(set(first_epoch.tolist())) == 9  # 3 full batches of one permutation: no repeats
    assert [b.tolist() for b in batches(10, 3, 7, seed=0)] == [b.tolist() for b in plan]


def test_batches_grouped_by_length_pad_less_and_still_see_every_example_once_per_epoch() -> None:
    lengths = np.random.default_rng(1).integers(4, 64, size=2000)
    grouped, plain = batches(2000, 8, 250, seed=0, lengths=lengths), batches(2000, 8, 250, seed=0)
    assert sorted(np.concatenate(grouped).tolist()) == list(range(2000))  # one epoch, every example once
    padded = [np.mean([lengths[b].max() for b in plan]) for plan in (grouped, plain)]
    assert padded[0] < 0.8 * padded[1]
    assert np.corrcoef(np.arange(250), [lengths[b].max() for b in grouped])[0, 1] ** 2 < 0.1  # not sorted by length
    assert [b.tolist() for b in batches(2000, 8, 250, seed=0, lengths=lengths)] == [b.tolist() for b in grouped]


def test_text_predict_sorts_by_length_and_returns_the_split_order(tiny_model_dir: Path, tokenizer: object) -> None:
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir).eval()
    texts = ["a fine and very long film about nothing at all", "dull", "I loved it", "not for me at all", "fine"]
    task = TextClassification(tokenizer, max_seq_len=16, eval_batch_size=2)
    with torch.no_grad():
        one_by_one = torch.cat([model(**tokenizer([t], return_tensors="pt")).logits for t in texts])
    assert torch.allclose(task.predict(model, Split(texts, np.zeros(5, dtype=np.int64))), one_by_one, atol=1e-5)


def test_padding_parts_run_the_fewest_tokens() -> None:
    lengths = np.random.default_rng(0).integers(4, 64, size=10)

    def cost(parts: list[np.ndarray], overhead: int) -> int:
        return sum(overhead + len(p) * int(lengths[p].max()) for p in parts)

    order = np.argsort(lengths, kind="stable")
    for overhead in (0, 16, 64, 10_000):
        parts = padding_parts(lengths, overhead)
        assert sorted(np.concatenate(parts).tolist()) == list(range(10))
        every_cut = (  # each way to cut the sorted rows into contiguous parts
            np.split(order, [i for i in range(1, 10) if mask >> (i - 1) & 1]) for mask in range(2**9)
        )
        assert cost(parts, overhead) == min(cost(c, overhead) for c in every_cut)
    assert len(padding_parts(lengths, 0)) == len(set(lengths.tolist())) and len(padding_parts(lengths, 10_000)) == 1


@pytest.mark.parametrize("kind", ["text", "token"])
def test_batch_logits_in_parts_equal_one_padded_batch(tiny_model_dir: Path, tokenizer: object, kind: str) -> None:
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    short, long = "fine", "a fine and very long film about nothing at all but its own long and slow end"
    texts = [short, long, "I loved it", short, "dull", long, "not for me", short] * 4
    if kind == "text":
        model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir).eval()
        task: TextClassification = TextClassification(tokenizer, max_seq_len=32)
        split = Split(texts, np.arange(32) % 2)
    else:
        config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
        model = BertForTokenClassification(config).eval()
        task = TokenClassification(tokenizer, max_seq_len=32)
        split = Split(texts, np.zeros((32, 20), dtype=np.int64))
    batch = task.batch(split, np.random.default_rng(0).permutation(32))
    assert len(padding_parts(batch.inputs["attention_mask"].sum(1).numpy())) > 1  # it does run in parts
    whole = task.logits(task.forward(model, batch), batch)
    whole.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    in_parts = task.batch_logits(model, batch)
    in_parts.sum().backward()
    assert torch.allclose(in_parts, whole, atol=1e-5)
    assert all(torch.allclose(p.grad, g, atol=1e-4) for p, g in zip(model.parameters(), grads, strict=True))


def _regression(seed: int) -> tuple[torch.nn.Module, torch.nn.Module, Split]:
    torch.manual_seed(seed)
    x = np.random.default_rng(seed).standard_normal((64, 4)).astype(np.float32)
    y = (x @ np.array([1.0, -2.0, 0.5, 3.0], dtype=np.float32) > 0).astype(np.int64)
    return torch.nn.Linear(4, 2), torch.nn.Linear(2, 2), Split(x, y)


def test_fit_is_seeded_and_trains_the_model_and_the_outside_parameters() -> None:
    task = ImageClassification()
    schedule = Schedule(lr=0.05, weight_decay=0.0, warmup_ratio=0.0, max_steps=40, batch_size=16)

    def run() -> tuple[list[float], torch.nn.Module, torch.nn.Module]:
        model, head, split = _regression(0)
        start = head.weight.detach().clone()

        def step_loss(trained: torch.nn.Module, step: int, index: np.ndarray) -> torch.Tensor:
            batch = task.batch(split, index)
            return F.cross_entropy(head(trained(batch.inputs)), batch.labels)

        fitted = fit(model, step_loss, schedule, len(split), seed=0, outside=list(head.parameters()))
        assert not torch.equal(head.weight, start)  # the outside parameters moved too
        assert len(fitted.losses) == len(fitted.step_s) == 40 and not model.training
        return fitted.losses, model, head

    losses, model, _ = run()
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    again, model_again, _ = run()
    assert again == losses and torch.equal(model.weight, model_again.weight)


def test_fit_leaves_frozen_parameters_alone() -> None:
    model, _, split = _regression(1)
    model.bias.requires_grad_(False)
    bias = model.bias.detach().clone()
    task = ImageClassification()
    fit(
        model,
        lambda m, step, index: task.loss(m(task.batch(split, index).inputs), task.batch(split, index)),
        Schedule(lr=0.1, weight_decay=0.1, warmup_ratio=0.1, max_steps=5, batch_size=8),
        len(split),
        seed=0,
    )
    assert torch.equal(model.bias, bias)


def test_fit_under_bf16_autocast_runs_the_forward_in_bf16_learns_and_keeps_fp32_weights() -> None:
    task = ImageClassification()
    dtypes: dict[str, set[torch.dtype]] = {}

    def run(autocast: str) -> list[float]:
        model, head, split = _regression(0)
        seen = dtypes.setdefault(autocast, set())

        def step_loss(trained: torch.nn.Module, step: int, index: np.ndarray) -> torch.Tensor:
            batch = task.batch(split, index)
            hidden = trained(batch.inputs)
            seen.add(hidden.dtype)
            return task.loss(task.logits(head(hidden), batch), batch)

        schedule = Schedule(0.05, 0.0, 0.0, 40, 16, autocast=autocast)
        losses = fit(model, step_loss, schedule, len(split), seed=0, outside=list(head.parameters())).losses
        assert model.weight.dtype == head.weight.dtype == torch.float32
        return losses

    bf16, fp32 = run("bf16"), run("none")
    assert dtypes == {"bf16": {torch.bfloat16}, "none": {torch.float32}}
    assert np.mean(bf16[-5:]) < 0.5 * np.mean(bf16[:5])
    assert bf16 != fp32 and abs(bf16[0] - fp32[0]) < 0.05  # the same first batch, rounded to bf16


@pytest.mark.parametrize(
    ("avx512_bf16", "amx", "expected"), [(True, False, "bf16"), (False, True, "bf16"), (False, False, "none")]
)
def test_autocast_auto_is_bf16_only_where_the_cpu_has_it_natively(
    monkeypatch: pytest.MonkeyPatch, avx512_bf16: bool, amx: bool, expected: str
) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert autocast_mode("auto", "cpu") == expected
    assert autocast_mode("bf16", "cpu") == "bf16" and autocast_mode("none", "cpu") == "none"
    with pytest.raises(ValueError, match="autocast 'fp8': use one of none, bf16, auto"):
        autocast_mode("fp8", "cpu")
