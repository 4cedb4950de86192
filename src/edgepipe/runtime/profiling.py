"""Where the time goes: onnxruntime's per-node profiling, summed per operator type.

Answers "why is int8 (not) faster" with numbers: the kernel time of each op type per run, for an
fp32 model and its int8 variants on the same inputs (Q/DQ pairs, MatMulInteger, DynamicQuantizeLinear,
Softmax...). Profiling adds its own overhead; it runs outside every timed region.
"""

from __future__ import annotations

import json
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

from edgepipe.runtime.backends import RuntimeOptions, ort_cpu_session, ort_session_options


def op_type_profile(model: Path, feeds: dict[str, np.ndarray], runs: int, options: RuntimeOptions) -> dict[str, float]:
    """Milliseconds per run spent in each operator type's kernels (CPU), most expensive first."""
    so = ort_session_options(options)
    with tempfile.TemporaryDirectory(prefix="edgepipe-profile-") as tmp:
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tmp) / "ort")
        session = ort_cpu_session(model, options, so)
        names = [i.name for i in session.get_inputs()]
        inputs = {n: feeds[n] for n in names}
        for _ in range(3):  # warm-up runs are profiled too: counted below and left out
            session.run(None, inputs)
        for _ in range(runs):
            session.run(None, inputs)
        events = json.loads(Path(session.end_profiling()).read_text(encoding="utf-8"))
    per_run: dict[str, list[float]] = defaultdict(list)
    for event in events:
        if event.get("cat") == "Node" and str(event.get("name", "")).endswith("_kernel_time"):
            per_run[event["args"]["op_name"]].append(float(event["dur"]))
    total_runs = runs + 3
    times = {}
    for op, durations in per_run.items():
        per_call = len(durations) // total_runs or 1  # calls of this op type per run
        kept = durations[3 * per_call :]  # drop the warm-up runs
        times[op] = round(sum(kept) / runs / 1000.0, 4)
    return dict(sorted(times.items(), key=lambda kv: -kv[1]))
