# llama2-toolkit: `make demo` runs the main job, `make test` the tests.
# Both set up their own virtual environment (.venv) from requirements-ci.txt.
# Each runtime and the benchmark bring their own make fragment (included below).

PYTHON_SYS ?= python3
VENV       := .venv
PY         := $(VENV)/bin/python
VENV_STAMP := $(VENV)/.installed

.PHONY: venv test test-fast demo lint

# The whole suite (what CI runs). The tests build the runtimes through the targets below;
# the web stamp brings the Zig compiler, wasmtime and Playwright (requirements-web.txt).
test: $(VENV_STAMP) $(VENV)/.web-installed
	$(VENV)/bin/ruff check -q .
	$(PY) -m pytest -q

# The edit loop: model, formats, configs, tokenizer and the C runtime's basics (< 60 s).
test-fast: $(VENV_STAMP)
	$(PY) -m pytest -q -m "not slow" tests/unit

# Offline end to end: synthetic corpus -> vocab -> shards -> train -> model.bin -> samples.
demo: $(VENV_STAMP)
	PY=$(PY) bash scripts/demo.sh

venv: $(VENV_STAMP)

$(VENV_STAMP): requirements-ci.txt pyproject.toml
	@test -x $(PY) || $(PYTHON_SYS) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-ci.txt
	@touch $@

lint: $(VENV_STAMP)
	$(VENV)/bin/ruff check .

include runtimes/c/c.mk
include runtimes/zig/zig.mk
include runtimes/web/web.mk
include bench/bench.mk
