/* y = x w^T for a few rows of x: the decoder's matmuls while it decodes (one row per sequence).
 *
 * x is (M, K), w is (N, K) (an nn.Linear weight), y is (M, N); all float32, row-major, contiguous.
 * With M <= 8 the product is bound by reading w once from memory, and BLAS sgemm packs w for a big
 * GEMM and streams it slower (benchmarks/RESULTS.md, session 6).  Here each tile of RB consecutive rows of w is read once
 * and multiplied with up to 8 rows of x held in L1: every w vector load feeds MB multiply-adds and
 * every x load RB of them, with MB * RB independent accumulators to cover the FMA latency.  The rows
 * of w are split between the caller and the worker threads of pool.c.  Built by native.py with the machine's C
 * compiler (-O3 -march=native); the vector type is GCC/Clang's portable one, so it compiles to AVX2, AVX-512 or NEON.
 */
#include <stddef.h>
#include <string.h>

#include "native.h"

typedef float v8 __attribute__((vector_size(32)));

static inline v8 load8(const float *p) {
    v8 v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline float hsum(v8 v) {
    float s = 0;
    for (int j = 0; j < 8; j++) s += v[j];
    return s;
}

/* RB rows of w (w points at the first) against MB rows of x; writes y[i * N + r]. */
#define TILE(MB, RB)                                                                            \
    static void tile_##MB##_##RB(const float *x, const float *w, float *y, int N, int K) {      \
        v8 acc[MB][RB];                                                                         \
        for (int i = 0; i < MB; i++)                                                            \
            for (int r = 0; r < RB; r++) acc[i][r] = (v8){0};                                   \
        int k = 0;                                                                              \
        for (; k + 8 <= K; k += 8) {                                                            \
            v8 wv[RB];                                                                          \
            for (int r = 0; r < RB; r++) wv[r] = load8(w + (size_t)r * K + k);                  \
            for (int i = 0; i < MB; i++) {                                                      \
                v8 xv = load8(x + (size_t)i * K + k);                                           \
                for (int r = 0; r < RB; r++) acc[i][r] += xv * wv[r];                           \
            }                                                                                   \
        }                                                                                       \
        for (int i = 0; i < MB; i++)                                                            \
            for (int r = 0; r < RB; r++) {                                                      \
                float s = hsum(acc[i][r]);                                                      \
                for (int t = k; t < K; t++) s += x[(size_t)i * K + t] * w[(size_t)r * K + t];   \
                y[(size_t)i * N + r] = s;                                                       \
            }                                                                                   \
    }

/* Widths measured best on a 2-core Zen 4: 8 rows of x take 3 rows of w (24 accumulators). */
TILE(8, 3) TILE(4, 4) TILE(2, 4) TILE(1, 8)
TILE(8, 1) TILE(4, 1) TILE(2, 1) TILE(1, 1)

typedef void (*tile_fn)(const float *, const float *, float *, int, int);

/* Rows n0..n1 of w against all of x, in blocks of 8, 4, 2 and 1 rows of x. */
static void part(const float *x, const float *w, float *y, int M, int N, int K, int n0, int n1) {
    for (int m = 0; m < M;) {
        int mb = M - m >= 8 ? 8 : M - m >= 4 ? 4 : M - m >= 2 ? 2 : 1;
        int width = mb == 8 ? 3 : mb == 1 ? 8 : 4;
        tile_fn wide = mb == 8 ? tile_8_3 : mb == 4 ? tile_4_4 : mb == 2 ? tile_2_4 : tile_1_8;
        tile_fn narrow = mb == 8 ? tile_8_1 : mb == 4 ? tile_4_1 : mb == 2 ? tile_2_1 : tile_1_1;
        const float *xm = x + (size_t)m * K;
        float *ym = y + (size_t)m * N;
        int n = n0;
        for (; n + width <= n1; n += width) wide(xm, w + (size_t)n * K, ym + n, N, K);
        for (; n < n1; n++) narrow(xm, w + (size_t)n * K, ym + n, N, K);
        m += mb;
    }
}

struct job {
    const float *x, *w;
    float *y;
    int M, N, K;
};

/* Part t of `parts` takes one slice of the rows of w, a multiple of 8 rows long. */
static void run_part(void *arg, int t, int parts) {
    const struct job *j = arg;
    int per = ((j->N + parts - 1) / parts + 7) / 8 * 8;
    int n0 = t * per < j->N ? t * per : j->N;
    int n1 = n0 + per < j->N ? n0 + per : j->N;
    if (n1 > n0) part(j->x, j->w, j->y, j->M, j->N, j->K, n0, n1);
}

/* y = x w^T on up to `threads` threads (the caller's included). */
void skinny_matmul(const float *x, const float *w, float *y, int M, int N, int K, int threads) {
    struct job j = {x, w, y, M, N, K};
    pool_run(run_part, &j, threads);
}
