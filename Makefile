# loraloom: `make run` and `make test` set up everything a fresh machine needs (idempotently).
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c

VENV      := .venv
PYTHON    := $(CURDIR)/$(VENV)/bin/python
DATA_DIR  ?= data
DEFAULT_MODEL := $(DATA_DIR)/models/SmolLM2-135M-Instruct
HOST      ?= 127.0.0.1
PORT      ?= 8000

# tch builds against the PyTorch installed in the venv; binaries find torch/lib through an rpath.
export VIRTUAL_ENV := $(CURDIR)/$(VENV)
export PATH := $(VIRTUAL_ENV)/bin:$(PATH)
export LIBTORCH_USE_PYTORCH := 1
export LORALOOM_PYTHON := $(PYTHON)
export LORALOOM_DEFAULT_MODEL_DIR := $(CURDIR)/$(DEFAULT_MODEL)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_VERBOSITY := error

.PHONY: run test build build-release venv model lint fmt bench soak fuzz clean-venv

$(VENV)/.installed: requirements.txt requirements-cookbook.txt
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PYTHON) -m pip install -q --disable-pip-version-check -r requirements.txt
	$(PYTHON) -m pip install -q --disable-pip-version-check --no-deps -r requirements-cookbook.txt
	touch $@

venv: $(VENV)/.installed

model: venv
	$(PYTHON) scripts/prepare_default_model.py $(DEFAULT_MODEL)

build: venv
	cargo build --workspace

build-release: venv
	cargo build --release -p loraloom-cli

run: model build-release
	./target/release/loraloom serve --host $(HOST) --port $(PORT) --model default --data-dir $(DATA_DIR)

test: model build
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings
	cargo test --workspace
	scripts/check_cuda_link.sh
	$(PYTHON) -m pytest -q tests

lint: venv
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

fmt:
	cargo fmt --all

soak: model build
	LORALOOM_SOAK_SECS=600 $(PYTHON) -m pytest -q -s tests/test_soak.py

# Hostile payloads for 10 minutes (a fresh seed each time; FUZZ_SECS to change); findings are
# written to fuzz-findings.jsonl with the seed that replays them.
FUZZ_SECS ?= 600
fuzz: model build
	$(PYTHON) tests/fuzz_http.py --secs $(FUZZ_SECS) --out fuzz-findings.jsonl

bench: model build-release
	./scripts/bench

clean-venv:
	rm -rf $(VENV)
