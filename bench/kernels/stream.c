/* STREAM-style read bandwidth: GB/s of the best of 5 sweeps over 1 GiB per variant of
 * sweep.h, and the best variant. Threads: OMP_NUM_THREADS. Prints "GB/s sum". */
#include <stdio.h>
#include <stdlib.h>
#include "sweep.h"

int main(void) {
    size_t n = (1ull << 30) / sizeof(float), nread = 0;
    float *a = ones(n);
    if (!a) return 1;
    double best = 1e30, total = 0;
    for (int v = 0; v < 4; v++)
        for (int r = 0; r < 5; r++) {
            size_t before = nread;
            double dt = sweep_all(a, n, v, &total, &nread);
            dt *= (double)n / (nread - before);  /* per GiB */
            if (dt < best) best = dt;
        }
    printf("%f %f\n", n * sizeof(float) / best / 1e9, total);
    return 0;
}
