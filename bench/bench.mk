# The benchmark (bench/bench.py): run.c under gcc / clang / zig cc and several flag sets, the Zig
# port natively, under wasmtime and in Chromium, llama.cpp (llama-cpp-python) on the same random
# models as GGUF, and the memory-bandwidth bound. Results in results/bench/ (JSON, markdown, PNG).
# First use installs requirements-bench.txt into .venv (llama-cpp-python compiles llama.cpp:
# minutes) and, with apt, clang, libomp-dev, qemu-user-static.
#   make bench        the full matrix (long)      make bench-quick   15M only, a few minutes
#   make bench-docs   quick run, also written to docs/performance.md + docs/bench.png
#   make bench-load   what the load-time NaN/infinity scan costs (bench/bench_load.py, 110M)
#   make test-bench   the tests that need llama.cpp / qemu: tests/pipeline/test_gguf.py, tests/runtimes/test_cross.py
BENCH_STAMP = $(VENV)/.bench-installed
BENCH_ARGS ?=
BENCH_CMAKE = -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF

.PHONY: bench bench-quick bench-docs bench-load bench-deps test-bench

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
	$(PY) bench/bench.py $(BENCH_ARGS)
bench-quick: $(BENCH_STAMP)
	$(PY) bench/bench.py --quick $(BENCH_ARGS)
bench-docs: $(BENCH_STAMP)
	$(PY) bench/bench.py --quick --docs $(BENCH_ARGS)
bench-load: $(VENV_STAMP)
	$(PY) bench/bench_load.py
test-bench: $(BENCH_STAMP)
	$(PY) -m pytest -q tests/pipeline/test_gguf.py tests/runtimes/test_cross.py
