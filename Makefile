# Quick start: `make demo` runs the main job, `make test` runs the test suite.
# Both create .venv on first use: torch first (pinned), then the five packages in editable mode,
# the example plugin packages under examples/, and the dev tools.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.metamorph-installed
PACKAGES := packages/metamorph-core[lora,hub,qlora] packages/metamorph-encoders[open_clip] packages/metamorph-decoders packages/metamorph-train[all] packages/metamorph-eval[lmms,metrics] packages/metamorph-serve[test] packages/metamorph-toy
EXAMPLE_PACKAGES := $(patsubst %/pyproject.toml,%,$(wildcard examples/*/pyproject.toml))

.PHONY: install test demo lint bench check-wheels

install: $(STAMP)

$(STAMP): Makefile constraints.txt $(wildcard packages/*/pyproject.toml) $(wildcard examples/*/pyproject.toml)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install torch==2.14.1 torchvision==0.29.1
	$(PIP) install -c constraints.txt $(foreach p,$(PACKAGES) $(EXAMPLE_PACKAGES),-e "$(p)") pytest ruff import-linter
	# an older metamorph-train declared the `metamorph` script; its uninstall removes core's
	test -x $(VENV)/bin/metamorph || $(PIP) install --no-deps --force-reinstall -e packages/metamorph-core
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

demo: $(STAMP)
	$(VENV)/bin/metamorph demo --preset quick --out runs/demo --overwrite

bench: $(STAMP)
	$(PY) benchmarks/run.py

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

check-wheels:
	.ci/check-wheels
