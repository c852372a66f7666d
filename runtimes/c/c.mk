# C runtime (runtimes/c/run.c): the llama2.c targets, plus a sanitizer build, the shared
# library for runtime.py, and the libFuzzer harnesses. Outputs land at the top level, as
# in llama2.c (./run). `make CC=clang ...` works.
CC = gcc
RUN_C = runtimes/c/run.c
RUN_WARN = -Wall -Wextra -Wno-unknown-pragmas
FUZZ_SECONDS ?= 30

.PHONY: runfast runomp rundebug runsan lib fuzz clean

run: $(RUN_C)
	$(CC) -O3 $(RUN_WARN) -o run $(RUN_C) -lm
runfast: $(RUN_C)
	$(CC) -Ofast $(RUN_WARN) -o run $(RUN_C) -lm
# the recommended fast build
runomp: $(RUN_C)
	$(CC) -Ofast -fopenmp -march=native $(RUN_WARN) -o run $(RUN_C) -lm
rundebug: $(RUN_C)
	$(CC) -g -O0 $(RUN_WARN) -o run $(RUN_C) -lm
# ASan + UBSan, any error aborts. With -march=native and OpenMP, so the sanitizers
# watch the kernels and thread splits that runomp runs, not only the portable loops.
runsan: run_san
run_san: $(RUN_C)
	$(CC) -g -O1 -march=native -fopenmp -fsanitize=address,undefined -fno-sanitize-recover=all \
		-fno-omit-frame-pointer $(RUN_WARN) -o run_san $(RUN_C) -lm
# librun.so for runtime.py. Linked in a separate step without -Ofast so gcc does
# not add crtfastmath.o, which would turn on flush-to-zero in the whole Python process.
lib: librun.so
librun.so: $(RUN_C)
	$(CC) -Ofast -fopenmp -march=native -fPIC -DRUN_LIBRARY $(RUN_WARN) -c $(RUN_C) -o librun.o
	$(CC) -shared -fopenmp librun.o -o librun.so -lm
	rm -f librun.o
# libFuzzer (clang): model and tokenizer loaders, FUZZ_SECONDS each (findings: docs/fuzzing.md)
FUZZ_C = runtimes/c/fuzz_run.c
fuzz: $(FUZZ_C) $(RUN_C) $(VENV_STAMP)
	clang -g -O1 -fsanitize=fuzzer,address,undefined -DFUZZ_MODEL -o fuzz_model $(FUZZ_C) -lm
	clang -g -O1 -fsanitize=fuzzer,address,undefined -DFUZZ_TOKENIZER -o fuzz_tokenizer $(FUZZ_C) -lm
	mkdir -p fuzz_corpus/model fuzz_corpus/tokenizer
	PYTHONPATH=bench $(PY) -c "from bench_run import *; c = (8, 16, 1, 2, 1, 8, 4); \
		write_v0('fuzz_corpus/model/seed_v0', c); write_v0('fuzz_corpus/model/seed_v0u', c, shared=False); \
		write_v1('fuzz_corpus/model/seed_v1', c); write_v2('fuzz_corpus/model/seed_v2', c, gs=8); \
		write_v2('fuzz_corpus/model/seed_v2g4', c, gs=4); write_tokenizer('fuzz_corpus/tokenizer/t', 300); \
		import pathlib; p = pathlib.Path('fuzz_corpus/tokenizer/t'); p.write_bytes(bytes([41, 1]) + p.read_bytes())"
	./fuzz_model -max_total_time=$(FUZZ_SECONDS) -max_len=4096 fuzz_corpus/model
	./fuzz_tokenizer -max_total_time=$(FUZZ_SECONDS) -max_len=4096 fuzz_corpus/tokenizer
clean::
	rm -f run run_san librun.so librun.o fuzz_model fuzz_tokenizer
