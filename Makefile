# `make test`: create .venv, install the pinned stack and the plugin, run the whole suite (what CI runs).
# `make demo`: same setup, then the controlled probe experiment (docs/experiment.md): 6 seeds x 5 arms.
# `make demo-vqa`: the LLM VQA pipeline (stage 2 + VQA fine-tuning through LAVIS's runner), the confirmation.
# `make gpu-check`: the CUDA paths on one GPU in minutes (lavis_xformer/gpucheck.py); without CUDA it says so.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test demo demo-vqa bench gpu-check clean

$(STAMP): requirements.txt requirements-test.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip wheel setuptools
	# torch first, on its own: it is the one package pip must take from this machine's wheels.
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-test.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(PY) -m lavis_xformer.experiment --seeds 6 --jobs 2 --out output/experiment

demo-vqa: $(STAMP)
	$(PY) -m lavis_xformer.demo --seeds 2

bench: $(STAMP)
	$(PY) -m lavis_xformer.analysis.bench --threads 2 --target-runs 2 --connectors --json bench/latest.json --readme bench/README.md --figures bench

gpu-check: $(STAMP)
	$(PY) -m lavis_xformer.gpucheck --out output/gpucheck.json

clean:
	rm -rf $(VENV) build *.egg-info output
