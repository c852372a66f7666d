/* Read-only bandwidth kernels, shared by stream.c and paired.c.
 *
 * A thread sums floats a[lo, hi) as S streams walked side by side (S = 1, 2, 4, 8),
 * 16 partial sums each. One stream alone under-reads some CPUs (AMD Zen 3: ~20% less
 * than four), and the runtime's fp32 kernel walks four. The streams sit a cache line
 * off a power of two apart, so they share no sets. *nread gets the number of floats
 * read (the last few lines are left out). */
#include <stddef.h>
#include <sys/mman.h>
#include <omp.h>

#define SWEEP(S) static double sweep##S(const float *a, size_t lo, size_t hi, size_t *nread) { \
    size_t q = (hi - lo) / S / 16 * 16 - 16; \
    float acc[S][16] = {{0}}; \
    for (size_t i = lo; i < lo + q; i += 16) \
        for (int k = 0; k < S; k++) \
            for (int v = 0; v < 16; v++) acc[k][v] += a[i + k * q + v]; \
    double s = 0; \
    for (int k = 0; k < S; k++) for (int v = 0; v < 16; v++) s += acc[k][v]; \
    *nread = S * q; \
    return s; }
SWEEP(1) SWEEP(2) SWEEP(4) SWEEP(8)
static double (*const sweeps[4])(const float *, size_t, size_t, size_t *) = {sweep1, sweep2, sweep4, sweep8};

/* One parallel sweep over a[0, n) with variant v; returns seconds, adds the sum to *sum
 * and the floats read to *nread. */
static double sweep_all(const float *a, size_t n, int v, double *sum, size_t *nread) {
    double t0 = omp_get_wtime(), s = 0;
    size_t got = 0;
    #pragma omp parallel reduction(+:s, got)
    {
        size_t nth = omp_get_num_threads(), tid = omp_get_thread_num(), r = 0;
        s += sweeps[v](a, n / nth * tid, n / nth * (tid + 1), &r);
        got += r;
    }
    double dt = omp_get_wtime() - t0;
    *sum += s;
    *nread += got;
    return dt;
}

/* n floats, all 1.0, on huge pages where the kernel gives them, as run.c's copy of the
 * weights is: 4 KiB pages read 3-15% slower (AMD EPYC, 1 thread). */
static float *ones(size_t n) {
    float *a = mmap(NULL, n * sizeof(float), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (a == MAP_FAILED) return NULL;
#ifdef MADV_HUGEPAGE
    madvise(a, n * sizeof(float), MADV_HUGEPAGE);
#endif
    #pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) a[i] = 1.0f;
    return a;
}
