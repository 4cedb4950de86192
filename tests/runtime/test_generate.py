"""Generation with a KV cache on a tiny seeded Llama: ONNX greedy equals torch greedy, seeded sampling is
reproducible, eos stops a row, timings are recorded, bad arguments are input errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_llama

from edgepipe.errors import InputError
from edgepipe.export.causal_lm import export_causal_lm
from edgepipe.runtime.backends import RuntimeOptions
from edgepipe.runtime.generate import OnnxCausalLM, TorchCausalLM, load_causal_lm, position_ids


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[TorchCausalLM, OnnxCausalLM]:
    # sharper logits than the default initialisation, so greedy ties do not occur
    model = tiny_llama(layers=2, vocab=128, initializer_range=0.2)
    folder = tmp_path_factory.mktemp("gen")
    export_causal_lm(model, folder / "model.onnx")
    return TorchCausalLM(model), OnnxCausalLM(folder)


def _prompts() -> tuple[np.ndarray, np.ndarray]:
    ids = np.random.default_rng(0).integers(0, 128, (2, 6))
    mask = np.ones_like(ids)
    mask[1, :2] = 0  # left padding
    return ids, mask


def test_greedy_onnx_equals_greedy_torch(models: tuple[TorchCausalLM, OnnxCausalLM]) -> None:
    torch_lm, onnx_lm = models
    ids, mask = _prompts()
    ours, theirs = onnx_lm.generate(ids, mask, 12), torch_lm.generate(ids, mask, 12)
    assert ours.tokens.shape == (2, 12)
    np.testing.assert_array_equal(ours.tokens, theirs.tokens)
    assert len(set(ours.tokens[0].tolist())) > 1  # not a degenerate repeat


def test_greedy_matches_transformers_generate(models: tuple[TorchCausalLM, OnnxCausalLM]) -> None:
    torch_lm, onnx_lm = models
    ids, mask = _prompts()
    reference = torch_lm.model.generate(
        input_ids=torch.from_numpy(ids),
        attention_mask=torch.from_numpy(mask),
        max_new_tokens=8,
        do_sample=False,
        pad_token_id=0,
    )[:, ids.shape[1] :].numpy()
    np.testing.assert_array_equal(onnx_lm.generate(ids, mask, 8).tokens, reference)


def test_seeded_sampling_is_reproducible(models: tuple[TorchCausalLM, OnnxCausalLM]) -> None:
    torch_lm, onnx_lm = models
    ids, mask = _prompts()

    def sample(lm: TorchCausalLM | OnnxCausalLM, seed: int, **options: float) -> np.ndarray:
        return lm.generate(ids, mask, 16, do_sample=True, temperature=2.0, seed=seed, **options).tokens  # type: ignore[arg-type]

    first = sample(onnx_lm, 1)
    np.testing.assert_array_equal(first, sample(onnx_lm, 1))
    np.testing.assert_array_equal(first, sample(torch_lm, 1))  # same logits, same draws
    assert (first != sample(onnx_lm, 2)).mean() > 0.5
    # top_k 1 leaves only the argmax
    np.testing.assert_array_equal(sample(onnx_lm, 3, top_k=1), onnx_lm.generate(ids, mask, 16).tokens)
    within = sample(onnx_lm, 4, top_k=3)
    assert within.shape == (2, 16)


def test_eos_stops_a_row_and_timings_are_recorded(models: tuple[TorchCausalLM, OnnxCausalLM]) -> None:
    _, onnx_lm = models
    ids, mask = _prompts()
    greedy = onnx_lm.generate(ids, mask, 10)
    eos = int(greedy.tokens[0, 2])
    stopped = onnx_lm.generate(ids, mask, 10, eos_token_id=eos)
    first = int(np.argmax(greedy.tokens[0] == eos))
    assert (stopped.tokens[0, first:] == eos).all()
    assert greedy.ttft_s > 0 and len(greedy.decode_s) == 9 and all(t > 0 for t in greedy.decode_s)
    assert greedy.decode_tokens_per_s > 0
    all_stop = onnx_lm.generate(ids[:1], mask[:1], 10, eos_token_id=int(greedy.tokens[0, 0]))
    assert all_stop.tokens.shape == (1, 1) and all_stop.decode_s == ()


def test_logits_equal_torch_on_real_positions(models: tuple[TorchCausalLM, OnnxCausalLM]) -> None:
    torch_lm, onnx_lm = models
    ids, mask = _prompts()
    real = mask.astype(bool)
    np.testing.assert_allclose(onnx_lm.logits(ids, mask)[real], torch_lm.logits(ids, mask)[real], atol=1e-4)
    assert position_ids(mask).tolist()[1] == [0, 0, 0, 1, 2, 3]


def test_bad_arguments_are_input_errors(models: tuple[TorchCausalLM, OnnxCausalLM], tmp_path: Path) -> None:
    _, onnx_lm = models
    ids, mask = _prompts()
    with pytest.raises(InputError, match=r"input_ids and attention_mask must both be \(batch, prompt_len\)"):
        onnx_lm.generate(ids, mask[:, :3], 4)
    with pytest.raises(InputError, match="temperature > 0"):
        onnx_lm.generate(ids, mask, 4, do_sample=True, temperature=0.0)
    with pytest.raises(InputError, match="no ONNX model at"):
        OnnxCausalLM(tmp_path)


def test_load_causal_lm_reads_either_artifact_format(
    models: tuple[TorchCausalLM, OnnxCausalLM], tmp_path: Path
) -> None:
    torch_lm, onnx_lm = models
    torch_lm.model.save_pretrained(tmp_path)
    ids, mask = _prompts()
    loaded_torch = load_causal_lm(tmp_path, "transformers")
    loaded_onnx = load_causal_lm(onnx_lm.path.parent, "onnx", RuntimeOptions(threads=1))
    assert isinstance(loaded_torch, TorchCausalLM) and isinstance(loaded_onnx, OnnxCausalLM)
    assert loaded_onnx.describe()["threads"] == 1
    np.testing.assert_array_equal(loaded_torch.generate(ids, mask, 6).tokens, loaded_onnx.generate(ids, mask, 6).tokens)
