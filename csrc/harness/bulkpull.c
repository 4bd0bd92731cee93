/* The C reference's background stream (see bulkpull.h). Same wire format as cref.c's source:
 *   request 16 bytes {u64 offset, u32 count, u32 flags}; reply runs of 16 bytes
 *   {u64 offset, u32 count, u32 kind} + count * page_size bytes when kind is DATA. */
#include "bulkpull.h"

#include <errno.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "common.h"
#include "cref.h"
#include "uffd_place.h"


struct up_bulkpull_msg {
    uint64_t offset;
    uint32_t count;
    uint32_t word; /* request: flags; reply: kind */
};

struct up_cref_bulk {
    int uffd, sock, stop_fd;
    uint64_t base, size, page_size, rate;
    uint32_t chunk;
    uint8_t *buf;   /* one chunk of received data */
    uint8_t *zeros; /* chunk of zeros: COPY where ZEROPAGE does not exist (huge pages) */
    int huge;
    int stopping;
    uint64_t t0;
    pthread_t tid;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    up_cref_bulk_stats st;
};

static void fail(up_cref_bulk *b, int err)
{
    stat_add(&b->st.errors, 1);
    __atomic_store_n(&b->st.last_errno, err, __ATOMIC_RELAXED);
}

enum { OP_COPY, OP_ZERO, OP_POISON };

/* Place [dst, dst+len) with one range ioctl, resuming after partial progress and stepping over
 * pages someone else placed first (EEXIST). */
static void place_range(up_cref_bulk *b, int op, uint64_t dst, const uint8_t *src, uint64_t len)
{
    int spins = 0;
    while (len) {
        int64_t done;
        int rc = op == OP_COPY   ? up_uffd_copy(b->uffd, dst, (uint64_t)(uintptr_t)src, len, 0, &done)
                 : op == OP_ZERO ? up_uffd_zeropage(b->uffd, dst, len, 0, &done)
                                 : up_uffd_poison(b->uffd, dst, len, 0, &done);
        if (rc == 0) {
            stat_add(&b->st.placed, len / b->page_size);
            return;
        }
        int e = -rc;
        if (e == EAGAIN && done > 0) {
            stat_add(&b->st.placed, (uint64_t)done / b->page_size);
        } else if (e == EEXIST) {
            done = (int64_t)b->page_size; /* the first page is there already: step over it */
            stat_add(&b->st.skipped, 1);
        } else if (e == EAGAIN && ++spins < 1000) {
            continue;
        } else {
            fail(b, e);
            return;
        }
        dst += (uint64_t)done;
        if (src)
            src += done;
        len -= (uint64_t)done;
    }
}

/* Sleep until t (ns, CLOCK_MONOTONIC) or a stop; 1 when stopped. */
static int sleep_until(up_cref_bulk *b, uint64_t t)
{
    for (;;) {
        uint64_t now = now_ns();
        if (now >= t)
            return 0;
        struct pollfd p = {.fd = b->stop_fd, .events = POLLIN};
        int ms = (int)((t - now + 999999) / 1000000);
        if (poll(&p, 1, ms) > 0)
            return 1;
    }
}

static void *bulk_thread(void *arg)
{
    up_cref_bulk *b = arg;
    __atomic_store_n(&b->st.cpu, sched_getcpu(), __ATOMIC_RELAXED);
    uint64_t ps = b->page_size;
    uint64_t data_bytes = 0;
    for (uint64_t off = 0; off < b->size; off += (uint64_t)b->chunk * ps) {
        if (__atomic_load_n(&b->stopping, __ATOMIC_ACQUIRE))
            break;
        if (b->rate && sleep_until(b, b->t0 + data_bytes * 1000000000ull / b->rate))
            break;
        uint64_t left = (b->size - off) / ps;
        uint32_t count = left < b->chunk ? (uint32_t)left : b->chunk;
        struct up_bulkpull_msg req = {.offset = off, .count = count,
                                   .word = UP_CREF_FLAG_ZERO_DETECT};
        if (send(b->sock, &req, sizeof req, MSG_NOSIGNAL) != (ssize_t)sizeof req) {
            fail(b, errno);
            break;
        }
        stat_add(&b->st.requests, 1);
        uint32_t got = 0;
        int rc = 0;
        while (got < count && !rc) {
            struct up_bulkpull_msg rep;
            rc = up_cref_read_all(b->sock, &rep, sizeof rep);
            if (rc)
                break;
            if (rep.word == UP_CREF_KIND_ERROR || rep.count == 0 || rep.count > count - got) {
                rc = -EPROTO;
                break;
            }
            uint64_t dst = b->base + rep.offset, len = (uint64_t)rep.count * ps;
            if (rep.word == UP_CREF_KIND_DATA) {
                rc = up_cref_read_all(b->sock, b->buf, len);
                if (rc)
                    break;
                stat_add(&b->st.bytes, len);
                data_bytes += len;
                place_range(b, OP_COPY, dst, b->buf, len);
            } else if (rep.word == UP_CREF_KIND_ZERO) {
                if (b->huge)
                    place_range(b, OP_COPY, dst, b->zeros, len);
                else
                    place_range(b, OP_ZERO, dst, NULL, len);
            } else if (rep.word == UP_CREF_KIND_POISONED) {
                place_range(b, OP_POISON, dst, NULL, len);
            } else {
                rc = -EPROTO;
            }
            got += rep.count;
        }
        if (rc) {
            if (!__atomic_load_n(&b->stopping, __ATOMIC_ACQUIRE))
                fail(b, -rc);
            break;
        }
    }
    pthread_mutex_lock(&b->mu);
    __atomic_store_n(&b->st.elapsed_ns, now_ns() - b->t0, __ATOMIC_RELAXED);
    __atomic_store_n(&b->st.done, 1, __ATOMIC_RELEASE);
    pthread_cond_broadcast(&b->cv);
    pthread_mutex_unlock(&b->mu);
    return NULL;
}

int up_cref_bulk_start(up_cref_bulk **out, int uffd, uint64_t base, uint64_t size,
                       uint64_t page_size, int sock_fd, uint32_t chunk_pages, uint64_t rate,
                       int cpu)
{
    if (!out || !span_ok(uffd, base, size, page_size) || sock_fd < 0 || chunk_pages == 0)
        return -EINVAL;
    up_cref_bulk *b = calloc(1, sizeof *b);
    if (!b)
        return -ENOMEM;
    b->uffd = uffd;
    b->sock = sock_fd;
    b->base = base;
    b->size = size;
    b->page_size = page_size;
    b->rate = rate;
    b->chunk = chunk_pages;
    b->huge = page_size != (uint64_t)sysconf(_SC_PAGESIZE);
    b->st.cpu = -1;
    pthread_mutex_init(&b->mu, NULL);
    pthread_cond_init(&b->cv, NULL);
    b->buf = malloc((size_t)chunk_pages * page_size);
    b->zeros = b->huge ? calloc(chunk_pages, page_size) : NULL;
    b->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    int rc = 0;
    if (!b->buf || (b->huge && !b->zeros))
        rc = -ENOMEM;
    else if (b->stop_fd < 0)
        rc = -errno;
    if (!rc) {
        b->t0 = now_ns();
        rc = start_thread(&b->tid, bulk_thread, b, cpu);
    }
    if (rc) {
        if (b->stop_fd >= 0)
            close(b->stop_fd);
        free(b->buf);
        free(b->zeros);
        free(b);
        return rc;
    }
    *out = b;
    return 0;
}

void up_cref_bulk_stats_get(up_cref_bulk *b, up_cref_bulk_stats *out)
{
    out->requests = __atomic_load_n(&b->st.requests, __ATOMIC_RELAXED);
    out->bytes = __atomic_load_n(&b->st.bytes, __ATOMIC_RELAXED);
    out->placed = __atomic_load_n(&b->st.placed, __ATOMIC_RELAXED);
    out->skipped = __atomic_load_n(&b->st.skipped, __ATOMIC_RELAXED);
    out->errors = __atomic_load_n(&b->st.errors, __ATOMIC_RELAXED);
    out->last_errno = __atomic_load_n(&b->st.last_errno, __ATOMIC_RELAXED);
    out->cpu = __atomic_load_n(&b->st.cpu, __ATOMIC_RELAXED);
    out->done = __atomic_load_n(&b->st.done, __ATOMIC_ACQUIRE);
    out->pad = 0;
    out->elapsed_ns = out->done ? __atomic_load_n(&b->st.elapsed_ns, __ATOMIC_RELAXED)
                                : now_ns() - b->t0;
}

int up_cref_bulk_wait(up_cref_bulk *b, int timeout_ms)
{
    struct timespec dl;
    clock_gettime(CLOCK_REALTIME, &dl);
    if (timeout_ms >= 0) {
        dl.tv_sec += timeout_ms / 1000;
        dl.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
        if (dl.tv_nsec >= 1000000000L) {
            dl.tv_sec++;
            dl.tv_nsec -= 1000000000L;
        }
    }
    pthread_mutex_lock(&b->mu);
    while (!b->st.done) {
        int e = timeout_ms < 0 ? pthread_cond_wait(&b->cv, &b->mu)
                               : pthread_cond_timedwait(&b->cv, &b->mu, &dl);
        if (e == ETIMEDOUT)
            break;
    }
    int done = b->st.done;
    pthread_mutex_unlock(&b->mu);
    return done;
}

int up_cref_bulk_stop(up_cref_bulk *b, up_cref_bulk_stats *final_out)
{
    if (!b)
        return 0;
    __atomic_store_n(&b->stopping, 1, __ATOMIC_RELEASE);
    uint64_t one = 1;
    if (write(b->stop_fd, &one, sizeof one) < 0)
        return -errno;
    shutdown(b->sock, SHUT_RDWR); /* ends a read blocked on the source */
    pthread_join(b->tid, NULL);
    if (final_out)
        up_cref_bulk_stats_get(b, final_out);
    close(b->stop_fd);
    pthread_cond_destroy(&b->cv);
    pthread_mutex_destroy(&b->mu);
    free(b->buf);
    free(b->zeros);
    free(b);
    return 0;
}
