# mtlface-jax: `make demo` and `make test` set up .venv from pyproject.toml on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=
# Test files run on two workers (CI has 2 cores; XLA compiles are single-threaded),
# slowest files first (tests/conftest.py; --no-loadscope-reorder needs pytest-xdist 3.8).
TEST_WORKERS ?= 2
DEMO_DIR ?= demo_out
# The demo's CPU variant (minutes on 2 cores); DEMO_CONFIG=configs/default.py on a GPU/TPU.
DEMO_CONFIG ?= configs/default.py:cpu
REAL_CONFIG ?= configs/real_lfw_utkface.py
REAL_DIR ?= real_out

.PHONY: venv test test-slow demo real clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

# Also the tests too slow for CI's budget (the TPAMI training step's compile,
# the CPU dry runs of the two GPU scripts).
test-slow: $(STAMP)
	MTLFACE_SLOW_TESTS=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) -m mtlface_jax.recipes.demo --config=$(DEMO_CONFIG) --workdir=$(DEMO_DIR)

# The real-data recipe on ../shared/data (README "Real faces"); REAL_CONFIG=...:cpu on a CPU.
real: $(STAMP)
	$(PY) -m mtlface_jax.recipes.lfw_utkface --config=$(REAL_CONFIG) --workdir=$(REAL_DIR)

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
