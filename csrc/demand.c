/*
 * The destination's demand engine (see demand.h and docs/DESIGN.md, "The demand engine").
 *
 * One thread polls the userfaultfd, the URGENT socket and a wake eventfd. A fault claims its
 * page in the ledger and sends the fast 48-byte Request frame of uffdpoison/protocol.py; a
 * fast Pages reply is checked exactly as protocol.Connection._accept_fast checks it, against
 * the engine's own table of outstanding requests, and placed through up_ledger_place, so the
 * never-un-poison invariant stays in ledger.c. Whatever is not the exact fast encoding goes
 * back to Python with the unconsumed bytes: Python's generic decoder decides.
 */
#include "demand.h"
#include "wire.h"
#include "uffd.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define PREFIX UP_WIRE_PREFIX
#define FAST_HEADER UP_WIRE_FAST_HEADER
#define FAST_FRAME (PREFIX + FAST_HEADER)
#define MAX_PAYLOAD UP_WIRE_MAX_PAYLOAD
#define MAX_PAGES UP_WIRE_MAX_PAGES
#define KIND_DATA UP_KIND_DATA
#define KIND_ZERO UP_KIND_ZERO
#define KIND_POISONED UP_KIND_POISONED
#define EVENT_BATCH 64
#define PUSH_HEADER UP_WIRE_PUSH_HEADER
#define PUSH_FRAME (PREFIX + PUSH_HEADER)
/* A fault waits behind at most one unit of bulk work: one recv of this many bytes, or one
 * placement of this many bytes (at least one page). */
#define BULK_PIECE (256u << 10)
#define BULK_SLICE (64u << 10)

#if defined(__x86_64__) || defined(__i386__)
#define cpu_relax() __builtin_ia32_pause()
#else
#define cpu_relax() __asm__ __volatile__("" ::: "memory")
#endif

#define CNT(e, field, n) __atomic_add_fetch(&(e)->st.field, (uint64_t)(n), __ATOMIC_RELAXED)
#define LOAD(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define STORE(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)

struct out_entry {
	uint64_t next; /* next byte offset a reply must start at */
	uint64_t end;  /* 0: answered (slot free) */
};

struct up_demand {
	int uffd, sock, wake_fd, progress_fd;
	uint64_t ps, memory_size;
	int nregions;
	up_demand_region *regions;

	/* lock: the outstanding table, the id counter, the outbox, writes to the socket */
	pthread_mutex_t lock;
	struct out_entry *out; /* ring indexed by id & (out_cap - 1), ids [out_base, next_id) */
	uint64_t out_cap, out_base, next_id;
	uint8_t *obuf;
	size_t ocap, opos, olen;
	int sock_err;          /* errno of a failed send (any thread) */

	/* engine thread only */
	uint8_t *rbuf;
	size_t rcap, rpos, rlen;
	up_event *evq; /* faults read but not served yet */
	size_t evcap, evhead, evlen;
	int sock_live;
	int complete_signalled;

	/* BULK: bulk_fd and bulk_state are set by attach (any thread) before the engine sees
	 * them (bulk_state is the atomic); the rest is the engine thread's (or detach's, when
	 * not running). bbuf holds the frame being received or placed, from offset 0. */
	int bulk_fd, bulk_state, bulk_more, bulk_eof;
	uint8_t *bbuf;
	size_t bcap, blen;
	int bk_active, bk_kind;
	uint64_t bk_off, bk_n, bk_done, slice_pages;

	int stop, release, running, notify; /* atomics */
	up_demand_stats st;
};

void up_demand_encode_request(uint8_t o[48], uint64_t id, uint64_t offset, uint64_t count)
{
	up_wire_put_request(o, id, offset, count);
}

static void wake(int fd)
{
	uint64_t one = 1;
	ssize_t r = write(fd, &one, sizeof(one));
	(void)r; /* EAGAIN: the counter is already non-zero, which is all we need */
}

static void drain(int fd)
{
	uint64_t v;
	ssize_t r = read(fd, &v, sizeof(v));
	(void)r;
}

up_demand *up_demand_new(int uffd, int sock, uint64_t page_size, uint64_t memory_size,
			 uint64_t next_id, const up_demand_region *regions, int nregions)
{
	if (page_size == 0 || (page_size & (page_size - 1)) || nregions <= 0 || !regions) {
		errno = EINVAL;
		return NULL;
	}
	up_demand *e = calloc(1, sizeof(*e));
	if (!e)
		return NULL;
	e->uffd = uffd;
	e->sock = sock;
	e->sock_live = sock >= 0;
	e->ps = page_size;
	e->memory_size = memory_size;
	e->next_id = e->out_base = next_id;
	e->nregions = nregions;
	e->wake_fd = e->progress_fd = -1;
	e->bulk_fd = -1;
	e->slice_pages = page_size < BULK_SLICE ? BULK_SLICE / page_size : 1;
	pthread_mutex_init(&e->lock, NULL);
	e->regions = malloc(sizeof(*regions) * (size_t)nregions);
	e->out_cap = 64;
	e->out = calloc(e->out_cap, sizeof(*e->out));
	e->rcap = (1u << 20) + FAST_FRAME;
	if (e->rcap < page_size + FAST_FRAME)
		e->rcap = page_size + FAST_FRAME;
	e->rbuf = malloc(e->rcap);
	e->evcap = 256;
	e->evq = malloc(sizeof(*e->evq) * e->evcap);
	e->ocap = 4096;
	e->obuf = malloc(e->ocap);
	e->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	e->progress_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (!e->regions || !e->out || !e->rbuf || !e->evq || !e->obuf || e->wake_fd < 0 ||
	    e->progress_fd < 0) {
		int err = errno ? errno : ENOMEM;
		up_demand_free(e);
		errno = err;
		return NULL;
	}
	memcpy(e->regions, regions, sizeof(*regions) * (size_t)nregions);
	return e;
}

void up_demand_free(up_demand *e)
{
	if (!e)
		return;
	if (e->wake_fd >= 0)
		close(e->wake_fd);
	if (e->progress_fd >= 0)
		close(e->progress_fd);
	pthread_mutex_destroy(&e->lock);
	free(e->regions);
	free(e->out);
	free(e->rbuf);
	free(e->evq);
	free(e->obuf);
	free(e->bbuf);
	free(e);
}

void up_demand_stop(up_demand *e)
{
	STORE(&e->stop, 1);
	wake(e->wake_fd);
}

void up_demand_release_socket(up_demand *e)
{
	pthread_mutex_lock(&e->lock);
	if (!e->release) {
		e->release = 1;
		if (e->sock >= 0)
			shutdown(e->sock, SHUT_RDWR);
		if (LOAD(&e->bulk_state) == UP_BULK_ENGINE)
			shutdown(e->bulk_fd, SHUT_RDWR); /* the engine sees EOF and lets go of it */
	}
	pthread_mutex_unlock(&e->lock);
	wake(e->wake_fd);
}

int up_demand_progress_fd(up_demand *e)
{
	return e->progress_fd;
}

void up_demand_notify(up_demand *e, int delta)
{
	__atomic_add_fetch(&e->notify, delta, __ATOMIC_ACQ_REL);
}

int up_demand_running(up_demand *e)
{
	return LOAD(&e->running);
}

uint64_t up_demand_next_id(up_demand *e)
{
	pthread_mutex_lock(&e->lock);
	uint64_t id = e->next_id;
	pthread_mutex_unlock(&e->lock);
	return id;
}

void up_demand_get_stats(up_demand *e, up_demand_stats *out)
{
	uint64_t *dst = (uint64_t *)out;
	const uint64_t *src = (const uint64_t *)&e->st;
	for (size_t i = 0; i < offsetof(up_demand_stats, last_errno) / 8; i++)
		dst[i] = __atomic_load_n(&src[i], __ATOMIC_RELAXED);
	out->last_errno = LOAD(&e->st.last_errno);
}

int64_t up_demand_outstanding(up_demand *e, uint64_t *ids, uint64_t *next, uint64_t *end,
			      int64_t cap)
{
	int64_t n = 0;
	pthread_mutex_lock(&e->lock);
	for (uint64_t id = e->out_base; id < e->next_id; id++) {
		struct out_entry *o = &e->out[id & (e->out_cap - 1)];
		if (!o->end)
			continue;
		if (n < cap) {
			ids[n] = id;
			next[n] = o->next;
			end[n] = o->end;
		}
		n++;
	}
	pthread_mutex_unlock(&e->lock);
	return n;
}

size_t up_demand_leftover(up_demand *e, const uint8_t **out)
{
	*out = e->rbuf + e->rpos;
	return e->rlen - e->rpos;
}

size_t up_demand_unsent(up_demand *e, const uint8_t **out)
{
	*out = e->obuf + e->opos;
	return e->olen - e->opos;
}

/* ---- sending (under e->lock) ------------------------------------------------------------- */

static int outbox_append(up_demand *e, const uint8_t *p, size_t n)
{
	if (e->opos && e->opos == e->olen)
		e->opos = e->olen = 0;
	if (e->olen + n > e->ocap) {
		if (e->opos) {
			memmove(e->obuf, e->obuf + e->opos, e->olen - e->opos);
			e->olen -= e->opos;
			e->opos = 0;
		}
		size_t cap = e->ocap;
		while (e->olen + n > cap)
			cap *= 2;
		if (cap != e->ocap) {
			uint8_t *b = realloc(e->obuf, cap);
			if (!b)
				return -ENOMEM;
			e->obuf = b;
			e->ocap = cap;
		}
	}
	memcpy(e->obuf + e->olen, p, n);
	e->olen += n;
	return 0;
}

static int send_locked(up_demand *e, const uint8_t *p, size_t n)
{
	if (e->release || e->sock < 0)
		return -ENOTCONN;
	if (e->sock_err)
		return -e->sock_err;
	if (e->opos == e->olen) {
		ssize_t w = send(e->sock, p, n, MSG_DONTWAIT | MSG_NOSIGNAL);
		if (w < 0) {
			if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
				e->sock_err = errno;
				return -errno;
			}
			w = 0;
		}
		if ((size_t)w == n)
			return 0;
		p += w;
		n -= (size_t)w;
	}
	return outbox_append(e, p, n); /* the engine polls POLLOUT while the outbox holds bytes */
}

static int flush_locked(up_demand *e)
{
	while (e->opos < e->olen) {
		ssize_t w = send(e->sock, e->obuf + e->opos, e->olen - e->opos,
				 MSG_DONTWAIT | MSG_NOSIGNAL);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN || errno == EWOULDBLOCK)
				return 0;
			e->sock_err = errno;
			return -errno;
		}
		e->opos += (size_t)w;
	}
	e->opos = e->olen = 0;
	return 0;
}

static int ring_grow(up_demand *e)
{
	uint64_t cap = e->out_cap * 2;
	struct out_entry *n = calloc(cap, sizeof(*n));
	if (!n)
		return -ENOMEM;
	for (uint64_t id = e->out_base; id < e->next_id; id++)
		n[id & (cap - 1)] = e->out[id & (e->out_cap - 1)];
	free(e->out);
	e->out = n;
	e->out_cap = cap;
	return 0;
}

/* One urgent Request for `count` pages at guest `offset`; registered only once it is sent
 * (or queued), so the table never holds a request the source cannot have seen. */
static int request_locked(up_demand *e, uint64_t offset, uint64_t count)
{
	if (e->next_id - e->out_base == e->out_cap) {
		int r = ring_grow(e);
		if (r)
			return r;
	}
	uint8_t frame[FAST_FRAME];
	uint64_t id = e->next_id;
	up_demand_encode_request(frame, id, offset, count);
	int r = send_locked(e, frame, sizeof(frame));
	if (r)
		return r;
	e->out[id & (e->out_cap - 1)] = (struct out_entry){offset, offset + count * e->ps};
	e->next_id = id + 1;
	CNT(e, demand_requests, 1);
	return 0;
}

static struct out_entry *lookup_locked(up_demand *e, uint64_t id)
{
	if (id < e->out_base || id >= e->next_id)
		return NULL;
	struct out_entry *o = &e->out[id & (e->out_cap - 1)];
	return o->end ? o : NULL;
}

static void answered_locked(up_demand *e, struct out_entry *o)
{
	o->end = 0;
	while (e->out_base < e->next_id && !e->out[e->out_base & (e->out_cap - 1)].end)
		e->out_base++;
}

/* ---- events ------------------------------------------------------------------------------ */

static int region_by_addr(const up_demand *e, uint64_t addr)
{
	int lo = 0, hi = e->nregions - 1, found = -1;
	while (lo <= hi) {
		int mid = (lo + hi) / 2;
		if (e->regions[mid].base <= addr) {
			found = mid;
			lo = mid + 1;
		} else {
			hi = mid - 1;
		}
	}
	if (found >= 0 && addr - e->regions[found].base < e->regions[found].size)
		return found;
	return -1;
}

static void signal_progress(up_demand *e)
{
	wake(e->progress_fd);
}

static void check_complete(up_demand *e)
{
	if (e->complete_signalled)
		return;
	for (int i = 0; i < e->nregions; i++) {
		const uint64_t *c = e->regions[i].ledger->counts;
		if (__atomic_load_n(&c[UP_MISSING], __ATOMIC_RELAXED) +
		    __atomic_load_n(&c[UP_REQUESTED], __ATOMIC_RELAXED) +
		    __atomic_load_n(&c[UP_BACKGROUND], __ATOMIC_RELAXED))
			return;
	}
	e->complete_signalled = 1;
	signal_progress(e);
}

/* Session._on_remove: the guest discarded [start, end); poisoned pages stay poisoned. */
static void on_remove(up_demand *e, uint64_t start, uint64_t end)
{
	const unsigned from = 1u << UP_MISSING | 1u << UP_REQUESTED | 1u << UP_BACKGROUND |
			      1u << UP_PRESENT;
	CNT(e, removes, 1);
	for (int i = 0; i < e->nregions; i++) {
		const up_demand_region *r = &e->regions[i];
		uint64_t lo = start > r->base ? start : r->base;
		uint64_t hi = end < r->base + r->size ? end : r->base + r->size;
		if (lo >= hi)
			continue;
		uint64_t first = (lo - r->base) / e->ps;
		uint64_t last = (hi - r->base + e->ps - 1) / e->ps;
		up_ledger_mark(r->ledger, first, last - first, from, UP_REMOVED);
	}
	check_complete(e);
}

/* Read what the userfaultfd holds: non-cooperative events are handled now (they only mark
 * the ledger or close an fd), faults are queued for serve_queue(). Never places anything, so
 * a placement waiting out a pending event may call it. */
static int pump(up_demand *e)
{
	up_event batch[EVENT_BATCH];
	int total = 0;
	for (;;) {
		int n = up_uffd_read_events(e->uffd, batch, EVENT_BATCH);
		if (n < 0)
			return n;
		total += n;
		for (int i = 0; i < n; i++) {
			const up_event *ev = &batch[i];
			switch (ev->kind) {
			case UFFD_EVENT_PAGEFAULT:
				if (e->evlen == e->evcap) {
					if (e->evhead) {
						memmove(e->evq, e->evq + e->evhead,
							(e->evlen - e->evhead) * sizeof(*e->evq));
						e->evlen -= e->evhead;
						e->evhead = 0;
					} else {
						up_event *q = realloc(e->evq, 2 * e->evcap * sizeof(*q));
						if (!q)
							return -ENOMEM;
						e->evq = q;
						e->evcap *= 2;
					}
				}
				e->evq[e->evlen++] = *ev;
				break;
			case UFFD_EVENT_REMOVE:
			case UFFD_EVENT_UNMAP:
				on_remove(e, ev->start, ev->end);
				break;
			case UFFD_EVENT_FORK:
				close(ev->fork_fd); /* the child's memory is not served */
				CNT(e, forks, 1);
				signal_progress(e);
				break;
			case UFFD_EVENT_REMAP:
				CNT(e, remaps, 1);
				signal_progress(e);
				break;
			default:
				break;
			}
		}
		if (n < EVENT_BATCH)
			return total;
	}
}

/* A claimed page whose request could not be sent is MISSING again: left REQUESTED, every
 * later fault on it would count as coalesced and wait for a reply that never comes. */
static void unclaim(up_demand *e, const up_demand_region *r, uint64_t first, uint64_t n)
{
	up_ledger_mark(r->ledger, first, n, 1u << UP_REQUESTED, UP_MISSING);
	CNT(e, unsent, n);
}

static void account(up_demand *e, int op, const up_place_result *r)
{
	if (r->placed) {
		if (op == UP_OP_COPY)
			CNT(e, copied, r->placed);
		else if (op == UP_OP_ZERO)
			CNT(e, zeroed, r->placed);
		else if (op == UP_OP_POISON)
			CNT(e, poisoned, r->placed);
	}
	if (r->already)
		CNT(e, already, r->already);
	if (r->refused)
		CNT(e, refused, r->refused);
	if (r->dropped)
		CNT(e, dropped, r->dropped);
	if (r->raced)
		CNT(e, raced, r->raced);
}

/* Wait a little for a pending non-cooperative event to clear. Its thread holds mmap_changing
 * from before it queues the event until it runs again after we read it, then issues its
 * next madvise at once: a VMM discarding page after page (balloon inflation) leaves only a
 * few microseconds between one event and the next. So retry mostly at once, spinning (the
 * window opens when that thread runs on the other CPU), and only now and then let it run
 * here (sched_yield) or wait in poll() on the userfaultfd, never asleep while an event
 * waits for us to read it. */
static void pause_for(up_demand *e, int engine, int attempt)
{
	if (attempt % 16 != 15) {
		for (int k = 0; k < 32; k++)
			cpu_relax();
		return;
	}
	if (!engine || attempt < 256) {
		sched_yield();
		return;
	}
	struct pollfd p = {.fd = e->uffd, .events = POLLIN};
	poll(&p, 1, 1);
}

/* Placer.place_now + _retry_until_placed, on the engine thread: a pending non-cooperative
 * event is read here (this thread is the reader), then the rest is retried. ENOENT: the range
 * is gone, count and drop. ESRCH/ENOSPC: the VMM is gone. */
static int place(up_demand *e, up_ledger *l, int op, uint64_t first, uint64_t count,
		 uint64_t src, int engine, int *placed)
{
	const uint64_t end = first + count;
	for (int attempt = 0;; attempt++) {
		up_place_result res;
		int rc = up_ledger_place(l, op, first, count, src, UP_PLACE_WAKE, &res);
		account(e, op, &res);
		if (res.placed)
			*placed = 1;
		if (rc == 0)
			return 0;
		uint64_t stop = res.stop >= 0 ? (uint64_t)res.stop : first;
		if (rc == -EAGAIN && res.progress < 0) {
			CNT(e, retries, 1);
			if (LOAD(&e->stop))
				return 0; /* shutting down: the page stays as it is */
			if (engine) {
				int pr = pump(e);
				if (pr < 0) {
					STORE(&e->st.last_errno, -pr);
					return UP_DEMAND_UFFD_ERROR;
				}
			} else if (attempt >= 200) {
				return -EAGAIN; /* the caller retries after the engine read the event */
			}
			pause_for(e, engine, attempt);
			if (op == UP_OP_COPY)
				src += (stop - first) * e->ps;
			first = stop;
			count = end - stop;
			continue;
		}
		if (rc == -ENOENT) {
			CNT(e, range_gone, end - stop);
			return 0;
		}
		STORE(&e->st.last_errno, -rc);
		return (rc == -ESRCH || rc == -ENOSPC) ? UP_DEMAND_TARGET_GONE
						       : UP_DEMAND_PLACE_ERROR;
	}
}

/* Session._on_fault */
static int serve_fault(up_demand *e, uint64_t addr, uint32_t flags)
{
	const uint64_t ps = e->ps, page = addr & ~(ps - 1);
	CNT(e, faults, 1);
	int ri = region_by_addr(e, addr);
	if (ri < 0) {
		CNT(e, unknown_address, 1);
		STORE(&e->st.last_fault, addr);
		signal_progress(e); /* Python logs it */
		up_uffd_wake(e->uffd, page, ps); /* woken unserved: it faults again, logged */
		return 0;
	}
	if (flags & UFFD_PAGEFAULT_FLAG_MINOR) {
		/* MINOR mode needs the digest/CLEAN/CONTINUE exchange: leave the vCPU blocked */
		CNT(e, minor_faults, 1);
		STORE(&e->st.last_fault, addr);
		signal_progress(e);
		return 0;
	}
	const up_demand_region *r = &e->regions[ri];
	uint64_t idx = (page - r->base) / ps;
	int placed = 0;
	switch (up_ledger_claim(r->ledger, idx)) {
	case UP_MISSING:
	case UP_BACKGROUND: {
		pthread_mutex_lock(&e->lock);
		int rc = request_locked(e, r->offset + idx * ps, 1);
		pthread_mutex_unlock(&e->lock);
		if (rc)
			unclaim(e, r, idx, 1);
		if (rc == -ENOTCONN)
			return 0;
		else if (rc == -ENOMEM)
			return UP_DEMAND_NOMEM;
		else if (rc < 0)
			return UP_DEMAND_SOCK_ERROR;
		return 0;
	}
	case UP_REQUESTED:
		CNT(e, coalesced, 1);
		return 0;
	case UP_PRESENT: /* placed by the background stream between the fault and now */
		CNT(e, woken_present, 1);
		up_uffd_wake(e->uffd, page, ps);
		return 0;
	case UP_POISONED: /* the marker was discarded, the page stays poisoned */
		CNT(e, repoisoned, 1);
		return place(e, r->ledger, UP_OP_POISON, idx, 1, 0, 1, &placed);
	case UP_REMOVED:
		CNT(e, zero_after_remove, 1);
		return place(e, r->ledger, UP_OP_ZERO, idx, 1, 0, 1, &placed);
	default:
		return 0;
	}
}

static int serve_queue(up_demand *e)
{
	while (e->evhead < e->evlen) {
		up_event ev = e->evq[e->evhead++]; /* by value: place() may grow the queue */
		int rc = serve_fault(e, ev.address, ev.flags);
		if (rc)
			return rc;
	}
	e->evhead = e->evlen = 0;
	return 0;
}

/* ---- replies ----------------------------------------------------------------------------- */

static int place_reply(up_demand *e, int kind, uint64_t off, uint64_t n, uint64_t payload,
		       int engine)
{
	const uint64_t len = n * e->ps, endo = off + len;
	const int op = kind == KIND_DATA ? UP_OP_COPY : kind == KIND_ZERO ? UP_OP_ZERO : UP_OP_POISON;
	int placed = 0;
	for (int i = 0; i < e->nregions; i++) {
		const up_demand_region *r = &e->regions[i];
		uint64_t lo = off > r->offset ? off : r->offset;
		uint64_t hi = endo < r->offset + r->size ? endo : r->offset + r->size;
		if (lo >= hi)
			continue; /* a gap no region maps, or another region */
		uint64_t src = op == UP_OP_COPY ? payload + (lo - off) : 0;
		int rc = place(e, r->ledger, op, (lo - r->offset) / e->ps, (hi - lo) / e->ps, src,
			       engine, &placed);
		if (rc)
			return rc;
	}
	if (placed && LOAD(&e->notify) > 0)
		signal_progress(e);
	return 0;
}

/* Frames in rbuf[rpos, rlen): accept the fast Pages frames exactly as _accept_fast does,
 * stop (FOREIGN) at the first that is anything else. */
static int parse(up_demand *e)
{
	for (;;) {
		size_t avail = e->rlen - e->rpos;
		if (avail < PREFIX)
			break;
		const uint8_t *p = e->rbuf + e->rpos;
		uint32_t hl, pl;
		if (!up_wire_get_prefix(p, &hl, &pl) || hl != FAST_HEADER || pl > MAX_PAYLOAD)
			return UP_DEMAND_FOREIGN;
		size_t total = FAST_FRAME + (size_t)pl;
		if (avail < total) {
			if (total > e->rcap - e->rpos) { /* make room for the whole frame */
				if (total > e->rcap) {
					uint8_t *b = malloc(total);
					if (!b)
						return UP_DEMAND_NOMEM;
					memcpy(b, p, avail);
					free(e->rbuf);
					e->rbuf = b;
					e->rcap = total;
				} else {
					memmove(e->rbuf, p, avail);
				}
				e->rpos = 0;
				e->rlen = avail;
			}
			break;
		}
		const uint8_t *h = p + PREFIX;
		uint64_t rid, off, n;
		int kind;
		if (!up_wire_get_pages(h, &rid, &kind, &off, &n))
			return UP_DEMAND_FOREIGN;
		pthread_mutex_lock(&e->lock);
		struct out_entry *o = lookup_locked(e, rid);
		int ok = o && off == o->next && n > 0 && n <= MAX_PAGES &&
			 off + n * e->ps <= o->end &&
			 (kind == KIND_DATA ? pl == n * e->ps
					    : (pl == 0 && (kind == KIND_ZERO || kind == KIND_POISONED)));
		/* CLEAN needs a request with digests; the engine never sends digests */
		if (ok) {
			o->next = off + n * e->ps;
			if (o->next == o->end)
				answered_locked(e, o);
		}
		pthread_mutex_unlock(&e->lock);
		if (!ok)
			return UP_DEMAND_FOREIGN;
		CNT(e, replies, 1);
		e->rpos += total;
		int rc = place_reply(e, kind, off, n, (uint64_t)(uintptr_t)(h + FAST_HEADER), 1);
		if (rc)
			return rc;
	}
	if (e->rpos == e->rlen)
		e->rpos = e->rlen = 0;
	return 0;
}

static int on_readable(up_demand *e)
{
	for (;;) {
		if (e->rlen == e->rcap) { /* parse() left a partial frame at the end */
			memmove(e->rbuf, e->rbuf + e->rpos, e->rlen - e->rpos);
			e->rlen -= e->rpos;
			e->rpos = 0;
		}
		size_t room = e->rcap - e->rlen;
		ssize_t got = recv(e->sock, e->rbuf + e->rlen, room, MSG_DONTWAIT);
		if (got == 0 || (got < 0 && errno != EAGAIN && errno != EWOULDBLOCK &&
				 errno != EINTR)) {
			if (LOAD(&e->release)) {
				e->sock_live = 0; /* we shut it down: the source is no longer needed */
				return 0;
			}
			if (got == 0)
				return UP_DEMAND_EOF;
			STORE(&e->st.last_errno, errno);
			return UP_DEMAND_SOCK_ERROR;
		}
		if (got < 0)
			return 0; /* EAGAIN (or EINTR: poll again) */
		e->rlen += (size_t)got;
		int rc = parse(e);
		if (rc)
			return rc;
		if ((size_t)got < room)
			return 0;
	}
}

/* ---- the push on BULK -------------------------------------------------------------------- */

int up_demand_attach_bulk(up_demand *e, int fd)
{
	int rc = 0;
	pthread_mutex_lock(&e->lock);
	if (LOAD(&e->bulk_state) != UP_BULK_NONE || e->bbuf) {
		rc = -EBUSY;
	} else if (e->release) {
		rc = -ENOTCONN;
	} else {
		e->bcap = (1u << 20) + PUSH_FRAME;
		e->bbuf = malloc(e->bcap);
		if (!e->bbuf) {
			rc = -ENOMEM;
		} else {
			e->bulk_fd = fd;
			e->bulk_more = 1; /* frames may already wait in the socket */
			STORE(&e->bulk_state, UP_BULK_ENGINE);
		}
	}
	pthread_mutex_unlock(&e->lock);
	if (!rc)
		wake(e->wake_fd);
	return rc;
}

int up_demand_bulk_state(up_demand *e)
{
	return LOAD(&e->bulk_state);
}

size_t up_demand_bulk_leftover(up_demand *e, const uint8_t **out, int *eof)
{
	*out = e->bbuf;
	*eof = e->bulk_eof;
	return LOAD(&e->bulk_state) == UP_BULK_RETURNED ? e->blen : 0;
}

/* Stop reading BULK at a frame boundary; Python's bulk reader goes on from bbuf[0, blen). */
static void bulk_hand_back(up_demand *e, int eof)
{
	e->bulk_eof = eof;
	e->bulk_more = 0;
	STORE(&e->bulk_state, UP_BULK_RETURNED);
	signal_progress(e);
}

/* The frame in bbuf[0, blen): 1 if it is not a push in the fixed encoding that passes
 * Connection._accept_fast's checks (Python's decoder judges it), else 0; a complete one
 * becomes the active frame. Never places anything. */
static int bulk_frame(up_demand *e)
{
	const uint8_t *p = e->bbuf;
	if (e->blen < PREFIX)
		return 0;
	uint32_t hl, pl;
	if (!up_wire_get_prefix(p, &hl, &pl) || hl != PUSH_HEADER || pl > MAX_PAYLOAD)
		return 1;
	if (e->blen < PUSH_FRAME)
		return 0;
	int kind;
	uint64_t off, n;
	if (!up_wire_get_push(p + PREFIX, &kind, &off, &n))
		return 1;
	const uint64_t ps = e->ps;
	/* Connection._validate for id nil on BULK: never CLEAN (nothing was asked) */
	if (!(kind == KIND_DATA || kind == KIND_ZERO || kind == KIND_POISONED) || off % ps ||
	    n == 0 || n > MAX_PAGES || off > e->memory_size || n > (e->memory_size - off) / ps ||
	    (kind == KIND_DATA ? (uint64_t)pl != n * ps : pl != 0))
		return 1;
	const size_t total = PUSH_FRAME + (size_t)pl;
	if (total > e->bcap) { /* only the prefix and header are in: cheap to move */
		uint8_t *b = realloc(e->bbuf, total);
		if (!b)
			return -UP_DEMAND_NOMEM;
		e->bbuf = b;
		e->bcap = total;
	}
	if (e->blen < total)
		return 0;
	e->bk_active = 1;
	e->bk_kind = kind;
	e->bk_off = off;
	e->bk_n = n;
	e->bk_done = 0;
	return 0;
}

/* One slice of the active frame (at most slice_pages pages). */
static int bulk_slice(up_demand *e, int engine)
{
	uint64_t k = e->bk_n - e->bk_done;
	if (k > e->slice_pages)
		k = e->slice_pages;
	const uint64_t at = e->bk_done * e->ps;
	int rc = place_reply(e, e->bk_kind, e->bk_off + at, k,
			     (uint64_t)(uintptr_t)(e->bbuf + PUSH_FRAME + at), engine);
	if (rc)
		return rc; /* -EAGAIN (engine == 0) retries this slice: placed pages are skipped */
	e->bk_done += k;
	CNT(e, bulk_pages, k);
	if (e->bk_done == e->bk_n) {
		e->bk_active = 0;
		e->blen = 0;
		CNT(e, pushes, 1);
	}
	return 0;
}

/* One unit of bulk work: a slice of the active frame, or one bounded recv (never past the
 * end of the frame being received, so bbuf holds one frame from offset 0). */
static int bulk_step(up_demand *e)
{
	if (e->bk_active)
		return bulk_slice(e, 1);
	size_t want = PUSH_FRAME;
	if (e->blen >= PREFIX) {
		uint32_t hl, pl;
		up_wire_get_prefix(e->bbuf, &hl, &pl); /* bulk_frame checked it */
		want = PREFIX + (size_t)hl + pl;
	}
	size_t room = want - e->blen;
	if (room > BULK_PIECE)
		room = BULK_PIECE;
	ssize_t got = recv(e->bulk_fd, e->bbuf + e->blen, room, MSG_DONTWAIT);
	if (got == 0) {
		bulk_hand_back(e, 1);
		return 0;
	}
	if (got < 0) {
		if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) {
			e->bulk_more = 0;
			return 0;
		}
		bulk_hand_back(e, 0); /* Python's recv meets the error itself */
		return 0;
	}
	e->blen += (size_t)got;
	e->bulk_more = (size_t)got == room;
	int f = bulk_frame(e);
	if (f < 0)
		return -f;
	if (f)
		bulk_hand_back(e, 0);
	return 0;
}

int up_demand_bulk_detach(up_demand *e)
{
	int st = LOAD(&e->bulk_state);
	if (st == UP_BULK_RETURNED)
		return 0;
	if (st == UP_BULK_ENGINE && LOAD(&e->running))
		return -EBUSY;
	/* not running: finish the frame being placed (this thread is not the userfaultfd's
	 * reader: a pending event makes it -EAGAIN, to be called again) */
	while (e->bk_active) {
		int rc = bulk_slice(e, 0);
		if (rc)
			return rc;
	}
	e->bulk_more = 0;
	STORE(&e->bulk_state, UP_BULK_RETURNED);
	return 0;
}

/* ---- the loop ---------------------------------------------------------------------------- */

int up_demand_run(up_demand *e)
{
	if (__atomic_exchange_n(&e->running, 1, __ATOMIC_ACQ_REL))
		return -EBUSY;
	int rc;
	for (;;) {
		if (LOAD(&e->stop)) {
			rc = UP_DEMAND_STOPPED;
			break;
		}
		pthread_mutex_lock(&e->lock);
		int want_out = e->opos < e->olen, sock_err = e->sock_err;
		pthread_mutex_unlock(&e->lock);
		if (sock_err) {
			STORE(&e->st.last_errno, sock_err);
			rc = UP_DEMAND_SOCK_ERROR;
			break;
		}
		if (e->sock_live && LOAD(&e->release))
			e->sock_live = 0;
		const int bulk = LOAD(&e->bulk_state) == UP_BULK_ENGINE;
		/* work that needs no wait: poll only to look at the fds, serve faults first */
		const int busy = (bulk && (e->bk_active || e->bulk_more)) || e->evhead < e->evlen;
		struct pollfd p[4] = {
			{.fd = e->uffd, .events = POLLIN},
			{.fd = e->wake_fd, .events = POLLIN},
			{.fd = e->sock_live ? e->sock : -1,
			 .events = (short)(POLLIN | (want_out ? POLLOUT : 0))},
			{.fd = bulk ? e->bulk_fd : -1, .events = POLLIN},
		};
		int np = bulk ? 4 : e->sock_live ? 3 : 2;
		if (poll(p, (nfds_t)np, busy ? 0 : -1) < 0) {
			if (errno == EINTR)
				continue;
			STORE(&e->st.last_errno, errno);
			rc = UP_DEMAND_UFFD_ERROR;
			break;
		}
		if (p[1].revents)
			drain(e->wake_fd); /* stop / release / a queued send: looked at above */
		if (p[0].revents) {
			if (p[0].revents & POLLNVAL) {
				STORE(&e->st.last_errno, EBADF);
				rc = UP_DEMAND_UFFD_ERROR;
				break;
			}
			int pr = pump(e);
			if (pr == 0 && (p[0].revents & (POLLERR | POLLHUP)))
				pr = -EIO; /* e.g. a blocking fd: poll says POLLERR for ever */
			if (pr < 0) {
				STORE(&e->st.last_errno, -pr);
				rc = UP_DEMAND_UFFD_ERROR;
				break;
			}
			if ((rc = serve_queue(e)))
				break;
		} else if (e->evhead < e->evlen && (rc = serve_queue(e))) {
			break; /* faults a placement read while waiting out an event */
		}
		if (e->sock_live && (p[2].revents & POLLOUT)) {
			pthread_mutex_lock(&e->lock);
			flush_locked(e);
			pthread_mutex_unlock(&e->lock);
		}
		if (e->sock_live && (p[2].revents & (POLLIN | POLLHUP | POLLERR))) {
			if ((rc = on_readable(e)))
				break;
		}
		if (bulk && LOAD(&e->bulk_state) == UP_BULK_ENGINE &&
		    (e->bk_active || e->bulk_more || p[3].revents)) {
			if ((rc = bulk_step(e)))
				break;
		}
		check_complete(e);
	}
	if (rc == UP_DEMAND_STOPPED) {
		STORE(&e->stop, 0);
		drain(e->wake_fd);
	}
	STORE(&e->running, 0);
	return rc;
}

/* ---- ensure_present ---------------------------------------------------------------------- */

static int send_run(up_demand *e, const up_demand_region *r, uint64_t first, uint64_t n)
{
	pthread_mutex_lock(&e->lock);
	int rc = request_locked(e, r->offset + first * e->ps, n);
	int queued = e->opos < e->olen;
	pthread_mutex_unlock(&e->lock);
	if (queued || rc)
		wake(e->wake_fd); /* the engine polls POLLOUT, or sees the socket error */
	if (rc)
		unclaim(e, r, first, n);
	return rc;
}

int up_demand_request(up_demand *e, int region, uint64_t first, uint64_t count,
		      uint64_t max_run)
{
	if (region < 0 || region >= e->nregions)
		return -EINVAL;
	const up_demand_region *r = &e->regions[region];
	up_ledger *l = r->ledger;
	if (first > l->npages || count > l->npages - first)
		return -EINVAL;
	if (max_run == 0 || max_run > MAX_PAGES)
		max_run = MAX_PAGES;
	uint64_t run = 0, run_len = 0;
	int rc = 0;
	for (uint64_t i = first; i < first + count && !rc; i++) {
		int s = up_ledger_claim(l, i);
		if (s == UP_MISSING || s == UP_BACKGROUND) {
			if (run_len && run + run_len == i && run_len < max_run) {
				run_len++;
				continue;
			}
			if (run_len)
				rc = send_run(e, r, run, run_len);
			if (rc) {
				unclaim(e, r, i, 1);
				break;
			}
			run = i;
			run_len = 1;
			continue;
		}
		if (run_len) {
			rc = send_run(e, r, run, run_len);
			run_len = 0;
		}
		if (!rc && s == UP_REMOVED) {
			int placed = 0;
			CNT(e, zero_after_remove, 1);
			rc = place(e, l, UP_OP_ZERO, i, 1, 0, 0, &placed);
			if (rc > 0) /* UP_DEMAND_* from place(): map to an errno for the caller */
				rc = rc == UP_DEMAND_TARGET_GONE ? -ESRCH : -LOAD(&e->st.last_errno);
		}
	}
	if (!rc && run_len)
		rc = send_run(e, r, run, run_len);
	return rc;
}
