/* libFuzzer harnesses for run.c's loaders (make fuzz). Build with -DFUZZ_MODEL or
 * -DFUZZ_TOKENIZER. The loaders parse from memory, so the input is the file. */
#define RUN_LIBRARY
#include "run.c"

#ifdef FUZZ_MODEL
/* what open_model does with a file, from memory: the header, then the weights */
static int parse_model(Transformer *t, const unsigned char *data, size_t size, const char *name) {
    return parse_header(t, data, size, name) < 0 ? -1 : parse_weights(t, data, size, 1, name);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    /* copy: parse_model keeps pointers into the buffer, and wants it 4-aligned */
    unsigned char *buf = malloc(size ? size : 1);
    memcpy(buf, data, size);
    Transformer t;
    memset(&t, 0, sizeof t);
    if (parse_model(&t, buf, size, "fuzz.bin") == 0) {
        /* a model that loads must also run: two positions, every token id edge */
        if (forward(&t, 0, 0) && t.c.seq_len > 1) forward(&t, t.c.vocab_size - 1, 1);
        free_state(&t);
    }
    free(buf);
    return 0;
}
#endif

#ifdef FUZZ_TOKENIZER
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    /* first two bytes: the model's vocab_size; the rest: tokenizer.bin */
    if (size < 2) return 0;
    int vocab = 3 + (data[0] | data[1] << 8) % 600;
    Tokenizer *t = parse_tokenizer(data + 2, size - 2, vocab, "fuzz_tok.bin");
    if (!t) return 0;
    static const char *texts[] = {"", "a", "hello world", "  x\n\ty ", "\xe2\x96\x81\xff\xc3(\xf0\x9f\x98\x80",
                                  "\xed\xa0\x80\xf4\x90\x80\x80"};
    int out[64];
    char buf[512];
    for (size_t i = 0; i < sizeof texts / sizeof *texts; i++) {
        int n = encode(t, texts[i], strlen(texts[i]), 1, 1, out, 64);
        if (n > 0) rt_decode(t, out, n, buf, sizeof buf);
    }
    free_tokenizer(t);
    return 0;
}
#endif
