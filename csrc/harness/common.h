/* What the harness's C pieces share. Internal: no cffi section, Python does not see it. */
#ifndef UP_HARNESS_COMMON_H
#define UP_HARNESS_COMMON_H
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <time.h>

static inline uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static inline void stat_add(uint64_t *p, uint64_t v) { __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }

/* The arguments every handler checks: a userfaultfd and page-aligned [base, base+size) of
 * power-of-two pages. */
static inline int span_ok(int uffd, uint64_t base, uint64_t size, uint64_t page_size)
{
    return uffd >= 0 && page_size && !(page_size & (page_size - 1)) && !(base % page_size) &&
           size && !(size % page_size);
}

/* Start a thread with every asynchronous signal blocked (Python's threads take those), pinned
 * to cpu when cpu >= 0. 0 or -errno. */
static inline int start_thread(pthread_t *tid, void *(*fn)(void *), void *arg, int cpu)
{
    if (cpu >= CPU_SETSIZE)
        return -EINVAL;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    if (cpu >= 0) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(cpu, &set);
        pthread_attr_setaffinity_np(&attr, sizeof set, &set);
    }
    sigset_t all, old;
    sigfillset(&all);
    sigdelset(&all, SIGBUS);
    sigdelset(&all, SIGSEGV);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int e = pthread_create(tid, &attr, fn, arg);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    pthread_attr_destroy(&attr);
    return -e;
}

#endif
