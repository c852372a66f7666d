# Zig port of the runtime (runtimes/zig/run.zig), native and WASI. The compiler (PyPI
# `ziglang`) and wasmtime come from requirements-web.txt and go into .venv on first use.
#   make runzig   ./runzig, native, same command line as ./run
#   make wasm     run.wasm, wasm32-wasi with SIMD128 and relaxed SIMD (run it with wasmtime)
ZIG        = $(PY) -m ziglang
ZIG_DIR    = runtimes/zig
WEB_STAMP  = $(VENV)/.web-installed
ZIG_WASM   = -O ReleaseFast -fstrip -mcpu=generic+simd128+relaxed_simd

.PHONY: wasm

$(WEB_STAMP): requirements-web.txt $(VENV_STAMP)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-web.txt
	@touch $@

runzig: $(ZIG_DIR)/run.zig $(WEB_STAMP)
	$(ZIG) build-exe -O ReleaseFast $(ZIG_DIR)/run.zig -femit-bin=runzig
wasm: run.wasm
run.wasm: $(ZIG_DIR)/run.zig $(WEB_STAMP)
	$(ZIG) build-exe $(ZIG_WASM) -target wasm32-wasi $(ZIG_DIR)/run.zig -femit-bin=run.wasm
clean::
	rm -f runzig run.wasm
