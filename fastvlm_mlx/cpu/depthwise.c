/* Depthwise convs in float32, channels-first: the tower's token mixers, ConvFFN convs, stem and downsampling.
 *
 * x is (planes, H, W) with planes = B * C; w is (C * m, k, k) (m output channels per input channel, as
 * nn.Conv2d's groups = C); bias is (C * m) or NULL; out is (B * C * m, Ho, Wo), with 'same' padding k / 2
 * and stride s.  A depthwise conv does k * k multiply-adds per output, far too few for a matmul to pay
 * off, and MLX's CPU grouped conv runs it slowly.  Here each pool thread takes whole output
 * planes: it copies the input plane, zero-padded and split into s column phases (for stride 2: even and
 * odd columns), into a buffer that stays in its cache, so that every tap of the kernel is a run of
 * contiguous vector loads, and sums the taps into up to 64 outputs of a row held in registers.
 */
#include <stdlib.h>
#include <string.h>

#include "native.h"

#define CHUNK 4 /* vectors of a row summed at once */

struct depthwise_job {
    const float *x, *w, *bias;
    float *out;
    int planes, channels, multiplier, height, width, k, stride, out_height, out_width, phase_width;
};

/* Outputs x0 .. x0 + 16 * nv of row y of one output plane; phases[ph] holds padded columns ph, ph + s, ... */
static inline __attribute__((always_inline)) void row_chunk(const struct depthwise_job *j, const float *phases,
                                                             const float *w, float bias, float *out, int y, int x0,
                                                             const int nv) {
    int k = j->k, s = j->stride, pw = j->phase_width;
    size_t phase_size = (size_t)(s * (j->out_height - 1) + k) * pw;
    v16 acc[CHUNK];
    for (int v = 0; v < nv; v++) acc[v] = splat(bias);
    for (int ky = 0; ky < k; ky++) {
        const float *row = phases + (size_t)(s * y + ky) * pw + x0;
        for (int kx = 0; kx < k; kx++) {
            const float *src = row + (size_t)(kx % s) * phase_size + kx / s;
            float tap = w[ky * k + kx];
            for (int v = 0; v < nv; v++) acc[v] += tap * load16(src + v * LANES);
        }
    }
    int n = j->out_width - x0 < nv * LANES ? j->out_width - x0 : nv * LANES;
    float buffer[CHUNK * LANES];
    memcpy(buffer, acc, sizeof(float) * LANES * nv);
    memcpy(out + (size_t)y * j->out_width + x0, buffer, sizeof(float) * n);
}

static void run_planes(void *arg, int part, int parts) {
    const struct depthwise_job *j = arg;
    int k = j->k, s = j->stride, pad = k / 2, pw = j->phase_width;
    int rows = s * (j->out_height - 1) + k; /* padded rows the outputs read */
    size_t phase_size = (size_t)rows * pw;
    float *phases = malloc(sizeof(float) * phase_size * s);
    if (!phases) abort(); /* at most a few MB; without them there is no sane way on */
    int out_channels = j->channels * j->multiplier;
    for (int o = part; o < j->planes * j->multiplier; o += parts) {
        int b = o / out_channels, co = o % out_channels, ci = co / j->multiplier;
        const float *in = j->x + ((size_t)b * j->channels + ci) * j->height * j->width;
        memset(phases, 0, sizeof(float) * phase_size * s);
        for (int r = 0; r < rows; r++) {
            int iy = r - pad;
            if (iy < 0 || iy >= j->height) continue;
            const float *src = in + (size_t)iy * j->width;
            float *dst = phases + (size_t)r * pw;
            if (s == 1) {
                memcpy(dst + pad, src, sizeof(float) * j->width);
            } else {
                for (int ix = 0; ix < j->width; ix++) dst[(size_t)((ix + pad) % s) * phase_size + (ix + pad) / s] = src[ix];
            }
        }
        const float *w = j->w + (size_t)co * k * k;
        float bias = j->bias ? j->bias[co] : 0.0f;
        float *out = j->out + (size_t)o * j->out_height * j->out_width;
        for (int y = 0; y < j->out_height; y++) {
            int x0 = 0;
            for (; x0 + CHUNK * LANES <= j->out_width; x0 += CHUNK * LANES) row_chunk(j, phases, w, bias, out, y, x0, 4);
            int left = (j->out_width - x0 + LANES - 1) / LANES;
            if (left == 3) row_chunk(j, phases, w, bias, out, y, x0, 3);
            if (left == 2) row_chunk(j, phases, w, bias, out, y, x0, 2);
            if (left == 1) row_chunk(j, phases, w, bias, out, y, x0, 1);
        }
    }
    free(phases);
}

void depthwise_f32(const float *x, const float *w, const float *bias, float *out, int planes, int channels,
                   int multiplier, int height, int width, int k, int stride, int threads) {
    int pad = k / 2;
    int out_height = (height + 2 * pad - k) / stride + 1, out_width = (width + 2 * pad - k) / stride + 1;
    int covered = (out_width + LANES - 1) / LANES * LANES; /* outputs computed per row, the tail included */
    int phase_width = covered + k / stride + 1;
    struct depthwise_job j = {x, w, bias, out, planes, channels, multiplier, height, width, k, stride,
                              out_height, out_width, phase_width};
    pool_run(run_planes, &j, threads);
}
