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
# Seeds, written by modelbin: a tiny model in every layout (v0 with and without a shared
# classifier, v1, v1 with norm_eps and rope_theta set, v2 at group sizes 8 and 4), and a
# 300-piece tokenizer after the two bytes that give the harness its vocab_size (3 + 297).
FUZZ_SEEDS = import modelbin as mb, pathlib; c = (8, 16, 1, 2, 1, 8, 4); \
	models = dict(v0=mb.Header(0, *c), v0u=mb.Header(0, *c, shared_classifier=False), v1=mb.Header(1, *c), \
		v1e=mb.Header(1, *c, norm_eps=1e-6, rope_theta=5e5), v2=mb.Header(2, *c, group_size=8), \
		v2g4=mb.Header(2, *c, group_size=4)); \
	[mb.write_model(f'fuzz_corpus/model/seed_{n}', h, mb.random_tensors(h)) for n, h in models.items()]; \
	pieces = [b'<unk>', b'<s>', b'</s>'] + [b'<0x%02X>' % i for i in range(256)] + [b' w%d' % i for i in range(41)]; \
	mb.write_tokenizer('fuzz_corpus/tokenizer/t', pieces, [-float(i) for i in range(300)]); \
	t = pathlib.Path('fuzz_corpus/tokenizer/t'); t.write_bytes(bytes([41, 1]) + t.read_bytes())
fuzz: $(FUZZ_C) $(RUN_C) $(VENV_STAMP)
	clang -g -O1 -fsanitize=fuzzer,address,undefined -DFUZZ_MODEL -o fuzz_model $(FUZZ_C) -lm
	clang -g -O1 -fsanitize=fuzzer,address,undefined -DFUZZ_TOKENIZER -o fuzz_tokenizer $(FUZZ_C) -lm
	mkdir -p fuzz_corpus/model fuzz_corpus/tokenizer
	$(PY) -c "$(FUZZ_SEEDS)"
	./fuzz_model -max_total_time=$(FUZZ_SECONDS) -max_len=4096 fuzz_corpus/model
	./fuzz_tokenizer -max_total_time=$(FUZZ_SECONDS) -max_len=4096 fuzz_corpus/tokenizer
clean::
	rm -f run run_san librun.so librun.o fuzz_model fuzz_tokenizer
