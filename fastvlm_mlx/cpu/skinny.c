/* y = x w^T for a few rows of x: the decoder's matmuls while it decodes (one row per sequence).
 *
 * x is (M, K), w is (N, K) (an nn.Linear weight), y is (M, N); float32 (w may be bfloat16, widened exactly as
 * it is read: half the bytes to stream), row-major, contiguous.
 * With M <= 8 the product is bound by reading w once from memory, and BLAS sgemm packs w for a big
 * GEMM and streams it slower (benchmarks/RESULTS.md).  Here each tile of RB consecutive rows of w is read once
 * and multiplied with up to 8 rows of x held in L1: every w vector load feeds MB multiply-adds and
 * every x load RB of them, with MB * RB independent accumulators to cover the FMA latency.  The rows
 * of w are split between the caller and the worker threads of pool.c.  Built by native.py with the machine's C
 * compiler (-O3 -march=native); the vector type is GCC/Clang's portable one, so it compiles to AVX2, AVX-512 or NEON.
 */
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "native.h"

typedef float v8 __attribute__((vector_size(32)));
typedef unsigned int u32x8 __attribute__((vector_size(32)));

static inline v8 load8(const float *p) {
    v8 v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* A bfloat16 is the top half of a float32, so widening it is exact. */
static inline float widen_bf16(unsigned short h) {
    unsigned int bits = (unsigned int)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
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
            for (int r = 0; r < RB; r++) {                                                      \
                wv[r] = load8(w + (size_t)r * K + k);                                           \
                if ((k & 15) == 0) /* the next tile's rows, a line ahead, into L2 (as below) */ \
                    __builtin_prefetch(w + (size_t)(r + RB) * K + k, 0, 2);                     \
            }                                                                                   \
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

/* The widths that timed best (python -m benchmarks.decode_matmul): 8 rows of x take 3 rows of w (24 accumulators). */
TILE(8, 3) TILE(4, 4) TILE(2, 4) TILE(1, 8)
TILE(8, 1) TILE(4, 1) TILE(2, 1) TILE(1, 1)

/* The same for w stored as bfloat16, 16 weights (8 32-bit words) at a time: the low half of each word widens
 * with a shift (the even-indexed weights), the high half with a mask (the odd ones).  So x's even and odd elements
 * come apart: each row of x as [x0 x2 .. | x1 x3 .. | the tail beyond the last multiple of 16] (split_pairs). */
#define TILE_BF16(MB, RB)                                                                                \
    static void tile_bf16_##MB##_##RB(const float *x, const unsigned short *w, float *y, int N, int K) { \
        int k16 = K / 16 * 16, half = k16 / 2;                                                            \
        v8 acc[MB][RB];                                                                                   \
        for (int i = 0; i < MB; i++)                                                                      \
            for (int r = 0; r < RB; r++) acc[i][r] = (v8){0};                                             \
        for (int k = 0; k < k16; k += 16) {                                                               \
            v8 even[RB], odd[RB];                                                                         \
            for (int r = 0; r < RB; r++) {                                                                \
                u32x8 bits, lo, hi;                                                                       \
                memcpy(&bits, w + (size_t)r * K + k, sizeof bits);                                        \
                if ((k & 31) == 0) /* the next tile's rows, a line ahead, into L2, before they are read */\
                    __builtin_prefetch(w + (size_t)(r + RB) * K + k, 0, 2);                               \
                lo = bits << 16;                                                                          \
                hi = bits & 0xffff0000u;                                                                  \
                memcpy(&even[r], &lo, sizeof lo);                                                         \
                memcpy(&odd[r], &hi, sizeof hi);                                                          \
            }                                                                                             \
            for (int i = 0; i < MB; i++) {                                                                \
                v8 xe = load8(x + (size_t)i * K + k / 2), xo = load8(x + (size_t)i * K + half + k / 2);   \
                for (int r = 0; r < RB; r++) { /* two FMAs (one sum of two products: a mul, an FMA, an add) */ \
                    acc[i][r] += xe * even[r];                                                            \
                    acc[i][r] += xo * odd[r];                                                             \
                }                                                                                         \
            }                                                                                             \
        }                                                                                                 \
        for (int i = 0; i < MB; i++)                                                                      \
            for (int r = 0; r < RB; r++) {                                                                \
                float s = hsum(acc[i][r]);                                                                \
                for (int t = k16; t < K; t++) s += x[(size_t)i * K + t] * widen_bf16(w[(size_t)r * K + t]); \
                y[(size_t)i * N + r] = s;                                                                 \
            }                                                                                             \
    }

TILE_BF16(8, 3) TILE_BF16(4, 4) TILE_BF16(2, 4) TILE_BF16(1, 8)
TILE_BF16(8, 1) TILE_BF16(4, 1) TILE_BF16(2, 1) TILE_BF16(1, 1)

typedef void (*tile_fn)(const float *, const float *, float *, int, int);
typedef void (*tile_bf16_fn)(const float *, const unsigned short *, float *, int, int);

/* Rows n0..n1 of w (float32, or bfloat16 where bf16 is set) against all of x, in blocks of 8, 4, 2 and 1 rows of x. */
static void part(const float *x, const void *w, int bf16, float *y, int M, int N, int K, int n0, int n1) {
    static const tile_fn wide[] = {tile_1_8, tile_2_4, tile_4_4, tile_8_3}, narrow[] = {tile_1_1, tile_2_1, tile_4_1, tile_8_1};
    static const tile_bf16_fn wide_bf16[] = {tile_bf16_1_8, tile_bf16_2_4, tile_bf16_4_4, tile_bf16_8_3},
                              narrow_bf16[] = {tile_bf16_1_1, tile_bf16_2_1, tile_bf16_4_1, tile_bf16_8_1};
    for (int m = 0; m < M;) {
        int mb = M - m >= 8 ? 8 : M - m >= 4 ? 4 : M - m >= 2 ? 2 : 1;
        int which = mb == 8 ? 3 : mb == 4 ? 2 : mb == 2 ? 1 : 0;
        int width = mb == 8 ? 3 : mb == 1 ? 8 : 4;
        const float *xm = x + (size_t)m * K;
        float *ym = y + (size_t)m * N;
        int n = n0;
        if (bf16) {
            const unsigned short *wb = w;
            for (; n + width <= n1; n += width) wide_bf16[which](xm, wb + (size_t)n * K, ym + n, N, K);
            for (; n < n1; n++) narrow_bf16[which](xm, wb + (size_t)n * K, ym + n, N, K);
        } else {
            const float *wf = w;
            for (; n + width <= n1; n += width) wide[which](xm, wf + (size_t)n * K, ym + n, N, K);
            for (; n < n1; n++) narrow[which](xm, wf + (size_t)n * K, ym + n, N, K);
        }
        m += mb;
    }
}

struct job {
    const float *x;
    const void *w;
    int bf16;
    float *y;
    int M, N, K;
};

/* Part t of `parts` takes one slice of the rows of w, a multiple of 8 rows long. */
static void run_part(void *arg, int t, int parts) {
    const struct job *j = arg;
    int per = ((j->N + parts - 1) / parts + 7) / 8 * 8;
    int n0 = t * per < j->N ? t * per : j->N;
    int n1 = n0 + per < j->N ? n0 + per : j->N;
    if (n1 > n0) part(j->x, j->w, j->bf16, j->y, j->M, j->N, j->K, n0, n1);
}

/* y = x w^T on up to `threads` threads (the caller's included). */
void skinny_matmul(const float *x, const float *w, float *y, int M, int N, int K, int threads) {
    struct job j = {x, w, 0, y, M, N, K};
    pool_run(run_part, &j, threads);
}

/* Each of the M rows of x (length K) as the bfloat16 tiles take it. */
static void split_pairs(const float *x, float *out, int M, int K) {
    int k16 = K / 16 * 16, half = k16 / 2;
    for (int i = 0; i < M; i++) {
        const float *row = x + (size_t)i * K;
        float *o = out + (size_t)i * K;
        for (int j = 0; j < half; j++) {
            o[j] = row[2 * j];
            o[half + j] = row[2 * j + 1];
        }
        for (int t = k16; t < K; t++) o[t] = row[t];
    }
}

/* The same with w stored as bfloat16 (its raw 16-bit patterns).  Returns 0, or -1 (y untouched) when the few
 * hundred KB for x's split rows cannot be allocated. */
int skinny_matmul_bf16(const float *x, const unsigned short *w, float *y, int M, int N, int K, int threads) {
    float *pairs = malloc((size_t)M * K * sizeof(float));
    if (!pairs) return -1;
    split_pairs(x, pairs, M, K);
    struct job j = {pairs, w, 1, y, M, N, K};
    pool_run(run_part, &j, threads);
    free(pairs);
    return 0;
}
