# The browser page (runtimes/web/): run.zig through runtimes/zig/run_web.zig for
# wasm32-freestanding, one module for one thread and one on a shared memory for the
# page's helper threads. Chromium for the browser test: make web-deps.
#   make web      build both modules, then serve the page on http://127.0.0.1:$(WEB_PORT)/
#                 (MODELS=dir also serves dir as /models/, for the page's Fetch button)
WEB_DIR   = runtimes/web
WEB_PORT ?= 8000
WEB_ZIG   = $(ZIG_DIR)/run_web.zig $(ZIG_DIR)/run.zig
# threads in the browser: atomics, and a shared memory that JavaScript creates
# (16 MiB to start, up to 4 GiB) and hands to every helper's instance
ZIG_WASM_THREADS = -mcpu=generic+simd128+relaxed_simd+atomics+bulk_memory -fno-single-threaded \
	--import-memory --shared-memory --initial-memory=16777216 --max-memory=4294967296

.PHONY: web web-build web-deps

web-build: $(WEB_DIR)/llama.wasm $(WEB_DIR)/llama-threads.wasm
$(WEB_DIR)/llama.wasm: $(WEB_ZIG) $(WEB_STAMP)
	$(ZIG) build-exe $(ZIG_WASM) -target wasm32-freestanding -fno-entry -rdynamic $(ZIG_DIR)/run_web.zig -femit-bin=$@
$(WEB_DIR)/llama-threads.wasm: $(WEB_ZIG) $(WEB_STAMP)
	$(ZIG) build-exe $(ZIG_WASM) $(ZIG_WASM_THREADS) -target wasm32-freestanding -fno-entry -rdynamic \
		$(ZIG_DIR)/run_web.zig -femit-bin=$@
web: web-build
	$(PY) $(WEB_DIR)/serve.py --port $(WEB_PORT) $(if $(MODELS),--models $(MODELS))
# Debian's Chromium for the browser tests (needs root and apt)
web-deps:
	test -x /usr/bin/chromium || (apt-get update -qq && apt-get install -y -qq chromium)
clean::
	rm -f $(WEB_DIR)/llama.wasm $(WEB_DIR)/llama-threads.wasm
