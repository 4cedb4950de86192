import json
from pathlib import Path

import pytest

from edgepipe.errors import InputError
from edgepipe.pipeline.data import data_problem, load_splits
from edgepipe.pipeline.recipe import DataConfig


def test_rotten_tomatoes_splits_are_disjoint_deduplicated_and_deterministic() -> None:
    a = load_splits(DataConfig(), seed=0)
    assert a.label_names == ["rotten", "fresh"]
    parts = [a.train.inputs, a.val.inputs, a.test.inputs, a.calibration.inputs]
    every = [t for part in parts for t in part]
    assert len(every) == len(set(every)), "a text is in two splits or duplicated"
    assert len(every) > 12_000
    assert len(a.calibration) == 256
    assert abs(len(a.test) - 0.1 * len(every)) <= 1
    assert 0.4 < a.train.labels.mean() < 0.6
    b = load_splits(DataConfig(), seed=0)
    assert a.fingerprint == b.fingerprint and a.test.inputs == b.test.inputs
    c = load_splits(DataConfig(), seed=1)
    assert c.fingerprint != a.fingerprint


def test_user_csv_without_the_label_column(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("review,stars\ngood,5\n", encoding="utf-8")
    cfg = DataConfig(source=str(path), text_column="review")
    assert data_problem(cfg) == (
        "`data.label_column` = 'label': no such column in d.csv; its columns are ['review', 'stars']"
    )
    with pytest.raises(InputError, match="no such column"):
        load_splits(cfg, seed=0)


def test_fewer_than_two_classes(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"review {i}", "label": "pos"}) for i in range(100)))
    with pytest.raises(InputError) as info:
        load_splits(DataConfig(source=str(path)), seed=0)
    assert str(info.value) == (
        f"`data.label_column` = 'label': found 1 class(es) ['pos'] in {path}; classification needs at least 2"
    )


def test_jsonl_duplicates_and_conflicting_labels_are_dropped(tmp_path: Path) -> None:
    rows = [{"text": f"review number {i}", "label": i % 3} for i in range(200)]
    rows += [{"text": "review number 1", "label": 1}, {"text": "review number 2", "label": 0}]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    splits = load_splits(DataConfig(source=str(path), calibration_size=10), seed=0)
    texts = splits.train.inputs + splits.val.inputs + splits.test.inputs + splits.calibration.inputs
    assert splits.label_names == ["0", "1", "2"]
    assert len(texts) == 199  # "review number 2" had two labels: dropped; "review number 1" deduplicated
    assert "review number 2" not in texts


def test_missing_data_file(tmp_path: Path) -> None:
    cfg = DataConfig(source=str(tmp_path / "none.csv"))
    assert data_problem(cfg) == (
        f"`data.source`: {str(tmp_path / 'none.csv')!r} is neither a built-in dataset (rotten-tomatoes) "
        "nor an existing file"
    )
