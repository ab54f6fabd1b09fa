/* The tower's pointwise MLP with its residual, in float32: out = residual + scale * (w2 gelu(w1 x + b1) + b2).
 *
 * That is the second half of every RepMixer block and ConvFFN (fc1, exact GELU, fc2, layer scale, skip).
 * Through MLX ops its hidden activations, 4x the block's width, go to memory and back twice, and MLX's CPU
 * GELU is single-threaded.  Here each pool thread takes a block of positions: one sgemm call (the
 * process's BLAS, run single-threaded) writes their hidden activations into a buffer that stays in the
 * core's cache, the GELU is applied there, and a second sgemm call and the residual finish them.
 *
 * Layout `channels_last` = 0: x, residual and out are (B, C, N) (NCHW, N = H * W); 1: (B, N, C).
 * w1 is (hidden, C) and w2 (C, hidden) (nn.Linear weights), b1, b2 and scale per channel; b1, b2 may be NULL.
 */
#include <stdlib.h>
#include <string.h>

#include "native.h"

static inline v16 vabs(v16 x) { return (v16)((i16)x & 0x7fffffff); }

/* Exact GELU, x (1/2 + erf(x / sqrt 2) / 2), with erf(s) = s P(s^2) / Q(s^2) on s clamped to [-4, 4]
 * (the rational form and coefficients of Eigen's float erf, as formulas.gelu_exact). */
static inline v16 gelu(v16 x) {
    v16 s = x * 0.70710678118654752f;
    v16 c = splat(4.0f);
    s = (vabs(s + c) - vabs(s - c)) * 0.5f; /* clamp(s, -4, 4) without a select */
    v16 u = s * s;
    v16 p = splat(-2.72614225801306e-10f);
    p = p * u + 2.77068142495902e-08f;
    p = p * u - 2.10102402082508e-06f;
    p = p * u - 5.69250639462346e-05f;
    p = p * u - 7.34990630326855e-04f;
    p = p * u - 2.95459980854025e-03f;
    p = p * u - 1.60960333262415e-02f;
    v16 q = splat(-1.45660718464996e-05f);
    q = q * u - 2.13374055278905e-04f;
    q = q * u - 1.68282697438203e-03f;
    q = q * u - 7.37332916720468e-03f;
    q = q * u - 1.42647390514189e-02f;
    return x * (0.5f + 0.5f * (s * p / q));
}

/* row[0 .. n) = gelu(row + bias + biases[0 .. n)), biases may be NULL: one bias per row (channels-first)
 * or one per element (channels-last). */
static void bias_gelu(float *row, int n, float bias, const float *biases) {
    int j = 0;
    for (; j + LANES <= n; j += LANES)
        store16(row + j, gelu(load16(row + j) + bias + (biases ? load16(biases + j) : (v16){0})));
    if (j < n) { /* the tail through one padded vector */
        float tail[LANES] = {0}, tail_biases[LANES] = {0};
        memcpy(tail, row + j, sizeof(float) * (n - j));
        if (biases) memcpy(tail_biases, biases + j, sizeof(float) * (n - j));
        v16 g = gelu(load16(tail) + bias + load16(tail_biases));
        memcpy(row + j, &g, sizeof(float) * (n - j));
    }
}

struct mlp_job {
    sgemm_fn sgemm;
    const float *x, *residual, *w1, *b1, *w2, *b2, *scale;
    float *out;
    int batch, channels, hidden, positions, channels_last, block;
};

static void run_blocks(void *arg, int part, int parts) {
    const struct mlp_job *j = arg;
    int blocks = (j->positions + j->block - 1) / j->block, C = j->channels, Hd = j->hidden, N = j->positions;
    float *h = malloc(sizeof(float) * ((size_t)Hd + C) * j->block);
    if (!h) abort(); /* about 1 MB; without it there is no sane way on */
    float *y = h + (size_t)Hd * j->block;
    for (int item = part; item < j->batch * blocks; item += parts) {
        int b = item / blocks, n0 = (item % blocks) * j->block;
        int n = N - n0 < j->block ? N - n0 : j->block;
        size_t base = (size_t)b * C * N;
        if (!j->channels_last) { /* h (Hd, n) = w1 x[:, n0:n0+n]; y (C, n) = w2 h */
            j->sgemm(ROW_MAJOR, NO_TRANS, NO_TRANS, Hd, n, C, 1.0f, j->w1, C, j->x + base + n0, N, 0.0f, h, n);
            for (int r = 0; r < Hd; r++) bias_gelu(h + (size_t)r * n, n, j->b1 ? j->b1[r] : 0.0f, NULL);
            j->sgemm(ROW_MAJOR, NO_TRANS, NO_TRANS, C, n, Hd, 1.0f, j->w2, Hd, h, n, 0.0f, y, n);
            for (int c = 0; c < C; c++) {
                const float *res = j->residual + base + (size_t)c * N + n0;
                float *out = j->out + base + (size_t)c * N + n0;
                float bias = j->b2 ? j->b2[c] : 0.0f, scale = j->scale[c];
                for (int t = 0; t < n; t++) out[t] = res[t] + scale * (y[(size_t)c * n + t] + bias);
            }
        } else { /* h (n, Hd) = x[n0:n0+n] w1^T; y (n, C) = h w2^T */
            const float *x = j->x + base + (size_t)n0 * C;
            j->sgemm(ROW_MAJOR, NO_TRANS, TRANS, n, Hd, C, 1.0f, x, C, j->w1, C, 0.0f, h, Hd);
            for (int t = 0; t < n; t++) bias_gelu(h + (size_t)t * Hd, Hd, 0.0f, j->b1);
            j->sgemm(ROW_MAJOR, NO_TRANS, TRANS, n, C, Hd, 1.0f, h, Hd, j->w2, Hd, 0.0f, y, C);
            for (int t = 0; t < n; t++) {
                const float *res = j->residual + base + (size_t)(n0 + t) * C;
                float *out = j->out + base + (size_t)(n0 + t) * C;
                for (int c = 0; c < C; c++) out[c] = res[c] + j->scale[c] * (y[(size_t)t * C + c] + (j->b2 ? j->b2[c] : 0.0f));
            }
        }
    }
    free(h);
}

/* See the top of this file; `threads` pool threads each call `sgemm`, which must then run single-threaded. */
void pointwise_mlp_f32(void *sgemm, const float *x, const float *residual, const float *w1, const float *b1,
                       const float *w2, const float *b2, const float *scale, float *out, int batch, int channels,
                       int hidden, int positions, int channels_last, int threads) {
    int block = (1 << 18) / (hidden > 0 ? hidden : 1); /* a block's hidden activations: 1 MB, within a core's L2 */
    block = block < 16 ? 16 : block > 512 ? 512 : (block + 15) / 16 * 16;
    struct mlp_job j = {(sgemm_fn)sgemm, x, residual, w1, b1, w2, b2, scale, out,
                        batch, channels, hidden, positions, channels_last, block};
    pool_run(run_blocks, &j, threads);
}
