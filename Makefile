# Two commands on a fresh machine: `make demo` and `make test`.
# torch is pinned here (the CPU build this machine installs locally); the package itself
# only asks for torch>=2.2 so GPU users get their CUDA build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0

.PHONY: venv demo test test-fast lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/otlt demo

test: venv
	$(PY) -m pytest -q -ra --durations=15

test-fast: venv
	$(PY) -m pytest -q -m "not slow"

lint: venv
	$(PY) -m ruff check src tests benchmarks scripts examples configs

bench: venv
	$(VENV)/bin/otlt bench --quick

clean:
	rm -rf $(VENV) build *.egg-info
