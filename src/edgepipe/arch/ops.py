"""What the structural stages do to a model, through its `ArchSpec`: keep layers, read and shrink FFNs.

Every change copies the kept weights as they are (pruning a unit equals masking it) and updates the
config with it, so the result saves with `save_pretrained` and reloads with a plain `from_pretrained`.
"""

from __future__ import annotations

import copy
from typing import Any

from edgepipe.arch import ArchSpec, Attention, Ffn, QueryHeads, Residual
from edgepipe.errors import InputError


def _walk(root: Any, pattern: str) -> list[Any]:
    """The modules at a dotted path, where `*` stands for every child."""
    found = [root]
    for part in pattern.split("."):
        found = [c for m in found for c in (m.children() if part == "*" else [getattr(m, part)])]
    return found


def layer_list(model: Any, spec: ArchSpec) -> Any:
    if spec.layers is None:
        raise InputError(f"{spec.family} has no per-layer weights to select")
    return model.base_model.get_submodule(spec.layers)


def blocks(model: Any, spec: ArchSpec) -> list[Any]:
    """The modules that hold each layer's weights (ALBERT: its shared layers)."""
    if spec.blocks is not None:
        return _walk(model.base_model, spec.blocks)
    return list(layer_list(model, spec))


def keep_layers(model: Any, spec: ArchSpec, keep: list[int]) -> None:
    """Keep layers `keep`, in that order, in place; config (layer count, per-layer types) follows.

    Each kept attention gets its new index (`layer_idx`: the KV cache and per-layer types are indexed
    by it). A shared-weight family (ALBERT) keeps its weights and repeats them `len(keep)` times."""
    import torch

    config = model.config
    total = int(config.num_hidden_layers)
    if not keep or len(set(keep)) != len(keep) or any(not 0 <= i < total for i in keep):
        raise InputError(f"`layers`: {keep} must be distinct indices of the model's {total} layers (0-{total - 1})")
    if spec.first_layer_fixed and keep[0] != 0:
        raise InputError(f"`layers`: {spec.family}'s first layer is built unlike the others; keep layer 0 first")
    if not spec.shared_layers:
        old = layer_list(model, spec)
        kept = [old[i] for i in keep]
        for position, layer in enumerate(kept):
            for module in layer.modules():
                for name in ("layer_idx", "layer_id"):
                    if isinstance(getattr(module, name, None), int):
                        setattr(module, name, position)
        parent, _, attr = spec.layers.rpartition(".") if spec.layers else ("", "", "")
        holder = model.base_model.get_submodule(parent) if parent else model.base_model
        setattr(holder, attr, torch.nn.ModuleList(kept))
    config.num_hidden_layers = len(keep)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in keep]


def layer_subset(model: Any, spec: ArchSpec, keep: list[int]) -> Any:
    """A new model keeping `keep` of `model`'s layers, weights copied; `model` is left as it is."""
    student = copy.deepcopy(model)
    keep_layers(student, spec, keep)
    for param in student.parameters():  # a frozen teacher gives a trainable student
        param.requires_grad_(True)
    return student.eval()


# FFN neurons ----------------------------------------------------------------------------------------


def _conv1d() -> Any:
    from transformers.pytorch_utils import Conv1D

    return Conv1D


def keep_out(module: Any, index: Any) -> Any:
    """A copy of a Linear (or GPT-2 Conv1D) with only its output units `index`."""
    import torch

    with torch.no_grad():
        if isinstance(module, _conv1d()):
            new = _conv1d()(len(index), module.weight.shape[0])
            new.weight.copy_(module.weight[:, index])
            new.bias.copy_(module.bias[index])
        else:
            new = torch.nn.Linear(module.in_features, len(index), bias=module.bias is not None)
            new.weight.copy_(module.weight[index])
            if module.bias is not None:
                new.bias.copy_(module.bias[index])
    return new.to(module.weight.dtype)


def keep_in(module: Any, index: Any) -> Any:
    """A copy of a Linear (or GPT-2 Conv1D) reading only its input units `index` (same outputs)."""
    import torch

    with torch.no_grad():
        if isinstance(module, _conv1d()):
            new = _conv1d()(module.weight.shape[1], len(index))
            new.weight.copy_(module.weight[index])
            new.bias.copy_(module.bias)
        else:
            new = torch.nn.Linear(len(index), module.out_features, bias=module.bias is not None)
            new.weight.copy_(module.weight[:, index])
            if module.bias is not None:
                new.bias.copy_(module.bias)
    return new.to(module.weight.dtype)


def _ffn(spec: ArchSpec) -> Ffn:
    if spec.ffn is None:
        raise InputError(f"{spec.family} has no FFN spec; FFN pruning does not apply to it")
    return spec.ffn


def ffn_width(block: Any, spec: ArchSpec) -> int:
    ffn = _ffn(spec)
    down = block.get_submodule(ffn.down)
    return int(down.weight.shape[0] if ffn.conv1d else down.in_features)


def ffn_widths(model: Any, spec: ArchSpec) -> list[int]:
    return [ffn_width(b, spec) for b in blocks(model, spec)]


def _unit_rows(tensor: Any, width: int, spec: ArchSpec, role: str) -> Any:
    """`tensor` (a weight, bias or gradient) as (width, -1): one row per FFN neuron."""
    ffn = _ffn(spec)
    if tensor.ndim == 1:  # bias of an input-side projection
        rows = tensor.view(2, width).T if ffn.fused_glu and role == "up" else tensor.view(width, 1)
        return rows.reshape(width, -1)
    if ffn.conv1d:  # Conv1D weight is (in, out)
        tensor = tensor.T
    if role == "down":
        return tensor.T  # (hidden, width) -> (width, hidden)
    if ffn.fused_glu:
        return tensor.view(2, width, -1).permute(1, 0, 2).reshape(width, -1)
    return tensor


def ffn_unit_views(block: Any, spec: ArchSpec, grad: bool = False) -> list[tuple[Any, bool]]:
    """(rows, is_weight) for every tensor touching the FFN neurons, one row per neuron.

    With `grad` the rows hold the gradients instead (None where a tensor has none)."""
    ffn = _ffn(spec)
    width = ffn_width(block, spec)
    views = []
    for path, role in ((ffn.up, "up"), (ffn.gate, "up"), (ffn.down, "down")):
        if path is None:
            continue
        module = block.get_submodule(path)
        tensors = [(module.weight, True)]
        if module.bias is not None and role == "up":
            tensors.append((module.bias, False))
        for param, is_weight in tensors:
            value = param.grad if grad else param
            views.append((None if value is None else _unit_rows(value.detach(), width, spec, role), is_weight))
    return views


def prune_ffn(model: Any, spec: ArchSpec, keep: list[Any]) -> None:
    """Keep FFN neurons `keep[i]` (same count in every block, so the config stays plain) of block i."""
    import torch

    ffn = _ffn(spec)
    for block, index in zip(blocks(model, spec), keep, strict=True):
        width = ffn_width(block, spec)
        rows = torch.cat([index, index + width]) if ffn.fused_glu else index
        for path in (ffn.up, ffn.gate):
            if path is not None:
                _replace(block, path, keep_out(block.get_submodule(path), rows))
        _replace(block, ffn.down, keep_in(block.get_submodule(ffn.down), index))
    setattr(model.config, spec.keys.ffn, max(len(k) for k in keep))


def _attention(spec: ArchSpec) -> Attention:
    if spec.attention is None:
        raise InputError(f"{spec.family} has no attention spec; head pruning does not apply to it")
    return spec.attention


def _qkv_width(layer: Any, att: Attention) -> int:
    """Units of one of q, k, v (heads x head size)."""
    if att.qkv is not None:
        return int(layer.get_submodule(att.qkv).out_features) // 3
    return int(layer.get_submodule(att.q or "").out_features)


def head_size(layer: Any, spec: ArchSpec) -> int:
    return int(getattr(layer.get_submodule(_attention(spec).module), _attention(spec).size))


def head_count(layer: Any, spec: ArchSpec) -> int:
    att = _attention(spec)
    if att.heads is not None:
        return int(getattr(layer.get_submodule(att.module), att.heads))
    return _qkv_width(layer, att) // head_size(layer, spec)


def head_projections(layer: Any, att: Attention) -> list[tuple[str, int]]:
    """(path, stacked copies) of every projection whose output units are the heads' (a fused qkv: 3)."""
    paths = [(att.qkv, 3)] if att.qkv is not None else [(p, 1) for p in (att.q, att.k, att.v) if p is not None]
    for path in att.extra:  # present only in some configurations
        parent, _, name = path.rpartition(".")
        if getattr(layer.get_submodule(parent), name, None) is not None:
            paths.append((path, 1))
    return [(p, n) for p, n in paths if p is not None]


def head_weight_sq(layer: Any, spec: ArchSpec) -> Any:
    """Per head: the sum of squares of its rows in q/k/v and its columns of the output projection."""
    att = _attention(spec)
    width = _qkv_width(layer, att)
    total = layer.get_submodule(att.out).weight.detach().pow(2).sum(0)
    for path, copies in head_projections(layer, att):
        weight = layer.get_submodule(path).weight.detach()
        total = total + weight.view(copies, width, -1).pow(2).sum((0, 2))
    return total.view(-1, head_size(layer, spec)).sum(1)


def head_output_taylor(layer: Any, spec: ArchSpec) -> Any:
    """Per head: |sum of w * dL/dw| over its columns of the output projection (the gradient of a mask on the
    head, Michel et al. 2019); needs the gradients of a backward pass."""
    out = layer.get_submodule(_attention(spec).out)
    per_column = (out.weight * out.weight.grad).sum(0)
    return per_column.view(-1, head_size(layer, spec)).sum(1).detach().abs()


def prune_heads(model: Any, spec: ArchSpec, keep: list[Any]) -> None:
    """Keep only heads `keep[i]` (indices into layer i's current heads) of every layer: their rows of
    q/k/v and their columns of the output projection, copied as they are; the module's head count follows."""
    import torch

    att = _attention(spec)
    for layer, heads in zip(layer_list(model, spec), keep, strict=True):
        size, width = head_size(layer, spec), _qkv_width(layer, att)
        units = (heads[:, None] * size + torch.arange(size)).flatten()
        for path, copies in head_projections(layer, att):
            rows = torch.cat([units + i * width for i in range(copies)])
            _replace(layer, path, keep_out(layer.get_submodule(path), rows))
        _replace(layer, att.out, keep_in(layer.get_submodule(att.out), units))
        module = layer.get_submodule(att.module)
        if att.heads is not None:
            setattr(module, att.heads, len(heads))
        if att.width is not None:
            setattr(module, att.width, len(units))


# Grouped-query heads of decoders ---------------------------------------------------------------------


def query_heads(spec: ArchSpec) -> QueryHeads:
    if spec.query_heads is None:
        raise InputError(f"{spec.family} has no grouped-query head spec; query-head pruning does not apply to it")
    return spec.query_heads


def prune_query_heads(model: Any, spec: ArchSpec, keep: list[Any]) -> None:
    """Keep query heads `keep[i]` (sorted indices into layer i's heads, the same number from every key/value
    group) of every layer: their rows of the query projection and columns of the output projection, copied as
    they are. The key/value heads stay; the module's query heads per group and the config follow (head_dim
    written out: it no longer follows from hidden_size / heads)."""
    import torch

    att = query_heads(spec)
    counts = {len(heads) for heads in keep}
    if len(counts) != 1:
        raise InputError(f"every layer must keep one number of query heads, got {sorted(counts)}")
    for layer, heads in zip(layer_list(model, spec), keep, strict=True):
        module = layer.get_submodule(att.module)
        size, groups = int(getattr(module, att.size)), int(getattr(module, att.groups))
        kv_heads = layer.get_submodule(att.q).out_features // size // groups
        per_group = torch.bincount(heads // groups, minlength=kv_heads)
        if len(heads) % kv_heads or (per_group != len(heads) // kv_heads).any():
            raise InputError(
                f"query heads must go evenly from the {kv_heads} key/value groups; kept per group {per_group.tolist()}"
            )
        units = (heads[:, None] * size + torch.arange(size)).flatten()
        _replace(layer, att.q, keep_out(layer.get_submodule(att.q), units))
        _replace(layer, att.out, keep_in(layer.get_submodule(att.out), units))
        setattr(module, att.groups, len(heads) // kv_heads)
    model.config.head_dim = size
    setattr(model.config, spec.keys.heads, counts.pop())


# Residual-stream channels (hidden size) ------------------------------------------------------------


def residual(spec: ArchSpec) -> Residual:
    if spec.residual is None or spec.layers is None:
        raise InputError(f"{spec.family} has no residual-stream spec; embedding channel pruning does not apply")
    return spec.residual


def residual_norms(model: Any, spec: ArchSpec) -> list[Any]:
    """Every norm over the residual stream: each layer's, then the final one."""
    res = residual(spec)
    per_layer = [layer.get_submodule(path) for layer in layer_list(model, spec) for path in res.norms]
    return [*per_layer, model.base_model.get_submodule(res.final_norm)]


def prune_hidden(model: Any, spec: ArchSpec, keep: Any) -> None:
    """Keep residual channels `keep` (sorted indices) everywhere the stream is read, written or normed: the
    token embedding's columns, the input units of the projections that read it and the LM head, the output
    units of those that write it, the norms' weights. The attention keeps its head size (written into the
    config as `head_dim`, which no longer follows from hidden_size / heads)."""
    import torch

    res = residual(spec)
    base = model.base_model
    head = model.get_output_embeddings()
    embedding = base.get_submodule(res.embedding)
    tied = head is not None and head.weight is embedding.weight
    with torch.no_grad():
        new = torch.nn.Embedding(embedding.num_embeddings, len(keep), padding_idx=embedding.padding_idx)
        new.weight.copy_(embedding.weight[:, keep])
        _replace(base, res.embedding, new.to(embedding.weight.dtype))
        for layer in layer_list(model, spec):
            head_dim = layer.get_submodule(res.attention).head_dim
            for path in res.reads:
                _replace(layer, path, keep_in(layer.get_submodule(path), keep))
            for path in res.writes:
                _replace(layer, path, keep_out(layer.get_submodule(path), keep))
        for norm in residual_norms(model, spec):
            norm.weight = torch.nn.Parameter(norm.weight[keep].clone())
    if head is not None:
        new_head = keep_in(head, keep)
        if tied:
            new_head.weight = base.get_submodule(res.embedding).weight
        model.set_output_embeddings(new_head)
    model.config.head_dim = int(head_dim)
    setattr(model.config, spec.keys.hidden, len(keep))


def _replace(root: Any, path: str, module: Any) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def linear_macs(model: Any, spec: ArchSpec, seq_len: int) -> int:
    """Multiply-accumulates of the weight matmuls in the layers for one sequence (attention scores aside)."""
    import torch

    weights = (torch.nn.Linear, _conv1d())
    total = sum(m.weight.numel() for block in blocks(model, spec) for m in block.modules() if isinstance(m, weights))
    repeats = int(model.config.num_hidden_layers) if spec.shared_layers else 1
    return seq_len * total * repeats
