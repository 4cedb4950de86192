"""Reading the files a user hands in: every failure becomes one `InputError` naming the file and the fix.

A file can be missing, a folder, unreadable, empty, truncated, of the wrong format or encoding. These
readers are the one place that turns each of those into a message; the callers say which recipe key the
file came from (`key`), so the message names what to change. No pickle, no torch.
"""

from __future__ import annotations

import bz2
import json
import struct
from pathlib import Path
from typing import Any

from edgepipe.errors import InputError

# bytes per element of each safetensors dtype, to check a header against the file's size
_SAFETENSORS_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip


def read_bytes(path: Path, key: str) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"`{key}`: file not found: {path}") from None
    except IsADirectoryError:
        raise InputError(f"`{key}`: {path} is a folder; pass a file") from None
    except OSError as error:
        raise InputError(f"`{key}`: cannot read {path} ({error.strerror or error}); check its permissions") from None
    if path.name.lower().endswith(".bz2"):
        try:
            return bz2.decompress(data)
        except (OSError, ValueError, EOFError) as error:
            raise InputError(f"`{key}`: {path} is not a complete bz2 file ({error}); recompress it") from None
    return data


def _guess_encoding(data: bytes) -> str:
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return "utf-16"
    try:
        data.decode("cp1252")
    except UnicodeDecodeError:
        return "latin-1"
    return "cp1252"


def read_text(path: Path, key: str, encoding: str | None = None, encoding_key: str | None = None) -> str:
    """The file's text in `encoding` (default UTF-8, a BOM allowed). Text in another encoding is refused with
    the encoding it looks like and how to convert it (or, with `encoding_key`, which key accepts it)."""
    data = read_bytes(path, key)
    try:
        return data.decode(encoding or "utf-8-sig")
    except UnicodeDecodeError as error:
        guess = _guess_encoding(data)
        fixes = [f"convert it: iconv -f {guess} -t utf-8 {path} > {path.stem}.utf8{path.suffix}"]
        if encoding_key:
            fixes.insert(0, f"set `{encoding_key}: {guess}`")
        raise InputError(
            f"`{key}`: {path} is not {encoding or 'UTF-8'} text (byte 0x{data[error.start]:02x} at offset "
            f"{error.start}; it looks like {guess}); {' or '.join(fixes)}"
        ) from None


def read_json(path: Path, key: str, fix: str) -> dict[str, Any]:
    """A JSON object from `path`; `fix` says how to get a good file (e.g. "rewrite it with save_pretrained")."""
    text = read_text(path, key)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise InputError(f"`{key}`: {path} is not valid JSON ({error}); {fix}") from None
    if not isinstance(value, dict):
        raise InputError(f"`{key}`: {path} holds a {type(value).__name__}, not a JSON object; {fix}")
    return value


def safetensors_problem(path: Path, key: str) -> str | None:
    """Why `path` is not a complete safetensors file (checked from its header and size, nothing loaded), or None."""
    fix = "write it again (save_pretrained or safetensors.torch.save_file)"
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            head = handle.read(8)
            (length,) = struct.unpack("<Q", head) if len(head) == 8 else (None,)
            if length is None or length > size - 8:
                return f"`{key}`: {path} is truncated or not a safetensors file ({size} bytes); {fix}"
            header = json.loads(handle.read(length).decode("utf-8"))
    except OSError as error:
        return f"`{key}`: cannot read {path} ({error.strerror or error}); check its permissions"
    except (UnicodeDecodeError, json.JSONDecodeError):
        return f"`{key}`: {path} has a corrupt safetensors header; {fix}"
    if not isinstance(header, dict):
        return f"`{key}`: {path} has a corrupt safetensors header; {fix}"
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = (int(v) for v in entry["data_offsets"])
            count = 1
            for dim in entry["shape"]:
                count *= int(dim)
            width = _SAFETENSORS_BYTES[entry["dtype"]]
        except (KeyError, TypeError, ValueError):
            return f"`{key}`: {path}: tensor {name!r} has a malformed header entry; {fix}"
        if stop - begin != count * width or begin < 0:
            return f"`{key}`: {path}: tensor {name!r} does not span its shape in the header; {fix}"
        end = max(end, stop)
    if 8 + length + end != size:
        return (
            f"`{key}`: {path} is {size} bytes but its header describes {8 + length + end} "
            f"(truncated or appended to); {fix}"
        )
    return None
