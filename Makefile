# One command to run the demo (make run), one to run every test (make test).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install run test test-fast lint bench bench-codec clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

run: install  ## the whole thing locally: mock Azure deployments, processor, real Envoy on :10000
	$(PY) -m extproc demo --config config/demo.yaml

test: install  ## every test: unit, rendered Envoy validation, end to end with real Envoy/Redis/openai
	$(PY) -m pytest -q

test-fast: install  ## unit tests only (milliseconds each)
	$(PY) -m pytest -q -m "not e2e"

lint: install
	$(VENV)/bin/ruff check extproc tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/mypy --strict bench/codec.py

bench: install  ## side by side: plain Envoy, the product (4 set-ups), LiteLLM Proxy; writes docs/benchmarks/ (~10 min)
	$(PY) -m bench.run

bench-codec: install  ## xds-protos vs envoy-data-plane codec cost per request (installs the latter in .bench-venv)
	$(PY) -m bench.codec

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
