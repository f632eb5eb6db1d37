# Two entry points for a new user (see README): `make quickstart` and `make test`.
# Both create .venv and install the pinned requirements first; nothing else is needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

export WANDB_MODE ?= offline
export GLOO_SOCKET_IFNAME ?= lo

.PHONY: install quickstart test lint format clean

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

test: $(STAMP) lint
	WANDB_MODE=disabled $(PY) -m pytest -q

clean:
	rm -rf runs .pytest_cache .ruff_cache
