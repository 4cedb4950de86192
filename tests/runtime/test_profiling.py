"""ORT per-op-type profiling: fp32 and int8 artifacts of the built run, and the report table."""

from pathlib import Path

from edgepipe.benchmarks.report import _profile_table
from edgepipe.runtime import Predictor, RuntimeOptions
from edgepipe.runtime.profiling import op_type_profile


def test_op_type_profile_shows_the_int8_kernels(built_run: Path) -> None:
    options = RuntimeOptions(threads=1)
    profiles = {}
    for name, folder in (("fp32", "02-export/fp32"), ("int8-dynamic", "03-quantize/int8-dynamic")):
        predictor = Predictor.load(built_run / folder, options=options)
        feeds = predictor.encode(["a film that drags", "great"], pad_to=16)
        profiles[name] = op_type_profile(built_run / folder / "model.onnx", feeds, runs=5, options=options)
    assert "MatMul" in profiles["fp32"] and "QAttention" not in profiles["fp32"]
    # onnxruntime fuses DynamicQuantizeLinear + MatMulInteger into DynamicQuantizeMatMul at load
    assert {"QAttention", "DynamicQuantizeMatMul"} <= set(profiles["int8-dynamic"])
    assert all(ms > 0 for times in profiles.values() for ms in times.values())
    assert list(profiles["fp32"].values()) == sorted(profiles["fp32"].values(), reverse=True)
    table = _profile_table({"batch": 2, "seq_len": 16, "input": "sequence 16", "artifacts": profiles})
    assert table[3] == "| op type | fp32 | int8-dynamic |" and table[-1].startswith("| **total** |")
