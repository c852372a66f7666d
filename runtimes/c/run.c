/* run.c: inference for Llama 2 models in llama2.c's model.bin format, in one C file.
 *
 * Reads model.bin version 0 (legacy, fp32), 1 (fp32 with header) and 2 (int8 Q8_0)
 * by looking at the header; fp32 and int8 share one forward pass. Weights are
 * memory-mapped, never copied. Sections: utilities, model, forward pass, tokenizer,
 * sampler, generation loop, library API, CLI.
 *
 *   make runomp && ./run model.bin -n 256 -i "Once upon a time"
 *
 * Build with -DRUN_LIBRARY to drop main() (librun.so, used by runtime.py). */

/* The same bits from every build (docs/formats.md, "Arithmetic"), -Ofast ones
 * too: no fused multiply-adds, no reordered sums, no reciprocals for divisions
 * (no-trapping-math changes no value: it lets selects and conversions vectorise).
 * Before the headers, so their inline functions are compiled the same way. */
#if defined(__clang__)
#pragma float_control(precise, on)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("no-fast-math", "fp-contract=off", "no-trapping-math")
#endif

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <float.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#ifdef _OPENMP
#include <omp.h>
#else
static int omp_get_thread_num(void) { return 0; }
static int omp_get_num_threads(void) { return 1; }
static int omp_get_max_threads(void) { return 1; }
#endif

#if defined(__x86_64__) || defined(__AVX2__)
#include <immintrin.h> /* the kernels, and copy_checking's AVX2 part in every x86-64 build */
#endif
#if defined(__AVX2__) && defined(__F16C__)
#define HAVE_AVX2 1 /* the kernels' shape: AVX2 and AVX-512 CPUs alike */
#endif

/* ------------------------------------------------------------------ utilities */

/* Errors are reported through a message buffer, never exit(): the library
 * returns NULL/-1 and runtime.py raises the message; the CLI prints it. */
static _Thread_local char err_msg[512];

static void set_err(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err_msg, sizeof err_msg, fmt, ap);
    va_end(ap);
}

static int32_t rd_i32(const unsigned char *p) { int32_t v; memcpy(&v, p, 4); return v; }
static float rd_f32(const unsigned char *p) { float v; memcpy(&v, p, 4); return v; }
static double rd_f64(const unsigned char *p) { double v; memcpy(&v, p, 8); return v; }

static uint32_t f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static float u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static uint64_t d2u(double d) { uint64_t u; memcpy(&u, &d, 8); return u; }

/* NaN and infinity are judged on the bits (exponent all ones), since -Ofast lets the
 * compiler assume that no value is either and drop a float test: bit 31 of (exponent + 1)
 * is set only by that exponent, so OR-ing this over many words (vectorised) tests them all. */
static inline uint32_t nonfinite_bit(uint32_t u) { return (u & 0x7f800000u) + 0x00800000u; }

/* Whether any of n 4-byte words (any bytes: read with memcpy) could be a NaN or infinity. */
static int any_nonfinite(const void *p, uint64_t n) {
    const unsigned char *b = p;
    uint32_t any = 0;
    for (uint64_t i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, b + 4 * i, 4);
        any |= nonfinite_bit(u);
    }
    return (int)(any >> 31);
}

/* Index of the first NaN or infinity among p[0..n), or n: block by block, each searched
 * only if it holds one. */
static uint64_t first_nonfinite(const float *p, uint64_t n) {
    for (uint64_t b = 0; b < n; b += 4096) {
        const uint64_t e = n - b < 4096 ? n : b + 4096;
        if (any_nonfinite(p + b, e - b))
            for (uint64_t i = b; i < e; i++)
                if ((f2u(p[i]) & 0x7f800000u) == 0x7f800000u) return i;
    }
    return n;
}

static const char *file_kind(mode_t m) {
    return S_ISDIR(m) ? "a directory" : S_ISFIFO(m) ? "a named pipe" : S_ISCHR(m) ? "a character device"
         : S_ISBLK(m) ? "a block device" : S_ISSOCK(m) ? "a socket" : "an unknown kind";
}

/* Open a file that is to be read whole, or -1 with a message. Only a regular file that is
 * not empty: a directory, FIFO or device is refused before anything is read or sized from
 * it (O_NONBLOCK: opening a FIFO must not wait for a writer). */
static int open_regular(const char *path, size_t *size) {
    int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) { set_err("%s: cannot open: %s", path, strerror(errno)); return -1; }
    struct stat st;
    if (fstat(fd, &st) < 0) { set_err("%s: cannot stat: %s", path, strerror(errno)); close(fd); return -1; }
    if (!S_ISREG(st.st_mode)) {
        set_err("%s: not a regular file (%s)", path, file_kind(st.st_mode));
        close(fd);
        return -1;
    }
    if (st.st_size == 0) { set_err("%s: file is empty", path); close(fd); return -1; }
    if ((uint64_t)st.st_size > SIZE_MAX / 2) { set_err("%s: file is too big", path); close(fd); return -1; }
    *size = (size_t)st.st_size;
    return fd;
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* ------------------------------------------------------------------ model */

#define MODEL_MAGIC 0x616b3432u
#define BOS 1
#define EOS 2
#define DEFAULT_NORM_EPS 1e-5 /* what a v0 file, or a 0 in the header, means */
#define DEFAULT_ROPE_THETA 10000.0

typedef struct {
    int dim;        /* D: residual stream width */
    int hidden_dim; /* H: feed-forward width */
    int n_layers;   /* L */
    int n_heads;    /* query heads */
    int n_kv_heads; /* key/value heads (< n_heads: grouped-query attention) */
    int vocab_size; /* V (positive here; v0's sign is turned into `shared`) */
    int seq_len;    /* S: maximum positions */
} Config;

/* One weight matrix (out × in, row-major): either fp32 (f) or Q8_0 int8 values
 * q with one fp32 scale per gs consecutive values of a row (s). */
typedef struct {
    const float *f;
    const int8_t *q;
    const float *s;
    int gs;
} Mat;

typedef struct {
    const float *rms_att;   /* L × D */
    const float *rms_ffn;   /* L × D */
    const float *rms_final; /* D */
    Mat emb;                /* V × D token embedding */
    Mat cls;                /* V × D classifier (== emb when shared) */
    Mat *wq, *wk, *wv, *wo, *w1, *w2, *w3; /* n_layers each, one allocation */
    float *w2_scales;       /* w2's scales per row, when its groups straddle rows */
} Weights;

/* Each thread's own copy of a matmul input: every thread normalises and
 * quantizes the whole (short) vector itself, which costs less than the
 * barrier that handing it over from one thread would need. */
typedef struct {
    float *xn;                /* D: rmsnorm output */
    int8_t *xq;               /* quantized matmul input (int8 models), max(D,H) */
    float *xs;                /* its group scales */
    double busy;              /* seconds in row-split matmuls this token */
} Scratch;

typedef struct {
    float *x, *xb, *xb2;      /* D: residual stream, attention out, branch out */
    float *hb, *hb2;          /* H: feed-forward */
    float *q;                 /* D: query */
    float *k, *v;             /* kvD: this position's key and value, before the cache */
    float *att;               /* n_heads × S: attention scores */
    float *logits;            /* V */
    /* L × n_kv_heads × S × hs: head-major, so attention reads each head's past
     * keys (values) as one stream. fp32 for fp32 models; fp16 for int8 models
     * (as llama.cpp keeps its cache): their activations are rounded to 8 bits
     * already, and attention reads half the bytes */
    void *key_cache, *value_cache;
    int kv_size;              /* bytes per cached number: 4 (fp32) or 2 (fp16) */
    Scratch *th;              /* one per thread (n_th) */
    int n_th, team;           /* threads allocated for; in the last forward's team */
    double *cut;              /* n_th + 1: thread t's rows are [cut[t], cut[t+1]) of each matrix */
    float *rope_cos, *rope_sin; /* S × hs/2, computed once at load */
} RunState;

typedef struct {
    Config c;
    int version;    /* 0, 1 or 2 */
    int shared;     /* classifier shares the embedding */
    int gs;         /* Q8_0 group size (v2), 0 for fp32 */
    double norm_eps;   /* RMSNorm's epsilon */
    double rope_theta; /* RoPE's base: pair i of a head turns by pos / theta^(i/hs) */
    Weights w;
    RunState s;
    void *map;      /* mmap of the file (NULL when parsing a caller's buffer) */
    size_t map_size;
    char name[256]; /* the file, for messages */
} Transformer;

static void free_state(Transformer *t) {
    RunState *s = &t->s;
    free(s->x); free(s->xb); free(s->xb2); free(s->hb); free(s->hb2); free(s->q); free(s->k); free(s->v);
    free(s->att); free(s->logits); free(s->key_cache); free(s->value_cache);
    for (int i = 0; s->th && i < s->n_th; i++) { free(s->th[i].xn); free(s->th[i].xq); free(s->th[i].xs); }
    free(s->th); free(s->cut); free(s->rope_cos); free(s->rope_sin);
    free(t->w.wq); free(t->w.w2_scales);
    memset(s, 0, sizeof *s);
    t->w.wq = NULL; t->w.w2_scales = NULL;
}

/* Header sanity bounds. They keep every size product below 2^50 so the
 * size arithmetic below cannot overflow uint64, and reject absurd headers
 * before we allocate anything from them. */
#define MAX_DIM (1 << 16)
#define MAX_HIDDEN (1 << 20)
#define MAX_LAYERS (1 << 10)
#define MAX_VOCAB (1 << 24)
#define MAX_SEQ (1 << 20)
#define MAX_STATE_BYTES (16ull << 30)

static int check_config(const Config *c, const char *name) {
    const int *v = &c->dim;
    static const char *names[7] = {"dim", "hidden_dim", "n_layers", "n_heads",
                                   "n_kv_heads", "vocab_size", "seq_len"};
    static const int maxv[7] = {MAX_DIM, MAX_HIDDEN, MAX_LAYERS, MAX_DIM, MAX_DIM, MAX_VOCAB, MAX_SEQ};
    for (int i = 0; i < 7; i++)
        if (v[i] <= 0 || v[i] > maxv[i]) {
            set_err("%s: bad header: %s = %d (must be 1..%d)", name, names[i], v[i], maxv[i]);
            return -1;
        }
    if (c->dim % c->n_heads || (c->dim / c->n_heads) % 2) {
        set_err("%s: bad header: dim %d must split into %d heads of even size", name, c->dim, c->n_heads);
        return -1;
    }
    if (c->n_kv_heads > c->n_heads || c->n_heads % c->n_kv_heads) {
        set_err("%s: bad header: n_heads %d is not a multiple of n_kv_heads %d", name, c->n_heads,
                c->n_kv_heads);
        return -1;
    }
    return 0;
}

/* Bytes of one quantized matrix: int8 values then one fp32 scale per group. */
static uint64_t qbytes(uint64_t numel, int gs) { return numel + 4 * (numel / gs); }

/* Exact file size the header implies; with check_config's bounds no overflow. */
static uint64_t expected_size(const Config *c, int version, int shared, int gs) {
    uint64_t D = c->dim, H = c->hidden_dim, L = c->n_layers, V = c->vocab_size, S = c->seq_len;
    uint64_t hs = D / c->n_heads, kvD = (uint64_t)c->n_kv_heads * hs;
    uint64_t norms = 2 * L * D + D;
    uint64_t per_layer = 2 * D * D + 2 * kvD * D + 3 * H * D; /* wq wo, wk wv, w1 w2 w3 */
    if (version == 0)
        return 28 + 4 * (norms + V * D + L * per_layer + 2 * S * (hs / 2) + (shared ? 0 : V * D));
    if (version == 1)
        return 256 + 4 * (norms + V * D + L * per_layer + (shared ? 0 : V * D));
    uint64_t q = qbytes(V * D, gs) * (shared ? 1 : 2);
    q += L * (2 * qbytes(D * D, gs) + 2 * qbytes(kvD * D, gs) + 3 * qbytes(H * D, gs));
    return 256 + 4 * norms + q;
}

typedef struct {
    const unsigned char *p;
    size_t left;
} Cursor;

/* Sizes were checked against the header up front, so take() cannot run out;
 * it still checks, so a bug here is an error message rather than a wild read. */
static const void *take(Cursor *cur, uint64_t bytes) {
    if (bytes > cur->left) return NULL;
    const void *r = cur->p;
    cur->p += bytes;
    cur->left -= bytes;
    return r;
}

static int take_f32(Cursor *cur, const float **out, uint64_t n) {
    *out = take(cur, 4 * n);
    return *out ? 0 : -1;
}

static int take_q(Cursor *cur, Mat *m, uint64_t numel, int gs) {
    m->f = NULL;
    m->q = take(cur, numel);
    m->s = take(cur, 4 * (numel / gs));
    m->gs = gs;
    if (!m->q || !m->s) return -1;
    if ((uintptr_t)m->s % 4) return -2; /* only possible for group sizes 1 and 2 */
    return 0;
}

static int gcd(int a, int b) { return b ? gcd(b, a % b) : a; }

/* Groups run over each flattened tensor (FORMATS.md), so when hidden_dim is
 * not a multiple of the group size (42M: 1376 with llama2.c's group of 64),
 * w2's rows end mid-group: rows alternate between starting on a group and
 * starting half way into one. Split w2's groups at the row ends into groups
 * of g = gcd(H, gs) that every row sees whole (32 for the 42M shape), each
 * with its group's scale: a small per-row table built once (D × H/g floats a
 * layer), after which w2 is an ordinary matrix of group size g whose input
 * is quantized in groups of g. Every other matrix keeps the group size. */
static int straddled_w2_scales(Transformer *t) {
    const int D = t->c.dim, H = t->c.hidden_dim, L = t->c.n_layers, gs = t->gs, g = gcd(H, gs);
    const size_t per_layer = (size_t)D * (H / g);
    float *tab = malloc(L * per_layer * sizeof(float));
    if (!tab) return -1;
    for (int l = 0; l < L; l++) {
        Mat *m = &t->w.w2[l];
        float *out = tab + l * per_layer;
        for (size_t r = 0; r < (size_t)D; r++)
            for (int k = 0; k < H / g; k++) out[r * (H / g) + k] = m->s[(r * H + (size_t)k * g) / gs];
        m->s = out;
        m->gs = g;
    }
    t->w.w2_scales = tab;
    return 0;
}

/* --- the header: version 0 (llama2.c's legacy 28 bytes, no magic) or 1/2 (256 bytes) */

static void read_header_v0(Transformer *t, const unsigned char *data) {
    Config *c = &t->c;
    int *cv = &c->dim;
    for (int i = 0; i < 7; i++) cv[i] = rd_i32(data + 4 * i);
    t->version = 0;
    t->gs = 0;
    /* v0 has no magic: negative vocab means an unshared classifier at the end */
    if (c->vocab_size == INT_MIN) c->vocab_size = 0;
    t->shared = c->vocab_size > 0;
    if (c->vocab_size < 0) c->vocab_size = -c->vocab_size;
    t->norm_eps = t->rope_theta = 0.0; /* no room for them: the defaults */
}

static int read_header_v12(Transformer *t, const unsigned char *data, size_t size, const char *name) {
    if (size < 256) { set_err("%s: file is %zu bytes, cut off inside the 256-byte header", name, size); return -1; }
    t->version = rd_i32(data + 4);
    if (t->version != 1 && t->version != 2) {
        set_err("%s: unknown model.bin version %d (this runtime reads 0, 1 and 2)", name, t->version);
        return -1;
    }
    int flag = data[36];
    if (flag > 1) { set_err("%s: bad header: shared_classifier flag is %d (must be 0 or 1)", name, flag); return -1; }
    t->shared = flag;
    t->gs = t->version == 2 ? rd_i32(data + 37) : 0; /* unaligned, hence rd_i32 */
    int *cv = &t->c.dim;
    for (int i = 0; i < 7; i++) cv[i] = rd_i32(data + 8 + 4 * i);
    t->norm_eps = rd_f64(data + 64);
    t->rope_theta = rd_f64(data + 72);
    return 0;
}

/* norm_eps or rope_theta: 0 means the default; otherwise a positive number in float's
 * normal range. Judged on the bits (a positive double's bits order as its values do): -Ofast
 * assumes no NaN or infinity, and flushes subnormals to zero, so float tests would not hold. */
static int check_real(double *v, double def, const char *field, const char *name) {
    const uint64_t bits = d2u(*v);
    if (bits << 1 == 0) { *v = def; return 0; } /* +0 or -0 */
    if (bits < d2u(FLT_MIN) || bits > d2u(FLT_MAX)) { /* negative, NaN or infinite: past FLT_MAX's bits */
        set_err("%s: bad header: %s = %g (must be 0 for the default, or a number from %g to %g)", name, field, *v,
                (double)FLT_MIN, (double)FLT_MAX);
        return -1;
    }
    return 0;
}

/* Checks for every version: the shape, v2's group size, norm_eps and rope_theta,
 * and the file size the header implies. */
static int check_header(Transformer *t, size_t size, const char *name) {
    Config *c = &t->c;
    if (check_config(c, name) < 0) {
        if (t->version == 0) { /* no magic and no plausible v0 header: say both */
            char tmp[sizeof err_msg];
            snprintf(tmp, sizeof tmp, "%s", err_msg);
            set_err("%s (no magic 0x%08x, read as version 0)", tmp, MODEL_MAGIC);
        }
        return -1;
    }
    /* every tensor has dim as a factor, so its groups tile it (w2's rows may
     * still end mid-group when hidden_dim % gs != 0: see straddled_w2_scales) */
    if (t->version == 2 && (t->gs <= 0 || c->dim % t->gs)) {
        set_err("%s: group size %d does not divide dim %d", name, t->gs, c->dim);
        return -1;
    }
    if (check_real(&t->norm_eps, DEFAULT_NORM_EPS, "norm_eps", name) < 0 ||
        check_real(&t->rope_theta, DEFAULT_ROPE_THETA, "rope_theta", name) < 0)
        return -1;
    uint64_t want = expected_size(c, t->version, t->shared, t->gs);
    if (want != size) {
        set_err("%s: file is %zu bytes but its version-%d header (dim %d, hidden_dim %d, n_layers %d, "
                "n_heads %d, n_kv_heads %d, vocab_size %d, seq_len %d%s) needs %llu bytes%s",
                name, size, t->version, c->dim, c->hidden_dim, c->n_layers, c->n_heads, c->n_kv_heads,
                c->vocab_size, c->seq_len, t->shared ? "" : ", unshared classifier",
                (unsigned long long)want, size < want ? " (cut off?)" : "");
        return -1;
    }
    return 0;
}

/* --- the weights: pointers into the buffer, one function per layout */

/* A layer's seven matrices in file order (wq wk wv wo w1 w2 w3): where they go, and their shapes. */
typedef struct {
    Mat *m[7];
    uint64_t rows[7], cols[7];
} Matrices;

static Matrices matrices(Weights *w, const Config *c) {
    const uint64_t D = c->dim, H = c->hidden_dim, kvD = (uint64_t)c->n_kv_heads * (D / c->n_heads);
    return (Matrices){{w->wq, w->wk, w->wv, w->wo, w->w1, w->w2, w->w3},
                      {D, kvD, kvD, D, H, D, H},
                      {D, D, D, D, D, H, D}};
}

/* Sizes were checked against the header, so this is a bug here, not a bad file. */
static int size_mismatch(const char *name) {
    set_err("%s: internal size mismatch", name);
    return -1;
}

/* fp32 (v0, v1): the embedding, the classifier after everything else (unless
 * shared), and each layer's matrices cut from their kind's block of all layers. */
static int point_f32(Transformer *t, Cursor *cur, const float *emb, const float *all[7], const char *name) {
    Weights *w = &t->w;
    Matrices ms = matrices(w, &t->c);
    w->emb.f = emb;
    if (t->shared) w->cls = w->emb;
    else if (take_f32(cur, &w->cls.f, (uint64_t)t->c.vocab_size * t->c.dim) < 0) return size_mismatch(name);
    for (int k = 0; k < 7; k++)
        for (int l = 0; l < t->c.n_layers; l++) ms.m[k][l].f = all[k] + (size_t)l * ms.rows[k] * ms.cols[k];
    return 0;
}

/* v0: embedding, rms_att, wq wk wv wo, rms_ffn, w1 w2 w3, final norm, RoPE tables (recomputed) */
static int map_v0(Transformer *t, Cursor *cur, const char *name) {
    const uint64_t D = t->c.dim, L = t->c.n_layers, V = t->c.vocab_size;
    Weights *w = &t->w;
    Matrices ms = matrices(w, &t->c);
    const float *emb = NULL, *all[7], *rope = NULL;
    int bad = take_f32(cur, &emb, V * D);
    bad |= take_f32(cur, &w->rms_att, L * D);
    for (int k = 0; k < 7; k++) {
        if (k == 4) bad |= take_f32(cur, &w->rms_ffn, L * D);
        bad |= take_f32(cur, &all[k], L * ms.rows[k] * ms.cols[k]);
    }
    bad |= take_f32(cur, &w->rms_final, D);
    bad |= take_f32(cur, &rope, (uint64_t)t->c.seq_len * (D / t->c.n_heads / 2) * 2); /* unused */
    return bad ? size_mismatch(name) : point_f32(t, cur, emb, all, name);
}

/* v1: the norms, embedding, then wq wk wv wo w1 w2 w3 (each all layers), fp32 */
static int map_v1(Transformer *t, Cursor *cur, const char *name) {
    const uint64_t D = t->c.dim, L = t->c.n_layers, V = t->c.vocab_size;
    Weights *w = &t->w;
    Matrices ms = matrices(w, &t->c);
    const float *emb = NULL, *all[7];
    int bad = take_f32(cur, &w->rms_att, L * D);
    bad |= take_f32(cur, &w->rms_ffn, L * D);
    bad |= take_f32(cur, &w->rms_final, D);
    bad |= take_f32(cur, &emb, V * D);
    for (int k = 0; k < 7; k++) bad |= take_f32(cur, &all[k], L * ms.rows[k] * ms.cols[k]);
    return bad ? size_mismatch(name) : point_f32(t, cur, emb, all, name);
}

/* v2 (Q8_0): the fp32 norms, then each matrix as int8 values and their group
 * scales: the embedding, wq..w3 layer by layer, the classifier unless shared */
static int map_v2(Transformer *t, Cursor *cur, const char *name) {
    const uint64_t D = t->c.dim, L = t->c.n_layers, V = t->c.vocab_size;
    const int gs = t->gs;
    Weights *w = &t->w;
    Matrices ms = matrices(w, &t->c);
    int bad = take_f32(cur, &w->rms_att, L * D);
    bad |= take_f32(cur, &w->rms_ffn, L * D);
    bad |= take_f32(cur, &w->rms_final, D);
    int r = take_q(cur, &w->emb, V * D, gs);
    for (int k = 0; k < 7 && !r; k++)
        for (uint64_t l = 0; l < L && !r; l++) r = take_q(cur, &ms.m[k][l], ms.rows[k] * ms.cols[k], gs);
    if (!r) {
        if (t->shared) w->cls = w->emb;
        else r = take_q(cur, &w->cls, V * D, gs);
    }
    if (r == -2) {
        set_err("%s: group size %d leaves scales unaligned (unsupported)", name, gs);
        return -1;
    }
    if (bad || r || cur->left) return size_mismatch(name);
    return 0;
}

static int map_weights(Transformer *t, const unsigned char *data, size_t size, const char *name) {
    Weights *w = &t->w;
    const int L = t->c.n_layers;
    w->wq = calloc(7 * (size_t)L, sizeof(Mat));
    if (!w->wq) { set_err("%s: out of memory", name); return -1; }
    w->wk = w->wq + L; w->wv = w->wk + L; w->wo = w->wv + L;
    w->w1 = w->wo + L; w->w2 = w->w1 + L; w->w3 = w->w2 + L;
    const size_t header = t->version == 0 ? 28 : 256;
    Cursor cur = {data + header, size - header};
    int r = t->version == 0 ? map_v0(t, &cur, name) : t->version == 1 ? map_v1(t, &cur, name) : map_v2(t, &cur, name);
    if (r == 0 && cur.left) r = size_mismatch(name);
    return r;
}

/* 0, or -1 naming the tensor when n floats from p hold a NaN or infinity: in its weights,
 * or (`scales`) in the scales of its int8 groups; in layer `layer` (< 0: not a layer's). */
/* " of layer N" for a layer's tensor (layer >= 0), else "" */
static const char *layer_suffix(char where[32], int layer) {
    where[0] = '\0';
    if (layer >= 0) snprintf(where, 32, " of layer %d", layer);
    return where;
}

static int check_tensor(const float *p, uint64_t n, const char *tensor, int layer, int scales, const char *name) {
    const uint64_t i = first_nonfinite(p, n);
    if (i == n) return 0;
    char where[32];
    set_err("%s: %s%s: NaN or infinity in its %s (%s %llu)", name, tensor, layer_suffix(where, layer),
            scales ? "scales" : "weights", scales ? "group" : "element", (unsigned long long)i);
    return -1;
}

/* 0, or -1 naming the tensor when its int8 values hold -128: Q8_0 writes -127..127, and the
 * vector kernels move x's sign onto w, where -128 would stay -128 (docs/formats.md) */
static int check_int8(const int8_t *q, uint64_t n, const char *tensor, int layer, const char *name) {
    const int8_t *bad = memchr(q, 0x80, n);
    if (!bad) return 0;
    char where[32];
    set_err("%s: %s%s: int8 value -128 in its weights (element %llu); Q8_0 values are -127..127", name, tensor,
            layer_suffix(where, layer), (unsigned long long)(bad - q));
    return -1;
}

static int check_matrix(const Mat *m, uint64_t numel, const char *tensor, int layer, const char *name) {
    if (!m->q) return check_tensor(m->f, numel, tensor, layer, 0, name);
    if (check_tensor(m->s, numel / m->gs, tensor, layer, 1, name)) return -1;
    return check_int8(m->q, numel, tensor, layer, name);
}

/* Refuse a file whose numbers are not all finite, before they reach the forward pass: the
 * norms, then every matrix's fp32 weights or int8 scales (in one order for every version). */
static int check_finite(Transformer *t, const char *name) {
    const Config *c = &t->c;
    const uint64_t D = c->dim, V = c->vocab_size;
    Weights *w = &t->w;
    Matrices ms = matrices(w, c);
    static const char *kinds[7] = {"wq", "wk", "wv", "wo", "w1", "w2", "w3"};
    for (int l = 0; l < c->n_layers; l++)
        if (check_tensor(w->rms_att + l * D, D, "rms_att", l, 0, name) ||
            check_tensor(w->rms_ffn + l * D, D, "rms_ffn", l, 0, name))
            return -1;
    if (check_tensor(w->rms_final, D, "rms_final", -1, 0, name) || check_matrix(&w->emb, V * D, "embedding", -1, name))
        return -1;
    for (int k = 0; k < 7; k++)
        for (int l = 0; l < c->n_layers; l++)
            if (check_matrix(&ms.m[k][l], ms.rows[k] * ms.cols[k], kinds[k], l, name)) return -1;
    return t->shared ? 0 : check_matrix(&w->cls, V * D, "classifier", -1, name);
}

/* --- the run state */

/* RoPE table, computed the way PyTorch does (fp32 frequencies and angles) so
 * logits match model.py closely: pair (i, i+1) of each head turns by
 * pos / theta^(i/hs). theta^e is taken in double and rounded once to float,
 * so C libraries that differ in a double's last bit (glibc, Zig's) still
 * agree on the float but in about one case in 2^29. */
static void rope_table(RunState *s, int S, int hs, double theta) {
    const float th = (float)theta;
    for (int pos = 0; pos < S; pos++)
        for (int i = 0; i < hs; i += 2) {
            const float e = (float)i / (float)hs;
            const float freq = 1.0f / (float)pow((double)th, (double)e);
            float angle = (float)pos * freq;
            s->rope_cos[(size_t)pos * (hs / 2) + i / 2] = (float)cos((double)angle);
            s->rope_sin[(size_t)pos * (hs / 2) + i / 2] = (float)sin((double)angle);
        }
}

/* Everything the forward pass needs, allocated once. */
static int alloc_state(Transformer *t, const char *name) {
    const Config *c = &t->c;
    RunState *s = &t->s;
    const int D = c->dim, H = c->hidden_dim, L = c->n_layers, V = c->vocab_size, S = c->seq_len;
    const int hs = D / c->n_heads, kvD = c->n_kv_heads * hs, maxDH = D > H ? D : H;
    s->kv_size = t->gs ? 2 : 4;
    uint64_t kv_bytes = 2ull * L * S * kvD * s->kv_size;
    if (kv_bytes > MAX_STATE_BYTES) {
        set_err("%s: KV cache for seq_len %d would need %.1f GiB", name, S, kv_bytes / 1073741824.0);
        free_state(t);
        return -1;
    }
    s->x = calloc(D, 4); s->xb = calloc(D, 4); s->xb2 = calloc(D, 4);
    s->hb = calloc(H, 4); s->hb2 = calloc(H, 4); s->q = calloc(D, 4);
    s->k = calloc(kvD, 4); s->v = calloc(kvD, 4);
    s->att = calloc((size_t)c->n_heads * S, 4); s->logits = calloc(V, 4);
    s->key_cache = calloc((size_t)L * S * kvD, s->kv_size); s->value_cache = calloc((size_t)L * S * kvD, s->kv_size);
    s->rope_cos = calloc((size_t)S * hs / 2, 4); s->rope_sin = calloc((size_t)S * hs / 2, 4);
    s->n_th = omp_get_max_threads();
    s->th = calloc(s->n_th, sizeof(Scratch));
    s->cut = calloc(s->n_th + 1, sizeof(double));
    int th_ok = s->th != NULL && s->cut != NULL;
    for (int i = 0; th_ok && i < s->n_th; i++) {
        Scratch *sc = &s->th[i];
        sc->xn = calloc(D, 4); sc->xq = calloc(maxDH + 64, 1); sc->xs = calloc(maxDH + 64, 4);
        th_ok = sc->xn && sc->xq && sc->xs;
    }
    if (!s->x || !s->xb || !s->xb2 || !s->hb || !s->hb2 || !s->q || !s->k || !s->v || !s->att || !s->logits ||
        !s->key_cache || !s->value_cache || !th_ok || !s->rope_cos || !s->rope_sin) {
        free_state(t);
        set_err("%s: out of memory for the run state", name);
        return -1;
    }
    rope_table(s, S, hs, t->rope_theta);
    return 0;
}

/* The header of a model held in memory, checked, and checked against its size: all that
 * is read before anything is allocated or copied from the file. */
static int parse_header(Transformer *t, const unsigned char *data, size_t size, const char *name) {
    memset(t, 0, sizeof *t);
    snprintf(t->name, sizeof t->name, "%s", name);
    if (size == 0) { set_err("%s: file is empty", name); return -1; }
    if (size < 28) { set_err("%s: file is %zu bytes, too short for a header", name, size); return -1; }
    uint32_t magic;
    memcpy(&magic, data, 4);
    if (magic != MODEL_MAGIC) read_header_v0(t, data);
    else if (read_header_v12(t, data, size, name) < 0) return -1;
    return check_header(t, size, name);
}

/* The rest, once parse_header has passed: the weights (pointers into data; checked to be
 * finite unless the caller knows that no 4-byte word of data can be a NaN or infinity),
 * w2's per-row scales where its groups straddle rows, and the run state. */
static int parse_weights(Transformer *t, const unsigned char *data, size_t size, int check, const char *name) {
    if (map_weights(t, data, size, name) < 0 || (check && check_finite(t, name) < 0)) {
        free_state(t); /* the weight tables; the run state is not there yet */
        return -1;
    }
    if (t->gs && t->c.hidden_dim % t->gs && straddled_w2_scales(t) < 0) {
        free_state(t);
        set_err("%s: out of memory", name);
        return -1;
    }
    return alloc_state(t, name);
}

/* The AVX2 part of copy_checking (x86-64, any build: taken where the CPU has AVX2). The
 * stores stream past the cache, as glibc's memcpy does for copies this large: plain stores
 * would first read each line of dst, a third more traffic. The bytes copied: a multiple of
 * 128, *any set if one of their words could be a NaN or infinity. */
#if defined(__x86_64__)
#define HAVE_COPY_AVX2 1
__attribute__((target("avx2"))) static size_t copy_checking_avx2(unsigned char *restrict dst,
                                                                 const unsigned char *restrict src, size_t size,
                                                                 uint32_t *any) {
    const __m256i exponent = _mm256_set1_epi32(0x7f800000), one = _mm256_set1_epi32(0x00800000);
    __m256i acc = _mm256_setzero_si256();
    size_t i = 0;
    for (; i + 128 <= size; i += 128)
        for (int k = 0; k < 128; k += 32) {
            __m256i v = _mm256_loadu_si256((const __m256i *)(src + i + k));
            _mm256_stream_si256((__m256i *)(dst + i + k), v);
            acc = _mm256_or_si256(acc, _mm256_add_epi32(_mm256_and_si256(v, exponent), one)); /* nonfinite_bit */
        }
    _mm_sfence();
    if (_mm256_movemask_ps(_mm256_castsi256_ps(acc))) *any = 0x80000000u;
    return i;
}
#endif

/* memcpy that also says whether any 4-byte word it copied could be a NaN or infinity, in
 * the same pass: the test rides on the copy's loads, free in a loop bound by memory
 * (bench/bench_load.py measures it against memcpy). Streaming stores need dst 32-byte
 * aligned, as open_model's page-aligned copy is. */
static int copy_checking(unsigned char *restrict dst, const unsigned char *restrict src, size_t size) {
    size_t i = 0;
    uint32_t any = 0;
#ifdef HAVE_COPY_AVX2
    if (((uintptr_t)dst & 31) == 0 && __builtin_cpu_supports("avx2")) i = copy_checking_avx2(dst, src, size, &any);
#endif
    for (; i + 4 <= size; i += 4) {
        uint32_t u;
        memcpy(&u, src + i, 4);
        memcpy(dst + i, &u, 4);
        any |= nonfinite_bit(u);
    }
    memcpy(dst + i, src + i, size - i);
    return (int)(any >> 31);
}

static Transformer *open_model(const char *path) {
    size_t size;
    int fd = open_regular(path, &size);
    if (fd < 0) return NULL;
    void *map = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (map == MAP_FAILED) { set_err("%s: mmap failed: %s", path, strerror(errno)); return NULL; }
    Transformer *t = calloc(1, sizeof *t);
    if (!t) { munmap(map, size); set_err("%s: out of memory", path); return NULL; }
    if (parse_header(t, map, size, path) < 0) {
        munmap(map, size);
        free(t);
        return NULL;
    }
    /* Copy the file into anonymous memory, on huge pages where the kernel
     * gives them: the matmuls stream it ~20% faster than the page cache's
     * scattered 4 KiB pages (measured: 10 vs 8 GB/s per core). If there is
     * no memory for a copy, run from the file mapping. Copying an fp32 file
     * checks it for NaN and infinity too: only if one may be there are the
     * tensors checked one by one. An int8 file's bytes often look like one,
     * so its scales and norms (a small part of it) are always checked. */
    int check = 1;
    void *anon = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (anon != MAP_FAILED) {
#ifdef MADV_HUGEPAGE
        madvise(anon, size, MADV_HUGEPAGE);
#endif
        if (t->version == 2) memcpy(anon, map, size);
        else check = copy_checking(anon, map, size);
        munmap(map, size);
        map = anon;
    }
    if (parse_weights(t, map, size, check, path) < 0) {
        munmap(map, size);
        free(t);
        return NULL;
    }
    t->map = map;
    t->map_size = size;
    return t;
}

static void close_model(Transformer *t) {
    if (!t) return;
    free_state(t);
    if (t->map) munmap(t->map, t->map_size);
    free(t);
}

/* ------------------------------------------------------------------ forward pass */

/* Every build computes the same bits (docs/formats.md, "Arithmetic"): each sum
 * has one order, whatever the vector width or thread count. Sums of n terms go
 * into 16 lanes (term j into lane j % 16) for the first n - n % 16 terms, the
 * lanes fold as l + l+8, l + l+4, l + l+2, l + l+1, and the tail adds on in
 * order. V16 is those 16 lanes: one AVX-512 vector, two AVX2 ones, or an array
 * the compiler vectorises at whatever width the target has. */
#if defined(__AVX512F__)
typedef __m512 V16;
static inline V16 v16_zero(void) { return _mm512_setzero_ps(); }
static inline V16 v16_load(const float *p) { return _mm512_loadu_ps(p); }
static inline V16 v16_load_f16(const uint16_t *p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)); }
static inline V16 v16_add(V16 a, V16 b) { return _mm512_add_ps(a, b); }
static inline V16 v16_mul(V16 a, V16 b) { return _mm512_mul_ps(a, b); }
#elif defined(HAVE_AVX2)
typedef struct { __m256 lo, hi; } V16;
static inline V16 v16_zero(void) { return (V16){_mm256_setzero_ps(), _mm256_setzero_ps()}; }
static inline V16 v16_load(const float *p) { return (V16){_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
static inline V16 v16_load_f16(const uint16_t *p) {
    return (V16){_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)), _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p + 1))};
}
static inline V16 v16_add(V16 a, V16 b) { return (V16){_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
static inline V16 v16_mul(V16 a, V16 b) { return (V16){_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
#else
typedef struct { float l[16]; } V16;
static inline V16 v16_zero(void) { return (V16){{0}}; }
static inline V16 v16_load(const float *p) { V16 v; memcpy(v.l, p, sizeof v.l); return v; }
static inline float from_f16(uint16_t h);
static inline V16 v16_load_f16(const uint16_t *p) { V16 v; for (int i = 0; i < 16; i++) v.l[i] = from_f16(p[i]); return v; }
static inline V16 v16_add(V16 a, V16 b) { for (int i = 0; i < 16; i++) a.l[i] += b.l[i]; return a; }
static inline V16 v16_mul(V16 a, V16 b) { for (int i = 0; i < 16; i++) a.l[i] *= b.l[i]; return a; }
#endif

/* 8 lanes folded as l + l+4, l + l+2, l + l+1 */
static inline float fold8(const float *l) { return (l[0] + l[4] + (l[2] + l[6])) + (l[1] + l[5] + (l[3] + l[7])); }

#ifdef HAVE_AVX2
static inline float hsum256(__m256 v) { /* fold8 on a vector */
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#endif

static inline float v16_fold(V16 v) {
#if defined(__AVX512F__)
    const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
    return hsum256(_mm256_add_ps(_mm512_castps512_ps256(v), hi));
#elif defined(HAVE_AVX2)
    return hsum256(_mm256_add_ps(v.lo, v.hi));
#else
    float l[8];
    for (int i = 0; i < 8; i++) l[i] = v.l[i] + v.l[i + 8];
    return fold8(l);
#endif
}

/* a · b in the order above (products rounded, then added: no fused multiply-add) */
static inline float dot16(const float *a, const float *b, int n) {
    V16 acc = v16_zero();
    int j = 0;
    for (; j + 16 <= n; j += 16) acc = v16_add(acc, v16_mul(v16_load(a + j), v16_load(b + j)));
    float sum = v16_fold(acc);
    for (; j < n; j++) sum += a[j] * b[j];
    return sum;
}

/* the sum of x, in the same order */
static float sum16(const float *x, int n) {
    V16 acc = v16_zero();
    int j = 0;
    for (; j + 16 <= n; j += 16) acc = v16_add(acc, v16_load(x + j));
    float sum = v16_fold(acc);
    for (; j < n; j++) sum += x[j];
    return sum;
}

/* the largest of x[0..n), n >= 1: in 16 lanes, so it vectorises (a maximum has no order) */
static float max16(const float *x, int n) {
    float m[16];
    for (int l = 0; l < 16; l++) m[l] = x[0];
    int j = 0;
    for (; j + 16 <= n; j += 16)
        for (int l = 0; l < 16; l++) m[l] = x[j + l] > m[l] ? x[j + l] : m[l];
    for (; j < n; j++) m[0] = x[j] > m[0] ? x[j] : m[0];
    for (int l = 1; l < 16; l++) m[0] = m[l] > m[0] ? m[l] : m[0];
    return m[0];
}

static void rmsnorm(float *o, const float *x, const float *w, int n, float eps) {
    const float ss = 1.0f / sqrtf(dot16(x, x, n) / (float)n + eps);
    for (int i = 0; i < n; i++) o[i] = w[i] * (ss * x[i]);
}

/* e^x from a polynomial of our own, so that no C library's expf (or vectorised
 * libmvec one) can change a bit: 2^k e^r with k = x / ln 2 rounded to an integer
 * (adding and subtracting 1.5 * 2^23 rounds it, half to even, in vectors too), r =
 * x - k ln 2 (ln 2 in two parts), Cephes' degree-6 polynomial for e^r, about
 * 1 ulp. x is clamped to [-87, 88], where 2^k stays a normal float. */
static inline float exp_fixed(float x) {
    x = x < -87.0f ? -87.0f : x;
    x = x > 88.0f ? 88.0f : x;
    const float k = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* rounded half to even */
    float r = x - k * 0.693359375f;
    r = r - k * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    const union { uint32_t u; float f; } two_k = {(uint32_t)((int32_t)k + 127) << 23}; /* a union, not memcpy: vectorises */
    return (p * (r * r) + (r + 1.0f)) * two_k.f;
}

static void softmax(float *x, int n) {
    const float mx = max16(x, n);
    for (int i = 0; i < n; i++) x[i] = exp_fixed(x[i] - mx);
    const float inv = 1.0f / sum16(x, n);
    for (int i = 0; i < n; i++) x[i] *= inv;
}

/* Symmetric Q8_0 quantization of a matmul input, once per input: all rows
 * (and all threads) share the quantized vector. lrintf rounds half to even. */
static void quantize(int8_t *q, float *s, const float *x, int n, int gs) {
    for (int g = 0; g < n / gs; g++) {
        const float *xg = x + (size_t)g * gs;
        float amax = 0.0f;
        for (int i = 0; i < gs; i++) amax = fmaxf(amax, fabsf(xg[i]));
        float scale = amax / 127.0f, inv = scale > 0.0f ? 1.0f / scale : 0.0f;
        for (int i = 0; i < gs; i++) q[(size_t)g * gs + i] = (int8_t)lrintf(xg[i] * inv);
        s[g] = scale;
    }
}

#ifdef HAVE_AVX2
/* d += the sums of four products of unsigned bytes a and signed bytes b per
 * 32-bit lane: one vpdpbusd where the CPU has VNNI (AVX-VNNI, or AVX-512 VNNI
 * on 256-bit vectors), else pmaddubsw + pmaddwd, whose pair sums stay below
 * 2 * 127 * 127 < 32767 (a is |x| here), so never saturate: the same integers. */
static inline __m256i dot_u8s8(__m256i d, __m256i a, __m256i b) {
#if defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(d, a, b);
#elif defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(d, a, b);
#else
    return _mm256_add_epi32(d, _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1)));
#endif
}

/* int8 dot products for group sizes that are multiples of 32, R rows sharing
 * each load of x: rows r, r + rs, r + 2 rs, ... (R streams), each prefetched
 * `ahead` rows on. The byte products take |x| as the unsigned side and move
 * x's sign onto w (sign_epi8). Lane l of d holds bytes 4l..4l+3 of every 32:
 * q8_row's lanes. */
static inline __attribute__((always_inline)) void
q_rows_avx2(float *out, const int8_t *xq, const float *xs, const int8_t *wq, const float *ws,
            int n, int gs, int r, const int R, int rs, int ahead) {
    const int ng = n / gs;
    const int8_t *w[4];
    const float *sc[4];
    __m256 acc[4];
    for (int k = 0; k < R; k++) {
        w[k] = wq + (size_t)(r + k * rs) * n;
        sc[k] = ws + (size_t)(r + k * rs) * ng;
        acc[k] = _mm256_setzero_ps();
        /* the scales of the row `ahead` on (ng floats: one or two cache lines),
         * which the weights' prefetch below does not reach: +1-4% tok/s at
         * 15M-110M, 1 and 2 threads (A/B, token by token) */
        _mm_prefetch((const char *)(sc[k] + (size_t)ahead * ng), _MM_HINT_T0);
        _mm_prefetch((const char *)(sc[k] + (size_t)ahead * ng + ng - 1), _MM_HINT_T0);
    }
    for (int g = 0, j = 0; g < ng; g++) {
        __m256i d[4];
        for (int k = 0; k < R; k++) d[k] = _mm256_setzero_si256();
        for (const int end = j + gs; j < end; j += 32) {
            __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + j));
            __m256i ax = _mm256_sign_epi8(xv, xv);
            for (int k = 0; k < R; k++) {
                _mm_prefetch((const char *)(w[k] + (size_t)ahead * n + j), _MM_HINT_T0);
                d[k] = dot_u8s8(d[k], ax, _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(w[k] + j)), xv));
            }
        }
        for (int k = 0; k < R; k++)
            acc[k] = _mm256_add_ps(acc[k], _mm256_mul_ps(_mm256_cvtepi32_ps(d[k]), _mm256_set1_ps(sc[k][g] * xs[g])));
    }
    for (int k = 0; k < R; k++) out[r + k * rs] = hsum256(acc[k]);
}
#endif

/* One int8 row · x, the order every build keeps: per group, eight exact integer
 * sums (byte j of the group into lane (j % 32) / 4); lane l of the float sums
 * gains sum_l * (w_scale * x_scale); the eight fold as fold8. */
static float q8_row(const int8_t *xq, const float *xs, const int8_t *wr, const float *sr, int n, int gs) {
    float acc[8] = {0};
    for (int g = 0; g < n / gs; g++) {
        const int8_t *xg = xq + (size_t)g * gs, *wg = wr + (size_t)g * gs;
        int32_t d[8] = {0};
        if (gs % 32 == 0) {
            for (int j = 0; j < gs; j += 32)
                for (int l = 0; l < 8; l++)
                    for (int b = 0; b < 4; b++) d[l] += (int32_t)xg[j + 4 * l + b] * wg[j + 4 * l + b];
        } else {
            for (int j = 0; j < gs; j++) d[(j >> 2) & 7] += (int32_t)xg[j] * wg[j];
        }
        const float s = sr[g] * xs[g];
        for (int l = 0; l < 8; l++) acc[l] += (float)d[l] * s;
    }
    return fold8(acc);
}

/* fp32 rows [r0, r1) of out = W x, W is (rows × n). The loop is memory-bound,
 * so its shape is about streaming W. */
static void matmul_f32(float *out, const float *x, const float *w, int n, int r0, int r1) {
    int r = r0;
#if defined(HAVE_AVX2)
    /* Four streams: this thread's rows in four parts, walked side by side, one
     * V16 sum each. On an AMD EPYC (Zen 3) a core's DRAM bandwidth grows with
     * the independent streams in flight: measured 1.34-1.53x one row at a time
     * (15M-110M, 1 and 2 threads); eight streams were no faster, and software
     * prefetch made one row at a time slower. On Zen 4 (AVX-512), against four
     * adjacent rows prefetched 8 rows ahead: 1.04-1.10x. */
    const int q = (r1 - r0) / 4, nv = n & ~15;
    for (; r < r0 + q; r++) {
        const float *wr[4] = {w + (size_t)r * n, w + (size_t)(r + q) * n, w + (size_t)(r + 2 * q) * n,
                              w + (size_t)(r + 3 * q) * n};
        V16 a[4];
        for (int k = 0; k < 4; k++) a[k] = v16_zero();
        for (int j = 0; j < nv; j += 16) {
            const V16 xv = v16_load(x + j);
            for (int k = 0; k < 4; k++) a[k] = v16_add(a[k], v16_mul(v16_load(wr[k] + j), xv));
        }
        for (int k = 0; k < 4; k++) {
            float sum = v16_fold(a[k]);
            for (int j = nv; j < n; j++) sum += wr[k][j] * x[j];
            out[r + k * q] = sum;
        }
    }
    r = r0 + 4 * q; /* the last (r1 - r0) % 4 rows: below */
#endif
    for (; r < r1; r++) out[r] = dot16(w + (size_t)r * n, x, n);
}

/* int8 rows [r0, r1) of out = W x, with x already quantized into (xq, xs). */
static void matmul_q8(float *out, const int8_t *xq, const float *xs, const Mat *m, int n, int r0, int r1) {
    const int gs = m->gs, ng = n / gs;
    int r = r0;
#if defined(HAVE_AVX2)
    /* Four streams, each a quarter of our share, as fp32 does. Measured on an
     * AMD EPYC (Zen 3) against four adjacent rows per pass: 1.27x at 15M (in
     * L3) and 1.06x at 2 threads; against one row at a time (DRAM-resident
     * 42M/110M) 1.06-1.11x. On an AMD EPYC with AVX-512 (Zen 4), against four
     * adjacent rows of AVX-512 VNNI prefetched 16 rows ahead: 1.16-1.19x at 1
     * thread, 1.28-1.44x at 42M/110M at 2 threads; the same four streams on
     * 512-bit vectors ran 0.98-0.99x. Each stream is prefetched 4 rows ahead;
     * past our share or the matrix that is harmless (a prefetch never faults). */
    if (gs % 32 == 0) {
        const int q = (r1 - r0) / 4;
        for (; r < r0 + q; r++) q_rows_avx2(out, xq, xs, m->q, m->s, n, gs, r, 4, q, 4);
        r = r0 + 4 * q;
        for (; r < r1; r++) q_rows_avx2(out, xq, xs, m->q, m->s, n, gs, r, 1, 1, 4);
    }
#endif
    for (; r < r1; r++) out[r] = q8_row(xq, xs, m->q + (size_t)r * n, m->s + (size_t)r * ng, n, gs);
}

/* Rows [r0, r1) of out = W in; int8 matrices read this thread's copy of in,
 * quantized in groups of the matrix's gs. */
static void matmul(const Scratch *sc, float *out, const Mat *m, const float *in, int n, int r0, int r1) {
    if (m->q) matmul_q8(out, sc->xq, sc->xs, m, n, r0, r1);
    else matmul_f32(out, in, m->f, n, r0, r1);
}

/* Where thread t's blocks begin: at its cut, or (NULL) at an equal share. */
static long block_edge(const double *cut, long blocks, int t) {
    return cut ? (long)(blocks * cut[t] + 0.5) : blocks * t / omp_get_num_threads();
}

/* This thread's share [*a, *b) of n items in blocks of `blk`: contiguous, so
 * four-row kernels and RoPE pairs never straddle threads. */
static void split(const double *cut, int n, int blk, int *a, int *b) {
    const int tid = omp_get_thread_num();
    const long blocks = (n + blk - 1) / blk;
    const long lo = blk * block_edge(cut, blocks, tid), hi = blk * block_edge(cut, blocks, tid + 1);
    *a = (int)(lo < n ? lo : n);
    *b = (int)(hi < n ? hi : n);
}

#ifdef _OPENMP
#define WALL() omp_get_wtime()
#else
#define WALL() 0.0
#endif

/* Rebalance the row shares after a token. A thread's share per busy second
 * is its speed now; on a shared host one core is often slower for a while,
 * and with equal shares the other waited 8-14% of a 110M int8 token at the
 * barriers. The new shares are the speeds' proportions, averaged with the
 * old shares so one noisy token cannot swing them (A/B, 2 threads: int8
 * +3-9% at 15M-110M, fp32 unchanged: there both threads wait on DRAM alike).
 * Which thread computes a row never changes its value. */
static void rebalance(RunState *s) {
    const int nth = s->team;
    double total = 0;
    for (int t = 0; t < nth; t++) {
        if (!(s->th[t].busy > 0)) return; /* no clock: a build without OpenMP */
        total += (s->cut[t + 1] - s->cut[t]) / s->th[t].busy;
    }
    double lo = 0, acc = 0; /* lo: the old cut[t], before it is overwritten */
    for (int t = 0; t + 1 < nth; t++) {
        const double share = s->cut[t + 1] - lo;
        lo = s->cut[t + 1];
        acc += 0.5 * share + 0.5 * share / s->th[t].busy / total;
        s->cut[t + 1] = acc;
    }
}

/* matmul over rows this thread took at s->cut: its time counts towards its speed */
static void shared_matmul(Scratch *sc, float *out, const Mat *m, const float *in, int n, int r0, int r1) {
    const double t0 = WALL();
    matmul(sc, out, m, in, n, r0, r1);
    sc->busy += WALL() - t0;
}

/* rmsnorm x into this thread's copy, and quantize it for int8 matmuls. */
static const float *norm_input(Scratch *sc, const float *x, const float *w, int D, int gs, float eps) {
    rmsnorm(sc->xn, x, w, D, eps);
    if (gs) quantize(sc->xq, sc->xs, sc->xn, D, gs);
    return sc->xn;
}

/* x += W in on this thread's rows of x: the wo and w2 projections back into the
 * residual stream. `out` is scratch for W in; int8 matrices quantize `in` first. */
static void add_projection(Scratch *sc, const double *cut, float *x, float *out, const Mat *m, const float *in, int n, int D) {
    int a, b;
    if (m->q) quantize(sc->xq, sc->xs, in, n, m->gs);
    split(cut, D, 4, &a, &b);
    shared_matmul(sc, out, m, in, n, a, b);
    for (int i = a; i < b; i++) x[i] += out[i];
}

/* IEEE half precision (fp16) for the KV cache of int8 models, by bit
 * arithmetic so that every compiler and target (WebAssembly too) rounds alike.
 * to_f16 rounds to nearest even and saturates at +-65504 instead of overflowing
 * to infinity; from_f16 is exact for every finite half. */
static inline uint16_t to_f16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    const uint32_t sign = (u >> 16) & 0x8000;
    u &= 0x7fffffff;
    if (u >= 0x477ff000) return (uint16_t)(sign | 0x7bff); /* rounds to 65520 or more; NaN too */
    if (u < 0x38800000) { /* below 2^-14: a subnormal half (or zero); the float add rounds it */
        float a;
        memcpy(&a, &u, 4);
        a += 0.5f; /* lands the half's bits in the low mantissa bits of 0.5 */
        memcpy(&u, &a, 4);
        return (uint16_t)(sign | (u - 0x3f000000));
    }
    u += 0xc8000fff + ((u >> 13) & 1); /* rebias 127 -> 15, round to nearest even */
    return (uint16_t)(sign | (u >> 13));
}
static inline float from_f16(uint16_t h) {
    uint32_t u = (uint32_t)(h & 0x7fff) << 13, sign = (uint32_t)(h & 0x8000) << 16;
    float f;
    memcpy(&f, &u, 4);
    f *= 0x1p112f; /* rebias 15 -> 127; turns subnormal halves into normal floats */
    memcpy(&u, &f, 4);
    u |= sign;
    memcpy(&f, &u, 4);
    return f;
}

#define PF_KV 8

/* q · k for one cached key, fp32 or fp16 (kv_size 4, 2), in dot16's order */
static inline float dot_cached(const float *q, const void *k, int n, int kv_size) {
    if (kv_size == 4) return dot16(q, k, n);
    const uint16_t *kb = k;
    V16 acc = v16_zero();
    int j = 0;
    for (; j + 16 <= n; j += 16) acc = v16_add(acc, v16_mul(v16_load(q + j), v16_load_f16(kb + j)));
    float sum = v16_fold(acc);
    for (; j < n; j++) sum += q[j] * from_f16(kb[j]);
    return sum;
}

/* o += a v for one cached value */
static inline void axpy_cached(float *o, float a, const void *v, int n, int kv_size) {
    if (kv_size == 4) {
        const float *vf = v;
        for (int i = 0; i < n; i++) o[i] += a * vf[i];
    } else {
        const uint16_t *vb = v;
        for (int i = 0; i < n; i++) o[i] += a * from_f16(vb[i]);
    }
}

/* o = sum over positions p < n of att[p] * (value at p), for one head whose
 * values lie `row` bytes apart; prefetches the line-aligned `pf` rows as it goes
 * (the next head's keys) unless pf is NULL. Element by element this is the same
 * chain of multiplies and adds as axpy_cached from o = 0, so the results are
 * the same bits; on AVX2 the head's sums stay in registers across positions
 * instead of a load and a store of o per position. */
#if defined(HAVE_AVX2)
static inline __attribute__((always_inline)) void
attend_values_avx2(float *o, const float *att, const char *v, size_t row, int n, int kv_size, const char *pf,
                   const int NV) {
    __m256 acc[16];
    for (int j = 0; j < NV; j++) acc[j] = _mm256_setzero_ps();
    for (int p = 0; p < n; p++) {
        if (pf) for (size_t i = 0; i < row; i += 64) __builtin_prefetch(pf + p * row + i);
        const __m256 a = _mm256_set1_ps(att[p]);
        const char *vp = v + p * row;
        for (int j = 0; j < NV; j++) {
            const __m256 x = kv_size == 4 ? _mm256_loadu_ps((const float *)vp + 8 * j)
                                          : _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)vp + j));
            acc[j] = _mm256_add_ps(acc[j], _mm256_mul_ps(a, x));
        }
    }
    for (int j = 0; j < NV; j++) _mm256_storeu_ps(o + 8 * j, acc[j]);
}
#endif

static void attend_values(float *o, const float *att, const char *v, size_t row, int n, int hs, int kv_size,
                          const char *pf) {
#if defined(HAVE_AVX2)
    /* a constant vector count per head size keeps the sums in registers */
    switch (hs) {
    case 32: attend_values_avx2(o, att, v, row, n, kv_size, pf, 4); return;
    case 48: attend_values_avx2(o, att, v, row, n, kv_size, pf, 6); return;
    case 64: attend_values_avx2(o, att, v, row, n, kv_size, pf, 8); return;
    case 128: attend_values_avx2(o, att, v, row, n, kv_size, pf, 16); return;
    }
#endif
    memset(o, 0, hs * sizeof(float));
    for (int p = 0; p < n; p++) {
        if (pf) for (size_t i = 0; i < row; i += 64) __builtin_prefetch(pf + p * row + i);
        axpy_cached(o, att[p], v + p * row, hs, kv_size);
    }
}

static void rope(float *v, int a, int b, int hs, const float *cosr, const float *sinr) {
    for (int i = a; i < b; i += 2) {
        float c0 = cosr[(i % hs) / 2], s0 = sinr[(i % hs) / 2], x0 = v[i], x1 = v[i + 1];
        v[i] = x0 * c0 - x1 * s0;
        v[i + 1] = x0 * s0 + x1 * c0;
    }
}

/* The forward pass body, run by every thread of one team: one fork/join per
 * token and four barriers per layer. A thread owns whole key/value heads
 * from q/k/v through attention, so attention needs no barrier before it;
 * every thread normalises/quantizes each matmul input itself (Scratch). The
 * other matmuls split their rows at s->cut (see rebalance). */
static void forward_team(Transformer *t, int pos) {
    const Config *c = &t->c;
    const Weights *w = &t->w;
    RunState *s = &t->s;
    Scratch *sc = &s->th[omp_get_thread_num()];
    const double *cut = omp_get_num_threads() == s->team ? s->cut : NULL;
    sc->busy = 0;
    const int D = c->dim, H = c->hidden_dim, S = c->seq_len, gs = t->gs;
    const int hs = D / c->n_heads, kvD = c->n_kv_heads * hs, kvmul = c->n_heads / c->n_kv_heads;
    const float *cosr = s->rope_cos + (size_t)pos * (hs / 2), *sinr = s->rope_sin + (size_t)pos * (hs / 2);
    const float scale = 1.0f / sqrtf((float)hs), eps = (float)t->norm_eps;
    int a, b, k0, k1;
    split(NULL, c->n_kv_heads, 1, &k0, &k1); /* my key/value heads, and their query heads */
    const int q0 = k0 * kvmul * hs, q1 = k1 * kvmul * hs;

    for (int l = 0; l < c->n_layers; l++) {
        const float *in = norm_input(sc, s->x, w->rms_att + (size_t)l * D, D, gs, eps);
        /* q, k and v of my heads, each one matmul over all my rows (per-head
         * calls of 64 rows ran the 110M qkv phase ~20% slower per byte at 1
         * thread); then k and v into the cache at pos */
        const int kvs = s->kv_size;
        const size_t row = (size_t)hs * kvs; /* bytes of one head's key (value) at one position */
        char *kl = (char *)s->key_cache + (size_t)l * kvD * S * kvs, *vl = (char *)s->value_cache + (size_t)l * kvD * S * kvs;
        matmul(sc, s->q, &w->wq[l], in, D, q0, q1);
        matmul(sc, s->k, &w->wk[l], in, D, k0 * hs, k1 * hs);
        matmul(sc, s->v, &w->wv[l], in, D, k0 * hs, k1 * hs);
        rope(s->q, q0, q1, hs, cosr, sinr);
        rope(s->k, k0 * hs, k1 * hs, hs, cosr, sinr);
        for (int kh = k0; kh < k1; kh++) {
            char *kp = kl + ((size_t)kh * S + pos) * row, *vp = vl + ((size_t)kh * S + pos) * row;
            const float *kf = s->k + (size_t)kh * hs, *vf = s->v + (size_t)kh * hs;
            if (kvs == 4) {
                memcpy(kp, kf, row);
                memcpy(vp, vf, row);
            } else {
                for (int i = 0; i < hs; i++) ((uint16_t *)kp)[i] = to_f16(kf[i]);
                for (int i = 0; i < hs; i++) ((uint16_t *)vp)[i] = to_f16(vf[i]);
            }
        }
        /* attention of my heads; output into xb */
        for (int h = q0 / hs; h < q1 / hs; h++) {
            const float *qh = s->q + (size_t)h * hs;
            const char *kh = kl + (size_t)(h / kvmul) * S * row, *vh = vl + (size_t)(h / kvmul) * S * row;
            float *att = s->att + (size_t)h * S;
            /* Each head's keys and values are two short streams that the
             * hardware prefetcher meets cold: fetch the values while reading
             * the keys, and the next head's keys (unless it shares these)
             * while reading the values (+2% tok/s at 42M/110M int8, 1 and 2
             * threads, A/B measured). */
            const int more = h + 1 < q1 / hs && (h + 1) / kvmul != h / kvmul;
            const char *kn = more ? kl + (size_t)((h + 1) / kvmul) * S * row : kh;
            for (int p = 0; p <= pos; p++) {
                /* the cache of earlier positions has been pushed out to DRAM
                 * by the weights since: keys PF_KV positions on, and values */
                for (size_t i = 0; i < row; i += 64) {
                    __builtin_prefetch(kh + (p + PF_KV) * row + i);
                    __builtin_prefetch(vh + p * row + i);
                }
                att[p] = dot_cached(qh, kh + p * row, hs, kvs) * scale;
            }
            softmax(att, pos + 1);
            attend_values(s->xb + (size_t)h * hs, att, vh, row, pos + 1, hs, kvs, more ? kn : NULL);
        }
#pragma omp barrier
        /* output projection; my rows of the residual */
        add_projection(sc, cut, s->x, s->xb2, &w->wo[l], s->xb, D, D);
#pragma omp barrier
        /* SwiGLU: silu(w1 x) * (w3 x), fused per thread on its own rows */
        in = norm_input(sc, s->x, w->rms_ffn + (size_t)l * D, D, gs, eps);
        split(cut, H, 16, &a, &b);
        shared_matmul(sc, s->hb, &w->w1[l], in, D, a, b);
        shared_matmul(sc, s->hb2, &w->w3[l], in, D, a, b);
        for (int i = a; i < b; i++) {
            float v = s->hb[i];
            s->hb[i] = v / (1.0f + exp_fixed(-v)) * s->hb2[i];
        }
#pragma omp barrier
        add_projection(sc, cut, s->x, s->xb2, &w->w2[l], s->hb, H, D);
#pragma omp barrier
    }
    /* the final norm goes into my copy (x itself is left as the residual) */
    const float *in = norm_input(sc, s->x, w->rms_final, D, gs, eps);
    split(cut, c->vocab_size, 4, &a, &b);
    shared_matmul(sc, s->logits, &w->cls, in, D, a, b);
}

/* Logits for `token` at position `pos`; positions before pos must already
 * have been run (they live in the KV cache). NULL with a message on bad input. */
static float *forward(Transformer *t, int token, int pos) {
    if (token < 0 || token >= t->c.vocab_size) {
        set_err("token %d out of range 0..%d", token, t->c.vocab_size - 1);
        return NULL;
    }
    if (pos < 0 || pos >= t->c.seq_len) {
        set_err("position %d out of range 0..%d", pos, t->c.seq_len - 1);
        return NULL;
    }
    const Config *c = &t->c;
    const Mat *emb = &t->w.emb;
    float *x = t->s.x;
    if (emb->q) { /* dequantise only the one embedding row we need */
        const int8_t *q = emb->q + (size_t)token * c->dim;
        const float *sc = emb->s + (size_t)token * c->dim / t->gs;
        for (int i = 0; i < c->dim; i++) x[i] = q[i] * sc[i / t->gs];
    } else {
        memcpy(x, emb->f + (size_t)token * c->dim, c->dim * sizeof(float));
    }
    /* at most n_th threads: one Scratch each */
    const int team = omp_get_max_threads() < t->s.n_th ? omp_get_max_threads() : t->s.n_th;
    if (team != t->s.team) { /* equal shares to start */
        t->s.team = team;
        for (int i = 0; i <= team; i++) t->s.cut[i] = (double)i / team;
    }
#pragma omp parallel num_threads(team)
    forward_team(t, pos);
    rebalance(&t->s);
    /* finite weights can still overflow: stop rather than sample from garbage */
    if (first_nonfinite(t->s.logits, c->vocab_size) < (uint64_t)c->vocab_size) {
        set_err("%s: the logits at position %d are not finite (NaN or infinity): the model's numbers overflow",
                t->name, pos);
        return NULL;
    }
    return t->s.logits;
}

/* ------------------------------------------------------------------ tokenizer */

typedef struct {
    const char *str;
    int len;
    int id;
} TokenIndex;

typedef struct {
    int vocab_size;
    int max_len;         /* longest piece actually present */
    float *scores;
    char **pieces;       /* NUL-terminated copies (pieces may hold NUL only as <0x00> text) */
    int *lens;
    int *byte_of;        /* for "<0xNN>" pieces the byte NN, else -1 */
    TokenIndex *sorted;  /* pieces sorted by bytes, for bsearch */
    char *arena;
    char *merge_buf;     /* 2*max_len+1: scratch for pair concatenation */
} Tokenizer;

static int cmp_index(const void *a, const void *b) {
    const TokenIndex *x = a, *y = b;
    int n = x->len < y->len ? x->len : y->len;
    int r = memcmp(x->str, y->str, n);
    return r ? r : (x->len > y->len) - (x->len < y->len);
}

static void free_tokenizer(Tokenizer *t) {
    if (!t) return;
    free(t->scores); free(t->pieces); free(t->lens); free(t->byte_of);
    free(t->sorted); free(t->arena); free(t->merge_buf);
    free(t);
}

static int hexval(int ch) {
    if (ch >= '0' && ch <= '9') return ch - '0';
    if (ch >= 'A' && ch <= 'F') return ch - 'A' + 10;
    if (ch >= 'a' && ch <= 'f') return ch - 'a' + 10;
    return -1;
}

#define MAX_PIECE 65536

/* The checks on tokenizer.bin's first 4 bytes (max_token_length) and its size, which need
 * nothing else: a file can hold at most vocab_size pieces of at most max_token_length bytes. */
static int check_tokenizer_size(const unsigned char *head, size_t size, int vocab_size, const char *name) {
    if (vocab_size < 3 || vocab_size > MAX_VOCAB) {
        set_err("%s: vocab_size %d is not usable (need 3..%d)", name, vocab_size, MAX_VOCAB);
        return -1;
    }
    if (size < 4) { set_err("%s: file is %zu bytes, cut off inside the header", name, size); return -1; }
    const int hdr_max = rd_i32(head);
    if (hdr_max <= 0 || hdr_max > MAX_PIECE) {
        set_err("%s: bad header: max_token_length %d (must be 1..%d)", name, hdr_max, MAX_PIECE);
        return -1;
    }
    const uint64_t most = 4 + (uint64_t)vocab_size * (8 + (uint64_t)hdr_max);
    if (size > most) {
        set_err("%s: file is %zu bytes, more than %d pieces of at most max_token_length %d bytes fill (%llu): it "
                "does not fit the model's vocab_size %d", name, size, vocab_size, hdr_max, (unsigned long long)most,
                vocab_size);
        return -1;
    }
    return 0;
}

/* Parse tokenizer.bin from memory; it must hold exactly vocab_size pieces. */
static Tokenizer *parse_tokenizer(const unsigned char *data, size_t size, int vocab_size, const char *name) {
    if (size == 0) { set_err("%s: file is empty", name); return NULL; }
    if (check_tokenizer_size(data, size, vocab_size, name) < 0) return NULL;
    const int hdr_max = rd_i32(data);
    /* first pass: validate and measure */
    size_t off = 4, text = 0;
    int maxlen = 1;
    for (int i = 0; i < vocab_size; i++) {
        if (size - off < 8) {
            set_err("%s: cut off at piece %d of %d (the model's vocab_size is %d)", name, i, vocab_size, vocab_size);
            return NULL;
        }
        int len = rd_i32(data + off + 4);
        if (len < 0 || len > hdr_max) {
            set_err("%s: piece %d has bad length %d (must be 0..max_token_length %d)", name, i, len, hdr_max);
            return NULL;
        }
        if ((size_t)len > size - off - 8) {
            set_err("%s: cut off inside piece %d of %d (the model's vocab_size is %d)", name, i, vocab_size, vocab_size);
            return NULL;
        }
        off += 8 + (size_t)len;
        text += (size_t)len + 1;
        if (len > maxlen) maxlen = len;
    }
    if (off != size) {
        set_err("%s: %zu bytes left over after %d pieces: it does not fit the model's vocab_size %d",
                name, size - off, vocab_size, vocab_size);
        return NULL;
    }
    Tokenizer *t = calloc(1, sizeof *t);
    if (!t) { set_err("%s: out of memory", name); return NULL; }
    t->vocab_size = vocab_size;
    t->max_len = maxlen;
    t->scores = malloc(vocab_size * sizeof(float));
    t->pieces = malloc(vocab_size * sizeof(char *));
    t->lens = malloc(vocab_size * sizeof(int));
    t->byte_of = malloc(vocab_size * sizeof(int));
    t->sorted = malloc(vocab_size * sizeof(TokenIndex));
    t->arena = malloc(text);
    t->merge_buf = malloc(2 * (size_t)maxlen + 1);
    if (!t->scores || !t->pieces || !t->lens || !t->byte_of || !t->sorted || !t->arena || !t->merge_buf) {
        free_tokenizer(t);
        set_err("%s: out of memory", name);
        return NULL;
    }
    off = 4;
    char *a = t->arena;
    for (int i = 0; i < vocab_size; i++) {
        int len = rd_i32(data + off + 4);
        t->scores[i] = rd_f32(data + off);
        memcpy(a, data + off + 8, len);
        a[len] = '\0';
        t->pieces[i] = a;
        t->lens[i] = len;
        t->byte_of[i] = -1;
        if (len == 6 && a[0] == '<' && a[1] == '0' && a[2] == 'x' && a[5] == '>' && hexval(a[3]) >= 0 &&
            hexval(a[4]) >= 0)
            t->byte_of[i] = hexval(a[3]) * 16 + hexval(a[4]);
        t->sorted[i] = (TokenIndex){a, len, i};
        a += len + 1;
        off += 8 + (size_t)len;
    }
    qsort(t->sorted, vocab_size, sizeof(TokenIndex), cmp_index);
    return t;
}

/* n bytes at offset off of fd, or -1 with a message (a short read: the file changed). */
static int read_at(int fd, unsigned char *buf, size_t n, size_t off, const char *path) {
    for (size_t done = 0; done < n;) {
        ssize_t got = pread(fd, buf + done, n - done, (off_t)(off + done));
        if (got < 0 && errno == EINTR) continue;
        if (got <= 0) {
            set_err("%s: read failed: %s", path, got < 0 ? strerror(errno) : "the file shrank while being read");
            return -1;
        }
        done += (size_t)got;
    }
    return 0;
}

/* tokenizer.bin: its header and size are checked before the file is read whole. */
static Tokenizer *open_tokenizer(const char *path, int vocab_size) {
    size_t size;
    int fd = open_regular(path, &size);
    if (fd < 0) return NULL;
    unsigned char head[4];
    unsigned char *buf = NULL;
    Tokenizer *t = NULL;
    if (read_at(fd, head, size < 4 ? size : 4, 0, path) == 0 &&
        check_tokenizer_size(head, size, vocab_size, path) == 0) {
        if (!(buf = malloc(size))) set_err("%s: out of memory", path);
        else if (read_at(fd, buf, size, 0, path) == 0) t = parse_tokenizer(buf, size, vocab_size, path);
    }
    free(buf);
    close(fd);
    return t;
}

static int lookup(const Tokenizer *t, const char *s, int len) {
    TokenIndex key = {s, len, 0};
    const TokenIndex *r = bsearch(&key, t->sorted, t->vocab_size, sizeof(TokenIndex), cmp_index);
    return r ? r->id : -1;
}

/* Length of the valid UTF-8 sequence at s (1..4), or 1 for an invalid byte,
 * which then goes through byte fallback like any unknown character. */
static int utf8_len(const unsigned char *s, size_t left) {
    unsigned c = s[0];
    int n;
    unsigned lo = 0x80, hi = 0xBF;
    if (c < 0x80) return 1;
    else if (c >= 0xC2 && c <= 0xDF) n = 2;
    else if (c >= 0xE0 && c <= 0xEF) { n = 3; if (c == 0xE0) lo = 0xA0; if (c == 0xED) hi = 0x9F; }
    else if (c >= 0xF0 && c <= 0xF4) { n = 4; if (c == 0xF0) lo = 0x90; if (c == 0xF4) hi = 0x8F; }
    else return 1;
    if ((size_t)n > left) return 1;
    if (s[1] < lo || s[1] > hi) return 1;
    for (int i = 2; i < n; i++)
        if ((s[i] & 0xC0) != 0x80) return 1;
    return n;
}

/* Score of merging tokens a and b, or -1 if the concatenation is no piece. */
static int pair_id(Tokenizer *t, int a, int b) {
    memcpy(t->merge_buf, t->pieces[a], t->lens[a]);
    memcpy(t->merge_buf + t->lens[a], t->pieces[b], t->lens[b]);
    return lookup(t, t->merge_buf, t->lens[a] + t->lens[b]);
}

/* Encode len bytes of text into out (capacity cap >= len + 3). Returns the
 * number of ids or -1. llama2.c's algorithm: dummy-prefix space, code points
 * with byte fallback (id = byte + 3), then highest-scoring pair merges. */
static int encode(Tokenizer *t, const char *text, size_t len, int bos, int eos, int *out, size_t cap) {
    if (cap < len + 3) { set_err("encode: output capacity %zu < text length + 3", cap); return -1; }
    if (len > INT_MAX / 2) { set_err("encode: text too long"); return -1; }
    int n = 0;
    if (bos) out[n++] = BOS;
    int start = n;
    if (len > 0) {
        int sp = lookup(t, " ", 1);
        if (sp >= 0) out[n++] = sp;
    }
    const unsigned char *u = (const unsigned char *)text;
    for (size_t i = 0; i < len;) {
        int cl = utf8_len(u + i, len - i);
        /* U+2581 "▁" is SentencePiece's space marker: SentencePiece cannot tell
         * it from a space, and tokenizer.bin stores it as one, so do the same */
        int is_marker = cl == 3 && u[i] == 0xE2 && u[i + 1] == 0x96 && u[i + 2] == 0x81;
        int id = is_marker ? lookup(t, " ", 1) : lookup(t, text + i, cl);
        if (id >= 0) out[n++] = id;
        else
            for (int k = 0; k < cl; k++) {
                if (u[i + k] + 3 >= t->vocab_size) {
                    set_err("encode: byte 0x%02x has no byte-fallback piece in a %d-piece vocabulary",
                            u[i + k], t->vocab_size);
                    return -1;
                }
                out[n++] = u[i + k] + 3;
            }
        i += cl;
    }
    /* merge: cache each adjacent pair's merged id; after a merge only the two
     * neighbouring pairs change. Leftmost wins ties, as in SentencePiece. */
    int m = n - start;
    if (m >= 2) {
        int *tok = out + start;
        int *pid = malloc((size_t)m * sizeof(int));
        if (!pid) { set_err("encode: out of memory"); return -1; }
        for (int k = 0; k + 1 < m; k++) pid[k] = pair_id(t, tok[k], tok[k + 1]);
        for (;;) {
            int best = -1;
            float bs = 0.0f;
            for (int k = 0; k + 1 < m; k++)
                if (pid[k] >= 0 && (best < 0 || t->scores[pid[k]] > bs)) { best = k; bs = t->scores[pid[k]]; }
            if (best < 0) break;
            tok[best] = pid[best];
            memmove(tok + best + 1, tok + best + 2, (size_t)(m - best - 2) * sizeof(int));
            memmove(pid + best + 1, pid + best + 2, (size_t)(m > best + 3 ? m - best - 3 : 0) * sizeof(int));
            m--;
            if (best > 0) pid[best - 1] = pair_id(t, tok[best - 1], tok[best]);
            if (best + 1 < m) pid[best] = pair_id(t, tok[best], tok[best + 1]);
        }
        free(pid);
        n = start + m;
    }
    if (eos) out[n++] = EOS;
    return n;
}

/* The bytes `token` stands for when it follows `prev` (prev < 0: start of
 * output), as text: for the library (runtime.py), which returns text and so keeps every
 * byte. After BOS and at the start a leading space is dropped, so text never begins with
 * the dummy-prefix space. BOS/EOS decode to nothing. (The CLI prints with print_token.) */
static const char *decode(const Tokenizer *t, int prev, int token, int *len, char byte_buf[2]) {
    *len = 0;
    if (token < 0 || token >= t->vocab_size || token == BOS || token == EOS) return "";
    if (t->byte_of[token] >= 0) {
        byte_buf[0] = (char)t->byte_of[token];
        byte_buf[1] = 0;
        *len = 1;
        return byte_buf;
    }
    const char *p = t->pieces[token];
    *len = t->lens[token];
    if ((prev == BOS || prev < 0) && *len > 0 && p[0] == ' ') { p++; (*len)--; }
    return p;
}

/* Print `token`, which follows `prev`, as llama2.c's run.c does (its decode and safe_printf),
 * so that the output is byte for byte llama2.c's: the piece as a C string, without its
 * leading space right after BOS; a piece that sscanf reads as "<0x%02hhX>" stands for that
 * one byte; a piece of one byte is printed only if it is printable or whitespace in the C
 * locale, so control bytes and lone bytes >= 0x80 (UTF-8 spelt out as byte pieces) are
 * dropped. BOS and EOS print their pieces like any other token. */
static void print_token(const Tokenizer *t, int prev, int token) {
    if (token < 0 || token >= t->vocab_size) return;
    const char *piece = t->pieces[token];
    if (prev == BOS && piece[0] == ' ') piece++;
    unsigned char byte;
    char one[2] = {0, 0};
    if (sscanf(piece, "<0x%02hhX>", &byte) == 1) {
        one[0] = (char)byte;
        piece = one;
    }
    if (!piece[0]) return;
    if (!piece[1] && !isprint((unsigned char)piece[0]) && !isspace((unsigned char)piece[0])) return;
    fputs(piece, stdout);
}

/* ------------------------------------------------------------------ sampler */

/* llama2.c's sampler, draw for draw: the same xorshift stream from the same seed, the same
 * probabilities (at -O3, bit for bit), and the same walks over them, so the same flags give
 * the same tokens. Only the way to top-p's candidates differs: a selection instead of a sort
 * of the whole vocabulary. */

typedef struct {
    int vocab_size;
    float temperature, topp;
    uint64_t rng;     /* the xorshift state; it starts as the seed itself, as in llama2.c */
    float *tmp;       /* vocab_size floats: topp_threshold's scratch */
    float *cand;      /* 2 * vocab_size: top-p's candidates, and the sort's second buffer */
} Sampler;

/* The sampler's settings, the same rules for the CLI and the library, judged on the bits
 * (-Ofast assumes no NaN or infinity and flushes subnormals to zero, so float comparisons
 * would not hold): the temperature is 0 (greedy) or a normal number that keeps logits /
 * temperature in range; top-p is 0 or 1 (off), or a fraction not too small to mean anything. */
#define TEMPERATURE_RULE "temperature must be 0 (greedy) or between 1e-6 and 1e6"
#define TOPP_RULE "top-p must be 0 or 1 (off), or between 1e-6 and 1"
static int temperature_ok(float t) {
    const uint32_t u = f2u(t); /* a positive float's bits order as its values do */
    return u << 1 == 0 || (u >= f2u(1e-6f) && u <= f2u(1e6f));
}
static int topp_ok(float p) {
    const uint32_t u = f2u(p);
    return u << 1 == 0 || (u >= f2u(1e-6f) && u <= f2u(1.0f));
}

static uint32_t rng_u32(uint64_t *s) { /* xorshift64*; a state of 0 would stay 0 */
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    return (uint32_t)((*s * 0x2545F4914F6CDD1Dull) >> 32);
}
static float rng_f32(uint64_t *s) { return (rng_u32(s) >> 8) / 16777216.0f; } /* [0, 1) */

static void free_sampler(Sampler *sp) {
    free(sp->tmp);
    free(sp->cand);
    sp->tmp = NULL;
    sp->cand = NULL;
}

/* -1 with a message when out of memory. */
static int init_sampler(Sampler *sp, int vocab_size, float temperature, float topp, uint64_t seed) {
    *sp = (Sampler){vocab_size, temperature, topp, seed, malloc((size_t)vocab_size * sizeof(float)),
                    malloc(2 * (size_t)vocab_size * sizeof(float))};
    if (sp->tmp && sp->cand) return 0;
    free_sampler(sp);
    set_err("out of memory");
    return -1;
}

static int argmax(const float *p, int n) {
    int best = 0;
    for (int i = 1; i < n; i++)
        if (p[i] > p[best]) best = i;
    return best;
}

/* 2^(i/32) rounded to the nearest double, less i << 47 (adding k << 47 for
 * k = 32q + i then gives 2^(k/32)) */
static const uint64_t EXP2_32[32] = {
    0x3ff0000000000000, 0x3fefd9b0d3158574, 0x3fefb5586cf9890f, 0x3fef9301d0125b51,
    0x3fef72b83c7d517b, 0x3fef54873168b9aa, 0x3fef387a6e756238, 0x3fef1e9df51fdee1,
    0x3fef06fe0a31b715, 0x3feef1a7373aa9cb, 0x3feedea64c123422, 0x3feece086061892d,
    0x3feebfdad5362a27, 0x3feeb42b569d4f82, 0x3feeab07dd485429, 0x3feea47eb03a5585,
    0x3feea09e667f3bcd, 0x3fee9f75e8ec5f74, 0x3feea11473eb0187, 0x3feea589994cce13,
    0x3feeace5422aa0db, 0x3feeb737b0cdc5e5, 0x3feec49182a3f090, 0x3feed503b23e255d,
    0x3feee89f995ad3ad, 0x3feeff76f2fb5e47, 0x3fef199bdd85529c, 0x3fef3720dcef9069,
    0x3fef5818dcfba487, 0x3fef7c97337b9b5f, 0x3fefa4afa2a490da, 0x3fefd0765b6e4540,
};

/* e^x for x <= 0 as glibc's expf computes it (llama2.c's probabilities), but in
 * code of our own so every build has the same bits: in double, x·32/ln 2 = k + r
 * with k rounded to an integer by adding 1.5·2^52; e^x = 2^(k/32) · 2^(r/32),
 * the first from EXP2_32 with k div 32 added to its exponent, the second a cubic
 * in r. Unfused: glibc fuses where the CPU has FMA, which changes one float in
 * [-104, 0] (near e^-63.1, about 4e-28). Below -104 the result is 0. */
static float exp_sampler(float x) {
    x = x < -104.0f ? -104.0f : x;
    const double xd = x, shift = 0x1.8p52, scale = 0x1.71547652b82fep+5;
    union { double d; uint64_t u; } k = {scale * xd + shift}, s; /* unions, not memcpy: vectorises */
    const double r = scale * xd - (k.d - shift);
    s.u = EXP2_32[k.u % 32] + (k.u << 47); /* k in the low bits of k.u */
    const double z = r * 0x1.c6af84b912394p-20 + 0x1.ebfce50fac4f3p-13;
    const double y = z * (r * r) + (r * 0x1.62e42ff0c52d6p-6 + 1.0);
    return (float)(y * s.d);
}

#if defined(__AVX512F__)
/* exp_sampler(x - mx) on 8 floats, the same operations lane by lane; the table from
 * registers (two 16-entry permutes) instead of a gather: 21 -> 9 us per 32,000 */
static inline __m256 exp_sampler8(__m256 x, float mx) {
    const __m512d shift = _mm512_set1_pd(0x1.8p52), scale = _mm512_set1_pd(0x1.71547652b82fep+5);
    const double *t = (const double *)EXP2_32;
    const __m512d xd = _mm512_cvtps_pd(_mm256_max_ps(_mm256_sub_ps(x, _mm256_set1_ps(mx)), _mm256_set1_ps(-104.0f)));
    const __m512d kd = _mm512_add_pd(_mm512_mul_pd(scale, xd), shift);
    const __m512i k = _mm512_castpd_si512(kd);
    const __m512d r = _mm512_sub_pd(_mm512_mul_pd(scale, xd), _mm512_sub_pd(kd, shift));
    const __m512i lo = _mm512_castpd_si512(_mm512_permutex2var_pd(_mm512_loadu_pd(t), k, _mm512_loadu_pd(t + 8)));
    const __m512i hi = _mm512_castpd_si512(_mm512_permutex2var_pd(_mm512_loadu_pd(t + 16), k, _mm512_loadu_pd(t + 24)));
    const __mmask8 upper = _mm512_test_epi64_mask(k, _mm512_set1_epi64(16));
    const __m512d s = _mm512_castsi512_pd(_mm512_add_epi64(_mm512_mask_blend_epi64(upper, lo, hi), _mm512_slli_epi64(k, 47)));
    const __m512d z = _mm512_add_pd(_mm512_mul_pd(r, _mm512_set1_pd(0x1.c6af84b912394p-20)), _mm512_set1_pd(0x1.ebfce50fac4f3p-13));
    const __m512d y = _mm512_add_pd(_mm512_mul_pd(z, _mm512_mul_pd(r, r)),
                                    _mm512_add_pd(_mm512_mul_pd(r, _mm512_set1_pd(0x1.62e42ff0c52d6p-6)), _mm512_set1_pd(1.0)));
    return _mm512_cvtpd_ps(_mm512_mul_pd(y, s));
}
#endif

/* softmax in place as llama2.c computes it: the max, e^(x - max), then each divided by
 * the sum. The sum goes in sum16's order, as llama2.c's -Ofast builds vectorise it (its
 * -O3 build adds in id order, 10x slower over 32,000 ids: the last bits can differ). */
static void sampler_softmax(float *x, int n) {
    const float mx = max16(x, n);
    int i = 0;
#if defined(__AVX512F__)
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, exp_sampler8(_mm256_loadu_ps(x + i), mx));
#endif
    for (; i < n; i++) x[i] = exp_sampler(x[i] - mx);
    const float sum = sum16(x, n);
    for (int i = 0; i < n; i++) x[i] /= sum;
}

/* llama2.c's sample_mult: the first index where the running sum of p passes coin. Float
 * additions round, so the order of the sum is part of the answer: one by one, in index
 * order (the compiler cannot reorder a sum that is tested at every step). */
static int sample_mult(const float *p, int n, float coin) {
    float cdf = 0.0f;
    for (int i = 0; i < n; i++) {
        cdf += p[i];
        if (coin < cdf) return i;
    }
    return n - 1; /* rounding left the whole sum at or below coin */
}

#ifdef HAVE_AVX2
/* keep_lanes[m]: the lanes whose bits are set in m, in order, as the vpermps
 * indices that pack them to the front (for compact); filled at load time. */
static uint8_t keep_lanes[256][8];
__attribute__((constructor)) static void init_keep_lanes(void) {
    for (int m = 0; m < 256; m++)
        for (int l = 0, k = 0; l < 8; l++)
            if (m >> l & 1) keep_lanes[m][k++] = (uint8_t)l;
}
#endif

/* Keep the values of src[0..n) that are > pivot (high) or <= pivot (!high)
 * in dst; returns how many. dst may equal src: each store lands at or before
 * the values just loaded. In vectors: the scalar loop was ~70% of top-p. */
static int compact(float *dst, const float *src, int n, float pivot, int high) {
    int k = 0, i = 0;
#if defined(__AVX512F__)
    const __m512 pv = _mm512_set1_ps(pivot);
    for (; i + 16 <= n; i += 16) {
        __m512 v = _mm512_loadu_ps(src + i);
        /* the predicate must be a compile-time constant (clang, zig cc) */
        __mmask16 m = high ? _mm512_cmp_ps_mask(v, pv, _CMP_GT_OQ) : _mm512_cmp_ps_mask(v, pv, _CMP_LE_OQ);
        _mm512_storeu_ps(dst + k, _mm512_maskz_compress_ps(m, v));
        k += __builtin_popcount(m);
    }
#elif defined(HAVE_AVX2)
    const __m256 pv = _mm256_set1_ps(pivot);
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(src + i);
        int m = _mm256_movemask_ps(high ? _mm256_cmp_ps(v, pv, _CMP_GT_OQ) : _mm256_cmp_ps(v, pv, _CMP_LE_OQ));
        __m256i lanes = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)keep_lanes[m]));
        _mm256_storeu_ps(dst + k, _mm256_permutevar8x32_ps(v, lanes));
        k += __builtin_popcount(m);
    }
#endif
    for (; i < n; i++) {
        float v = src[i];
        dst[k] = v;
        k += high ? v > pivot : v <= pivot;
    }
    return k;
}

/* Top-p without sorting the vocabulary: find the threshold th such that the
 * tokens with p >= th are the smallest set with mass >= topp. Each round
 * splits the remaining candidates at a pivot (alternately their mean, and
 * the midpoint of their float bit patterns, which bounds the rounds at ~32)
 * and keeps the side holding the boundary; the last few are sorted. */
static float topp_threshold(const float *p, int n, float topp, float *buf) {
    const float *src = p;
    float need = topp, mass = 1.0f, lo = 0.0f, hi = 1.0f;
    for (int round = 0;; round++) {
        if (n <= 32) {
            float v[32];
            memcpy(v, src, n * sizeof(float));
            for (int i = 1; i < n; i++) /* insertion sort, descending */
                for (int j = i; j > 0 && v[j] > v[j - 1]; j--) { float x = v[j]; v[j] = v[j - 1]; v[j - 1] = x; }
            for (int i = 0; i < n; i++) {
                need -= v[i];
                if (need <= 0.0f) return v[i];
            }
            return n ? v[n - 1] : 0.0f;
        }
        if (round > 0) { /* exact bounds of the current candidates */
            lo = src[0]; hi = src[0];
            for (int i = 1; i < n; i++) { lo = fminf(lo, src[i]); hi = fmaxf(hi, src[i]); }
            if (lo >= hi) return lo; /* all equal: keep them all */
        }
        float pivot = mass / n;
        if ((round & 1) || !(pivot >= lo && pivot < hi)) pivot = u2f((uint32_t)(((uint64_t)f2u(lo) + f2u(hi)) / 2));
        float mh = 0.0f;
        for (int i = 0; i < n; i++) mh += src[i] > pivot ? src[i] : 0.0f;
        if (mh >= need) { /* boundary is above the pivot */
            n = compact(buf, src, n, pivot, 1);
            mass = mh;
        } else { /* everything above is in; look below */
            need -= mh;
            n = compact(buf, src, n, pivot, 0);
            mass -= mh;
        }
        src = buf;
        if (round > 64) return src[0]; /* cannot happen; a bound, not a path */
    }
}

/* Whether any of p[i], i in [0, 16), is >= x: one vector test where there are vectors. */
static inline int any_at_least(const float *p, float x) {
#if defined(HAVE_AVX2)
    const __m256 v = _mm256_set1_ps(x);
    return _mm256_movemask_ps(_mm256_or_ps(_mm256_cmp_ps(_mm256_loadu_ps(p), v, _CMP_GE_OQ),
                                           _mm256_cmp_ps(_mm256_loadu_ps(p + 8), v, _CMP_GE_OQ)));
#else
    int any = 0;
    for (int k = 0; k < 16; k++) any |= p[k] >= x;
    return any;
#endif
}

/* The index of the t-th (from 0) of the p[i] equal to x, in index order; -1 if none. Blocks
 * of 16 with nothing as large as x are passed over: most of the vocabulary, as x is in the
 * nucleus. */
static int nth_equal(const float *p, int n, float x, int t) {
    int i = 0;
    for (; i + 16 <= n; i += 16)
        if (any_at_least(p + i, x))
            for (int k = i; k < i + 16; k++)
                if (p[k] == x && t-- == 0) return k;
    for (; i < n; i++)
        if (p[i] == x && t-- == 0) return i;
    return -1;
}

/* Sort the m probabilities in a, largest first; b has room for m more. Returns a or b,
 * whichever holds the result. A radix sort on how far each value's bits lie below the
 * largest's (a positive float's bits order as its values): at most three passes of at most
 * 11 bits, as many as that distance needs, of equal width so that no digit is left with
 * few values (runs of one digit make each count wait for the last). Insertion sort for a
 * few. Only values: which of equal probabilities came first is found afterwards. */
static float *sort_descending(float *a, float *b, int m) {
    if (m <= 32) {
        for (int i = 1; i < m; i++) {
            const float x = a[i];
            int j = i;
            for (; j > 0 && a[j - 1] < x; j--) a[j] = a[j - 1];
            a[j] = x;
        }
        return a;
    }
    uint32_t top = f2u(a[0]), bottom = top;
    for (int i = 1; i < m; i++) {
        const uint32_t u = f2u(a[i]);
        top = u > top ? u : top;
        bottom = u < bottom ? u : bottom;
    }
    if (top == bottom) return a;
    const int bits = 32 - __builtin_clz(top - bottom), passes = (bits + 10) / 11, w = (bits + passes - 1) / passes;
    const uint32_t mask = (1u << w) - 1;
    uint32_t count[3][2048] = {{0}};
    for (int i = 0; i < m; i++) {
        const uint32_t k = top - f2u(a[i]);
        count[0][k & mask]++;
        count[1][k >> w & mask]++;
        count[2][k >> 2 * w & mask]++;
    }
    for (int d = 0; d < passes; d++) {
        uint32_t *c = count[d];
        for (uint32_t v = 0, at = 0; v <= mask; v++) {
            const uint32_t here = c[v];
            c[v] = at;
            at += here;
        }
        for (int i = 0; i < m; i++) b[c[(top - f2u(a[i])) >> w * d & mask]++] = a[i];
        float *t = a;
        a = b;
        b = t;
    }
    return a;
}

/* How much wider than topp the first try's set of candidates is: room for the rounding of the
 * two ways to sum the nucleus (the selection's and llama2.c's). */
#define TOPP_MARGIN 0x1p-12f

/* llama2.c's sample_topp. It keeps the tokens with p >= (1 - topp) / (n - 1), sorts them by
 * probability (largest first; ties in index order, as its qsort, glibc's stable merge sort,
 * leaves them), sums them in that order until the sum passes topp (the nucleus ends there, or
 * at the last candidate), then picks by coin * that sum, summing in the same order again.
 * Only the nucleus's order matters, so instead of sorting every candidate: select the tokens
 * above a threshold that holds a little more than topp (topp_threshold), sort just their
 * probabilities and walk them. They are the first of llama2.c's sorted candidates, so if the
 * sum passes topp within them, the walk is llama2.c's; if not (rounding ate the margin), walk
 * all the candidates. The token picked is the k-th of those with the probability picked, for
 * the k found in the sorted list. Where no token reaches the cutoff (near-uniform p and topp
 * below 1 / n; llama2.c then reads before its array), the answer is the most likely token. */
static int sample_topp(Sampler *sp, const float *p, int n, float coin) {
    const float topp = sp->topp;
    if (n < 2) return 0;
    const float cutoff = (1.0f - topp) / (float)(n - 1);
    float lo = topp + TOPP_MARGIN < 1.0f ? topp_threshold(p, n, topp + TOPP_MARGIN, sp->tmp) : 0.0f;
    for (;;) {
        const int all = lo <= cutoff; /* then these are all of llama2.c's candidates */
        if (all) lo = cutoff;
        const int m = compact(sp->cand, p, n, u2f(f2u(lo) - 1), 1); /* p > the float below lo */
        const float *c = sort_descending(sp->cand, sp->cand + n, m);
        float cum = 0.0f;
        int last = -1;
        for (int i = 0; i < m; i++) {
            cum += c[i];
            if (cum > topp) { last = i; break; }
        }
        if (last < 0 && !all) { lo = 0.0f; continue; }
        if (m == 0) return argmax(p, n);
        if (last < 0) last = m - 1;
        const float r = coin * cum;
        float cdf = 0.0f;
        int at = last; /* rounding: the last of the nucleus */
        for (int i = 0; i < last; i++) {
            cdf += c[i];
            if (r < cdf) { at = i; break; }
        }
        int k = 0; /* how many equal probabilities come before */
        while (at - k > 0 && c[at - k - 1] == c[at]) k++;
        return nth_equal(p, n, c[at], k);
    }
}

/* A token from probabilities p (sp->vocab_size of them) and a coin in [0, 1). */
static int draw(Sampler *sp, const float *p, float coin) {
    if (sp->topp <= 0.0f || sp->topp >= 1.0f) return sample_mult(p, sp->vocab_size, coin);
    return sample_topp(sp, p, sp->vocab_size, coin);
}

/* The next token from these (finite) logits, which it overwrites; -1 with a message when
 * dividing them by the temperature overflows. */
static int sample(Sampler *sp, float *logits) {
    int n = sp->vocab_size;
    if (sp->temperature == 0.0f) return argmax(logits, n);
    for (int i = 0; i < n; i++) logits[i] /= sp->temperature;
    if (first_nonfinite(logits, n) < (uint64_t)n) {
        set_err("temperature too low: the logits divided by it are not finite (NaN or infinity)");
        return -1;
    }
    sampler_softmax(logits, n);
    return draw(sp, logits, rng_f32(&sp->rng));
}

/* ------------------------------------------------------------------ generation loop */

#define STOP_AT_BOS 1

/* The context shift, when all seq_len positions hold win's tokens: keep the
 * first `keep`, drop the older half of the rest (rounded up, so at least one
 * goes), and run the tokens after the kept ones again at their new positions.
 * (The kept tokens' keys and values stay: they see only each other.) Running
 * them again gives the bits of a fresh run over the shortened context, which
 * moving the cached keys to new angles would not. Returns the next free
 * position, or -1. */
static int shift_context(Transformer *t, int *win, int keep) {
    const int S = t->c.seq_len, drop = (S - keep + 1) / 2;
    memmove(win + keep, win + keep + drop, (size_t)(S - keep - drop) * sizeof(int));
    for (int p = keep; p < S - drop; p++)
        if (!forward(t, win[p], p)) return -1;
    return S - drop;
}

/* llama2.c's loop: feed the prompt, then sample; at most `steps` forward
 * passes (not counting shift_context's). keep 0 keeps llama2.c's limit,
 * steps <= seq_len; keep > 0 shifts the context when it is full, so steps
 * may pass seq_len. Writes the whole sequence (prompt, then generated ids)
 * into out if given (capacity steps + 1) and returns its length, or -1. If
 * tok is given, the text is streamed to stdout as it is produced. */
static int generate(Transformer *t, Tokenizer *tok, Sampler *sp, const int *prompt, int np, int steps, int keep,
                    int flags, int *out, double *tok_per_s) {
    if (np < 1) { set_err("generate: the prompt needs at least one token (BOS)"); return -1; }
    int *win = keep ? malloc((size_t)t->c.seq_len * sizeof(int)) : NULL; /* the tokens at positions 0..at-1 */
    if (keep && !win) { set_err("out of memory"); return -1; }
    int token = prompt[0], pos = 0, n = 1, at = 0; /* pos: forward passes done; at: the next position */
    if (out) out[0] = token;
    double start = 0.0;
    while (pos < steps) {
        if (keep && at == t->c.seq_len && (at = shift_context(t, win, keep)) < 0) break;
        float *logits = forward(t, token, at);
        if (!logits) { at = -1; break; }
        if (win) win[at] = token;
        at++;
        int next = pos + 1 < np ? prompt[pos + 1] : sample(sp, logits);
        if (next < 0) { at = -1; break; }
        pos++;
        if (next == BOS && pos >= np && (flags & STOP_AT_BOS)) break;
        if (tok) {
            print_token(tok, token, next);
            fflush(stdout);
        }
        if (out) out[n] = next;
        n++;
        token = next;
        if (pos == 1) start = now_s(); /* time from the second token, as llama2.c */
    }
    free(win);
    if (at < 0) return -1;
    if (tok_per_s) *tok_per_s = pos > 1 ? (pos - 1) / (now_s() - start) : 0.0;
    return n;
}

/* ------------------------------------------------------------------ library API (runtime.py) */

const char *rt_last_error(void) { return err_msg; }

Transformer *rt_open(const char *path) { return open_model(path); }
void rt_close(Transformer *t) { close_model(t); }

/* dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len, version, shared, group_size */
void rt_info(const Transformer *t, int *out) {
    memcpy(out, &t->c, 7 * sizeof(int));
    out[7] = t->version; out[8] = t->shared; out[9] = t->gs;
}

float *rt_forward(Transformer *t, int token, int pos) { return forward(t, token, pos); }

/* The library's seed is the xorshift state, as the CLI's -s, except 0: llama2.c reads it as
 * "use the clock", which would make the library's ids change from run to run, and as a state
 * it would give coin 0 for ever; here it is this fixed state. */
#define SEED_ZERO_STATE 0x9E3779B97F4A7C15ull

int rt_generate(Transformer *t, const int *prompt, int np, int steps, int keep, float temperature, float topp,
                unsigned long long seed, int flags, int *out) {
    if (keep < 0 || keep >= t->c.seq_len) { set_err("keep %d out of range 0..%d", keep, t->c.seq_len - 1); return -1; }
    const int most = keep ? INT_MAX - 1 : t->c.seq_len;
    if (steps < 1 || steps > most) { set_err("steps %d out of range 1..%d", steps, most); return -1; }
    if (!temperature_ok(temperature)) { set_err(TEMPERATURE_RULE ", got %g", temperature); return -1; }
    if (!topp_ok(topp)) { set_err(TOPP_RULE ", got %g", topp); return -1; }
    for (int i = 0; i < np; i++)
        if (prompt[i] < 0 || prompt[i] >= t->c.vocab_size) { set_err("prompt id %d out of range", prompt[i]); return -1; }
    Sampler sp;
    if (init_sampler(&sp, t->c.vocab_size, temperature, topp, seed ? seed : SEED_ZERO_STATE) < 0) return -1;
    int n = generate(t, NULL, &sp, prompt, np, steps, keep, flags, out, NULL);
    free_sampler(&sp);
    return n;
}

/* The KV cache's fp16 conversions over arrays (for tests) */
void rt_to_f16(const float *x, uint16_t *out, long n) { for (long i = 0; i < n; i++) out[i] = to_f16(x[i]); }
void rt_from_f16(const uint16_t *h, float *out, long n) { for (long i = 0; i < n; i++) out[i] = from_f16(h[i]); }

/* The token the sampler draws from probabilities p with this coin in [0, 1) (for tests):
 * llama2.c's sample_mult when topp is 0 or 1, else its sample_topp; -1 when out of memory. */
int rt_sample_probs(const float *p, int n, float topp, float coin) {
    Sampler sp;
    if (n < 1 || init_sampler(&sp, n, 1.0f, topp, 1) < 0) return -1;
    int token = draw(&sp, p, coin);
    free_sampler(&sp);
    return token;
}

/* The top-p threshold for probabilities p (for tests): the nucleus is p >= it. */
float rt_topp_threshold(const float *p, int n, float topp) {
    float *buf = malloc((size_t)(n > 0 ? n : 1) * sizeof(float));
    if (!buf) return -1.0f;
    float th = topp_threshold(p, n, topp, buf);
    free(buf);
    return th;
}

Tokenizer *rt_tokenizer_open(const char *path, int vocab_size) { return open_tokenizer(path, vocab_size); }
void rt_tokenizer_close(Tokenizer *t) { free_tokenizer(t); }
int rt_encode(Tokenizer *t, const char *text, long len, int bos, int eos, int *out, long cap) {
    if (len < 0 || cap < 0) { set_err("encode: negative length"); return -1; }
    return encode(t, text, (size_t)len, bos, eos, out, (size_t)cap);
}

/* Decode ids into buf (no NUL added); returns the full length, which may
 * exceed cap (then only cap bytes were written: call again, bigger). */
long rt_decode(Tokenizer *t, const int *ids, int n, char *buf, long cap) {
    long total = 0;
    char bb[2];
    for (int i = 0; i < n; i++) {
        int len;
        const char *p = decode(t, i ? ids[i - 1] : -1, ids[i], &len, bb);
        for (int k = 0; k < len; k++, total++)
            if (total < cap) buf[total] = p[k];
    }
    return total;
}

/* ------------------------------------------------------------------ CLI */
#ifndef RUN_LIBRARY

static void usage(FILE *f) {
    fprintf(f,
            "Usage:   run <checkpoint> [options]\n"
            "Example: run model.bin -n 256 -i \"Once upon a time\"\n"
            "Options:\n"
            "  -t <float>  temperature, 0 (greedy) or 1e-6..1e6, default 1.0\n"
            "  -p <float>  top-p (nucleus), 0 or 1 (off) or 1e-6..1, default 0.9\n"
            "  -s <int>    random seed, default time(NULL), 0 = time(NULL)\n"
            "  -n <int>    number of steps to run, default 256, 0 = seq_len\n"
            "  -k <int>    past seq_len: keep the first k tokens, drop the older half of\n"
            "              the rest and go on (1..seq_len-1; -n may then pass seq_len),\n"
            "              default 0 = stop at seq_len\n"
            "  -i <string> input prompt\n"
            "  -z <string> tokenizer path, default tokenizer.bin\n"
            "  -m <string> mode: generate|chat, default generate\n"
            "  -y <string> (optional) system prompt in chat mode\n");
}

/* -Ofast links start-up code that flushes subnormal floats to zero; turn that
 * off (OpenMP's threads, started later, inherit it) so these builds compute
 * what every other build does. */
static void keep_subnormals(void) {
#if defined(__x86_64__)
    _mm_setcsr(_mm_getcsr() & ~0x8040u); /* FTZ and DAZ */
#elif defined(__aarch64__)
    uint64_t fpcr;
    __asm__ volatile("mrs %0, fpcr" : "=r"(fpcr));
    __asm__ volatile("msr fpcr, %0" : : "r"(fpcr & ~(1ull << 24))); /* FZ */
#endif
}

static void die(const char *msg) {
    fprintf(stderr, "run: %s\n", msg);
    exit(1);
}

static int is_digit(char c) { return c >= '0' && c <= '9'; }

/* A number flag's text: decimal only, [+-]digits[.digits][(e|E)[+-]digits] with a digit
 * before the exponent (no hex, inf, nan, spaces or digit separators: text every build reads
 * alike), as the float it rounds to. Past float's range it is an infinity; a number that is
 * not 0 but rounds to 0 is the smallest subnormal, so that the rules refuse it as too small. */
static float parse_float(const char *flag, const char *v) {
    const char *p = v;
    int digits = 0, nonzero = 0;
    if (*p == '+' || *p == '-') p++;
    for (; is_digit(*p); p++, digits++) nonzero |= *p != '0';
    if (*p == '.')
        for (p++; is_digit(*p); p++, digits++) nonzero |= *p != '0';
    if (digits && (*p == 'e' || *p == 'E')) {
        p += p[1] == '+' || p[1] == '-' ? 2 : 1;
        if (!is_digit(*p)) digits = 0;
        while (is_digit(*p)) p++;
    }
    if (!digits || *p) {
        set_err("%s: expected a number, got '%s'", flag, v);
        die(err_msg);
    }
    const double d = strtod(v, NULL); /* correctly rounded, as Zig's parseFloat */
    const uint32_t sign = (uint32_t)(d2u(d) >> 63) << 31;
    if ((d2u(d) << 1 >> 1) > d2u(FLT_MAX)) return u2f(sign | 0x7f800000u);
    const float f = (float)d;
    return nonzero && f2u(f) << 1 == 0 ? u2f(sign | 1) : f;
}

/* An integer flag's text, [+-]digits, as its sign and magnitude: 0 when it is not that,
 * 1, or 2 when the magnitude passes 2^64 - 1 (it is then 2^64 - 1). */
static int parse_integer(const char *v, int *negative, uint64_t *magnitude) {
    *negative = *v == '-';
    if (*v == '+' || *v == '-') v++;
    uint64_t m = 0;
    int r = 1;
    if (!*v) return 0;
    for (; *v; v++) {
        if (!is_digit(*v)) return 0;
        const uint64_t digit = (uint64_t)(*v - '0');
        if (m > (UINT64_MAX - digit) / 10) r = 2, m = UINT64_MAX;
        else if (r == 1) m = m * 10 + digit;
    }
    *magnitude = m;
    return r;
}

/* Chat: Llama 2's [INST] template; user turns from -i then stdin. */
static void chat(Transformer *t, Tokenizer *tok, Sampler *sp, const char *user0, const char *system, int steps) {
    /* room for the template around the system prompt and the longest user turn, whole */
    const size_t cap = (system ? strlen(system) : 0) + (user0 ? strlen(user0) : 0) + 8192 + 64;
    char *user = malloc(cap), *rendered = malloc(cap);
    int *ids = malloc((cap + 3) * sizeof(int));
    if (!user || !rendered || !ids) die("out of memory");
    int pos = 0, user_turn = 1, next = 0, token = 0, np = 0, idx = 0, first = 1;
    while (pos < steps) {
        if (user_turn) {
            if (first && user0) snprintf(user, cap, "%s", user0);
            else {
                printf("User: ");
                fflush(stdout);
                if (!fgets(user, 8192, stdin)) break;
                user[strcspn(user, "\n")] = 0;
            }
            if (first && system && system[0])
                snprintf(rendered, cap, "[INST] <<SYS>>\n%s\n<</SYS>>\n\n%s [/INST]", system, user);
            else
                snprintf(rendered, cap, "[INST] %s [/INST]", user);
            first = 0;
            np = encode(tok, rendered, strlen(rendered), 1, 0, ids, cap + 3);
            if (np < 0) die(err_msg);
            if (pos + np > t->c.seq_len) {
                set_err("chat: prompt of %d tokens does not fit in the %d positions left of seq_len %d", np,
                        t->c.seq_len - pos, t->c.seq_len);
                die(err_msg);
            }
            idx = 0;
            user_turn = 0;
            printf("Assistant: ");
        }
        if (idx < np) token = ids[idx++];
        else token = next;
        if (idx >= np && token == EOS) { user_turn = 1; printf("\n"); }
        float *logits = forward(t, token, pos);
        if (!logits) die(err_msg);
        next = sample(sp, logits);
        if (next < 0) die(err_msg);
        pos++;
        if (idx >= np && next != EOS) {
            print_token(tok, token, next);
            fflush(stdout);
        }
        if (next == EOS) { user_turn = 1; printf("\n"); }
    }
    printf("\n");
    free(user);
    free(rendered);
    free(ids);
}

int main(int argc, char **argv) {
    const char *model_path = NULL, *tok_path = "tokenizer.bin", *prompt = NULL, *mode = "generate", *system = NULL;
    const char *steps_text = NULL, *keep_text = NULL; /* -n and -k as given */
    float temperature = 1.0f, topp = 0.9f;
    unsigned long long seed = 0;
    int negative, steps_negative = 0;
    uint64_t magnitude, steps = 256;
    keep_subnormals();
    if (argc < 2) { usage(stderr); return 1; }
    if (!strcmp(argv[1], "-h") || !strcmp(argv[1], "--help")) { usage(stdout); return 0; }
    if (argv[1][0] == '-') {
        set_err("expected the model path first, got flag '%s' (see run -h)", argv[1]);
        die(err_msg);
    }
    model_path = argv[1];
    for (int i = 2; i < argc; i += 2) {
        const char *f = argv[i];
        if (!strcmp(f, "-h")) { usage(stdout); return 0; }
        if (f[0] != '-' || strlen(f) != 2 || !strchr("tpsnkizmy", f[1])) {
            set_err("unknown flag '%s' (see run -h)", f);
            die(err_msg);
        }
        if (i + 1 >= argc) { set_err("flag %s needs a value (see run -h)", f); die(err_msg); }
        const char *v = argv[i + 1];
        switch (f[1]) {
        case 't':
            temperature = parse_float(f, v);
            if (!temperature_ok(temperature)) { set_err("-t: " TEMPERATURE_RULE ", got '%s'", v); die(err_msg); }
            break;
        case 'p':
            topp = parse_float(f, v);
            if (!topp_ok(topp)) { set_err("-p: " TOPP_RULE ", got '%s'", v); die(err_msg); }
            break;
        case 's':
            if (parse_integer(v, &negative, &magnitude) != 1 || (negative && magnitude)) {
                set_err("-s: seed must be an integer in 0..%llu, got '%s'", (unsigned long long)UINT64_MAX, v);
                die(err_msg);
            }
            seed = magnitude;
            break;
        case 'n': /* any integer: outside 0..seq_len means seq_len, with a note */
            if (!parse_integer(v, &steps_negative, &steps)) {
                set_err("-n: expected an integer, got '%s'", v);
                die(err_msg);
            }
            steps_text = v;
            break;
        case 'k': keep_text = v; break; /* checked against seq_len below */
        case 'i': prompt = v; break;
        case 'z': tok_path = v; break;
        case 'm': mode = v; break;
        case 'y': system = v; break;
        }
    }
    if (strcmp(mode, "generate") && strcmp(mode, "chat")) {
        set_err("-m: unknown mode '%s' (generate or chat)", mode);
        die(err_msg);
    }
    if (!seed) seed = (unsigned int)time(NULL); /* as llama2.c: no -s, or -s 0, is the clock */

    Transformer *t = open_model(model_path);
    if (!t) die(err_msg);
    const int S = t->c.seq_len;
    int keep = 0;
    if (keep_text) {
        if (parse_integer(keep_text, &negative, &magnitude) != 1 || (negative && magnitude) || magnitude >= (uint64_t)S) {
            set_err("-k: expected an integer in 0..%d (seq_len - 1), got '%s'", S - 1, keep_text);
            die(err_msg);
        }
        keep = (int)magnitude;
        if (keep && !strcmp(mode, "chat")) die("-k: the context shift is for -m generate only");
    }
    const int most = keep ? INT_MAX - 1 : S; /* with -k, -n may pass seq_len */
    if (steps_text && ((steps_negative && steps) || steps > (uint64_t)most)) {
        fprintf(stderr, "run: note: -n %s is outside 0..%d, using seq_len %d\n", steps_text, most, S);
        steps = S;
    } else if (steps == 0 || steps > (uint64_t)most) steps = S;
    Tokenizer *tok = open_tokenizer(tok_path, t->c.vocab_size);
    if (!tok) die(err_msg);
    Sampler sp;
    if (init_sampler(&sp, t->c.vocab_size, temperature, topp, seed) < 0) die(err_msg);

    if (!strcmp(mode, "generate")) {
        const char *text = prompt ? prompt : "";
        size_t len = strlen(text);
        int *ids = malloc((len + 3) * sizeof(int));
        if (!ids) die("out of memory");
        int np = encode(tok, text, len, 1, 0, ids, len + 3);
        if (np < 0) die(err_msg);
        if (np > S) {
            set_err("-i: prompt encodes to %d tokens, more than seq_len %d", np, S);
            die(err_msg);
        }
        double tps = 0.0;
        if (generate(t, tok, &sp, ids, np, (int)steps, keep, STOP_AT_BOS, NULL, &tps) < 0) die(err_msg);
        printf("\n");
        fflush(stdout);
        if (tps > 0.0) fprintf(stderr, "achieved tok/s: %f\n", tps); /* 0: under two tokens timed, as llama2.c */
        free(ids);
    } else {
        chat(t, tok, &sp, prompt, system, (int)steps);
    }
    free_sampler(&sp);
    free_tokenizer(tok);
    close_model(t);
    return 0;
}
#endif /* RUN_LIBRARY */
