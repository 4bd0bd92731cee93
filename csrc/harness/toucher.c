/* The C "vCPU" stand-in.
 *
 * N pthreads take indexes from one shared atomic cursor (so a thread blocked in a fault does not
 * hold back the others' work) and touch addrs[i] with a volatile one-byte access, timing it with
 * CLOCK_MONOTONIC (how long it took, and when it finished). A SIGBUS on a toucher thread
 * (poisoned page, file hole) is caught by a process-wide SA_SIGINFO handler that siglongjmps out
 * of the access and records si_code and si_addr; a SIGBUS on any other thread goes to the
 * handler that was installed before (pytest's faulthandler) or kills the process as the default
 * action would. The handler is installed while at least one toucher runs (refcounted) and the
 * previous one is restored by the last thread out.
 */
#include "toucher.h"

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <setjmp.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common.h"
#include "digest.h" /* up_xxh64: the one XXH64, as the wire uses */

struct up_toucher {
    const uint64_t *addrs;
    size_t n;
    int threads;
    int write;
    uint8_t value;
    uint64_t page_size;
    uint64_t *latency_ns;
    uint64_t *done_ns;
    uint8_t *outcome;
    uint8_t *value_out;
    int32_t *sig_code;
    uint64_t *sig_addr;
    uint64_t *digest;
    int32_t *thread_cpu;

    atomic_size_t cursor;
    atomic_size_t completed;
    pthread_t *tids;
    int started;  /* threads actually created */
    int running;  /* threads not yet finished; guarded by lock */
    int joined;
    pthread_mutex_t lock;
    pthread_cond_t cond;
};

struct up_worker_arg {
    up_toucher *t;
    int index;
};

/* ---- SIGBUS handling ---------------------------------------------------------------------- */

static pthread_mutex_t g_sig_lock = PTHREAD_MUTEX_INITIALIZER;
static int g_sig_refs;
static struct sigaction g_sig_prev;

static __thread sigjmp_buf tl_jb;
static __thread volatile sig_atomic_t tl_armed;
static __thread volatile int tl_code;
static __thread volatile uintptr_t tl_addr;

static void up_sigbus_handler(int sig, siginfo_t *si, void *uctx)
{
    if (tl_armed) {
        tl_armed = 0;
        tl_code = si->si_code;
        tl_addr = (uintptr_t)si->si_addr;
        siglongjmp(tl_jb, 1);
    }
    /* Not ours: chain to whatever was there before us. */
    struct sigaction prev = g_sig_prev;
    if ((prev.sa_flags & SA_SIGINFO) && prev.sa_sigaction) {
        prev.sa_sigaction(sig, si, uctx);
        return;
    }
    if (!(prev.sa_flags & SA_SIGINFO) && prev.sa_handler != SIG_DFL && prev.sa_handler != SIG_IGN) {
        prev.sa_handler(sig);
        return;
    }
    /* Default action (an ignored hardware SIGBUS is fatal anyway). */
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    sigaction(SIGBUS, &dfl, NULL);
    raise(SIGBUS);
}

static int up_sigbus_acquire(void)
{
    int rc = 0;
    pthread_mutex_lock(&g_sig_lock);
    if (g_sig_refs == 0) {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = up_sigbus_handler;
        /* NODEFER: SIGBUS stays unblocked after the siglongjmp, so sigsetjmp need not save the
         * signal mask (no syscall per touch). */
        sa.sa_flags = SA_SIGINFO | SA_NODEFER | SA_ONSTACK;
        sigemptyset(&sa.sa_mask);
        if (sigaction(SIGBUS, &sa, &g_sig_prev) != 0)
            rc = -errno;
    }
    if (rc == 0)
        g_sig_refs++;
    pthread_mutex_unlock(&g_sig_lock);
    return rc;
}

static void up_sigbus_release(void)
{
    pthread_mutex_lock(&g_sig_lock);
    if (--g_sig_refs == 0)
        sigaction(SIGBUS, &g_sig_prev, NULL);
    pthread_mutex_unlock(&g_sig_lock);
}

uint64_t up_toucher_sigbus_current(int32_t *flags_out)
{
    struct sigaction cur;
    sigaction(SIGBUS, NULL, &cur);
    if (flags_out)
        *flags_out = (int32_t)cur.sa_flags;
    if (cur.sa_flags & SA_SIGINFO)
        return (uint64_t)(uintptr_t)cur.sa_sigaction;
    return (uint64_t)(uintptr_t)cur.sa_handler;
}

uint64_t up_toucher_sigbus_own(void) { return (uint64_t)(uintptr_t)up_sigbus_handler; }

int up_toucher_sigbus_refs(void)
{
    pthread_mutex_lock(&g_sig_lock);
    int r = g_sig_refs;
    pthread_mutex_unlock(&g_sig_lock);
    return r;
}

/* up_xxh64 under the name the toucher tests use (digest.c has the one implementation). */
uint64_t up_xxh64_buffer(const void *p, size_t n, uint64_t seed) { return up_xxh64(p, n, seed); }

/* ---- touching ----------------------------------------------------------------------------- */

static __attribute__((noinline)) void up_touch_one(up_toucher *t, size_t i)
{
    volatile uint8_t *p = (volatile uint8_t *)(uintptr_t)t->addrs[i];
    volatile uint64_t t0 = 0;
    volatile int in_digest = 0;

    if (sigsetjmp(tl_jb, 0)) {
        uint64_t t1 = now_ns();
        if (!in_digest) {
            t->latency_ns[i] = t1 - t0;
            t->done_ns[i] = t1;
        }
        t->sig_code[i] = tl_code;
        t->sig_addr[i] = (uint64_t)tl_addr;
        t->outcome[i] = UP_TOUCH_SIGBUS;
        return;
    }
    t0 = now_ns();
    tl_armed = 1;
    uint8_t v;
    if (t->write) {
        *p = t->value;
        v = t->value;
    } else {
        v = *p;
    }
    tl_armed = 0;
    uint64_t t1 = now_ns();
    t->latency_ns[i] = t1 - t0;
    t->done_ns[i] = t1;
    t->value_out[i] = v;
    if (t->digest) {
        /* The page holding the touched byte is now mapped; a page_size larger than the real
         * page can still fault, hence armed again. */
        const uint8_t *base = (const uint8_t *)(uintptr_t)(t->addrs[i] & ~(t->page_size - 1));
        in_digest = 1;
        tl_armed = 1;
        uint64_t d = up_xxh64(base, t->page_size, 0);
        tl_armed = 0;
        t->digest[i] = d;
    }
    t->outcome[i] = UP_TOUCH_OK;
}

static void *up_toucher_thread(void *arg)
{
    struct up_worker_arg *w = arg;
    up_toucher *t = w->t;
    t->thread_cpu[w->index] = sched_getcpu();
    free(w);
    for (;;) {
        size_t i = atomic_fetch_add_explicit(&t->cursor, 1, memory_order_relaxed);
        if (i >= t->n)
            break;
        up_touch_one(t, i);
        atomic_fetch_add_explicit(&t->completed, 1, memory_order_release);
    }
    pthread_mutex_lock(&t->lock);
    int last = --t->running == 0;
    if (last)
        pthread_cond_broadcast(&t->cond);
    pthread_mutex_unlock(&t->lock);
    if (last)
        up_sigbus_release();
    return NULL;
}

static void up_toucher_join_all(up_toucher *t)
{
    if (t->joined)
        return;
    for (int k = 0; k < t->started; k++)
        pthread_join(t->tids[k], NULL);
    t->joined = 1;
}

int up_toucher_start(up_toucher **out, const uint64_t *addrs, size_t n, int threads, int write,
                     uint8_t value, uint64_t page_size, const int32_t *cpus, size_t ncpus,
                     uint64_t *latency_ns, uint64_t *done_ns, uint8_t *outcome,
                     uint8_t *value_out, int32_t *sig_code, uint64_t *sig_addr, uint64_t *digest,
                     int32_t *thread_cpu)
{
    if (!out || threads < 1 || (n && !addrs) || !latency_ns || !done_ns || !outcome ||
        !value_out || !sig_code || !sig_addr || !thread_cpu || (cpus == NULL) != (ncpus == 0))
        return -EINVAL;
    if (page_size == 0 || (page_size & (page_size - 1)))
        return -EINVAL;
    up_toucher *t = calloc(1, sizeof *t);
    if (!t)
        return -ENOMEM;
    t->tids = calloc((size_t)threads, sizeof *t->tids);
    if (!t->tids) {
        free(t);
        return -ENOMEM;
    }
    t->addrs = addrs;
    t->n = n;
    t->threads = threads;
    t->write = write;
    t->value = value;
    t->page_size = page_size;
    t->latency_ns = latency_ns;
    t->done_ns = done_ns;
    t->outcome = outcome;
    t->value_out = value_out;
    t->sig_code = sig_code;
    t->sig_addr = sig_addr;
    t->digest = digest;
    t->thread_cpu = thread_cpu;
    for (size_t i = 0; i < n; i++)
        outcome[i] = UP_TOUCH_NOT_RUN;
    for (int k = 0; k < threads; k++)
        thread_cpu[k] = -1;
    atomic_init(&t->cursor, 0);
    atomic_init(&t->completed, 0);
    pthread_mutex_init(&t->lock, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&t->cond, &ca);
    pthread_condattr_destroy(&ca);

    int rc = up_sigbus_acquire();
    if (rc) {
        pthread_cond_destroy(&t->cond);
        pthread_mutex_destroy(&t->lock);
        free(t->tids);
        free(t);
        return rc;
    }

    /* Touch threads take only the synchronous signals; the rest go to Python's threads. */
    sigset_t all, old;
    sigfillset(&all);
    sigdelset(&all, SIGBUS);
    sigdelset(&all, SIGSEGV);
    sigdelset(&all, SIGFPE);
    sigdelset(&all, SIGILL);
    pthread_sigmask(SIG_SETMASK, &all, &old);

    t->running = threads; /* each thread decrements once; uncreated ones are subtracted below */
    for (int k = 0; k < threads; k++) {
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setstacksize(&attr, 256 * 1024);
        if (cpus) {
            cpu_set_t set;
            CPU_ZERO(&set);
            int c = cpus[(size_t)k % ncpus];
            if (c < 0 || c >= CPU_SETSIZE) {
                pthread_attr_destroy(&attr);
                rc = -EINVAL;
                break;
            }
            CPU_SET(c, &set);
            pthread_attr_setaffinity_np(&attr, sizeof set, &set);
        }
        struct up_worker_arg *w = malloc(sizeof *w);
        if (!w) {
            pthread_attr_destroy(&attr);
            rc = -ENOMEM;
            break;
        }
        w->t = t;
        w->index = k;
        int e = pthread_create(&t->tids[k], &attr, up_toucher_thread, w);
        pthread_attr_destroy(&attr);
        if (e) {
            free(w);
            rc = -e;
            break;
        }
        t->started++;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);

    if (rc) {
        /* Stop the threads that did start (they may still be in one touch), undo the rest. */
        atomic_store(&t->cursor, n);
        int missing = threads - t->started;
        pthread_mutex_lock(&t->lock);
        t->running -= missing;
        int none_left = t->running == 0;
        pthread_mutex_unlock(&t->lock);
        if (none_left)
            up_sigbus_release();
        up_toucher_join_all(t);
        pthread_cond_destroy(&t->cond);
        pthread_mutex_destroy(&t->lock);
        free(t->tids);
        free(t);
        return rc;
    }
    *out = t;
    return 0;
}

int up_toucher_join(up_toucher *t, int64_t timeout_ms)
{
    pthread_mutex_lock(&t->lock);
    if (t->running > 0 && timeout_ms != 0) {
        if (timeout_ms < 0) {
            while (t->running > 0)
                pthread_cond_wait(&t->cond, &t->lock);
        } else {
            struct timespec dl;
            clock_gettime(CLOCK_MONOTONIC, &dl);
            dl.tv_sec += timeout_ms / 1000;
            dl.tv_nsec += (timeout_ms % 1000) * 1000000L;
            if (dl.tv_nsec >= 1000000000L) {
                dl.tv_sec++;
                dl.tv_nsec -= 1000000000L;
            }
            while (t->running > 0)
                if (pthread_cond_timedwait(&t->cond, &t->lock, &dl) == ETIMEDOUT)
                    break;
        }
    }
    int done = t->running == 0;
    /* Joined under the lock so two callers never join a thread twice; finished workers no
     * longer take it. Joining also waits out the last one's handler release. */
    if (done)
        up_toucher_join_all(t);
    pthread_mutex_unlock(&t->lock);
    return done;
}

size_t up_toucher_completed(up_toucher *t)
{
    return atomic_load_explicit(&t->completed, memory_order_acquire);
}

int up_toucher_free(up_toucher *t)
{
    if (!t)
        return 0;
    pthread_mutex_lock(&t->lock);
    int busy = t->running > 0;
    if (!busy)
        up_toucher_join_all(t);
    pthread_mutex_unlock(&t->lock);
    if (busy)
        return -EBUSY;
    pthread_cond_destroy(&t->cond);
    pthread_mutex_destroy(&t->lock);
    free(t->tids);
    free(t);
    return 0;
}

int up_toucher_current_cpu(void) { return sched_getcpu(); }
