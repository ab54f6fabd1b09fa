/* What the C kernels share (native.py compiles them into one library): the worker pool of pool.c, the
 * process's BLAS sgemm as the callers pass it in, and 16-float vectors (GCC/Clang's portable vector type:
 * AVX-512 where the CPU has it, pairs of AVX2 or quads of NEON registers elsewhere). */
#ifndef FASTVLM_NATIVE_H
#define FASTVLM_NATIVE_H

#include <string.h>

/* Runs fn(arg, part, parts) for part = 0 .. parts-1, where parts <= threads is what the pool could start,
 * part 0 on the calling thread; returns when every part is done.  Calls from several threads take turns. */
void pool_run(void (*fn)(void *arg, int part, int parts), void *arg, int threads);

/* cblas_sgemm, row-major only. */
typedef void (*sgemm_fn)(int order, int trans_a, int trans_b, int m, int n, int k, float alpha, const float *a,
                         int lda, const float *b, int ldb, float beta, float *c, int ldc);
enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112 };

typedef float v16 __attribute__((vector_size(64)));
typedef int i16 __attribute__((vector_size(64)));
#define LANES 16

static inline v16 load16(const float *p) {
    v16 v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void store16(float *p, v16 v) { memcpy(p, &v, sizeof v); }

/* x in every lane. */
static inline v16 splat(float x) { return (v16){0} + x; }

#endif
