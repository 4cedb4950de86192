"""Artifacts on disk: atomic writes, content hashes, and the `Artifact` record a stage hands on."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgepipe.pipeline.recipe import ArtifactKind
from edgepipe.runtime.predictor import META_FILE

TEMP_SUFFIX = ".tmp"  # of write_atomic's temporary files: a rerun removes what a killed process left


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write to a temporary file in the same folder, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_records(folder: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file under `folder`, keyed by relative path."""
    return {
        str(p.relative_to(folder)): {"sha256": sha256_file(p), "size": p.stat().st_size}
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def fingerprint(records: dict[str, dict[str, Any]], prefix: str = "") -> str:
    """Content fingerprint of the files under `prefix` (a folder's relative path) in `file_records` output."""
    digest = hashlib.sha256()
    for name, record in records.items():
        if name.startswith(prefix):
            digest.update(f"{name[len(prefix) :]}:{record['sha256']}\n".encode())
    return digest.hexdigest()[:16]


def folder_fingerprint(folder: Path) -> str:
    return fingerprint(file_records(folder))


def config_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Artifact:
    """A model a stage produced: a folder that `Predictor.load` can open on its own."""

    name: str  # unique in the run: "teacher", "fp32", "fp32-fused", "int8-dynamic", ...
    kind: ArtifactKind
    path: Path  # the artifact folder
    precision: str  # "fp32" | "int8-dynamic" | "int8-static"
    fingerprint: str = ""

    @property
    def model_file(self) -> Path:
        return self.path / "model.onnx" if self.kind != ArtifactKind.TORCH_MODEL else self.path

    def to_json(self, root: Path) -> dict[str, Any]:
        data = asdict(self)
        data["kind"] = self.kind.value
        data["path"] = str(self.path.relative_to(root)) if self.path.is_relative_to(root) else str(self.path)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any], root: Path) -> Artifact:
        path = Path(data["path"])
        return cls(
            name=data["name"],
            kind=ArtifactKind(data["kind"]),
            path=path if path.is_absolute() else root / path,
            precision=data["precision"],
            fingerprint=data.get("fingerprint", ""),
        )


def write_meta(folder: Path, *, task: str, labels: list[str], precision: str, fmt: str, **extra: Any) -> None:
    """edgepipe.json: what `Predictor` needs besides the model (task, labels, input description)."""
    meta = {"task": task, "labels": labels, "precision": precision, "format": fmt, **extra}
    write_json(folder / META_FILE, meta)
