"""vocab: prune a WordPiece text model's vocabulary to the tokens its task's train split uses.

The word-embedding table is most of a small student (MiniLM's 30,522 x 384 rows are 11.7M parameters
beside 1.8M per encoder layer), and a task reads a fraction of it. As TextPruner's vocabulary pruning
(Yang et al. 2022), the stage keeps: the special tokens, every token the train texts use at least
`min_count` times, and with `keep_chars` every single-character token and its `##` form, so a word made
of unseen pieces splits into characters rather than becoming [UNK]. Kept ids are renumbered in their
original order, their embedding rows copied as they are (a text made only of kept tokens gets the same
logits), and `tokenizer.json` rewritten to the new ids (vocabulary, special-token ids of the
post-processor, padding), so `AutoTokenizer.from_pretrained` reloads the folder as it is.

Only WordPiece (BERT, DistilBERT, MiniLM, MPNet, ELECTRA): dropping BPE or Unigram tokens changes how
their merges and scores split every word. What it costs is measured on the validation split, not
assumed: accuracy before and after, and the share of validation tokens that were not kept.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

from edgepipe.errors import InputError
from edgepipe.pipeline.adapters import adapter_for
from edgepipe.pipeline.artifacts import Artifact, write_atomic
from edgepipe.pipeline.recipe import ArtifactKind, VocabConfig
from edgepipe.pipeline.stages import StageContext, StageResult, register
from edgepipe.pipeline.stages.training import save_model
from edgepipe.tasks import Task

log = logging.getLogger(__name__)
TOKENIZER_JSON = "tokenizer.json"


def wordpiece(source: Path) -> dict[str, Any]:
    """The folder's tokenizer.json, refused unless its model is WordPiece."""
    path = source / TOKENIZER_JSON
    if not path.is_file():
        raise InputError(f"vocab: {source} has no {TOKENIZER_JSON}; vocabulary pruning needs a fast tokenizer")
    spec = json.loads(path.read_text(encoding="utf-8"))
    kind = spec.get("model", {}).get("type")
    if kind != "WordPiece":
        raise InputError(
            f"vocab: the tokenizer of {source} is {kind}, not WordPiece; pruning a {kind} vocabulary changes how "
            "every word splits. Remove the vocab stage for this model"
        )
    return spec


def kept_ids(spec: dict[str, Any], counts: Counter[int], special: set[int], cfg: VocabConfig) -> list[int]:
    """The ids kept, in their original order."""
    vocab: dict[str, int] = spec["model"]["vocab"]
    prefix = spec["model"].get("continuing_subword_prefix", "##")
    chars = {i for token, i in vocab.items() if cfg.keep_chars and len(token.removeprefix(prefix)) == 1}
    used = {i for i, n in counts.items() if n >= cfg.min_count}
    return sorted(used | special | chars | {t["id"] for t in spec.get("added_tokens", [])})


def renumbered(spec: dict[str, Any], new_id: dict[int, int]) -> dict[str, Any]:
    """`spec` (a WordPiece tokenizer.json) with only the kept tokens, under their new ids."""
    out = json.loads(json.dumps(spec))
    out["model"]["vocab"] = {t: new_id[i] for t, i in spec["model"]["vocab"].items() if i in new_id}
    for token in out.get("added_tokens", []):
        token["id"] = new_id[token["id"]]
    post = out.get("post_processor") or {}
    for entry in post.get("special_tokens", {}).values():  # TemplateProcessing
        entry["ids"] = [new_id[i] for i in entry["ids"]]
    for key in ("cls", "sep"):  # BertProcessing / RobertaProcessing: [token, id]
        if isinstance(post.get(key), list):
            post[key][1] = new_id[post[key][1]]
    if out.get("padding"):
        out["padding"]["pad_id"] = new_id[out["padding"]["pad_id"]]
    return out


def prune_embeddings(model: Any, keep: list[int]) -> None:
    """Keep the rows `keep` of the input embedding table (in that order), in place."""
    import torch

    old = model.get_input_embeddings()
    pad = model.config.pad_token_id
    new_pad = keep.index(pad) if pad is not None and pad in keep else None
    table = torch.nn.Embedding(len(keep), old.embedding_dim, padding_idx=new_pad)
    with torch.no_grad():
        table.weight.copy_(old.weight[torch.tensor(keep)])
    model.set_input_embeddings(table)
    model.config.vocab_size = len(keep)
    model.config.pad_token_id = new_pad


@register("vocab", Task.TEXT, Task.TOKEN)
def run_vocab(inputs: dict[ArtifactKind, Artifact], cfg: VocabConfig, ctx: StageContext) -> StageResult:
    from transformers import AutoTokenizer

    from edgepipe.runtime.text import load_text_model

    source = inputs[ArtifactKind.TORCH_MODEL].path
    spec = wordpiece(source)
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = load_text_model(source)
    rows_before = model.get_input_embeddings().num_embeddings
    if rows_before != len(spec["model"]["vocab"]):
        raise InputError(
            f"vocab: {source}'s embedding table has {rows_before} rows but its tokenizer {len(spec['model']['vocab'])} "
            "tokens; give the model its own tokenizer"
        )

    def ids(texts: Any) -> list[list[int]]:
        return tokenizer(list(texts), truncation=True, max_length=cfg.max_seq_len)["input_ids"]

    counts = Counter(i for row in ids(ctx.data.train.inputs) for i in row)
    keep = kept_ids(spec, counts, set(tokenizer.all_special_ids), cfg)
    new_id = {old: new for new, old in enumerate(keep)}
    val_ids = [i for row in ids(ctx.data.val.inputs) for i in row]
    task = adapter_for(ctx.task, tokenizer, cfg.max_seq_len, cfg.eval_batch_size)
    accuracy_before = float(task.metric(model, ctx.data.val))
    params_before = sum(p.numel() for p in model.parameters())
    prune_embeddings(model, keep)
    out = ctx.stage_dir / "model"
    save_model(model, tokenizer, out, ctx)
    write_atomic(out / TOKENIZER_JSON, json.dumps(renumbered(spec, new_id), ensure_ascii=False))
    for extra in source.glob("modeling_*.py"):  # a head-pruned model's own modeling file
        shutil.copyfile(extra, out / extra.name)
    reloaded = AutoTokenizer.from_pretrained(out)
    if len(reloaded) != len(keep):
        raise InputError(f"vocab: the rewritten tokenizer has {len(reloaded)} tokens, not {len(keep)}")
    task = adapter_for(ctx.task, reloaded, cfg.max_seq_len, cfg.eval_batch_size)
    accuracy_after = float(task.metric(model, ctx.data.val))
    metrics = {
        "rows_before": rows_before,
        "rows_after": len(keep),
        "rows_used_by_train": len(counts),
        "params_before": params_before,
        "params_after": sum(p.numel() for p in model.parameters()),
        "val_tokens_not_kept": round(sum(i not in new_id for i in val_ids) / max(1, len(val_ids)), 5),
        "val_accuracy_before": accuracy_before,
        "val_accuracy_after": accuracy_after,
    }
    log.info("vocab: %d -> %d rows, val accuracy %.4f -> %.4f", rows_before, len(keep), accuracy_before, accuracy_after)
    return StageResult([Artifact("vocab-pruned", ArtifactKind.TORCH_MODEL, out, "fp32")], metrics)
