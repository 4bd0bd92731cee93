/* The C reference ("the floor"): a local userfaultfd handler, a minimal TCP page source, a
 * remote handler asking that source one page per fault, and a ping-pong client.
 *
 * Wire format of the reference source (little-endian, TCP_NODELAY):
 *   request  16 bytes {u64 offset, u32 count, u32 flags} (+ (flags >> 16) padding bytes, ignored)
 *   reply    one or more runs covering the count pages in order, each
 *            16 bytes {u64 offset, u32 count, u32 kind} + count * page_size bytes when kind DATA.
 *   kind ERROR (count 0) answers a request outside the served buffer.
 *   MINOR mode: flag DIGESTS, and count u64 digests (XXH64 of the requester's cached copies)
 *   follow the request; a page whose digest matches (or any page, when the source vouches
 *   that nothing changed: UP_CREF_SOURCE_VOUCH) is answered CLEAN, no data.
 */
#include "cref.h"
#include "common.h"
#include "uffd_place.h" /* the kernel boundary's ioctl wrappers and newer-uapi definitions */
#include "digest.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>


#define UP_CREF_MAX_CONNS 64
#define UP_CREF_MSG_BATCH 64

struct up_cref_req {
    uint64_t offset;
    uint32_t count;
    uint32_t flags;
};
struct up_cref_rep {
    uint64_t offset;
    uint32_t count;
    uint32_t kind;
};
_Static_assert(sizeof(struct up_cref_req) == 16, "request is 16 bytes");
_Static_assert(sizeof(struct up_cref_rep) == 16, "reply header is 16 bytes");


static void st_copy(const up_cref_stats *in, up_cref_stats *out)
{
    out->faults = __atomic_load_n(&in->faults, __ATOMIC_RELAXED);
    out->copies = __atomic_load_n(&in->copies, __ATOMIC_RELAXED);
    out->zeropages = __atomic_load_n(&in->zeropages, __ATOMIC_RELAXED);
    out->poisons = __atomic_load_n(&in->poisons, __ATOMIC_RELAXED);
    out->eexist = __atomic_load_n(&in->eexist, __ATOMIC_RELAXED);
    out->errors = __atomic_load_n(&in->errors, __ATOMIC_RELAXED);
    out->requests = __atomic_load_n(&in->requests, __ATOMIC_RELAXED);
    out->pages = __atomic_load_n(&in->pages, __ATOMIC_RELAXED);
    out->connections = __atomic_load_n(&in->connections, __ATOMIC_RELAXED);
    out->last_errno = __atomic_load_n(&in->last_errno, __ATOMIC_RELAXED);
    out->cpu = __atomic_load_n(&in->cpu, __ATOMIC_RELAXED);
}

static void st_error(up_cref_stats *s, int err)
{
    stat_add(&s->errors, 1);
    __atomic_store_n(&s->last_errno, err, __ATOMIC_RELAXED);
}

static inline int bit_set(const uint8_t *bm, uint64_t i)
{
    return bm && (bm[i >> 3] >> (i & 7)) & 1;
}

static int write_all(int fd, const struct iovec *iov_in, int iovcnt)
{
    struct iovec iov[4];
    memcpy(iov, iov_in, sizeof(struct iovec) * (size_t)iovcnt);
    struct iovec *v = iov;
    while (iovcnt > 0) {
        struct msghdr mh = {.msg_iov = v, .msg_iovlen = (size_t)iovcnt};
        ssize_t w = sendmsg(fd, &mh, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        while (iovcnt > 0 && (size_t)w >= v->iov_len) {
            w -= (ssize_t)v->iov_len;
            v++;
            iovcnt--;
        }
        if (iovcnt > 0) {
            v->iov_base = (char *)v->iov_base + w;
            v->iov_len -= (size_t)w;
        }
    }
    return 0;
}

/* Read exactly len bytes; -EPIPE on EOF. Shared with bulkpull.c. */
int up_cref_read_all(int fd, void *buf, size_t len)
{
    char *p = buf;
    while (len) {
        ssize_t r = recv(fd, p, len, MSG_WAITALL);
        if (r == 0)
            return -EPIPE;
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        p += r;
        len -= (size_t)r;
    }
    return 0;
}

/* ---- userfaultfd ------------------------------------------------------------------------- */

int up_cref_uffd_open(void)
{
    int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (fd < 0)
        return -errno;
    struct uffdio_api api = {.api = UFFD_API, .features = UFFD_FEATURE_POISON};
    if (ioctl(fd, UFFDIO_API, &api) != 0) {
        /* Older kernel without the POISON bit: an fd can be negotiated once, start over. */
        close(fd);
        fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
        if (fd < 0)
            return -errno;
        api.api = UFFD_API;
        api.features = 0;
        if (ioctl(fd, UFFDIO_API, &api) != 0) {
            int e = errno;
            close(fd);
            return -e;
        }
    }
    return fd;
}

int up_cref_uffd_register(int uffd, uint64_t base, uint64_t len)
{
    struct uffdio_register reg = {.range = {.start = base, .len = len},
                                  .mode = UFFDIO_REGISTER_MODE_MISSING};
    return ioctl(uffd, UFFDIO_REGISTER, &reg) == 0 ? 0 : -errno;
}

/* ---- handlers (a) and (c) ---------------------------------------------------------------- */

struct up_cref_handler {
    int uffd;
    int stop_fd;
    int sock;  /* remote: connected to a source; local: -1 */
    uint64_t base, size, page_size;
    uint64_t src;
    const uint8_t *poison;
    uint8_t *scratch;  /* remote: one page of received data */
    uint8_t *zeros;    /* a zero page for COPY where ZEROPAGE does not exist (hugetlb) */
    int huge;
    uint8_t *alias;           /* MINOR: the cache's unregistered mapping, or NULL */
    const uint64_t *digests;  /* MINOR: digests kept at precopy, or NULL (hash at fault) */
    pthread_t tid;
    int stopping;
    up_cref_stats st;
};

static void place_wake_on_eexist(up_cref_handler *h, uint64_t page)
{
    /* Another thread's fault placed it first; make sure nobody is left waiting. */
    struct uffdio_range r = {.start = page, .len = h->page_size};
    stat_add(&h->st.eexist, 1);
    ioctl(h->uffd, UFFDIO_WAKE, &r);
}

enum { OP_COPY, OP_ZERO, OP_POISON, OP_CONTINUE };

/* Place one page with the kernel boundary's wrappers (no ledger: this is the floor the
 * product is measured against). Zero pages of huge pages are COPYs of a zero page. */
static void place_page(up_cref_handler *h, int op, uint64_t page, const void *from)
{
    int64_t done;
    uint64_t ps = h->page_size;
    uint64_t *count = op == OP_COPY || op == OP_CONTINUE ? &h->st.copies
                      : op == OP_ZERO                   ? &h->st.zeropages
                                                        : &h->st.poisons;
    if (op == OP_ZERO && h->huge) {
        op = OP_COPY;
        from = h->zeros;
    }
    for (;;) {
        int rc = op == OP_COPY       ? up_uffd_copy(h->uffd, page, (uint64_t)(uintptr_t)from, ps, 0, &done)
                 : op == OP_ZERO     ? up_uffd_zeropage(h->uffd, page, ps, 0, &done)
                 : op == OP_CONTINUE ? up_uffd_continue(h->uffd, page, ps, 0, &done)
                                     : up_uffd_poison(h->uffd, page, ps, 0, &done);
        if (rc == 0) {
            stat_add(count, 1);
            return;
        }
        if (rc == -EAGAIN)
            continue; /* a non-cooperative event in flight; none are enabled, so retry */
        if (rc == -EEXIST)
            place_wake_on_eexist(h, page);
        else
            st_error(&h->st, -rc);
        return;
    }
}

static void resolve_local(up_cref_handler *h, uint64_t page)
{
    uint64_t idx = (page - h->base) / h->page_size;
    if (bit_set(h->poison, idx))
        place_page(h, OP_POISON, page, NULL);
    else
        place_page(h, OP_COPY, page, (const void *)(uintptr_t)(h->src + idx * h->page_size));
}

/* 0, or -errno when the connection to the source is unusable (the handler then stops). In
 * MINOR mode the request carries the cached copy's digest; the page is mapped with CONTINUE
 * after any new bytes were written into the cache through the alias. */
static int resolve_remote(up_cref_handler *h, uint64_t page)
{
    const uint64_t idx = (page - h->base) / h->page_size;
    uint8_t *cached = h->alias ? h->alias + idx * h->page_size : NULL;
    struct up_cref_req req = {
        .offset = page - h->base, .count = 1,
        .flags = UP_CREF_FLAG_ZERO_DETECT | (cached ? UP_CREF_FLAG_DIGESTS : 0)};
    uint64_t digest = !cached ? 0 : h->digests ? h->digests[idx] : up_xxh64(cached, h->page_size, 0);
    struct iovec iov[2] = {{.iov_base = &req, .iov_len = sizeof req},
                           {.iov_base = &digest, .iov_len = sizeof digest}};
    int rc = write_all(h->sock, iov, cached ? 2 : 1);
    if (rc)
        return rc;
    stat_add(&h->st.requests, 1);
    uint32_t got = 0;
    while (got < req.count) {
        struct up_cref_rep rep;
        rc = up_cref_read_all(h->sock, &rep, sizeof rep);
        if (rc)
            return rc;
        if (rep.kind == UP_CREF_KIND_ERROR || rep.count == 0 || rep.count > req.count - got)
            return -EPROTO;
        for (uint32_t k = 0; k < rep.count; k++) {
            uint64_t at = h->base + rep.offset + (uint64_t)k * h->page_size;
            switch (rep.kind) {
            case UP_CREF_KIND_DATA:
                rc = up_cref_read_all(h->sock, cached ? cached : h->scratch, h->page_size);
                if (rc)
                    return rc;
                place_page(h, cached ? OP_CONTINUE : OP_COPY, at, h->scratch);
                break;
            case UP_CREF_KIND_ZERO:
                if (cached)
                    memset(cached, 0, h->page_size);
                place_page(h, cached ? OP_CONTINUE : OP_ZERO, at, NULL);
                break;
            case UP_CREF_KIND_CLEAN:
                if (!cached)
                    return -EPROTO;
                place_page(h, OP_CONTINUE, at, NULL);
                break;
            case UP_CREF_KIND_POISONED:
                place_page(h, OP_POISON, at, NULL);
                break;
            default:
                return -EPROTO;
            }
        }
        got += rep.count;
    }
    return 0;
}

static void *handler_thread(void *arg)
{
    up_cref_handler *h = arg;
    __atomic_store_n(&h->st.cpu, sched_getcpu(), __ATOMIC_RELAXED);
    struct uffd_msg msgs[UP_CREF_MSG_BATCH];
    struct pollfd pfd[2] = {{.fd = h->uffd, .events = POLLIN},
                            {.fd = h->stop_fd, .events = POLLIN}};
    int need_poll = 1;
    while (!__atomic_load_n(&h->stopping, __ATOMIC_ACQUIRE)) {
        /* Read first and poll only when nothing is pending: the next fault is often queued
         * by the time the previous COPY returns (always when both threads share a CPU). */
        if (need_poll) {
            int pr = poll(pfd, 2, -1);
            if (pr < 0) {
                if (errno == EINTR)
                    continue;
                st_error(&h->st, errno);
                break;
            }
            if (pfd[1].revents)
                break;
            if (pfd[0].revents & (POLLERR | POLLNVAL)) {
                st_error(&h->st, EBADF);
                break;
            }
        }
        ssize_t r = read(h->uffd, msgs, sizeof msgs);
        if (r < 0) {
            if (errno == EAGAIN || errno == EINTR) {
                need_poll = 1;
                continue;
            }
            st_error(&h->st, errno);
            break;
        }
        need_poll = 0;
        size_t nmsg = (size_t)r / sizeof msgs[0];
        int fatal = 0;
        for (size_t i = 0; i < nmsg && !fatal; i++) {
            if (msgs[i].event != UFFD_EVENT_PAGEFAULT)
                continue;
            stat_add(&h->st.faults, 1);
            uint64_t page = msgs[i].arg.pagefault.address & ~(h->page_size - 1);
            if (page < h->base || page >= h->base + h->size) {
                st_error(&h->st, ERANGE);
                continue;
            }
            if (h->sock < 0) {
                resolve_local(h, page);
            } else {
                int rc = resolve_remote(h, page);
                if (rc) {
                    st_error(&h->st, -rc);
                    fatal = 1;
                }
            }
        }
        if (fatal)
            break;
    }
    return NULL;
}

static int handler_start(up_cref_handler **out, int uffd, uint64_t base, uint64_t size,
                         uint64_t page_size, uint64_t src, const uint8_t *poison, int sock,
                         int cpu)
{
    if (!out || !span_ok(uffd, base, size, page_size))
        return -EINVAL;
    up_cref_handler *h = calloc(1, sizeof *h);
    if (!h)
        return -ENOMEM;
    h->uffd = uffd;
    h->sock = sock;
    h->base = base;
    h->size = size;
    h->page_size = page_size;
    h->src = src;
    h->poison = poison;
    h->huge = page_size != (uint64_t)sysconf(_SC_PAGESIZE);
    h->st.cpu = -1;
    h->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    int rc = h->stop_fd < 0 ? -errno : 0;
    if (!rc) {
        h->zeros = calloc(1, page_size);
        h->scratch = sock >= 0 ? malloc(page_size) : NULL;
        if (!h->zeros || (sock >= 0 && !h->scratch))
            rc = -ENOMEM;
    }
    if (!rc && sock >= 0) {
        int one = 1;
        setsockopt(sock, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one); /* not TCP: harmless */
    }
    if (!rc)
        rc = start_thread(&h->tid, handler_thread, h, cpu);
    if (rc) {
        if (h->stop_fd >= 0)
            close(h->stop_fd);
        free(h->zeros);
        free(h->scratch);
        free(h);
        return rc;
    }
    *out = h;
    return 0;
}

int up_cref_local_start(up_cref_handler **out, int uffd, uint64_t base, uint64_t size,
                        uint64_t page_size, uint64_t src, const uint8_t *poison_bitmap, int cpu)
{
    if (!src)
        return -EINVAL;
    return handler_start(out, uffd, base, size, page_size, src, poison_bitmap, -1, cpu);
}

int up_cref_remote_start(up_cref_handler **out, int uffd, uint64_t base, uint64_t size,
                         uint64_t page_size, int sock_fd, int cpu)
{
    if (sock_fd < 0)
        return -EINVAL;
    return handler_start(out, uffd, base, size, page_size, 0, NULL, sock_fd, cpu);
}

int up_cref_minor_start(up_cref_handler **out, int uffd, uint64_t base, uint64_t size,
                        uint64_t page_size, int sock_fd, uint64_t alias,
                        const uint64_t *digests, int cpu)
{
    if (sock_fd < 0 || !alias)
        return -EINVAL;
    int rc = handler_start(out, uffd, base, size, page_size, 0, NULL, sock_fd, cpu);
    if (!rc) { /* before its first fault: nothing can fault until a page is touched */
        __atomic_store_n(&(*out)->digests, digests, __ATOMIC_RELEASE);
        __atomic_store_n(&(*out)->alias, (uint8_t *)(uintptr_t)alias, __ATOMIC_RELEASE);
    }
    return rc;
}

void up_cref_handler_stats_get(up_cref_handler *h, up_cref_stats *out) { st_copy(&h->st, out); }

int up_cref_handler_stop(up_cref_handler *h, up_cref_stats *final_out)
{
    if (!h)
        return 0;
    __atomic_store_n(&h->stopping, 1, __ATOMIC_RELEASE);
    uint64_t one = 1;
    if (write(h->stop_fd, &one, sizeof one) < 0)
        return -errno;
    pthread_join(h->tid, NULL);
    if (final_out)
        st_copy(&h->st, final_out);
    close(h->stop_fd);
    free(h->zeros);
    free(h->scratch);
    free(h);
    return 0;
}

/* ---- source (b) --------------------------------------------------------------------------- */

struct up_cref_source {
    int listen_fd;
    int own_listen;
    int port;
    int stop_fd;
    const uint8_t *buf;
    uint64_t size, page_size;
    const uint8_t *poison;
    uint8_t *discard;
    pthread_t tid;
    int cpu;
    int threaded;                                /* a thread per connection */
    int vouch;                                   /* UP_CREF_SOURCE_VOUCH */
    struct up_cref_conn *conns[UP_CREF_MAX_CONNS];
    int nconns;
    up_cref_stats st;
};

/* Threaded mode: one connection served by its own thread. The fd stays open until the thread
 * has been joined (by the accept loop once done is set, or at stop), so it is never reused
 * while someone may still shut it down. */
struct up_cref_conn {
    up_cref_source *s;
    int fd;
    int done;
    pthread_t tid;
    uint8_t *discard;
};

static int page_is_zero(const uint8_t *p, uint64_t len)
{
    const uint64_t *w = (const uint64_t *)p;
    for (uint64_t i = 0; i < len / 8; i++)
        if (w[i])
            return 0;
    return 1;
}

static uint32_t page_kind(up_cref_source *s, uint64_t idx, uint32_t flags)
{
    if (bit_set(s->poison, idx))
        return UP_CREF_KIND_POISONED;
    if ((flags & UP_CREF_FLAG_ZERO_DETECT) &&
        page_is_zero(s->buf + idx * s->page_size, s->page_size))
        return UP_CREF_KIND_ZERO;
    return UP_CREF_KIND_DATA;
}

/* With digests: CLEAN where the requester's copy is current (vouched, or the digest matches). */
static uint32_t page_kind_minor(up_cref_source *s, uint64_t idx, uint32_t flags, uint64_t digest)
{
    if (!(flags & UP_CREF_FLAG_DIGESTS) || bit_set(s->poison, idx))
        return page_kind(s, idx, flags);
    if (s->vouch || up_xxh64(s->buf + idx * s->page_size, s->page_size, 0) == digest)
        return UP_CREF_KIND_CLEAN;
    return page_kind(s, idx, flags);
}

/* Serve one request on fd; -errno closes the connection. */
static int serve_one(up_cref_source *s, int fd, uint8_t *discard)
{
    struct up_cref_req req;
    int rc = up_cref_read_all(fd, &req, sizeof req);
    if (rc)
        return rc;
    size_t pad = req.flags >> 16;
    if (pad) {
        rc = up_cref_read_all(fd, discard, pad);
        if (rc)
            return rc;
    }
    stat_add(&s->st.requests, 1);
    uint64_t ps = s->page_size;
    if (req.count == 0 || req.offset % ps || req.offset >= s->size ||
        (uint64_t)req.count > (s->size - req.offset) / ps) {
        struct up_cref_rep rep = {.offset = req.offset, .count = 0, .kind = UP_CREF_KIND_ERROR};
        struct iovec iov = {.iov_base = &rep, .iov_len = sizeof rep};
        return write_all(fd, &iov, 1);
    }
    uint64_t first = req.offset / ps;
    uint64_t end = first + req.count;
    uint64_t i = first;
    uint64_t digests[64];
    if (req.flags & UP_CREF_FLAG_DIGESTS) {
        if (req.count > 64)
            return -EPROTO;
        rc = up_cref_read_all(fd, digests, 8u * req.count);
        if (rc)
            return rc;
    }
#define KIND(k) page_kind_minor(s, (k), req.flags, digests[(k) - first])
    while (i < end) {
        uint32_t kind = KIND(i);
        uint64_t j = i + 1;
        while (j < end && KIND(j) == kind)
            j++;
        struct up_cref_rep rep = {.offset = i * ps, .count = (uint32_t)(j - i), .kind = kind};
        struct iovec iov[2] = {{.iov_base = &rep, .iov_len = sizeof rep},
                               {.iov_base = (void *)(s->buf + i * ps), .iov_len = (j - i) * ps}};
        rc = write_all(fd, iov, kind == UP_CREF_KIND_DATA ? 2 : 1);
        if (rc)
            return rc;
        stat_add(&s->st.pages, j - i);
        i = j;
    }
    return 0;
}

static void *conn_thread(void *arg)
{
    struct up_cref_conn *c = arg;
    struct pollfd p[2] = {{.fd = c->fd, .events = POLLIN}, {.fd = c->s->stop_fd, .events = POLLIN}};
    for (;;) {
        if (poll(p, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            st_error(&c->s->st, errno);
            break;
        }
        if (p[1].revents)
            break;
        int rc = (p[0].revents & POLLIN) ? serve_one(c->s, c->fd, c->discard) : -EPIPE;
        if (rc) {
            if (rc != -EPIPE && rc != -ECONNRESET && rc != -ESHUTDOWN)
                st_error(&c->s->st, -rc);
            break;
        }
    }
    __atomic_store_n(&c->done, 1, __ATOMIC_RELEASE);
    return NULL;
}

static void conn_free(struct up_cref_conn *c)
{
    shutdown(c->fd, SHUT_RDWR); /* ends a read or write it is blocked in */
    pthread_join(c->tid, NULL);
    close(c->fd);
    free(c->discard);
    free(c);
}

/* Threaded mode: hand an accepted connection to a thread of its own (0 or -errno). */
static int conn_start(up_cref_source *s, int fd)
{
    for (int k = 0; k < s->nconns; k++) { /* reap finished connections first */
        if (__atomic_load_n(&s->conns[k]->done, __ATOMIC_ACQUIRE)) {
            conn_free(s->conns[k]);
            s->conns[k--] = s->conns[--s->nconns];
        }
    }
    if (s->nconns == UP_CREF_MAX_CONNS)
        return -EMFILE;
    struct up_cref_conn *c = calloc(1, sizeof *c);
    if (!c)
        return -ENOMEM;
    c->s = s;
    c->fd = fd;
    c->discard = malloc(65536);
    int rc = c->discard ? start_thread(&c->tid, conn_thread, c, s->cpu) : -ENOMEM;
    if (rc) {
        free(c->discard);
        free(c);
        return rc;
    }
    s->conns[s->nconns++] = c;
    return 0;
}

static void *source_thread(void *arg)
{
    up_cref_source *s = arg;
    __atomic_store_n(&s->st.cpu, sched_getcpu(), __ATOMIC_RELAXED);
    struct pollfd pfd[2 + UP_CREF_MAX_CONNS];
    int nconn = 0;
    pfd[0] = (struct pollfd){.fd = s->stop_fd, .events = POLLIN};
    pfd[1] = (struct pollfd){.fd = s->listen_fd, .events = POLLIN};
    for (;;) {
        int pr = poll(pfd, (nfds_t)(2 + nconn), -1);
        if (pr < 0) {
            if (errno == EINTR)
                continue;
            st_error(&s->st, errno);
            break;
        }
        if (pfd[0].revents)
            break;
        for (int k = 0; k < nconn; k++) {
            if (!pfd[2 + k].revents)
                continue;
            int rc = (pfd[2 + k].revents & POLLIN) ? serve_one(s, pfd[2 + k].fd, s->discard)
                                                    : -EPIPE;
            if (rc) {
                if (rc != -EPIPE && rc != -ECONNRESET)
                    st_error(&s->st, -rc);
                close(pfd[2 + k].fd);
                pfd[2 + k] = pfd[2 + nconn - 1];
                nconn--;
                k--;
            }
        }
        if (pfd[1].revents & POLLIN) {
            int c = accept4(s->listen_fd, NULL, NULL, SOCK_CLOEXEC);
            if (c < 0) {
                if (errno != EAGAIN && errno != EINTR)
                    st_error(&s->st, errno);
            } else if (!s->threaded && nconn == UP_CREF_MAX_CONNS) {
                st_error(&s->st, EMFILE);
                close(c);
            } else {
                int one = 1;
                setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                /* Blocking I/O per request: the reference serves requests back to back. */
                fcntl(c, F_SETFL, fcntl(c, F_GETFL) & ~O_NONBLOCK);
                if (s->threaded) {
                    int rc = conn_start(s, c);
                    if (rc) {
                        st_error(&s->st, -rc);
                        close(c);
                        continue;
                    }
                } else {
                    pfd[2 + nconn++] = (struct pollfd){.fd = c, .events = POLLIN};
                }
                stat_add(&s->st.connections, 1);
            }
        }
    }
    for (int k = 0; k < nconn; k++)
        close(pfd[2 + k].fd);
    for (int k = 0; k < s->nconns; k++)
        conn_free(s->conns[k]);
    s->nconns = 0;
    return NULL;
}

int up_cref_source_start(up_cref_source **out, int listen_fd, uint64_t buf, uint64_t size,
                         uint64_t page_size, const uint8_t *poison_bitmap, int cpu)
{
    return up_cref_source_start_ex(out, listen_fd, buf, size, page_size, poison_bitmap, cpu, 0);
}

int up_cref_source_start_ex(up_cref_source **out, int listen_fd, uint64_t buf, uint64_t size,
                            uint64_t page_size, const uint8_t *poison_bitmap, int cpu,
                            uint32_t flags)
{
    if (!out || !buf || page_size == 0 || (page_size & (page_size - 1)) || size % page_size)
        return -EINVAL;
    up_cref_source *s = calloc(1, sizeof *s);
    if (!s)
        return -ENOMEM;
    s->buf = (const uint8_t *)(uintptr_t)buf;
    s->size = size;
    s->page_size = page_size;
    s->poison = poison_bitmap;
    s->cpu = cpu;
    s->threaded = (flags & UP_CREF_SOURCE_THREADED) != 0;
    s->vouch = (flags & UP_CREF_SOURCE_VOUCH) != 0;
    s->st.cpu = -1;
    s->stop_fd = -1;
    s->listen_fd = listen_fd;
    int rc = 0;
    if (listen_fd < 0) {
        s->own_listen = 1;
        s->listen_fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = 0,
                                .sin_addr = {.s_addr = htonl(INADDR_LOOPBACK)}};
        if (s->listen_fd < 0 || bind(s->listen_fd, (struct sockaddr *)&a, sizeof a) != 0 ||
            listen(s->listen_fd, 16) != 0)
            rc = -errno;
    }
    if (!rc) {
        struct sockaddr_in a;
        socklen_t alen = sizeof a;
        if (getsockname(s->listen_fd, (struct sockaddr *)&a, &alen) == 0 && a.sin_family == AF_INET)
            s->port = ntohs(a.sin_port);
        s->discard = malloc(65536);
        s->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        if (!s->discard)
            rc = -ENOMEM;
        else if (s->stop_fd < 0)
            rc = -errno;
    }
    if (!rc)
        rc = start_thread(&s->tid, source_thread, s, cpu);
    if (rc) {
        if (s->own_listen && s->listen_fd >= 0)
            close(s->listen_fd);
        if (s->stop_fd >= 0)
            close(s->stop_fd);
        free(s->discard);
        free(s);
        return rc;
    }
    *out = s;
    return 0;
}

int up_cref_source_port(up_cref_source *s) { return s->port; }

void up_cref_source_stats_get(up_cref_source *s, up_cref_stats *out) { st_copy(&s->st, out); }

int up_cref_source_stop(up_cref_source *s, up_cref_stats *final_out)
{
    if (!s)
        return 0;
    uint64_t one = 1;
    if (write(s->stop_fd, &one, sizeof one) < 0)
        return -errno;
    pthread_join(s->tid, NULL);
    if (final_out)
        st_copy(&s->st, final_out);
    close(s->stop_fd);
    if (s->own_listen)
        close(s->listen_fd);
    free(s->discard);
    free(s);
    return 0;
}

/* ---- ping-pong (d) ------------------------------------------------------------------------ */

int up_cref_pingpong(int fd, const void *req, size_t req_len, size_t reply_len, size_t n,
                     uint64_t *ns_out)
{
    if ((req_len && !req) || (n && !ns_out))
        return -EINVAL;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    void *reply = malloc(reply_len ? reply_len : 1);
    if (!reply)
        return -ENOMEM;
    int rc = 0;
    for (size_t i = 0; i < n && !rc; i++) {
        uint64_t t0 = now_ns();
        struct iovec iov = {.iov_base = (void *)req, .iov_len = req_len};
        rc = req_len ? write_all(fd, &iov, 1) : 0;
        if (!rc)
            rc = up_cref_read_all(fd, reply, reply_len);
        ns_out[i] = now_ns() - t0;
    }
    free(reply);
    return rc;
}
