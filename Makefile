# `make run` and `make test` work on a fresh machine: each sets up what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# torch first and pinned: anything that depends on torch would otherwise pull a
# multi-GB CUDA build. On a GPU host install the CUDA build of the same version
# into .venv before `make` (see README).
TORCH := torch==2.13.0

.PHONY: run test lint format bench install browser clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[dev,ctranslate2]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/aigc-bot run

# Chromium for the widget's browser tests (Debian's package; Playwright cannot
# download its own browser here). Skipped quietly when it is already there; the
# browser tests skip with a loud reason when it cannot be installed.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get install -y -q chromium >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1)) \
	      || echo "warning: could not install chromium; browser tests will be skipped"; \
	  else echo "warning: chromium missing and not root; browser tests will be skipped"; fi; }

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: $(STAMP) browser lint
	$(BIN)/python -m pytest

# The set-up installs the ctranslate2 extra: text.engine = "ctranslate2", and the
# CTranslate2 peers of `bench --peers`.
bench: $(STAMP)
	$(BIN)/aigc-bot bench --peers

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
