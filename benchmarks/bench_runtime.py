"""Two runtime findings behind the harness's defaults, measured side by side on a finished run.

    python benchmarks/bench_runtime.py --run runs/demo --json runs/bench/runtime.json

1. denormals: each ONNX artifact with `session.set_denormal_as_zero` on and off (b1 s128, real padded
   sentences), interleaved in rotating rounds, one session alive at a time.
2. co-resident sessions: the same artifacts timed with every session alive at once (as a naive harness
   does) against one alive at a time; spread (std/mean) and p90 show the interference.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from edgepipe.benchmarks.harness import measure_interleaved
from edgepipe.pipeline.artifacts import write_json
from edgepipe.pipeline.data import load_splits
from edgepipe.pipeline.recipe import parse_recipe
from edgepipe.runtime import Predictor, RuntimeOptions

ARTIFACT_NAMES = ("fp32", "int8-dynamic", "int8-static")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=Path("runs/demo"))
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--runs", type=int, default=60)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args(argv)
    manifest = json.loads((args.run / "manifest.json").read_text())
    recipe = parse_recipe(manifest["recipe"])
    artifacts = {a["name"]: a["path"] for a in manifest["artifacts"] if a["name"] in ARTIFACT_NAMES}
    texts = load_splits(recipe.data, recipe.seed).test.inputs[: args.batch]

    def load(path: str, daz: bool) -> Predictor:
        return Predictor.load(args.run / path, options=RuntimeOptions(denormal_as_zero=daz))

    def runner(predictor: Predictor):  # type: ignore[no-untyped-def]
        feeds = predictor.encode(texts, pad_to=args.seq_len)
        return lambda: predictor.session.run(feeds)

    @contextmanager
    def one_at_a_time(name: str):  # type: ignore[no-untyped-def]
        artifact, daz = name.rsplit("|", 1)
        yield {"x": runner(load(artifacts[artifact], daz == "daz"))}

    timing = {"runs": args.runs, "rounds": 6, "warmup_runs": 5, "warmup_s": 0.5}
    names = [f"{a}|{d}" for a in artifacts for d in ("daz", "no-daz")]
    daz = measure_interleaved(names, one_at_a_time, **timing)

    alive = {a: runner(load(p, True)) for a, p in artifacts.items()}

    @contextmanager
    def all_alive(name: str):  # type: ignore[no-untyped-def]
        yield {"x": alive[name]}

    crowded = measure_interleaved(list(artifacts), all_alive, **timing)
    alive.clear()  # release the sessions before timing one at a time
    single = measure_interleaved(list(artifacts), lambda n: one_at_a_time(f"{n}|daz"), **timing)

    def row(stats):  # type: ignore[no-untyped-def]
        return {"p50_ms": round(stats.p50, 3), "p90_ms": round(stats.p90, 3), "cv": round(stats.cv, 3)}

    out = {
        "batch": args.batch,
        "seq_len": args.seq_len,
        "denormal_as_zero": {
            a: {
                "on": row(daz[(f"{a}|daz", "x")]),
                "off": row(daz[(f"{a}|no-daz", "x")]),
                "speedup": round(daz[(f"{a}|no-daz", "x")].p50 / daz[(f"{a}|daz", "x")].p50, 3),
            }
            for a in artifacts
        },
        "sessions": {
            a: {"all_alive": row(crowded[(a, "x")]), "one_at_a_time": row(single[(a, "x")])} for a in artifacts
        },
    }
    write_json(args.json, out)  # atomic, creates the folder
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
