"""transformers image classifiers (ViT, ResNet, MobileNetV2, ConvNeXt, ...) as edgepipe image modules.

A user's `*ForImageClassification` folder becomes a module folder once per run (`pipeline.models`):
the factory below rebuilds the model from its config with the data's label count and channels, and
its forward returns the logits tensor, the contract every image stage, exporter and backend already
speaks. The folder's own weights load into it by name; a classifier head of another label count is
the only thing left at its fresh init (a new head, as `from_pretrained(..., num_labels=N)` gives).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgepipe.errors import InputError

FACTORY = "edgepipe.runtime.hf_vision:image_classifier"
# config.json keys that describe the source folder's head or provenance, not the architecture
_HEAD_KEYS = ("id2label", "label2id", "architectures", "_name_or_path", "num_labels", "transformers_version")


def read_config(folder: Path) -> dict[str, Any] | None:
    """The config of a transformers image-classification folder, or None for any other folder."""
    path = folder / "config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # not one; `validate` names what is wrong with the file (pipeline.checks.read_config)
    if not isinstance(config, dict):
        return None
    architectures = config.get("architectures") or []
    if not any(str(a).endswith("ForImageClassification") for a in architectures):
        return None
    return dict(config)


def factory_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    return {"config": {k: v for k, v in config.items() if k not in _HEAD_KEYS}}


def image_classifier(num_classes: int, in_channels: int, config: dict[str, Any]) -> Any:
    """The config's image classifier with `num_classes` labels over `in_channels`, returning logits."""
    import torch
    from transformers import AutoConfig, AutoModelForImageClassification

    values = {k: v for k, v in config.items() if k not in ("model_type", "num_channels")}
    cfg = AutoConfig.for_model(config["model_type"], **values, num_labels=num_classes, num_channels=in_channels)

    class ImageClassifier(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = AutoModelForImageClassification.from_config(cfg)

        def forward(self, pixel_values: Any) -> Any:
            return self.model(pixel_values=pixel_values).logits

    return ImageClassifier()


def load_pretrained(model: Any, folder: Path) -> None:
    """Load `folder`'s weights into a module built by `image_classifier`, the way `from_pretrained` reads
    them (safetensors only; transformers maps older checkpoint names); a classifier head of another
    label count stays at its init."""
    from transformers import AutoModelForImageClassification

    if not (folder / "model.safetensors").is_file():
        raise InputError(f"`model`: {folder} has no model.safetensors; save it with save_pretrained (safetensors)")
    loaded = AutoModelForImageClassification.from_pretrained(
        folder, config=model.model.config, ignore_mismatched_sizes=True, use_safetensors=True
    )
    model.model.load_state_dict(loaded.state_dict())
