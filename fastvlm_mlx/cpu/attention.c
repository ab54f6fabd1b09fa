/* softmax(q k^T * scale) v in float32, a block of query rows at a time: the vision tower's attention stages
 * and the decoder's prefill.
 *
 * MLX computes attention on the CPU as separate passes over the whole (heads, L, S) score array, most of
 * them single-threaded: with 1024 positions and 24 heads (the tower's stage 3) that array is 100 MB and
 * each pass goes through memory.  Here each pool thread takes a block of query rows of one head, gets its
 * scores with one sgemm call into a buffer that stays in the core's cache, applies the softmax in place
 * (a vectorized exponential) and multiplies by v with a second sgemm call.  The sgemm is the process's
 * BLAS (blas.py), passed in by the caller, which runs it single-threaded: the threads here are the
 * parallelism.
 *
 * q is (H, R, D) with R = group * L: each of the H k/v heads serves `group` consecutive query heads of L
 * rows each (grouped-query attention); k and v are (H, S, D); out is like q.  With `causal`, query row i
 * (of L) sees keys 0 .. i + S - L, as mx.fast's "causal" mask.
 */
#include <stdlib.h>
#include <string.h>

#include "native.h"

static inline v16 vmax(v16 a, v16 b) {
    i16 a_wins = a > b;
    return (v16)((a_wins & (i16)a) | (~a_wins & (i16)b));
}

/* exp(y) for y <= 0 (the same method as kernels.exp_nonpositive): y clamped at -64, whose exponential
 * 1.6e-28 vanishes beside a row sum of at least 1 and keeps the next matmul clear of subnormal floats;
 * n = round(y / ln 2), f = y - n ln 2 in two exact parts, a degree-6 fit of exp(f), times 2^n. */
static inline v16 exp_nonpositive(v16 y) {
    y = vmax(y, splat(-64.0f));
    v16 n = (y * 1.4426950408889634f + 12582912.0f) - 12582912.0f;
    v16 f = (y - n * 0.693359375f) - n * -2.12194440e-4f;
    v16 p = splat(0.001382942431378f);
    p = p * f + 0.008374774507024f;
    p = p * f + 0.04166835815592f;
    p = p * f + 0.1666642079678f;
    p = p * f + 0.4999999149164f;
    p = p * f + 1.000000036134f;
    p = p * f + 1.000000000592f;
    i16 bits = (__builtin_convertvector(n, i16) + 127) << 23;
    return p * (v16)bits;
}

/* row[0 .. n) becomes exp(row - max row), row[n .. width) zero; returns 1 / the sum of the exponentials. */
static float softmax_numerators(float *row, int n, int width) {
    v16 top = splat(-3.0e38f);
    int j = 0;
    for (; j + LANES <= n; j += LANES) top = vmax(top, load16(row + j));
    float m = -3.0e38f;
    for (int l = 0; l < LANES; l++) m = top[l] > m ? top[l] : m;
    for (; j < n; j++) m = row[j] > m ? row[j] : m;
    v16 sums = {0};
    for (j = 0; j + LANES <= n; j += LANES) {
        v16 e = exp_nonpositive(load16(row + j) - m);
        store16(row + j, e);
        sums += e;
    }
    float sum = 0;
    if (j < n) { /* the tail through one padded vector; only its first n - j lanes are kept */
        float tail[LANES];
        for (int l = 0; l < LANES; l++) tail[l] = j + l < n ? row[j + l] : m;
        v16 e = exp_nonpositive(load16(tail) - m);
        for (int l = 0; j + l < n; l++) row[j + l] = e[l], sum += e[l];
    }
    for (int l = 0; l < LANES; l++) sum += sums[l];
    memset(row + n, 0, sizeof(float) * (size_t)(width - n));
    return 1.0f / sum;
}

struct attention_job {
    sgemm_fn sgemm;
    const float *q, *k, *v;
    float *out;
    int heads, rows, length, keys, dim, causal, block;
    float scale;
};

static void run_blocks(void *arg, int part, int parts) {
    const struct attention_job *j = arg;
    int blocks = (j->rows + j->block - 1) / j->block;
    float *scores = malloc(sizeof(float) * ((size_t)j->block * j->keys + j->block));
    if (!scores) abort(); /* a few hundred kB; without them there is no sane way on */
    float *inverse = scores + (size_t)j->block * j->keys;
    for (int item = part; item < j->heads * blocks; item += parts) {
        int h = item / blocks, r0 = (item % blocks) * j->block;
        int n = j->rows - r0 < j->block ? j->rows - r0 : j->block;
        int width = j->keys; /* keys any row of the block sees: the rest of the products are not needed */
        if (j->causal) {
            width = 0;
            for (int r = 0; r < n; r++) {
                int seen = (r0 + r) % j->length + j->keys - j->length + 1;
                width = seen > width ? seen : width;
            }
            width = width < j->keys ? width : j->keys;
        }
        const float *q = j->q + ((size_t)h * j->rows + r0) * j->dim;
        const float *k = j->k + (size_t)h * j->keys * j->dim, *v = j->v + (size_t)h * j->keys * j->dim;
        float *out = j->out + ((size_t)h * j->rows + r0) * j->dim;
        j->sgemm(ROW_MAJOR, NO_TRANS, TRANS, n, width, j->dim, j->scale, q, j->dim, k, j->dim, 0.0f, scores, width);
        for (int r = 0; r < n; r++) {
            int seen = j->causal ? (r0 + r) % j->length + j->keys - j->length + 1 : width;
            inverse[r] = softmax_numerators(scores + (size_t)r * width, seen < width ? seen : width, width);
        }
        j->sgemm(ROW_MAJOR, NO_TRANS, NO_TRANS, n, j->dim, width, 1.0f, scores, width, v, j->dim, 0.0f, out, j->dim);
        for (int r = 0; r < n; r++)
            for (int d = 0; d < j->dim; d++) out[(size_t)r * j->dim + d] *= inverse[r];
    }
    free(scores);
}

/* See the top of this file; `threads` pool threads each call `sgemm`, which must then run single-threaded. */
void attention_f32(void *sgemm, const float *q, const float *k, const float *v, float *out, int heads, int rows,
                   int length, int keys, int dim, float scale, int causal, int threads) {
    int block = (1 << 16) / (keys > 0 ? keys : 1); /* a block's scores: 256 kB, within a core's L2 */
    block = block < 16 ? 16 : block > 256 ? 256 : block;
    struct attention_job j = {(sgemm_fn)sgemm, q, k, v, out, heads, rows, length, keys, dim, causal, block, scale};
    pool_run(run_blocks, &j, threads);
}
