# llama2-toolkit: `make demo` runs the main job, `make test` the tests.
# Both set up their own virtual environment (.venv) from requirements-ci.txt.
# Each runtime and the benchmark bring their own make fragment (included below).

PYTHON_SYS ?= python3
VENV       := .venv
PY         := $(VENV)/bin/python
VENV_STAMP := $(VENV)/.installed

.PHONY: venv test test-fast demo plot lint fuzz-py

# The whole suite (what CI runs), on TEST_WORKERS pytest-xdist workers. The tests build the
# runtimes through the targets below, in the background while other tests run; librun.so comes
# first, since tests in both workers load it. The web stamp brings the Zig compiler, wasmtime and
# Playwright (requirements-web.txt), the wandb stamp Weights & Biases for the offline logging test
# (requirements-wandb.txt).
TEST_WORKERS ?= 2
test: $(VENV_STAMP) $(VENV)/.web-installed $(VENV)/.wandb-installed librun.so
	$(VENV)/bin/ruff check -q .
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

# The edit loop: model, formats, configs, tokenizer, and the conformance cases on the C runtime
# (./run's build; the other builds are marked slow).
test-fast: $(VENV_STAMP)
	$(PY) -m pytest -q -m "not slow" tests/unit tests/runtimes/test_conformance.py

# Offline end to end: the README's pipeline (synthetic corpus -> vocab -> shards -> train ->
# model.bin -> stories from PyTorch and C), with each stage's time and the loss reached.
demo: $(VENV_STAMP)
	PY=$(PY) bash scripts/demo.sh

# Loss curves of train.py runs, one panel each: make plot RUNS="out/demo out/other"
RUNS ?= out/demo
plot: $(VENV_STAMP)
	$(PY) plot_loss.py $(RUNS)

# The Python loaders' fuzzer (tests/loader_fuzzer.py): model.bin, tokenizer.bin, ckpt.pt, configs and
# meta.json, FUZZ_SECONDS in all; findings go to fuzz_findings/ (docs/fuzzing.md)
fuzz-py: $(VENV_STAMP)
	$(PY) -m tests.loader_fuzzer --seconds $(or $(FUZZ_SECONDS),60)

venv: $(VENV_STAMP)

$(VENV_STAMP): requirements-ci.txt pyproject.toml
	@test -x $(PY) || $(PYTHON_SYS) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-ci.txt
	@touch $@

$(VENV)/.wandb-installed: requirements-wandb.txt | $(VENV_STAMP)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-wandb.txt
	@touch $@

lint: $(VENV_STAMP)
	$(VENV)/bin/ruff check .

include runtimes/c/c.mk
include runtimes/zig/zig.mk
include runtimes/web/web.mk
include bench/bench.mk
