"""llama.cpp's decode speed on a GGUF file, in a process of its own (bench.py runs it).

    python bench/llama_worker.py MODEL.gguf THREADS STEPS N_CTX

Decodes STEPS single tokens from BOS, greedy, and prints llama.cpp's own eval counters as
JSON ({"n_eval": ..., "t_eval_ms": ...}): load and sampling excluded, the first token too
(run.c times from its 2nd token as well).
"""

import json
import sys

import llama_cpp
import numpy as np


def main():
    path, threads, steps, n_ctx = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    llm = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_batch=64, n_threads=threads, n_threads_batch=threads,
                          verbose=False)
    tok = llm.token_bos()
    llm.eval([tok])  # not timed
    llama_cpp.llama_perf_context_reset(llm.ctx)
    n_vocab = llm.n_vocab()
    for _ in range(steps - 1):
        tok = int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm.ctx), shape=(n_vocab,))))
        llm.eval([tok])
    perf = llama_cpp.llama_perf_context(llm.ctx)
    print(json.dumps({"n_eval": perf.n_eval, "t_eval_ms": perf.t_eval_ms}))


if __name__ == "__main__":
    main()
