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

.PHONY: install quickstart test test-portable cpu-info lint format clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	DS_BUILD_OPS=0 $(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(PY) -m launch pipeline --config configs/quickstart.yaml

lint: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# The whole suite, then the numerically sensitive tests (marker `numerics`) again under AVX2
# kernels: equivalence must not depend on which kernels this CPU picks.
test: $(STAMP) lint cpu-info
	WANDB_MODE=disabled $(PY) -m pytest -q
	$(MAKE) --no-print-directory test-portable

test-portable: $(STAMP)
	$(PORTABLE_ENV) WANDB_MODE=disabled $(PY) -m pytest -q -m numerics

cpu-info: $(STAMP)
	@grep -m1 "model name" /proc/cpuinfo || true
	@$(PY) -c "import torch; print('torch', torch.__version__, 'CPU capability:', torch.backends.cpu.get_cpu_capability())"
	@$(PORTABLE_ENV) $(PY) -c "import torch; print('under test-portable:', torch.backends.cpu.get_cpu_capability())"

clean:
	rm -rf runs .pytest_cache .ruff_cache
