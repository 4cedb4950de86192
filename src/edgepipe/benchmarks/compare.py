"""Regression gate: compare a current benchmark report with a baseline report.

Latency: a shape regresses when the current p50 exceeds the baseline p50 by more than a tolerance
derived from the measured noise: the standard error of both medians (1.2533 * std / sqrt(n), the
large-sample standard error of a median) scaled by `z`, and never less than `latency_floor`, the
run-to-run drift of the machine that no within-run statistic sees (see benchmarks/RESULTS.md).
Accuracy: a drop of more than `max_accuracy_drop` (0.005 = half a point) regresses.
Reports from another machine or other library versions are refused unless mismatches are allowed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from edgepipe.errors import InputError

SCHEMA_VERSION = 1
# Interleaved A/B runs share the machine's drift; only within-run noise and a small margin remain.
AB_LATENCY_FLOOR = 0.10
_MACHINE_KEYS = ("cpu", "cpu_flags", "logical_cores", "gpu")
_VERSION_KEYS = ("python", "torch", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt", "openvino")


@dataclass(frozen=True)
class Tolerance:
    latency_floor: float = 0.15  # relative; shared 2-core machines drift this much between runs
    z: float = 3.0
    max_accuracy_drop: float = 0.005


@dataclass(frozen=True)
class Row:
    artifact: str
    target: str
    batch: int
    seq_len: int
    base_p50: float | None
    cur_p50: float | None
    allowed_ratio: float | None
    base_accuracy: float | None
    cur_accuracy: float | None
    verdict: str  # ok | slower | less accurate | missing | new

    @property
    def ratio(self) -> float | None:
        if self.base_p50 is None or self.cur_p50 is None:
            return None
        return self.cur_p50 / self.base_p50

    @property
    def regressed(self) -> bool:
        return self.verdict in ("slower", "less accurate", "missing")


def check_schema(report: dict[str, Any], name: str) -> None:
    """A report `compare` can read: the schema version, and each result's keys with the right types."""
    version = report.get("schema_version")
    if version != SCHEMA_VERSION or "results" not in report:
        raise InputError(
            f"{name}: report schema_version {version!r} is not {SCHEMA_VERSION}; "
            "regenerate it with this edgepipe's `edgepipe bench`"
        )
    if report.get("task") == "causal-lm":
        raise InputError(f"{name}: a causal-lm report; `compare` gates latency/accuracy reports of classifiers")
    for key in ("machine", "versions"):
        if not isinstance(report.get(key, {}), dict):
            raise InputError(f"{name}: `{key}` is a {type(report[key]).__name__}, not an object; regenerate the report")
    results = report["results"]
    if not isinstance(results, list):
        raise InputError(f"{name}: `results` is a {type(results).__name__}, not a list; regenerate the report")
    for i, row in enumerate(results):
        problem = _row_problem(row)
        if problem:
            raise InputError(f"{name}: results[{i}] {problem}; regenerate the report with `edgepipe bench`")


def _number(value: Any, low: float = 0.0) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= low


def _row_problem(row: Any) -> str | None:
    if not isinstance(row, dict):
        return f"is a {type(row).__name__}, not an object"
    for key, kind in (("artifact", str), ("target", str), ("batch", int), ("seq_len", int)):
        if not isinstance(row.get(key), kind) or isinstance(row.get(key), bool):
            return f"has no {kind.__name__} `{key}` (got {row.get(key)!r})"
    latency = row.get("latency_ms")
    if not isinstance(latency, dict) or not _number(latency.get("p50"), 1e-12) or not _number(latency.get("std")):
        return f"has no `latency_ms` with a positive `p50` and a `std` (got {latency!r})"
    if not isinstance(latency.get("n", 1), int) or isinstance(latency.get("n", 1), bool):
        return f"has a `latency_ms.n` that is not a count (got {latency.get('n')!r})"
    if row.get("accuracy") is not None and not _number(row["accuracy"]):
        return f"has an `accuracy` that is not a number (got {row['accuracy']!r})"
    return None


def mismatches(base: dict[str, Any], cur: dict[str, Any]) -> list[str]:
    """What differs between the machines and library versions of two reports."""
    found = []
    for key in _MACHINE_KEYS:
        a, b = base.get("machine", {}).get(key), cur.get("machine", {}).get(key)
        if a != b:
            found.append(f"machine.{key}: baseline {a!r}, current {b!r}")
    for key in _VERSION_KEYS:
        a, b = base.get("versions", {}).get(key), cur.get("versions", {}).get(key)
        if a != b:
            found.append(f"versions.{key}: baseline {a!r}, current {b!r}")
    return found


def _relative_se(latency: dict[str, float]) -> float:
    n = max(int(latency.get("n", 1)), 1)
    return 1.2533 * latency["std"] / math.sqrt(n) / latency["p50"]


def compare(base: dict[str, Any], cur: dict[str, Any], tol: Tolerance) -> list[Row]:
    def key(r: dict[str, Any]) -> tuple[str, str, int, int]:
        return r["artifact"], r["target"], r["batch"], r["seq_len"]

    before = {key(r): r for r in base["results"]}
    after = {key(r): r for r in cur["results"]}
    rows = []
    for k in sorted(before.keys() | after.keys()):
        b, c = before.get(k), after.get(k)
        if b is None and c is not None:  # only in the current report
            rows.append(Row(*k, None, c["latency_ms"]["p50"], None, None, c.get("accuracy"), "new"))
            continue
        if c is None and b is not None:  # gone from the current report
            rows.append(Row(*k, b["latency_ms"]["p50"], None, None, b.get("accuracy"), None, "missing"))
            continue
        if b is None or c is None:
            continue
        noise = tol.z * math.hypot(_relative_se(b["latency_ms"]), _relative_se(c["latency_ms"]))
        allowed = 1.0 + max(tol.latency_floor, noise)
        ratio = c["latency_ms"]["p50"] / b["latency_ms"]["p50"]
        verdict = "ok"
        if ratio > allowed:
            verdict = "slower"
        elif b.get("accuracy") is not None and b["accuracy"] - (c.get("accuracy") or 0.0) > tol.max_accuracy_drop:
            verdict = "less accurate"
        rows.append(
            Row(
                *k,
                b["latency_ms"]["p50"],
                c["latency_ms"]["p50"],
                allowed,
                b.get("accuracy"),
                c.get("accuracy"),
                verdict,
            )
        )
    return rows


def render(rows: list[Row]) -> str:
    lines = [
        "| artifact | target | batch | seq | baseline p50 ms | current p50 ms | ratio | allowed | "
        "baseline acc | current acc | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def fmt(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    for r in rows:
        lines.append(
            f"| {r.artifact} | {r.target} | {r.batch} | {r.seq_len} | {fmt(r.base_p50, '.2f')} | "
            f"{fmt(r.cur_p50, '.2f')} | {fmt(r.ratio, '.3f')} | {fmt(r.allowed_ratio, '.3f')} | "
            f"{fmt(r.base_accuracy, '.4f')} | {fmt(r.cur_accuracy, '.4f')} | {r.verdict} |"
        )
    return "\n".join(lines)
