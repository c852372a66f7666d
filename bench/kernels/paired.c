/* The bound token by token, around run.c (built with -DRUNC="path/to/run.c").
 * argv: model steps bytes. Each greedy token's forward pass is followed by one sweep that
 * reads `bytes` (the weights' bytes per token) with the same threads, the variants of
 * sweep.h taking turns. A neighbour's load on a shared host hits both alike, so their
 * ratio stands still while each one drifts.
 * Prints: mean forward seconds (from the 5th token), mean seconds of the fastest
 * variant's sweep of `bytes`, and 1 if every sweep read the floats it claims (all ones). */
#define RUN_LIBRARY
#include RUNC
#include "sweep.h"

int main(int argc, char **argv) {
    if (argc < 4) return 2;
    int steps = atoi(argv[2]);
    size_t n = strtoull(argv[3], NULL, 10) / sizeof(float);
    Transformer *t = open_model(argv[1]);
    if (!t) { fprintf(stderr, "%s\n", err_msg); return 1; }
    float *a = ones(n + 1024);
    if (!a) return 1;
    double fwd = 0, sw[4] = {0}, sum = 0;
    size_t nread = 0, cnt[4] = {0}, timed = 0;
    int token = BOS, ok = 1;
    for (int pos = 0; pos < steps && pos < t->c.seq_len; pos++) {
        double t0 = now_s();
        const float *lg = forward(t, token, pos);
        double t1 = now_s();
        int v = pos % 4;
        size_t before = nread;
        double s0 = sum, dt = sweep_all(a, n + 1024, v, &sum, &nread);
        ok &= sum - s0 == (double)(nread - before);
        dt *= (double)n / (nread - before);  /* seconds to read exactly n floats */
        int best = 0;
        for (int i = 1; i < t->c.vocab_size; i++) if (lg[i] > lg[best]) best = i;
        token = best == BOS ? 3 : best;  /* keep going: random models say BOS often */
        if (pos < 4) continue;  /* warm-up */
        fwd += t1 - t0; sw[v] += dt; cnt[v]++; timed++;
    }
    double best = 1e30;
    for (int v = 0; v < 4; v++) if (cnt[v] && sw[v] / cnt[v] < best) best = sw[v] / cnt[v];
    printf("%g %g %d\n", fwd / timed, best, ok);
    close_model(t);
    return 0;
}
