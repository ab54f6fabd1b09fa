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
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "native.h"

static inline v16 vmax(v16 a, v16 b) {
    i16 a_wins = a > b;
    return (v16)((a_wins & (i16)a) | (~a_wins & (i16)b));
}

/* exp(y) for y <= 0 (the same method as formulas.exp_nonpositive): y clamped at -64, whose exponential
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

/* ----------------------------------------------------------------------------------------- decode steps
 * One new position per sequence, attending to the KV cache and to itself, with the rotary embedding (rotated
 * halves) applied to its query and key first.  Through MLX's CPU ops this handful of floats costs mostly
 * scheduling and waiting for MLX's stream; here it costs only its arithmetic.
 *
 * q (B, H, D), k and v (B, G, D): the new position's projections before the rope; each of the G k/v heads
 * serves H / G consecutive query heads.  cache_k and cache_v hold the `cached` earlier positions of each
 * sequence and head as rows of D floats, seq_stride and head_stride floats apart (an MLX cache buffer as it
 * is, spare capacity included).  positions (B) is each new token's position; the rope rotates the first
 * 2 * half dimensions at angles position * inv_freq[i], taken in double precision.  keep (B, cached + 1) or
 * NULL: 0 where a key is masked (left padding).  Writes k_roped (B, G, D), the key the cache stores, and
 * out (B, H, D). */
struct decode_job {
    const float *q, *k, *v, *cache_k, *cache_v, *positions, *inv_freq;
    const unsigned char *keep;
    float *k_roped, *out;
    long seq_stride, head_stride;
    int batch, heads, kv_heads, dim, cached, half;
    float scale;
};

static void rope_row(const float *x, float *y, const float *cosines, const float *sines, int half, int dim, float scale) {
    for (int i = 0; i < half; i++) {
        float a = x[i], b = x[i + half];
        y[i] = (a * cosines[i] - b * sines[i]) * scale;
        y[i + half] = (b * cosines[i] + a * sines[i]) * scale;
    }
    for (int i = 2 * half; i < dim; i++) y[i] = x[i] * scale;
}

static inline float dot(const float *a, const float *b, int n) {
    v16 acc = {0};
    int d = 0;
    for (; d + LANES <= n; d += LANES) acc += load16(a + d) * load16(b + d);
    float s = 0;
    for (int l = 0; l < LANES; l++) s += acc[l];
    for (; d < n; d++) s += a[d] * b[d];
    return s;
}

static void decode_heads(void *arg, int part, int parts) {
    const struct decode_job *j = arg;
    int D = j->dim, group = j->heads / j->kv_heads, L = j->cached + 1;
    float *scratch = malloc(sizeof(float) * ((size_t)group * D + (size_t)group * L + 2 * (size_t)j->half + LANES));
    if (!scratch) abort(); /* a few tens of kB; without them there is no sane way on */
    float *qr = scratch, *scores = qr + (size_t)group * D, *cosines = scores + (size_t)group * L, *sines = cosines + j->half;
    for (int item = part; item < j->batch * j->kv_heads; item += parts) {
        int b = item / j->kv_heads, g = item % j->kv_heads;
        for (int i = 0; i < j->half; i++) {
            double angle = (double)j->positions[b] * (double)j->inv_freq[i];
            cosines[i] = (float)cos(angle);
            sines[i] = (float)sin(angle);
        }
        const float *q = j->q + ((size_t)b * j->heads + (size_t)g * group) * D;
        for (int r = 0; r < group; r++) rope_row(q + (size_t)r * D, qr + (size_t)r * D, cosines, sines, j->half, D, j->scale);
        float *k_new = j->k_roped + ((size_t)b * j->kv_heads + g) * D;
        const float *v_new = j->v + ((size_t)b * j->kv_heads + g) * D;
        rope_row(j->k + ((size_t)b * j->kv_heads + g) * D, k_new, cosines, sines, j->half, D, 1.0f);
        const float *ck = j->cache_k + b * j->seq_stride + g * j->head_stride;
        const float *cv = j->cache_v + b * j->seq_stride + g * j->head_stride;
        const unsigned char *keep = j->keep ? j->keep + (size_t)b * L : NULL;
        for (int t = 0; t < L; t++) {
            const float *key = t < j->cached ? ck + (size_t)t * D : k_new;
            for (int r = 0; r < group; r++) scores[(size_t)r * L + t] = dot(qr + (size_t)r * D, key, D);
        }
        float *out = j->out + ((size_t)b * j->heads + (size_t)g * group) * D;
        memset(out, 0, sizeof(float) * (size_t)group * D);
        for (int r = 0; r < group; r++) {
            float *row = scores + (size_t)r * L;
            if (keep) /* masked keys out of the maximum */
                for (int t = 0; t < L; t++) row[t] = keep[t] ? row[t] : -3.0e38f;
            float inverse = softmax_numerators(row, L, L);
            if (keep) { /* and their clamped exponentials (1e-28) out of the sum: exact zeros, as MLX's */
                float sum = 0;
                for (int t = 0; t < L; t++) sum += row[t] = keep[t] ? row[t] : 0.0f;
                inverse = sum > 0 ? 1.0f / sum : 0.0f;
            }
            for (int t = 0; t < L; t++) row[t] *= inverse;
        }
        for (int t = 0; t < L; t++) {
            if (keep && !keep[t]) continue; /* a padding position's value may be anything */
            const float *value = t < j->cached ? cv + (size_t)t * D : v_new;
            for (int r = 0; r < group; r++) {
                float p = scores[(size_t)r * L + t], *o = out + (size_t)r * D;
                int d = 0;
                for (; d + LANES <= D; d += LANES) store16(o + d, load16(o + d) + p * load16(value + d));
                for (; d < D; d++) o[d] += p * value[d];
            }
        }
    }
    free(scratch);
}

/* See above; the (sequence, k/v head) pairs are shared out over `threads` pool threads. */
void decode_attention_f32(const float *q, const float *k, const float *v, const float *cache_k, const float *cache_v,
                          long seq_stride, long head_stride, int cached, const float *positions, const float *inv_freq,
                          int half, const unsigned char *keep, float *k_roped, float *out, int batch, int heads,
                          int kv_heads, int dim, float scale, int threads) {
    struct decode_job j = {q, k, v, cache_k, cache_v, positions, inv_freq, keep, k_roped, out,
                           seq_stride, head_stride, batch, heads, kv_heads, dim, cached, half, scale};
    int items = batch * kv_heads;
    pool_run(decode_heads, &j, threads < items ? threads : items);
}
