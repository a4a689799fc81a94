# `make test` is the project's test command (CI runs it through .ci/run).
PYTHON ?= python3
VENV := .venv
# `make gpu-check PY=python3` (any target) runs in an environment that already has torch and
# the other requirements, a GPU machine's own CUDA build say, instead of building .venv.
PY := $(VENV)/bin/python
ENV := $(if $(filter $(VENV)/bin/python,$(PY)),venv)

.PHONY: test test-oldest demo smoke bench bench-targets gpu-check venv clean

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -r requirements.txt
	touch $@

venv: $(VENV)/.installed

test: $(ENV)
	$(PY) -m pytest -q tests

# The suite on the oldest PyTorch we support, torch 2.1 (its wheels need numpy 1.x). Not part
# of CI: it downloads about 3 GB once.
OLDEST := .venv-oldest
$(OLDEST)/.installed: requirements.txt
	$(PYTHON) -m venv $(OLDEST)
	$(OLDEST)/bin/python -m pip install --quiet --upgrade pip
	grep -v -E '^torch(vision)?==' requirements.txt > $(OLDEST)/requirements.txt
	$(OLDEST)/bin/python -m pip install --quiet torch==2.1.2 torchvision==0.16.2 "numpy<2" -r $(OLDEST)/requirements.txt
	touch $@

test-oldest: $(OLDEST)/.installed
	$(OLDEST)/bin/python -m pytest -q tests

# The whole pipeline on a small synthetic dataset, CPU only, offline (reruns from scratch).
demo: $(ENV)
	$(PY) data/demo.py --out demo-run --overwrite

# CDTG trained with random SIGKILLs and resumes must match an uninterrupted run (minutes).
smoke: $(ENV)
	$(PY) tests/long_run_smoke.py --work runs/smoke

# Speed figures (not part of `make test`; nothing is asserted): printed and appended to
# runs/bench/*.jsonl. The paper configuration on a GPU, a tiny one on a CPU.
bench: $(ENV)
	$(PY) benchmarks/bench_resnet.py
	$(PY) benchmarks/bench_cdtg.py

# Only the cases of the speed targets (issue figures: CDTG step with and without CLIP,
# generation at batch 1 and batched, KMDN's trainer fp32 against bf16 and against in-memory
# batches), without the longest cases of `make bench`.
bench-targets: $(ENV)
	$(PY) benchmarks/bench_cdtg.py --cases step step-no-clip gen-batch1-fused gen
	$(PY) benchmarks/bench_resnet.py --trainers kmdn --large-batch 0

# On a machine with a GPU: the CUDA checks that CI (no GPU) skips, then the benchmarks.
gpu-check: $(ENV)
	$(PY) -m pytest -q tests/test_cuda.py
	$(MAKE) bench

clean:
	rm -rf $(VENV) $(OLDEST) .pytest_cache
