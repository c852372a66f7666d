/* What run.c's load-time NaN/infinity scan costs (built with -DRUNC="path/to/run.c").
 * argv: model reps. Prints four medians over `reps`, in seconds:
 *   load   open_model + close_model, the file already in the page cache (what `./run` pays)
 *   copy   memcpy of the file into memory already faulted in (huge pages where the kernel gives them)
 *   scan   copy_checking of the same bytes into the same memory (the copy with the scan riding on it),
 *          less the memcpy just before it: the median of these differences
 *   check  check_finite of the opened model (tensor by tensor: always for int8 scales and norms;
 *          for fp32 only when copy_checking saw a word that could be a NaN or infinity)
 * copy and scan take turns, so a neighbour's load hits both alike. */
#define RUN_LIBRARY
#include RUNC

static int by_value(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(double *v, int n) {
    qsort(v, n, sizeof *v, by_value);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

int main(int argc, char **argv) {
    if (argc < 3) return 2;
    const char *path = argv[1];
    int reps = atoi(argv[2]);
    double *load = calloc(reps, sizeof(double)), *copy = calloc(reps, sizeof(double));
    double *scan = calloc(reps, sizeof(double)), *check = calloc(reps, sizeof(double));
    size_t size;
    int fd = open_regular(path, &size);
    if (fd < 0 || !load || !copy || !scan || !check) { fprintf(stderr, "%s\n", err_msg); return 1; }
    unsigned char *map = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
    unsigned char *dst = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (map == MAP_FAILED || dst == MAP_FAILED) return 1;
#ifdef MADV_HUGEPAGE
    madvise(dst, size, MADV_HUGEPAGE); /* as open_model's copy */
#endif
    memset(dst, 0, size);
    int flagged = 0;
    for (int r = 0; r < reps; r++) {
        double t0 = now_s();
        Transformer *t = open_model(path);
        double t1 = now_s();
        if (!t) { fprintf(stderr, "%s\n", err_msg); return 1; }
        check[r] = now_s();
        if (check_finite(t, path) < 0) { fprintf(stderr, "%s\n", err_msg); return 1; }
        check[r] = now_s() - check[r];
        close_model(t);
        load[r] = t1 - t0;
        double t2 = now_s();
        memcpy(dst, map, size);
        double t3 = now_s();
        flagged |= copy_checking(dst, map, size);
        double t4 = now_s();
        copy[r] = t3 - t2;
        scan[r] = (t4 - t3) - (t3 - t2);
    }
    printf("%g %g %g %g %d\n", median(load, reps), median(copy, reps), median(scan, reps), median(check, reps),
           flagged);
    return 0;
}
