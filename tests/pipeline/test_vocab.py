"""vocab: the tokens the train split uses are kept, their rows copied, the tokenizer rewritten to match."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_recipe, write_recipe

from edgepipe.errors import InputError
from edgepipe.pipeline.cli import main
from edgepipe.pipeline.stages.vocab import wordpiece


@pytest.fixture(scope="module")
def vocab_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, rt_csv: Path) -> Path:
    root = tmp_path_factory.mktemp("vocab")
    raw = tiny_recipe(tiny_model_dir, rt_csv)
    raw["stages"] = [raw["stages"][0], {"kind": "vocab"}, raw["stages"][1]]  # finetune, vocab, export
    raw["bench"] |= {"batch_sizes": [1]}
    run = root / "run"
    assert main(["build", str(write_recipe(root / "r.yaml", raw)), "--out", str(run), "--set", "bench.runs=6"]) == 0
    return run


def test_the_table_keeps_the_used_rows_and_a_kept_text_gives_the_same_logits(vocab_run: Path) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    metrics = json.loads((vocab_run / "02-vocab" / "metrics.json").read_text())
    rows, hidden = metrics["rows_after"], 32
    assert metrics["rows_before"] == 30522 and metrics["rows_used_by_train"] < rows < 30522 / 3
    assert metrics["params_before"] - metrics["params_after"] == (30522 - rows) * hidden
    assert 0 < metrics["val_tokens_not_kept"] < 0.2
    before, after = vocab_run / "01-finetune" / "model", vocab_run / "02-vocab" / "model"
    old_tok, new_tok = AutoTokenizer.from_pretrained(before), AutoTokenizer.from_pretrained(after)
    old = AutoModelForSequenceClassification.from_pretrained(before).eval()
    new = AutoModelForSequenceClassification.from_pretrained(after).eval()  # a plain folder of its family
    assert new.config.vocab_size == len(new_tok) == rows
    text = "the film is a gripping, beautifully acted story"  # words the reviews use
    old_ids, new_ids = old_tok(text, return_tensors="pt"), new_tok(text, return_tensors="pt")
    assert old_tok.convert_ids_to_tokens(old_ids["input_ids"][0]) == new_tok.convert_ids_to_tokens(
        new_ids["input_ids"][0]
    )
    assert not torch.equal(old_ids["input_ids"], new_ids["input_ids"])  # renumbered
    with torch.no_grad():
        torch.testing.assert_close(new(**new_ids).logits, old(**old_ids).logits, rtol=0, atol=1e-6)
    padded = new_tok(["dull", text], padding=True)
    assert padded["input_ids"][0][-1] == new_tok.pad_token_id == new.config.pad_token_id


def test_an_unseen_word_splits_into_kept_characters_not_unk(vocab_run: Path) -> None:
    from transformers import AutoTokenizer

    new_tok = AutoTokenizer.from_pretrained(vocab_run / "02-vocab" / "model")
    pieces = new_tok.tokenize("zyxwvq")
    assert new_tok.unk_token not in pieces and "".join(p.removeprefix("##") for p in pieces) == "zyxwvq"


def test_the_exported_graph_reads_the_small_table(vocab_run: Path) -> None:
    import onnx

    rows = json.loads((vocab_run / "02-vocab" / "metrics.json").read_text())["rows_after"]
    graph = onnx.load(vocab_run / "03-export" / "fp32" / "model.onnx").graph
    shapes = [list(i.dims) for i in graph.initializer if "word_embeddings" in i.name]
    assert shapes == [[rows, 32]]
    report = json.loads((vocab_run / "report.json").read_text())
    sizes = {r["artifact"]: r["size_mb"] for r in report["results"]}
    assert sizes["fp32"] < sizes["teacher"] / 2
    assert np.isfinite([r["accuracy"] for r in report["results"]]).all()


def test_a_tokenizer_that_is_not_wordpiece_is_refused(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": {}, "merges": []}}))
    with pytest.raises(InputError, match="is BPE, not WordPiece; pruning a BPE vocabulary changes how every word"):
        wordpiece(tmp_path)
