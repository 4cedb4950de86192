"""Width against depth for decoders (Minitron, Sreenivas et al. 2024): students of the SmolLM2-135M teacher at
about the same parameter count, distilled with the same token budget, measured side by side in one run.

    python benchmarks/bench_lm_width.py --json runs/bench/lm_width.json [--work runs/lm] \\
        [--candidate NAME:LAYERS:HIDDEN:FFN ...]

Each candidate keeps LAYERS evenly spaced teacher layers (first and last kept; the recipe's own layer list
for the default depth student), then prunes its residual channels to HIDDEN and every FFN to FFN neurons by
activation importance on train text (`edgepipe.pipeline.lm.prune_width`; nothing pruned at the teacher's
width), then distils with `distill_lm` and the settings of `recipes/smollm2-student.yaml`: same steps, batch,
sequence length, learning rate, loss, so the same token budget. Measured: parameters, training time,
teacher-forced perplexity, KL divergence from and top-1 agreement with the fp32 teacher on held-out snippets
(PyTorch), and b1 decode tokens/s of each plain fp32 ONNX export against the teacher's, interleaved. Students
are cached in WORK by name and settings (`bench_lm.py` shares the default depth student in WORK/student).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

from bench_lm import _export, _prompts, _speed, _student, distill_settings, recipe_distill

from edgepipe.pipeline.adapters import text_batches
from edgepipe.pipeline.lm import evenly_spaced_layers, lm_texts
from edgepipe.pipeline.models import smollm2_folder
from edgepipe.runtime.generate import OnnxCausalLM, TorchCausalLM, token_quality
from edgepipe.runtime.host import host_info, versions

log = logging.getLogger("bench_lm_width")

# about 70.8 M parameters each (the recipe's 12-layer subset); the tied 49152-token embedding is 28.3 M of the
# teacher's 134.5 M at hidden 576, so narrower students spend less of their budget on it. Hidden sizes are
# multiples of the 9 heads (transformers' LlamaConfig requires it, head_dim or not).
DEFAULT_CANDIDATES = ("depth-12:12:576:1536", "width-30:30:432:768", "mixed-20:20:504:1008")


@dataclass(frozen=True)
class Candidate:
    name: str
    layers: int
    hidden: int
    ffn: int

    @classmethod
    def parse(cls, text: str) -> Candidate:
        try:
            name, layers, hidden, ffn = text.split(":")
            return cls(name, int(layers), int(hidden), int(ffn))
        except ValueError:
            raise SystemExit(
                f"--candidate {text!r}: expected NAME:LAYERS:HIDDEN:FFN, e.g. width-30:30:432:768"
            ) from None


def run_width(work: Path, candidates: list[Candidate], ppl_texts: int, runs: int, rounds: int) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher_dir = smollm2_folder(work / "cache")
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    for param in teacher.parameters():
        param.requires_grad_(False)
    config = teacher.config
    total, hidden, ffn = config.num_hidden_layers, config.hidden_size, config.intermediate_size
    cfg = recipe_distill()
    settings = distill_settings(cfg, 0)
    recipe_layers = list(cfg.student.layers or [])
    train, held_out = lm_texts("train"), lm_texts("test")[:ppl_texts]
    students: dict[str, Any] = {}
    rows: dict[str, dict[str, Any]] = {}
    for c in candidates:
        layers = recipe_layers if len(recipe_layers) == c.layers else evenly_spaced_layers(total, c.layers)
        plain = c.hidden == hidden and c.ffn == ffn
        folder = work / ("student" if plain and layers == recipe_layers else f"student-{c.name}")
        log.info("student %s: layers %s, hidden %d, FFN %d", c.name, layers, c.hidden, c.ffn)
        model, distill = _student(
            teacher,
            tokenizer,
            folder,
            layers,
            train,
            settings,
            ffn_width=None if c.ffn == ffn else c.ffn,
            hidden_width=None if c.hidden == hidden else c.hidden,
        )
        students[c.name] = (model, folder)
        embedding = model.get_input_embeddings().weight.numel()
        rows[c.name] = {
            "layers": layers,
            "hidden": c.hidden,
            "ffn": c.ffn,
            "parameters_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
            "non_embedding_m": round((sum(p.numel() for p in model.parameters()) - embedding) / 1e6, 2),
            "train_s": distill.get("train_s"),
            "step_s_median": round(distill["step_s_median"], 3),
            "loss_last": round(distill["loss_last"], 4),
            "importance_kept": distill.get("importance_kept"),
        }
    log.info("teacher-forced quality on %d held-out texts", len(held_out))
    logits = {
        "teacher": TorchCausalLM(teacher).logits,
        **{n: TorchCausalLM(m).logits for n, (m, _) in students.items()},
    }
    quality = token_quality(logits, text_batches(tokenizer, held_out, 16, cfg.max_seq_len), reference="teacher")
    teacher_ppl = quality["teacher"].perplexity
    for name, row in rows.items():
        q = quality[name]
        row |= {
            "ppl": round(q.perplexity, 3),
            "ppl_ratio": round(q.perplexity / teacher_ppl, 4),
            "kl": round(q.kl, 4),
            "top1": round(q.top1, 4),
        }
    onnx = {"teacher-onnx": work / "teacher-onnx"}
    parity = {"teacher-onnx": _export(teacher, onnx["teacher-onnx"], 1e-3)}
    for name, (model, folder) in students.items():
        onnx[name] = folder.with_name(f"{folder.name}-onnx")
        parity[name] = _export(model, onnx[name], 1e-3)
    del students
    prompt = _prompts(tokenizer, held_out, 1, 32)
    log.info("timing %d fp32 ONNX graphs: keep the machine quiet", len(onnx))
    speed = _speed({n: (lambda p=p: OnnxCausalLM(p)) for n, p in onnx.items()}, None, prompt, 32, runs, rounds)
    base = speed["teacher-onnx"]["decode_tok_s_p50"]
    for name, row in rows.items():
        row |= speed[name] | {"tok_s_ratio": round(speed[name]["decode_tok_s_p50"] / base, 3)}
    return {
        "teacher": {
            "ppl": round(teacher_ppl, 3),
            "parameters_m": round(sum(p.numel() for p in teacher.parameters()) / 1e6, 2),
            **speed["teacher-onnx"],
        },
        "rows": rows,
        "parity": parity,
        "settings": {
            **settings,
            "ppl_texts": len(held_out),
            "quality_tokens": quality["teacher"].tokens,
            "runs": runs,
            "rounds": rounds,
            "torch_threads": torch.get_num_threads(),
        },
        "machine": host_info(),
        "versions": versions(),
        "table": table(rows),
    }


def table(rows: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| student | layers | hidden | FFN | params M | non-emb M | train s | ppl | x teacher ppl | KL | top-1 "
        "| decode tok/s p50 (min-max) | x teacher-onnx |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        low, high = r["decode_tok_s_min_max"]
        lines.append(
            f"| {name} | {len(r['layers'])} | {r['hidden']} | {r['ffn']} | {r['parameters_m']} | "
            f"{r['non_embedding_m']} | {r['train_s']} | {r['ppl']:.2f} | {r['ppl_ratio']:.3f} | {r['kl']:.4f} | "
            f"{r['top1']:.3f} | {r['decode_tok_s_p50']:.1f} ({low:.1f}-{high:.1f}) | {r['tok_s_ratio']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("runs/lm"))
    parser.add_argument("--candidate", action="append", help="NAME:LAYERS:HIDDEN:FFN (repeat); default: three")
    parser.add_argument("--ppl-texts", type=int, default=256)
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    for name in ("edgepipe", "bench_lm", "bench_lm_width"):
        logging.getLogger(name).setLevel(logging.INFO)
    candidates = [Candidate.parse(c) for c in args.candidate or DEFAULT_CANDIDATES]
    args.work.mkdir(parents=True, exist_ok=True)
    result = run_width(args.work, candidates, args.ppl_texts, args.runs, args.rounds)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(result["table"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
