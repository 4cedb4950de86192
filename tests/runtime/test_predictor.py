import re
from pathlib import Path

import numpy as np
import pytest

from edgepipe.errors import BackendUnavailableError, InputError
from edgepipe.runtime import BACKENDS, Predictor, RuntimeOptions, get_backend


def test_predict_returns_labels_and_probabilities(built_run: Path) -> None:
    predictor = Predictor.load(built_run / "03-quantize" / "int8-dynamic")
    [a, b] = predictor.predict(["great film", "a dull, lifeless mess"])
    assert a.label in ("rotten", "fresh") and set(a.probabilities) == {"rotten", "fresh"}
    assert sum(b.probabilities.values()) == pytest.approx(1.0, abs=1e-6)
    assert a.score == max(a.probabilities.values())


def test_torch_and_onnx_artifacts_agree(built_run: Path) -> None:
    texts = ["great film", "a dull, lifeless mess", "not bad at all, though a bit long"]
    torch_logits = Predictor.load(built_run / "01-finetune" / "model").logits(texts)
    onnx_logits = Predictor.load(built_run / "02-export" / "fp32").logits(texts)
    np.testing.assert_allclose(onnx_logits, torch_logits, atol=1e-4)


def test_batches_of_similar_length_come_back_in_input_order(built_run: Path) -> None:
    texts = ["a dull, lifeless mess that never finds its footing", "great", "not bad at all", "fine", "a long " * 9]
    predictor = Predictor.load(built_run / "02-export" / "fp32")
    alone = np.concatenate([predictor.logits([t]) for t in texts])
    np.testing.assert_allclose(predictor.logits(texts, batch_size=2), alone, atol=1e-5)


def test_session_records_its_settings(built_run: Path) -> None:
    predictor = Predictor.load(built_run / "02-export" / "fp32", options=RuntimeOptions(threads=1))
    settings = predictor.session.describe()
    assert settings["providers"] == ["CPUExecutionProvider"] and settings["intra_op_threads"] == 1
    assert settings["graph_optimization"] == "all" and settings["denormal_as_zero"] is True


def test_corrupt_model_is_an_input_error(run_copy: Path) -> None:
    model = run_copy / "02-export" / "fp32" / "model.onnx"
    model.write_bytes(model.read_bytes()[:5000])
    with pytest.raises(InputError, match="is not a valid ONNX model"):
        Predictor.load(model.parent)


def test_an_unknown_or_unavailable_backend_is_refused_with_the_reason() -> None:
    assert BACKENDS["ort-cpu"].available() is None and BACKENDS["torch"].available() is None
    with pytest.raises(BackendUnavailableError, match="unknown backend 'tensorrt-llm'; known: "):
        get_backend("tensorrt-llm")
    reason = BACKENDS["tensorrt"].available()
    if reason is not None:
        with pytest.raises(BackendUnavailableError, match=re.escape(f"backend 'tensorrt' cannot run here: {reason}")):
            get_backend("tensorrt")
