# Two entry points for a new user (see README): `make quickstart` and `make test`.
# Both create .venv and install the pinned requirements first; nothing else is needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

export WANDB_MODE ?= offline
export GLOO_SOCKET_IFNAME ?= lo

# What an older or different x86-64 CPU gives: oneDNN and ATen limited to AVX2 kernels.
PORTABLE_ENV := ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2

.PHONY: install quickstart test test-portable test-all cpu-info lint format clean

# pytest on both cores (pytest-xdist); the SLURM tests stay together on one worker (one local
# cluster a session: tests/conftest.py); the 20 slowest tests are listed at the end.
PYTEST := WANDB_MODE=disabled $(PY) -m pytest -q -n 2 --durations=20
# What `make test` leaves to `make test-all`: tests marked `extended` (the full SLURM matrix,
# long end-to-end runs), each repeating in kind a proof that the fast tier makes.
FAST := -m "not extended"

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	DS_BUILD_OPS=0 $(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

# ARGS: overrides, e.g. make quickstart ARGS="run.seed=1 run.out_dir=runs/quickstart-s1"
quickstart: $(STAMP)
	$(PY) -m launch pipeline --config configs/quickstart.yaml $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# The fast tier (at most 15 minutes on an idle 2-core machine, BENCHMARKS.md "Test suite"),
# then its numerically sensitive tests (marker `numerics`) again under AVX2 kernels:
# equivalence must not depend on which kernels this CPU picks.
test: $(STAMP) lint cpu-info
	$(PYTEST) $(FAST)
	$(MAKE) --no-print-directory test-portable

test-portable: $(STAMP)
	$(PORTABLE_ENV) $(PYTEST) -m "numerics and not extended"

# Every test (contributors, before a change lands), and every `numerics` test under AVX2.
test-all: $(STAMP) lint cpu-info
	$(PYTEST)
	$(PORTABLE_ENV) $(PYTEST) -m numerics

cpu-info: $(STAMP)
	@grep -m1 "model name" /proc/cpuinfo || true
	@$(PY) -c "import torch; print('torch', torch.__version__, 'CPU capability:', torch.backends.cpu.get_cpu_capability())"
	@$(PORTABLE_ENV) $(PY) -c "import torch; print('under test-portable:', torch.backends.cpu.get_cpu_capability())"

clean:
	rm -rf runs .pytest_cache .ruff_cache
