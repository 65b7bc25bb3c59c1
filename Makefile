# Every target sets up what it needs: `make test` on a fresh machine creates .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The CPU build of torch is installed before the package so that the package's looser torch
# requirement is already met and pip never downloads the CUDA wheels.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
GPU_CHECK_ARGS ?=

.PHONY: install test bench bench-gpu gpu-check lint demo demo-stages demo-lora demo-dpo clean

install: $(STAMP)

$(STAMP): setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	# Default (finder-based) editable install: it maps glm_kernels to kernels/glm_kernels/ (compat
	# mode would only put the checkout on sys.path); new glm_megatron subpackages need no reinstall.
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

test: install
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS=1 $(PY) -m pytest $(PYTEST_ARGS)

bench: install
	$(PY) tools/bench_kernels.py
	$(PY) tools/bench_sft.py
	$(PY) tools/bench_generation.py
	$(PY) tools/bench_ppo.py
	$(PY) tools/bench_lora.py

# On a CUDA machine: the Triton kernels' TFLOP/s and GB/s against the device's peak.
bench-gpu: install
	$(PY) tools/bench_kernels_gpu.py

# First run on one CUDA GPU (< 8 minutes): environment, kernel tests, bench-gpu, a tiny
# SFT -> RM -> PPO in bf16 over NCCL, bf16 parity with transformers; one table, also in
# output/gpu_check/summary.md and summary.json. Exit 3 = no GPU, nothing was checked.
gpu-check: install
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) tools/gpu_check.py $(GPU_CHECK_ARGS)

lint: install
	$(VENV)/bin/ruff check glm_megatron kernels tools tests

# The whole pipeline on 2 CPU ranks (EP=2): tiny SFT -> reward model -> PPO -> HF export -> chat.
demo: install
	PY=$(PY) examples/tiny_ppo/demo.sh

# The single stages with their own data and evaluations (digit-task SFT, reward model + plot).
demo-stages: install
	PY=$(PY) examples/tiny_sft/demo.sh
	PY=$(PY) examples/tiny_rm/demo.sh

# LoRA SFT as the ChatGLM4 tutorial (r 8, alpha 32, q/k/v) on a tiny GLM-4-9B-shaped model, 2 CPU
# ranks (TP=2+SP): Alpaca-zh data -> HF base -> LoRA -> PEFT + merged export -> transformers + peft.
demo-lora: install
	OMP_NUM_THREADS=1 $(PY) examples/tiny_lora/run_demo.py

# DPO on 2 CPU ranks (EP=2): tiny SFT -> DPO (frozen reference) -> HF exports -> the share of
# positive words in sampled replies before and after (transformers), a few minutes.
demo-dpo: install
	PY=$(PY) examples/tiny_dpo/demo.sh

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
