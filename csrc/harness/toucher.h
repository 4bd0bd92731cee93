#ifndef UP_TOUCHER_H
#define UP_TOUCHER_H
/* The C "vCPU" stand-in: pthreads that touch addresses and survive SIGBUS (see toucher.c). */
#include <stddef.h>
#include <stdint.h>

/* --- cffi: what Python sees (csrc/build_ffi.py reads it from here) --- */
#define UP_TOUCH_OK 0
#define UP_TOUCH_SIGBUS 1
#define UP_TOUCH_NOT_RUN 2

typedef struct up_toucher up_toucher;

/* Result arrays are owned by the caller and must stay alive until up_toucher_join() returned 1.
 * Every array has n entries except thread_cpu (threads entries) and digest (NULL: no digests).
 * done_ns[i]: when touch i finished, CLOCK_MONOTONIC ns (the access returned or raised SIGBUS;
 * it began latency_ns[i] earlier), so a run's touches can be put on one timeline.
 * cpus (ncpus entries, may be NULL) pins thread i to cpus[i % ncpus].
 * Returns 0, or -errno (nothing started). */
int up_toucher_start(up_toucher **out, const uint64_t *addrs, size_t n, int threads, int write,
                     uint8_t value, uint64_t page_size, const int32_t *cpus, size_t ncpus,
                     uint64_t *latency_ns, uint64_t *done_ns, uint8_t *outcome,
                     uint8_t *value_out, int32_t *sig_code, uint64_t *sig_addr, uint64_t *digest,
                     int32_t *thread_cpu);
/* 1: all threads finished (and joined), 0: timeout. timeout_ms < 0 waits forever. */
int up_toucher_join(up_toucher *t, int64_t timeout_ms);
/* Touches finished so far (ok or sigbus). */
size_t up_toucher_completed(up_toucher *t);
/* Frees a finished toucher; returns -EBUSY (and frees nothing) while threads still run. */
int up_toucher_free(up_toucher *t);

/* The process's current C-level SIGBUS handler (sa_sigaction or sa_handler) and its flags, and
 * the toucher's own handler: lets tests prove the previous handler is restored. */
uint64_t up_toucher_sigbus_current(int32_t *flags_out);
uint64_t up_toucher_sigbus_own(void);
/* Number of touchers currently holding the SIGBUS handler installed. */
int up_toucher_sigbus_refs(void);

/* CPU the calling thread runs on now (sched_getcpu), for placement reports. */
int up_toucher_current_cpu(void);

uint64_t up_xxh64_buffer(const void *p, size_t n, uint64_t seed);
/* --- end cffi --- */
#endif
