/* y = x w^T for a few rows of x: the decoder's matmuls while it decodes (one row per sequence).
 *
 * x is (M, K), w is (N, K) (an nn.Linear weight), y is (M, N); all float32, row-major, contiguous.
 * With M <= 8 the product is bound by reading w once from memory, and BLAS sgemm packs w for a big
 * GEMM and streams it slower (benchmarks/RESULTS.md, session 6).  Here each tile of RB consecutive rows of w is read once
 * and multiplied with up to 8 rows of x held in L1: every w vector load feeds MB multiply-adds and
 * every x load RB of them, with MB * RB independent accumulators to cover the FMA latency.  The rows
 * of w are split between the caller and a persistent pool of worker threads.  Built by skinny.py with the machine's C compiler (-O3
 * -march=native); the vector type is GCC/Clang's portable one, so it compiles to AVX2, AVX-512 or NEON.
 */
#include <pthread.h>
#include <time.h>
#include <stddef.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#define cpu_relax() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define cpu_relax() __asm__ volatile("yield")
#else
#define cpu_relax() ((void)0)
#endif

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
    int M, N, K, n0, n1;
};

static void run(const struct job *j) { part(j->x, j->w, j->y, j->M, j->N, j->K, j->n0, j->n1); }

/* A persistent pool: a decode step makes ~170 of these calls ~30 us apart, and starting a thread per
 * call cost ~40 us each.  Workers spin briefly for the next call (it usually comes within the spin),
 * then sleep on a condition variable, so an idle pool costs nothing.  A forked child has none of the
 * parent's threads: it starts a pool of its own. */
#define MAX_THREADS 64
#define SPIN_NS 200000L /* how long an idle worker spins before it sleeps */

static struct {
    pthread_mutex_t lock;
    pthread_cond_t wake;
    struct job jobs[MAX_THREADS];
    volatile unsigned long generation; /* bumped for every call */
    volatile int pending;              /* workers still busy with this call */
    int workers;                       /* started so far (threads 1..workers) */
} pool = {.lock = PTHREAD_MUTEX_INITIALIZER, .wake = PTHREAD_COND_INITIALIZER};

static pthread_mutex_t caller = PTHREAD_MUTEX_INITIALIZER; /* one call at a time uses the pool */

static void forget_pool_in_child(void) {
    pthread_mutex_init(&caller, NULL);
    pthread_mutex_init(&pool.lock, NULL);
    pthread_cond_init(&pool.wake, NULL);
    pool.workers = 0;
    pool.pending = 0;
}

__attribute__((constructor)) static void register_fork_handler(void) {
    pthread_atfork(NULL, NULL, forget_pool_in_child);
}

static long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000L + t.tv_nsec;
}

struct worker_arg {
    int index;
    unsigned long seen; /* the generation when it was started: it takes the calls after that */
};

static void *worker(void *arg) {
    int t = ((struct worker_arg *)arg)->index;
    unsigned long seen = ((struct worker_arg *)arg)->seen;
    for (;;) {
        long until = now_ns() + SPIN_NS;
        for (int i = 0; __atomic_load_n(&pool.generation, __ATOMIC_ACQUIRE) == seen; i++) {
            cpu_relax();
            if ((i & 63) == 63 && now_ns() > until) break;
        }
        pthread_mutex_lock(&pool.lock);
        while (__atomic_load_n(&pool.generation, __ATOMIC_ACQUIRE) == seen) pthread_cond_wait(&pool.wake, &pool.lock);
        pthread_mutex_unlock(&pool.lock);
        seen = __atomic_load_n(&pool.generation, __ATOMIC_ACQUIRE);
        if (pool.jobs[t].n1 > pool.jobs[t].n0) run(&pool.jobs[t]);
        __atomic_sub_fetch(&pool.pending, 1, __ATOMIC_ACQ_REL);
    }
    return NULL;
}

/* Threads 1..want-1 running (fewer if they cannot be started); returns how many helpers there are. */
static int ensure_workers(int want) {
    static struct worker_arg args[MAX_THREADS];
    while (pool.workers + 1 < want) {
        pthread_t tid;
        args[pool.workers + 1] = (struct worker_arg){pool.workers + 1, pool.generation};
        if (pthread_create(&tid, NULL, worker, &args[pool.workers + 1]) != 0) break;
        pthread_detach(tid);
        pool.workers++;
    }
    return pool.workers;
}

/* y = x w^T on up to `threads` threads (the caller's included). */
void skinny_matmul(const float *x, const float *w, float *y, int M, int N, int K, int threads) {
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    pthread_mutex_lock(&caller);
    int helpers = threads > 1 ? ensure_workers(threads) : 0;
    int parts = helpers + 1 < threads ? helpers + 1 : threads;
    int per = ((N + parts - 1) / parts + 7) / 8 * 8;
    for (int t = 0; t <= helpers; t++) {
        int n0 = t < parts && t * per < N ? t * per : N;
        int n1 = n0 + per < N ? n0 + per : N;
        pool.jobs[t] = (struct job){x, w, y, M, N, K, n0, n1};
    }
    if (helpers > 0) {
        __atomic_store_n(&pool.pending, helpers, __ATOMIC_RELEASE);
        pthread_mutex_lock(&pool.lock);
        __atomic_add_fetch(&pool.generation, 1, __ATOMIC_ACQ_REL);
        pthread_cond_broadcast(&pool.wake);
        pthread_mutex_unlock(&pool.lock);
    }
    run(&pool.jobs[0]);
    while (__atomic_load_n(&pool.pending, __ATOMIC_ACQUIRE) > 0) cpu_relax();
    pthread_mutex_unlock(&caller);
}
