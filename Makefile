# llama2-toolkit: `make demo` runs the main job, `make test` the tests.
# Both set up their own virtual environment (.venv) from requirements-ci.txt.

PYTHON_SYS ?= python3
VENV       := .venv
PY         := $(VENV)/bin/python
VENV_STAMP := $(VENV)/.installed

.PHONY: venv test demo lint

# The tests build the C runtime themselves through the targets below.
# .web-installed: the Zig compiler, wasmtime and Playwright (requirements-web.txt, ZIG-WEB section).
test: $(VENV_STAMP) $(VENV)/.web-installed
	$(VENV)/bin/ruff check -q .
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
# C runtime (run.c): the llama2.c targets, plus a sanitizer build, the shared
# library for runtime.py, and the libFuzzer harnesses. `make CC=clang ...` works.
CC = gcc
RUN_WARN = -Wall -Wextra -Wno-unknown-pragmas
FUZZ_SECONDS ?= 30

.PHONY: runfast runomp rundebug runsan lib fuzz clean

run: run.c
	$(CC) -O3 $(RUN_WARN) -o run run.c -lm
runfast: run.c
	$(CC) -Ofast $(RUN_WARN) -o run run.c -lm
# the recommended fast build
runomp: run.c
	$(CC) -Ofast -fopenmp -march=native $(RUN_WARN) -o run run.c -lm
rundebug: run.c
	$(CC) -g -O0 $(RUN_WARN) -o run run.c -lm
# ASan + UBSan, any error aborts; used by tests/test_run_bad_input.py. With
# -march=native and OpenMP, so the sanitizers watch the kernels and thread
# splits that runomp runs, not only the portable loops.
runsan: run_san
run_san: run.c
	$(CC) -g -O1 -march=native -fopenmp -fsanitize=address,undefined -fno-sanitize-recover=all \
		-fno-omit-frame-pointer $(RUN_WARN) -o run_san run.c -lm
# librun.so for runtime.py. Linked in a separate step without -Ofast so gcc does
# not add crtfastmath.o, which would turn on flush-to-zero in the whole Python process.
lib: librun.so
librun.so: run.c
	$(CC) -Ofast -fopenmp -march=native -fPIC -DRUN_LIBRARY $(RUN_WARN) -c run.c -o librun.o
	$(CC) -shared -fopenmp librun.o -o librun.so -lm
	rm -f librun.o
# libFuzzer (clang): model and tokenizer loaders, FUZZ_SECONDS each (findings: docs/fuzzing.md)
fuzz: fuzz_run.c run.c
	clang -g -O1 -fsanitize=fuzzer,address,undefined -DFUZZ_MODEL -o fuzz_model fuzz_run.c -lm
	clang -g -O1 -fsanitize=fuzzer,address,undefined -DFUZZ_TOKENIZER -o fuzz_tokenizer fuzz_run.c -lm
	mkdir -p fuzz_corpus/model fuzz_corpus/tokenizer
	PYTHONPATH=scripts $(PY) -c "from bench_run import *; c = (8, 16, 1, 2, 1, 8, 4); \
		write_v0('fuzz_corpus/model/seed_v0', c); write_v0('fuzz_corpus/model/seed_v0u', c, shared=False); \
		write_v1('fuzz_corpus/model/seed_v1', c); write_v2('fuzz_corpus/model/seed_v2', c, gs=8); \
		write_v2('fuzz_corpus/model/seed_v2g4', c, gs=4); write_tokenizer('fuzz_corpus/tokenizer/t', 300); \
		import pathlib; p = pathlib.Path('fuzz_corpus/tokenizer/t'); p.write_bytes(bytes([41, 1]) + p.read_bytes())"
	./fuzz_model -max_total_time=$(FUZZ_SECONDS) -max_len=4096 fuzz_corpus/model
	./fuzz_tokenizer -max_total_time=$(FUZZ_SECONDS) -max_len=4096 fuzz_corpus/tokenizer
clean::
	rm -f run run_san librun.so librun.o fuzz_model fuzz_tokenizer
# C-RUNTIME-END
# ZIG-WEB-BEGIN
# Zig port of the runtime (run.zig) and its WebAssembly builds. The compiler
# (PyPI `ziglang`), wasmtime and Playwright come from requirements-web.txt and
# go into .venv on first use. Chromium for the browser test: make web-deps.
#   make runzig   ./runzig, native, same command line as ./run
#   make wasm     run.wasm, wasm32-wasi with SIMD128 (run it with wasmtime)
#   make web      web/llama.wasm and web/llama-threads.wasm (shared memory, for the
#                 page's helper threads), then serve web/ on http://127.0.0.1:$(WEB_PORT)/
#                 (MODELS=dir also serves dir as /models/, for the page's Fetch button)
ZIG        = $(PY) -m ziglang
WEB_STAMP  = $(VENV)/.web-installed
WEB_PORT  ?= 8000
ZIG_WASM   = -O ReleaseFast -fstrip -mcpu=generic+simd128
# threads in the browser: atomics, and a shared memory that JavaScript creates
# (16 MiB to start, up to 4 GiB) and hands to every helper's instance
ZIG_WASM_THREADS = -mcpu=generic+simd128+atomics+bulk_memory -fno-single-threaded \
	--import-memory --shared-memory --initial-memory=16777216 --max-memory=4294967296

.PHONY: wasm web web-build web-deps

$(WEB_STAMP): requirements-web.txt $(VENV_STAMP)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-web.txt
	@touch $@

runzig: run.zig $(WEB_STAMP)
	$(ZIG) build-exe -O ReleaseFast run.zig -femit-bin=runzig
wasm: run.wasm
run.wasm: run.zig $(WEB_STAMP)
	$(ZIG) build-exe $(ZIG_WASM) -target wasm32-wasi run.zig -femit-bin=run.wasm
web-build: web/llama.wasm web/llama-threads.wasm
web/llama.wasm: run_web.zig run.zig $(WEB_STAMP)
	$(ZIG) build-exe $(ZIG_WASM) -target wasm32-freestanding -fno-entry -rdynamic run_web.zig -femit-bin=web/llama.wasm
web/llama-threads.wasm: run_web.zig run.zig $(WEB_STAMP)
	$(ZIG) build-exe $(ZIG_WASM) $(ZIG_WASM_THREADS) -target wasm32-freestanding -fno-entry -rdynamic run_web.zig -femit-bin=$@
web: web-build
	$(PY) web/serve.py --port $(WEB_PORT) $(if $(MODELS),--models $(MODELS))
# Debian's Chromium for tests/test_web.py (needs root and apt)
web-deps:
	test -x /usr/bin/chromium || (apt-get update -qq && apt-get install -y -qq chromium)
clean::
	rm -f runzig run.wasm web/llama.wasm web/llama-threads.wasm
# ZIG-WEB-END
# BENCH-BEGIN
# Benchmarks (scripts/bench.py): run.c under gcc / clang / zig cc and the seed's flag sets, llama.cpp
# (llama-cpp-python) on the same random models as GGUF, and the memory-bandwidth bound. Results in
# results/bench/ (JSON, markdown, PNG). First use installs requirements-bench.txt into .venv
# (llama-cpp-python compiles llama.cpp: minutes) and, with apt, clang, libomp-dev, qemu-user-static.
#   make bench        the full matrix (long)      make bench-quick   15M only, a few minutes
#   make bench-docs   quick run, also written to docs/performance.md + docs/bench.png
#   make test-bench   the tests that need llama.cpp / qemu: tests/test_gguf.py, tests/test_cross.py
BENCH_STAMP = $(VENV)/.bench-installed
BENCH_ARGS ?=
BENCH_CMAKE = -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF

.PHONY: bench bench-quick bench-docs bench-deps test-bench

bench-deps: $(BENCH_STAMP)
$(BENCH_STAMP): requirements-bench.txt $(VENV_STAMP)
	@(command -v qemu-aarch64-static && echo 'int main(void){return 0;}' | clang -fopenmp -x c - -o /dev/null) \
		>/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq clang libomp-dev qemu-user-static) || echo "warning: could not apt-get install \
		clang libomp-dev qemu-user-static: their builds and tests are skipped"
	@start=$$(date +%s); \
	CMAKE_ARGS="$(BENCH_CMAKE)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
		$(PY) -m pip install -q --disable-pip-version-check -r requirements-bench.txt && \
	echo $$(( $$(date +%s) - start )) > $(VENV)/.bench-llama-build-s
	@touch $@

bench: $(BENCH_STAMP)
	$(PY) scripts/bench.py $(BENCH_ARGS)
bench-quick: $(BENCH_STAMP)
	$(PY) scripts/bench.py --quick $(BENCH_ARGS)
bench-docs: $(BENCH_STAMP)
	$(PY) scripts/bench.py --quick --docs $(BENCH_ARGS)
test-bench: $(BENCH_STAMP)
	$(PY) -m pytest -q tests/test_gguf.py tests/test_cross.py
# BENCH-END
