# Two commands set everything up and run it: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install clean bench

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch pinned first, so no dependency resolves another build. PyPI's Linux wheel is the CUDA build;
	# for the CPU one: make install TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
	$(PY) -m pip install -q torch==2.13.0 $(TORCH_PIP_ARGS)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	# Headless Chromium for the web-page test (Debian's package; the test skips, saying why, if it cannot install).
	bash scripts/install_browser.sh || echo "chromium could not be installed: the browser test will skip"
	# One torch thread per process: Ray workers and the test process share 2 cores, and oversubscribed
	# threads slow every CPU op several-fold.
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m pytest -q --durations=25 tests

demo: $(STAMP)
	$(PY) -m jobs.demo --output demo_output

bench: $(STAMP)
	$(PY) benchmarks/model_forward.py

clean:
	rm -rf $(VENV) demo_output .pytest_cache
