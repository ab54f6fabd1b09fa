/* The worker pool shared by the C kernels (pool.c): one call at a time runs its parts on persistent threads. */
#ifndef FASTVLM_POOL_H
#define FASTVLM_POOL_H

/* Runs fn(arg, part, parts) for part = 0 .. parts-1, where parts <= threads is what the pool could start,
 * part 0 on the calling thread; returns when every part is done.  Calls from several threads take turns. */
void pool_run(void (*fn)(void *arg, int part, int parts), void *arg, int threads);

#endif
