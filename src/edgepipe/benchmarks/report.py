"""Render `report.json` as Markdown a person can read, and derive the notes worth saying out loud."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

BASELINE = "fp32"  # ORT fp32 without fusion: the speedup column is relative to it


def _row_key(row: dict[str, Any]) -> tuple[str, int, int]:
    return row["target"], row["batch"], row["seq_len"]


def findings(report: dict[str, Any]) -> list[str]:
    """Plain statements about the int8 artifacts relative to fp32, per shape."""
    notes = []
    groups: dict[tuple[str, int, int], dict[str, dict[str, Any]]] = {}
    for row in report["results"]:
        groups.setdefault(_row_key(row), {})[row["artifact"]] = row
    for (target, batch, seq_len), rows in sorted(groups.items()):
        p50 = {name: row["latency_ms"]["p50"] for name, row in rows.items()}
        shape = next(iter(rows.values())).get("input", "")
        where = f"{target} batch {batch} " + (shape if shape.startswith("image") else f"seq {seq_len}")
        static = [n for n, r in rows.items() if r["precision"] == "int8-static"]
        dynamic = [n for n, r in rows.items() if r["precision"] == "int8-dynamic"]
        fused = p50.get("fp32-fused")
        for name in static:
            for other in [*dynamic, "fp32-fused"]:
                if other in p50 and p50[name] > p50[other]:
                    notes.append(
                        f"{where}: static int8 `{name}` ({p50[name]:.2f} ms) is slower than `{other}` "
                        f"({p50[other]:.2f} ms) on this CPU"
                    )
        if fused is not None and BASELINE in p50:
            best = min(p50, key=lambda n: p50[n])
            notes.append(
                f"{where}: fastest is `{best}` at {p50[best]:.2f} ms p50, "
                f"{p50[BASELINE] / p50[best]:.2f}x ORT fp32 ({p50[BASELINE]:.2f} ms)"
            )
    return notes


def _profile_table(profile: dict[str, Any] | None) -> list[str]:
    """Op types as rows, artifacts as columns: where each artifact spends its time."""
    if not profile or not profile["artifacts"]:
        return []
    names = list(profile["artifacts"])
    ops = sorted(
        {op for times in profile["artifacts"].values() for op in times},
        key=lambda op: -max(t.get(op, 0.0) for t in profile["artifacts"].values()),
    )
    out = [
        "",
        f"## Where the time goes: ORT kernel time per op type (ms per run, batch {profile['batch']}, "
        f"{profile['input']})",
        "",
        "| op type | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for op in ops:
        cells = [f"{profile['artifacts'][n][op]:.3f}" if op in profile["artifacts"][n] else "" for n in names]
        out.append(f"| {op} | " + " | ".join(cells) + " |")
    totals = [f"**{sum(profile['artifacts'][n].values()):.3f}**" for n in names]
    out.append("| **total** | " + " | ".join(totals) + " |")
    return out


def _pruning_tables(stages: list[dict[str, Any]] | None) -> list[str]:
    """Per prune stage: what was kept, parameters, MACs, ORT latency and accuracy before and after."""
    out: list[str] = []
    for m in stages or []:
        rows = [("parameters", m["params_before"], m["params_after"])]
        if "encoder_params_before" in m:
            rows.append(("encoder-layer parameters", m["encoder_params_before"], m["encoder_params_after"]))
            rows.append(
                ("encoder MACs per 128-token sequence", m["macs_per_seq128_before"], m["macs_per_seq128_after"])
            )
        else:
            rows.append(("MACs per image", m["macs_before"], m["macs_after"]))
        out += ["", f"## Pruning ({m['stage']}, importance {m['importance']})", ""]
        out += ["| | before | after | after / before |", "|---|---|---|---|"]
        out += [f"| {name} | {a:,} | {b:,} | {b / a:.3f} |" for name, a, b in rows]
        for shape, before in m.get("ort_latency_ms", {}).get("before", {}).items():
            after = m["ort_latency_ms"]["after"][shape]["p50"]
            label = shape.replace("_", " ").replace("b", "batch ", 1).replace("s", "seq ", 1)
            out.append(
                f"| ORT fp32 p50 ms, {label} | {before['p50']:.2f} | {after:.2f} | {after / before['p50']:.3f} "
                f"({before['p50'] / after:.2f}x faster) |"
            )
        recovered = m.get("val_accuracy_recovered")
        out.append(
            f"| val accuracy | {100 * m['val_accuracy_before']:.2f}% | {100 * m['val_accuracy_pruned']:.2f}% pruned"
            + (f", {100 * recovered:.2f}% recovered" if recovered is not None else "")
            + " | |"
        )
        out.append("")
        if "heads_before" in m:
            out.append(
                f"Heads per layer: {m['heads_before']} -> {m['heads_after']}; FFN neurons per layer: "
                f"{m['ffn_before']} -> {m['ffn_after']}; layers removed: {m['dropped_layers'] or 'none'}."
            )
        else:
            kept = ", ".join(f"{name} {a}->{b}" for name, (a, b) in m["channels"].items())
            out.append(f"Output channels per conv: {kept}.")
    return out


def render_markdown(
    report: dict[str, Any], title: str, gate_lines: list[str] | None = None, plot: str | None = None
) -> str:
    """The report as Markdown; `plot` is the accuracy-vs-latency PNG's path relative to the report."""
    machine, vers = report["machine"], report["versions"]
    out = [f"# edgepipe report: {title}", ""]
    out.append(
        f"Machine: {machine['cpu']} ({machine['physical_cores']} physical / "
        f"{machine['logical_cores']} logical cores, {machine['memory_gb']} GB), "
        f"flags {', '.join(machine['cpu_flags']) or 'n/a'}; {machine['os']}."
    )
    out.append("Versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()) + ".")
    settings = report["settings"]
    out.append(
        f"Latency: {settings['runs']} timed runs per artifact and shape, interleaved over "
        f"{settings['rounds']} rounds, after >= {settings['warmup_runs']} warm-up runs and "
        f">= {settings['warmup_s']} s at the first opening; "
        f"threads {report['threads']}."
    )
    metric = report.get("metric", "accuracy")  # entity F1 for token classification
    out += ["", f"## {metric[0].upper()}{metric[1:]} (test split, {report['eval_examples']} examples)", ""]
    out += [
        f"| artifact | engine | precision | size MB | {metric} | vs reference | vs fp32 ONNX: agree / max diff |",
        "|---|---|---|---|---|---|---|",
    ]
    seen: dict[tuple[str, str], dict[str, Any]] = {}
    for row in report["results"]:
        seen.setdefault((row["artifact"], row["target"]), row)
    ref = next((r["accuracy"] for (n, _), r in seen.items() if n == report.get("reference")), None)
    for (name, _), row in seen.items():
        delta = "" if ref is None else f"{100 * (row['accuracy'] - ref):+.2f} pt"
        found = row.get("agreement")
        agree = "" if found is None else f"{100 * found['argmax_agreement']:.2f}% / {found['max_abs_diff']:.2g}"
        out.append(
            f"| {name} | {row['engine']} | {row['precision']} | {row['size_mb']:.1f} | "
            f"{100 * row['accuracy']:.2f}% | {delta} | {agree} |"
        )
    if plot:
        out += ["", f"![{metric} against latency, every artifact]({plot})"]
    groups: dict[tuple[str, int, int], list[dict[str, Any]]] = {}
    for row in report["results"]:
        groups.setdefault(_row_key(row), []).append(row)
    for (target, batch, seq_len), rows in groups.items():
        base = next((r["latency_ms"]["p50"] for r in rows if r["artifact"] == BASELINE), None)
        shape = rows[0].get("input", f"sequence {seq_len}")
        out += ["", f"## Latency: {target}, batch {batch}, {shape} (ms)", ""]
        out += [
            "| artifact | p50 | p90 | p99 | mean ± std | per s | x vs ORT fp32 (p50) |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in rows:
            lat = row["latency_ms"]
            speed = "" if base is None else f"{base / lat['p50']:.2f}"
            out.append(
                f"| {row['artifact']} | {lat['p50']:.2f} | {lat['p90']:.2f} | {lat['p99']:.2f} | "
                f"{lat['mean']:.2f} ± {lat['std']:.2f} | {row['throughput_per_s']:.1f} | {speed} |"
            )
    out += _profile_table(report.get("op_profile"))
    out += _pruning_tables(report.get("pruning"))
    notes = findings(report)
    if notes or report["warnings"] or report["skipped"]:
        out += ["", "## Notes", ""]
        out += [f"- {n}" for n in notes]
        out += [f"- warning: {w}" for w in report["warnings"]]
        out += [f"- skipped `{s['artifact']}` on {s['target']}: {s['reason']}" for s in report["skipped"]]
    if gate_lines:
        out += ["", "## Gates", ""] + [f"- {line}" for line in gate_lines]
    return "\n".join(out) + "\n"


PLOT_PNG = "accuracy_latency.png"


def _ratio(reference: float | None, value: float) -> float | None:
    return reference / value if reference and value else None


def headline(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per artifact and engine at batch 1 and the longest input measured: size, accuracy, p50 and
    how many times faster and smaller than the reference (the teacher) at that shape."""
    rows = [r for r in report.get("results", []) if r.get("batch") == 1 and "latency_ms" in r]
    if not rows:
        return []
    seq_len = max(r["seq_len"] for r in rows)
    rows = [r for r in rows if r["seq_len"] == seq_len]
    ref = next((r for r in rows if r["artifact"] == report.get("reference")), None)
    return [
        {
            "artifact": r["artifact"],
            "engine": r["engine"],
            "input": r.get("input", f"sequence {seq_len}"),
            "size_mb": r["size_mb"],
            "accuracy": r["accuracy"],
            "p50_ms": r["latency_ms"]["p50"],
            "speedup": _ratio(ref and ref["latency_ms"]["p50"], r["latency_ms"]["p50"]),
            "smaller": _ratio(ref and ref["size_mb"], r["size_mb"]),  # a tiny model rounds to 0.0 MB
        }
        for r in rows
    ]


def _lm_summary(report: dict[str, Any]) -> str:
    """A causal-lm report's batch-1 rows at the longest prompt: size, perplexity, KL, decode tokens/s."""
    rows = [r for r in report.get("results", []) if r.get("batch") == 1 and "decode_tokens_per_s" in r]
    if not rows:
        return ""
    prompt = max(r["prompt_len"] for r in rows)
    rows = [r for r in rows if r["prompt_len"] == prompt]
    ref = next((r for r in rows if r["artifact"] == report.get("reference")), None)
    name = report.get("reference", "reference")
    head = (
        f"{'artifact':<24} {'engine':<12} {'MB':>7} {'ppl':>9} {'KL':>7} {'tok/s':>7} {'x ' + name:>10} {'1/size':>7}"
    )
    lines = [f"batch 1, prompt {prompt}, {rows[0]['new_tokens']} new tokens:", head, "-" * len(head)]
    for r in rows:
        tok_s = r["decode_tokens_per_s"]["p50"]
        faster = _ratio(tok_s, ref["decode_tokens_per_s"]["p50"]) if ref else None
        smaller = _ratio(ref and ref["size_mb"], r["size_mb"])
        lines.append(
            f"{r['artifact']:<24} {r['engine']:<12} {r['size_mb']:>7.1f} {r['perplexity']:>9.3f} "
            f"{r['kl_divergence']:>7.4f} {tok_s:>7.1f} {'' if faster is None else f'{faster:.2f}':>10} "
            f"{'' if smaller is None else f'{smaller:.1f}':>7}"
        )
    return "\n".join(lines)


def render_summary(report: dict[str, Any]) -> str:
    """The headline rows as a fixed-width table for the terminal."""
    if report.get("task") == "causal-lm":
        return _lm_summary(report)
    rows = headline(report)
    if not rows:
        return ""
    metric, ref = report.get("metric", "accuracy"), report.get("reference", "reference")
    head = f"{'artifact':<24} {'engine':<12} {'MB':>7} {metric:>9} {'p50 ms':>8} {'x ' + ref:>10} {'1/size':>7}"
    lines = [f"batch 1, {rows[0]['input']}:", head, "-" * len(head)]
    for r in rows:
        speed = "" if r["speedup"] is None else f"{r['speedup']:.2f}"
        smaller = "" if r["smaller"] is None else f"{r['smaller']:.1f}"
        lines.append(
            f"{r['artifact']:<24} {r['engine']:<12} {r['size_mb']:>7.1f} {100 * r['accuracy']:>8.2f}% "
            f"{r['p50_ms']:>8.2f} {speed:>10} {smaller:>7}"
        )
    return "\n".join(lines)


def plot_accuracy_latency(report: dict[str, Any], path: Path) -> Path | None:
    """Accuracy against p50 latency of every artifact (batch 1, longest input) as a PNG, written atomically;
    None when the report has no such rows."""
    rows = headline(report)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = report.get("metric", "accuracy")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, r in enumerate(sorted(rows, key=lambda r: r["p50_ms"])):
        is_ref = r["artifact"] == report.get("reference")
        ax.scatter(r["p50_ms"], 100 * r["accuracy"], s=20 + 2 * r["size_mb"], alpha=0.7, marker="s" if is_ref else "o")
        label = f"{r['artifact']} {r['size_mb']:.0f} MB"  # neighbours alternate above and below
        where = (4, 4) if i % 2 == 0 else (4, -10)
        ax.annotate(label, (r["p50_ms"], 100 * r["accuracy"]), fontsize=7, xytext=where, textcoords="offset points")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.set_xlabel(f"p50 latency, batch 1, {rows[0]['input']} (ms, log scale)")
    ax.set_ylabel(f"test {metric} (%)")
    ax.set_title("every artifact: test accuracy against latency (marker area ~ size)", fontsize=9)
    fig.tight_layout()
    partial = path.with_name(f".{path.name}.partial.png")
    fig.savefig(partial, dpi=110)
    plt.close(fig)
    os.replace(partial, path)
    return path
