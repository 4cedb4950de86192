"""Render `report.json` as Markdown a person can read, and derive the notes worth saying out loud."""

from __future__ import annotations

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


def render_markdown(report: dict[str, Any], title: str, gate_lines: list[str] | None = None) -> str:
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
        f">= {settings['warmup_s']} s; "
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
