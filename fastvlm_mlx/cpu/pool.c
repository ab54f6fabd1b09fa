/* A persistent pool of worker threads for the C kernels (skinny.c, attention.c).
 *
 * A decode step makes a kernel call for every matmul of every layer, in quick succession, and starting a thread
 * per call would cost as much as the smaller calls themselves.
 * Workers spin briefly for the next call (it usually comes within the spin), then sleep on a condition
 * variable, so an idle pool costs nothing.  A forked child has none of the parent's threads: it starts
 * a pool of its own.
 */
#include <pthread.h>
#include <time.h>

#include "native.h"

#if defined(__x86_64__) || defined(__i386__)
#define cpu_relax() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define cpu_relax() __asm__ volatile("yield")
#else
#define cpu_relax() ((void)0)
#endif

#define MAX_THREADS 64
#define SPIN_NS 200000L /* how long an idle worker spins before it sleeps */

static struct {
    pthread_mutex_t lock;
    pthread_cond_t wake;
    void (*fn)(void *, int, int);
    void *arg;
    int parts;
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
        if (t < pool.parts) pool.fn(pool.arg, t, pool.parts);
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

void pool_run(void (*fn)(void *arg, int part, int parts), void *arg, int threads) {
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    pthread_mutex_lock(&caller);
    int helpers = threads > 1 ? ensure_workers(threads) : 0;
    int parts = helpers + 1 < threads ? helpers + 1 : threads;
    pool.fn = fn;
    pool.arg = arg;
    pool.parts = parts;
    if (helpers > 0) {
        __atomic_store_n(&pool.pending, helpers, __ATOMIC_RELEASE);
        pthread_mutex_lock(&pool.lock);
        __atomic_add_fetch(&pool.generation, 1, __ATOMIC_ACQ_REL);
        pthread_cond_broadcast(&pool.wake);
        pthread_mutex_unlock(&pool.lock);
    }
    fn(arg, 0, parts);
    while (__atomic_load_n(&pool.pending, __ATOMIC_ACQUIRE) > 0) cpu_relax();
    pthread_mutex_unlock(&caller);
}
