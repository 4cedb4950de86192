"""Loading transformers text classifiers, head-pruned ones included.

Every stage and backend loads a text model through `load_text_model`. A folder whose config.json
has per-layer `layer_heads` is a pruned BERT (`edgepipe.runtime.pruned_bert`) and loads with that
class directly, never through the modeling file copied beside it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def is_pruned_bert(config: dict[str, Any]) -> bool:
    return "layer_heads" in config


def load_text_model(path: Path | str, **kwargs: Any) -> Any:
    """`AutoModelForSequenceClassification.from_pretrained(path, **kwargs)` in eval mode."""
    from transformers import AutoModelForSequenceClassification

    config_path = Path(path) / "config.json"
    if config_path.is_file() and is_pruned_bert(json.loads(config_path.read_text(encoding="utf-8"))):
        from edgepipe.runtime.pruned_bert import PrunedBertForSequenceClassification

        return PrunedBertForSequenceClassification.from_pretrained(path, **kwargs).eval()
    return AutoModelForSequenceClassification.from_pretrained(path, **kwargs).eval()
