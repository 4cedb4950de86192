"""Backend settings that must hold whatever ran before in the process."""

import subprocess
import sys
from pathlib import Path

SCRIPT = """
import numpy as np, onnxruntime as ort, sys
from edgepipe.runtime.backends import OrtCpuBackend, RuntimeOptions
ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])  # first session: default options
OrtCpuBackend().load(__import__("pathlib").Path(sys.argv[1]), RuntimeOptions(denormal_as_zero=sys.argv[2] == "on"))
tiny = np.array([1e-40], dtype=np.float32)  # a denormal
print(float((tiny * np.float32(1.0))[0]) == 0.0)
"""


def test_caller_thread_flushes_denormals_even_after_another_session(built_run: Path) -> None:
    """onnxruntime sets the calling thread's flush-to-zero only for the first session of a process;
    ours must apply its own setting (on or off) regardless."""
    model = str(built_run / "02-export" / "fp32" / "model.onnx")
    for setting, flushed in (("on", "True"), ("off", "False")):
        out = subprocess.run(
            [sys.executable, "-c", SCRIPT, model, setting], capture_output=True, text=True, check=True
        ).stdout
        assert out.strip() == flushed
