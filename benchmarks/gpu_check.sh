#!/usr/bin/env bash
# The one prepared run on a CUDA machine (issue 21), about 6 minutes: the cuda/tensorrt-marked tests, then
# the torch CUDA engines of the demo student's shape timed with CUDA events (benchmarks/bench_gpu.py).
# It uses that machine's own python3 (torch with CUDA, transformers, onnx, onnxruntime) plus .gpu-kit/
# (benchmarks/gpu_kit.py writes it here); it installs nothing from a network and edgepipe not at all
# (PYTHONPATH=src). Logs and JSON go to $OUT (runs/gpu when unset). From the repository root:
#
#   .venv/bin/python benchmarks/gpu_kit.py          # here, once
#   bash benchmarks/gpu_check.sh                    # there: device run, carry [".gpu-kit"], timeout 480
#
# TensorRT and onnxruntime-gpu are not on that machine: their tests report "skipped" with the reason.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
[ -d .gpu-kit/wheels ] || { echo "no .gpu-kit/: run benchmarks/gpu_kit.py here first" >&2; exit 2; }

deps=$(mktemp -d)
$PY -m pip install -q --no-index --no-deps --target "$deps" .gpu-kit/wheels/*.whl >"$OUT/install.log" 2>&1 \
  || { echo "installing the kit's wheels failed: see $OUT/install.log" >&2; exit 1; }
export PYTHONPATH="$PWD/src:$PWD/.gpu-kit/site:$deps"
export EDGEPIPE_CACHE="$(mktemp -d)"

{ nvidia-smi; $PY -c 'import sys, torch, transformers, onnxruntime as o; print(sys.version, torch.__version__,
torch.version.cuda, transformers.__version__, o.__version__, o.get_available_providers())'; } >"$OUT/env.txt" 2>&1

status=0
timeout 300 $PY -m pytest -q -rs -p no:cacheprovider -m "cuda or tensorrt" tests/runtime tests/pipeline \
  --junitxml="$OUT/pytest.xml" >"$OUT/pytest.log" 2>&1 || status=1
tail -n 25 "$OUT/pytest.log"

timeout 150 $PY benchmarks/bench_gpu.py --model .gpu-kit/student --json "$OUT/gpu.json" >"$OUT/bench.log" 2>&1 \
  || status=1
cat "$OUT/bench.log"
exit $status
