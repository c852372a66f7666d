# llama2-toolkit: `make demo` runs the main job, `make test` the tests.
# Both set up their own virtual environment (.venv) from requirements-ci.txt.

PYTHON_SYS ?= python3
VENV       := .venv
PY         := $(VENV)/bin/python
VENV_STAMP := $(VENV)/.installed

.PHONY: venv test demo lint

# The tests build the C runtime themselves through the targets below.
test: $(VENV_STAMP)
	$(PY) -m pytest -q

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

# ---------------------------------------------------------------- C runtime (owned by the C runtime section)
# C-RUNTIME-BEGIN
# C-RUNTIME-END
