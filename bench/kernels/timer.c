/* Per-token timer around run.c (built with -DRUNC="path/to/run.c").
 * argv: model steps reps topp. Each position runs `reps` times with the same tokens and
 * keeps its fastest times (preemption only ever adds time). Prints: tok/s of forward +
 * top-p sampling and of the forward alone (sum over positions 1.. of each position's
 * fastest time), and the sampler's mean microseconds with top-p off and on, on the same
 * logits. */
#define RUN_LIBRARY
#include RUNC

int main(int argc, char **argv) {
    if (argc < 5) return 2;
    int steps = atoi(argv[2]), reps = atoi(argv[3]);
    Transformer *t = open_model(argv[1]);
    if (!t) { fprintf(stderr, "%s\n", err_msg); return 1; }
    int V = t->c.vocab_size;
    double *fw = malloc(steps * sizeof(double)), *so = malloc(steps * sizeof(double));
    double *sn = malloc(steps * sizeof(double));
    float *b1 = malloc(V * 4), *b2 = malloc(V * 4);
    for (int i = 0; i < steps; i++) fw[i] = so[i] = sn[i] = 1e30;
    for (int r = 0; r < reps; r++) {
        Sampler off, on;
        if (init_sampler(&off, V, 1.0f, 1.0f, 1) < 0 || init_sampler(&on, V, 1.0f, (float)atof(argv[4]), 1) < 0) return 1;
        int token = BOS;
        for (int pos = 0; pos < steps; pos++) {
            double t0 = now_s();
            float *lg = forward(t, token, pos);
            double t1 = now_s();
            memcpy(b1, lg, V * 4); memcpy(b2, lg, V * 4);
            double t2 = now_s();
            sample(&off, b1);
            double t3 = now_s();
            token = sample(&on, b2);
            double t4 = now_s();
            if (token == BOS) token = 3; /* keep going: the random models say BOS often */
            if (t1 - t0 < fw[pos]) fw[pos] = t1 - t0;
            if (t3 - t2 < so[pos]) so[pos] = t3 - t2;
            if (t4 - t3 < sn[pos]) sn[pos] = t4 - t3;
        }
        free_sampler(&off);
        free_sampler(&on);
    }
    double F = 0, O = 0, N = 0;
    for (int i = 1; i < steps; i++) { F += fw[i]; O += so[i]; N += sn[i]; }
    printf("%f %f %f %f\n", (steps - 1) / (F + N), (steps - 1) / F, 1e6 * O / (steps - 1), 1e6 * N / (steps - 1));
    close_model(t);
    return 0;
}
