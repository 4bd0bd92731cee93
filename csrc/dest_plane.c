/*
 * The destination's data plane (see dest_plane.h and docs/DESIGN.md, "The data planes").
 *
 * One thread polls the userfaultfd, the URGENT and BULK sockets and a wake eventfd. A fault
 * claims its page in the ledger and queues a Request; a reply is checked (frame.c, then against
 * the table of outstanding requests) and placed through up_ledger_place, so the never-un-poison
 * invariant stays in ledger.c. The push on BULK is placed between faults, one slice (or one
 * receive) per loop turn, so a fault waits behind one slice at most.
 */
#include "dest_plane.h"
#include "digest.h"
#include "uffd.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define URGENT UP_WIRE_CHANNEL_URGENT
#define BULK UP_WIRE_CHANNEL_BULK
#define EVENT_BATCH 64
#define NOTES 64
#define MAX_OUTSTANDING (1u << 20) /* requests in flight; each at least one blocked vCPU */
#define MAX_IN (UP_FRAME_PAGES + UP_WIRE_MAX_PAYLOAD)
#define DIGEST_RUN 64u /* pages a Request with digests covers: the source hashes them at once */

#if defined(__x86_64__) || defined(__i386__)
#define cpu_relax() __builtin_ia32_pause()
#else
#define cpu_relax() __asm__ __volatile__("" ::: "memory")
#endif

#define CNT(d, field, n) __atomic_add_fetch(&(d)->st.field, (uint64_t)(n), __ATOMIC_RELAXED)
#define LOAD(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define STORE(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)

struct out_entry {
	uint64_t next;    /* next byte offset a reply must start at */
	uint64_t end;     /* 0: answered (slot free) */
	uint64_t sent_ns; /* when it was queued (the deadline runs from here); 0: no source yet */
	int digests;      /* it carries the digests of cached copies: CLEAN may answer it */
	uint64_t fault_ns; /* metrics: when its fault was read (0: not a fault's, or not timed) */
};

struct up_dest {
	int uffd, wake_fd, epfd; /* epoll: registered once, not re-armed on every wait */
	uint64_t ps, memory_size, timeout_ns;
	int nregions;
	up_dest_region *regions;
	up_notes notes;
	up_chan ch[3]; /* URGENT (1), BULK (2) */

	/* lock: the outstanding table and the id counter (faults, and ensure_present's thread) */
	pthread_mutex_t lock;
	struct out_entry *out; /* ring indexed by id & (out_cap - 1), ids [out_base, next_id) */
	uint64_t out_cap, out_base, next_id;

	/* the engine thread's own */
	up_event *evq; /* faults read, not served yet */
	size_t evcap, evhead, evlen;
	uint64_t *poison; /* the handshake's poison list, placed when run() starts */
	uint64_t npoison;
	int bulk_more;    /* the last BULK receive filled its piece: more may wait */
	int bk_active;    /* a push frame is being placed, slice by slice */
	uint64_t bk_done; /* pages of it placed */
	up_frame bk;
	int complete, noted_stall, failed;
	uint32_t watched[3]; /* each channel's events in epfd (0: not in it) */

	int stop, notify, running; /* atomics */
	up_dest_stats st;
	up_hists hists; /* metrics: fault-serve latencies (hist.c) */
};

static int pump(up_dest *d);
static void check_complete(up_dest *d);

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* ---- life cycle ---------------------------------------------------------------------------- */

static int region_by_offset(const up_dest *d, uint64_t off)
{
	for (int i = 0; i < d->nregions; i++)
		if (off >= d->regions[i].offset && off - d->regions[i].offset < d->regions[i].size)
			return i;
	return -1;
}

up_dest *up_dest_new(int uffd, uint64_t page_size, uint64_t memory_size,
		     const up_dest_region *regions, int nregions, const uint64_t *poison,
		     uint64_t npoison, uint64_t request_timeout_ms)
{
	if (!page_size || (page_size & (page_size - 1)) || nregions <= 0 || !regions) {
		errno = EINVAL;
		return NULL;
	}
	up_dest *d = calloc(1, sizeof(*d));
	if (!d)
		return NULL;
	d->uffd = uffd;
	d->wake_fd = d->epfd = -1;
	d->ps = page_size;
	d->memory_size = memory_size;
	d->timeout_ns = request_timeout_ms * 1000000u;
	d->nregions = nregions;
	d->next_id = d->out_base = 1; /* 0 is the push's */
	d->out_cap = 64;
	d->evcap = 256;
	pthread_mutex_init(&d->lock, NULL);
	up_hists_init(&d->hists); /* metrics */
	d->regions = malloc(sizeof(*regions) * (size_t)nregions);
	d->out = calloc(d->out_cap, sizeof(*d->out));
	d->evq = malloc(sizeof(*d->evq) * d->evcap);
	d->poison = malloc(sizeof(*poison) * (npoison ? npoison : 1));
	d->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	d->epfd = epoll_create1(EPOLL_CLOEXEC);
	int rc = (!d->regions || !d->out || !d->evq || !d->poison) ? -ENOMEM
		 : d->wake_fd < 0 || d->epfd < 0		   ? -errno
								   : up_notes_init(&d->notes, NOTES);
	/* the userfaultfd (data 0; none during a precopy) and the wake fd (data 1) */
	for (int i = uffd < 0; !rc && i < 2; i++) {
		struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
		if (epoll_ctl(d->epfd, EPOLL_CTL_ADD, i ? d->wake_fd : uffd, &ev))
			rc = -errno;
	}
	for (int ch = URGENT; !rc && ch <= BULK; ch++)
		rc = up_chan_init(&d->ch[ch], ch, d->wake_fd, (1u << 20) + UP_FRAME_PAGES, MAX_IN,
				  (size_t)MAX_OUTSTANDING * UP_FRAME_REQUEST);
	if (rc) {
		up_dest_free(d);
		errno = -rc;
		return NULL;
	}
	memcpy(d->regions, regions, sizeof(*regions) * (size_t)nregions);
	/* What the handshake said is poisoned is POISONED before any data can be placed: from
	 * here on the ledger refuses data there, whatever arrives first. */
	const unsigned unplaced = 1u << UP_MISSING | 1u << UP_REQUESTED | 1u << UP_BACKGROUND |
				  1u << UP_REMOVED;
	for (uint64_t k = 0; k < npoison; k++) {
		int i = region_by_offset(d, poison[k]);
		if (i < 0)
			continue; /* a part of guest memory this VMM does not map */
		const up_dest_region *r = &d->regions[i];
		up_ledger_mark(r->ledger, (poison[k] - r->offset) / page_size, 1, unplaced,
			       UP_POISONED);
		d->poison[d->npoison++] = poison[k];
	}
	d->st.known_poison = d->npoison;
	return d;
}

void up_dest_free(up_dest *d)
{
	if (!d)
		return;
	if (d->wake_fd >= 0)
		close(d->wake_fd);
	if (d->epfd >= 0)
		close(d->epfd);
	up_chan_free(&d->ch[URGENT]);
	up_chan_free(&d->ch[BULK]);
	up_notes_free(&d->notes);
	pthread_mutex_destroy(&d->lock);
	free(d->regions);
	free(d->out);
	free(d->evq);
	free(d->poison);
	free(d);
}

up_notes *up_dest_notes(up_dest *d)
{
	return &d->notes;
}

int up_dest_attach(up_dest *d, int channel, int fd, up_tls *tls)
{
	if ((channel != URGENT && channel != BULK) || fd < 0)
		return -EINVAL;
	up_chan_attach(&d->ch[channel], fd, tls);
	return 0;
}

void up_dest_stop(up_dest *d)
{
	STORE(&d->stop, 1);
	up_wake(d->wake_fd);
}

up_chan *up_dest_chan(up_dest *d, int channel)
{
	return channel == URGENT || channel == BULK ? &d->ch[channel] : NULL;
}

void up_dest_notify(up_dest *d, int delta)
{
	__atomic_add_fetch(&d->notify, delta, __ATOMIC_ACQ_REL);
}

void up_dest_get_stats(up_dest *d, up_dest_stats *out)
{
	const uint64_t *src = (const uint64_t *)&d->st;
	uint64_t *dst = (uint64_t *)out;
	for (size_t i = 0; i < sizeof(*out) / 8; i++)
		dst[i] = __atomic_load_n(&src[i], __ATOMIC_RELAXED);
}

void up_dest_have(const up_dest_region *regions, int nregions, uint64_t ps, int poisoned,
		  uint64_t first, uint64_t n, uint8_t *bits)
{
	memset(bits, poisoned ? 0 : 0xff, (n + 7) / 8);
	for (int i = 0; i < nregions; i++) {
		const up_dest_region *r = &regions[i];
		const uint64_t r0 = r->offset / ps, r1 = r0 + r->size / ps;
		const uint64_t lo = first > r0 ? first : r0, hi = first + n < r1 ? first + n : r1;
		for (uint64_t u = lo; u < hi; u++) {
			const int s = up_ledger_get(r->ledger, u - r0);
			const uint64_t k = u - first;
			if (poisoned && s == UP_POISONED)
				bits[k >> 3] |= (uint8_t)(1u << (k & 7));
			else if (!poisoned && s != UP_PRESENT && s != UP_POISONED && s != UP_REMOVED)
				bits[k >> 3] &= (uint8_t)~(1u << (k & 7));
		}
	}
	if (n & 7)
		bits[n >> 3] &= (uint8_t)((1u << (n & 7)) - 1); /* no bits past the last unit */
}

/* metrics: read on a scrape (hist.h) */
void up_dest_get_timing(up_dest *d, up_timing *out)
{
	up_hists_copy(&d->hists, &out->h);
	out->bytes_urgent = LOAD(&d->ch[URGENT].bytes_in);
	out->bytes_bulk = LOAD(&d->ch[BULK].bytes_in);
}

void up_dest_set_timing(up_dest *d, int on)
{
	STORE(&d->hists.on, on);
}

int64_t up_dest_outstanding(up_dest *d)
{
	int64_t n = 0;
	pthread_mutex_lock(&d->lock);
	for (uint64_t id = d->out_base; id < d->next_id; id++)
		n += d->out[id & (d->out_cap - 1)].end != 0;
	pthread_mutex_unlock(&d->lock);
	return n;
}

/* A note the control plane must see; the queue is bounded, so wait for room (a millisecond at
 * a time, reading nothing meanwhile). */
static void note(up_dest *d, int what, int channel, int err, uint64_t a, uint64_t b,
		 const char *text)
{
	while (up_notes_put(&d->notes, what, channel, err, a, b, text) == -ENOSPC && !LOAD(&d->stop)) {
		struct pollfd p = {.fd = d->wake_fd, .events = POLLIN};
		poll(&p, 1, 1);
	}
}

/* Something this session cannot go on from: noted once; the engine keeps serving what needs
 * no source (present, poisoned, removed pages) until the control plane stops it. */
static void fail(up_dest *d, int what, int channel, int err, const char *text)
{
	if (!d->failed) {
		d->failed = 1;
		note(d, what, channel, err, 0, 0, text);
	}
}

/* ---- requests ------------------------------------------------------------------------------ */

static int ring_grow(up_dest *d)
{
	uint64_t cap = d->out_cap * 2;
	if (cap > MAX_OUTSTANDING)
		return -ENOSPC;
	struct out_entry *n = calloc(cap, sizeof(*n));
	if (!n)
		return -ENOMEM;
	for (uint64_t id = d->out_base; id < d->next_id; id++)
		n[id & (cap - 1)] = d->out[id & (d->out_cap - 1)];
	free(d->out);
	d->out = n;
	d->out_cap = cap;
	return 0;
}

static int connected(const up_chan *c)
{
	return c->fd >= 0 && c->held != UP_HELD_STOPPED && !LOAD(&c->closing);
}

/* The digests of `count` cached pages of region `r` from page `first`, u64 little-endian (the
 * wire's order) into `out`: as the ledger wrote them (the precopy, or a placement), else
 * hashed now through the alias. Called before the plane's lock is taken: hashing a huge page
 * takes a while, and a fault on another thread would wait behind it. */
static void cached_digests(const up_dest *d, const up_dest_region *r, uint64_t first,
			   uint64_t count, uint8_t *out)
{
	const uint8_t *cached = (const uint8_t *)(uintptr_t)r->ledger->alias + first * d->ps;
	const uint64_t *known = r->ledger->digests + first;
	for (uint64_t k = 0; k < count; k++) {
		uint64_t h = known[k] ? known[k] : up_xxh64(cached + k * d->ps, d->ps, 0);
		for (int b = 0; b < 8; b++)
			out[8 * k + b] = (uint8_t)(h >> (8 * b));
	}
}

/* A Request frame into `frame` (UP_FRAME_REQUEST + 8 * DIGEST_RUN bytes), with `digests` (8 *
 * count bytes, MINOR mode) or none; its length. */
static size_t put_request(uint8_t *frame, uint64_t id, uint64_t offset, uint64_t count,
			  const uint8_t *digests)
{
	const uint32_t pl = digests ? (uint32_t)(8 * count) : 0;
	up_frame_put_request(frame, id, offset, count, pl);
	if (digests)
		memcpy(frame + UP_FRAME_REQUEST, digests, pl);
	return UP_FRAME_REQUEST + pl;
}

/* One Request for `count` pages at guest `offset`, recorded and queued on URGENT. With no
 * source now (the session is paused, or its socket not taken yet), only recorded: it goes out
 * when one is attached. `digests` (cached_digests, at most DIGEST_RUN pages, or NULL): the
 * source may answer CLEAN; the pages stay as cached until answered (only a placement writes
 * them, and they are REQUESTED), so a re-send hashes them again. `fault_ns` (metrics): when
 * the fault behind it was read, 0 for none. */
static int request_locked(up_dest *d, uint64_t offset, uint64_t count, const uint8_t *digests,
			  uint64_t fault_ns)
{
	if (digests && count > DIGEST_RUN)
		return -EINVAL;
	if (d->next_id - d->out_base == d->out_cap) {
		int r = ring_grow(d);
		if (r)
			return r;
	}
	const uint64_t id = d->next_id;
	uint64_t sent = 0;
	if (connected(&d->ch[URGENT])) {
		uint8_t frame[UP_FRAME_REQUEST + 8 * DIGEST_RUN];
		size_t len = put_request(frame, id, offset, count, digests);
		int r = up_chan_queue(&d->ch[URGENT], frame, len);
		if (r)
			return r;
		sent = now_ns();
	}
	d->out[id & (d->out_cap - 1)] =
		(struct out_entry){offset, offset + count * d->ps, sent, digests != NULL, fault_ns};
	d->next_id = id + 1;
	CNT(d, demand_requests, 1);
	return 0;
}

/* A new URGENT socket: every request still unanswered (in flight when the old one broke, or
 * made while there was none) is sent on it, for what is left of it. */
static void resend_locked(up_dest *d)
{
	const uint64_t now = now_ns();
	for (uint64_t id = d->out_base; id < d->next_id; id++) {
		struct out_entry *o = &d->out[id & (d->out_cap - 1)];
		if (!o->end)
			continue;
		uint8_t frame[UP_FRAME_REQUEST + 8 * DIGEST_RUN], dg[8 * DIGEST_RUN];
		const uint64_t n = (o->end - o->next) / d->ps;
		if (o->digests) { /* under the lock, but only on a new socket, a run at a time */
			const up_dest_region *r = &d->regions[region_by_offset(d, o->next)];
			cached_digests(d, r, (o->next - r->offset) / d->ps, n, dg);
		}
		size_t len = put_request(frame, id, o->next, n, o->digests ? dg : NULL);
		if (up_chan_queue(&d->ch[URGENT], frame, len))
			break; /* cannot happen: the queue holds MAX_OUTSTANDING requests */
		o->sent_ns = now;
		CNT(d, resent, 1);
	}
}

static struct out_entry *lookup_locked(up_dest *d, uint64_t id)
{
	if (id < d->out_base || id >= d->next_id)
		return NULL;
	struct out_entry *o = &d->out[id & (d->out_cap - 1)];
	return o->end ? o : NULL;
}

static void answered_locked(up_dest *d, struct out_entry *o)
{
	o->end = 0;
	while (d->out_base < d->next_id && !d->out[d->out_base & (d->out_cap - 1)].end)
		d->out_base++;
}

/* A claimed page whose request could not be sent is MISSING again: left REQUESTED, every later
 * fault on it would wait for a reply that never comes. */
static void unclaim(const up_dest_region *r, uint64_t first, uint64_t n)
{
	up_ledger_mark(r->ledger, first, n, 1u << UP_REQUESTED, UP_MISSING);
}

/* ---- placement ----------------------------------------------------------------------------- */

static void account(up_dest *d, int op, const up_place_result *r, const up_dest_region *reg,
		    uint64_t first)
{
	if (r->placed) {
		if (op == UP_OP_COPY)
			CNT(d, copied, r->placed);
		else if (op == UP_OP_ZERO)
			CNT(d, zeroed, r->placed);
		else if (op == UP_OP_POISON)
			CNT(d, poisoned, r->placed);
		else
			CNT(d, continued, r->placed);
	}
	if (r->already)
		CNT(d, already, r->already);
	if (r->dropped)
		CNT(d, dropped, r->dropped);
	if (r->raced)
		CNT(d, raced, r->raced);
	if (r->refused) { /* the number this project exists to keep at zero: logged, each */
		CNT(d, refused, r->refused);
		STORE(&d->st.last_refused, reg->offset + first * d->ps);
		up_notes_flag(&d->notes, UP_FLAG_LOG);
	}
}

/* Wait a little for a pending non-cooperative event to clear. Its thread holds mmap_changing
 * from before it queues the event until it runs again after we read it, then issues its next
 * madvise at once: a VMM discarding page after page leaves microseconds between one event and
 * the next. So retry mostly at once, spinning (the window opens when that thread runs on the
 * other CPU), and only now and then let it run here or wait in poll(), never asleep while an
 * event waits for us to read it. */
static void pause_for(up_dest *d, int engine, int attempt)
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
	struct pollfd p = {.fd = d->uffd, .events = POLLIN};
	poll(&p, 1, 1);
}

/* Place through the ledger; a pending non-cooperative event is read here when this is the
 * engine thread (it is the reader), then the rest is retried. ENOENT: the range is gone, count
 * and drop. 0, -EAGAIN (not the engine: call again after the engine read the event), or a
 * failure already noted (1). */
static int place(up_dest *d, int ri, int op, uint64_t first, uint64_t count, uint64_t src,
		 int engine, int *placed)
{
	const up_dest_region *reg = &d->regions[ri];
	const uint64_t end = first + count;
	for (int attempt = 0;; attempt++) {
		up_place_result res;
		int rc = up_ledger_place(reg->ledger, op, first, count, src, UP_PLACE_WAKE, &res);
		account(d, op, &res, reg, first);
		*placed |= res.placed != 0;
		if (rc == 0)
			return 0;
		uint64_t stop = res.stop >= 0 ? (uint64_t)res.stop : first;
		if (rc == -EAGAIN && res.progress < 0) {
			CNT(d, retries, 1);
			if (LOAD(&d->stop))
				return 0; /* shutting down: the page stays as it is */
			if (engine) {
				int pr = pump(d);
				if (pr < 0) {
					fail(d, UP_NOTE_FATAL, 0, -pr, "reading the userfaultfd");
					return 1;
				}
			} else if (attempt >= 200) {
				return -EAGAIN;
			}
			pause_for(d, engine, attempt);
			if (op == UP_OP_COPY)
				src += (stop - first) * d->ps;
			first = stop;
			count = end - stop;
			continue;
		}
		if (rc == -ENOENT) {
			CNT(d, range_gone, end - stop);
			return 0;
		}
		if (rc == -ESRCH || rc == -ENOSPC)
			fail(d, UP_NOTE_TARGET_GONE, 0, -rc, "placing pages: the VMM's memory is gone");
		else
			fail(d, UP_NOTE_FATAL, 0, -rc, "placing pages");
		return 1;
	}
}

/* A run of the guest memory space: placed in every region that maps part of it. */
static int place_run(up_dest *d, int kind, uint64_t off, uint64_t n, const uint8_t *payload,
		     int engine)
{
	const uint64_t endo = off + n * d->ps;
	const int op = kind == UP_WIRE_KIND_DATA	 ? UP_OP_COPY
		       : kind == UP_WIRE_KIND_ZERO	 ? UP_OP_ZERO
		       : kind == UP_WIRE_KIND_POISONED ? UP_OP_POISON
						       : UP_OP_CONTINUE;
	int placed = 0;
	for (int i = 0; i < d->nregions; i++) {
		const up_dest_region *r = &d->regions[i];
		uint64_t lo = off > r->offset ? off : r->offset;
		uint64_t hi = endo < r->offset + r->size ? endo : r->offset + r->size;
		if (lo >= hi)
			continue; /* a gap no region maps, or another region */
		uint64_t src = op == UP_OP_COPY ? (uint64_t)(uintptr_t)(payload + (lo - off)) : 0;
		int rc = place(d, i, op, (lo - r->offset) / d->ps, (hi - lo) / d->ps, src, engine,
			       &placed);
		if (rc)
			return rc;
	}
	if (placed && LOAD(&d->notify) > 0)
		up_notes_flag(&d->notes, UP_FLAG_PROGRESS);
	return 0;
}

/* ---- faults and events --------------------------------------------------------------------- */

static int region_by_addr(const up_dest *d, uint64_t addr)
{
	int lo = 0, hi = d->nregions - 1, found = -1;
	while (lo <= hi) {
		int mid = (lo + hi) / 2;
		if (d->regions[mid].base <= addr) {
			found = mid;
			lo = mid + 1;
		} else {
			hi = mid - 1;
		}
	}
	if (found >= 0 && addr - d->regions[found].base < d->regions[found].size)
		return found;
	return -1;
}

static void check_complete(up_dest *d)
{
	if (d->complete)
		return;
	for (int i = 0; i < d->nregions; i++) {
		const uint64_t *c = d->regions[i].ledger->counts;
		if (LOAD(&c[UP_MISSING]) + LOAD(&c[UP_REQUESTED]) + LOAD(&c[UP_BACKGROUND]))
			return;
	}
	d->complete = 1;
	up_notes_flag(&d->notes, UP_FLAG_COMPLETE);
}

/* The guest discarded [start, end): it reads as zeros from now on, except poisoned pages,
 * which stay poisoned (and are re-poisoned on their next fault). */
static void on_remove(up_dest *d, uint64_t start, uint64_t end)
{
	const unsigned from = 1u << UP_MISSING | 1u << UP_REQUESTED | 1u << UP_BACKGROUND |
			      1u << UP_PRESENT;
	CNT(d, removes, 1);
	for (int i = 0; i < d->nregions; i++) {
		const up_dest_region *r = &d->regions[i];
		uint64_t lo = start > r->base ? start : r->base;
		uint64_t hi = end < r->base + r->size ? end : r->base + r->size;
		if (lo >= hi)
			continue;
		uint64_t first = (lo - r->base) / d->ps, last = (hi - r->base + d->ps - 1) / d->ps;
		up_ledger_mark(r->ledger, first, last - first, from, UP_REMOVED);
	}
	check_complete(d);
}

/* Read what the userfaultfd holds: non-cooperative events are handled now (they only mark the
 * ledger or close an fd), faults are queued. Never places anything, so a placement waiting out
 * a pending event may call it. */
static int pump(up_dest *d)
{
	up_event batch[EVENT_BATCH];
	int total = 0;
	for (;;) {
		int n = up_uffd_read_events(d->uffd, batch, EVENT_BATCH);
		if (n < 0)
			return n;
		const uint64_t read_ns = up_hists_now(&d->hists); /* metrics */
		total += n;
		for (int i = 0; i < n; i++) {
			const up_event *ev = &batch[i];
			switch (ev->kind) {
			case UFFD_EVENT_PAGEFAULT:
				if (d->evlen == d->evcap) {
					if (d->evhead) {
						memmove(d->evq, d->evq + d->evhead,
							(d->evlen - d->evhead) * sizeof(*d->evq));
						d->evlen -= d->evhead;
						d->evhead = 0;
					} else {
						up_event *q = realloc(d->evq, 2 * d->evcap * sizeof(*q));
						if (!q)
							return -ENOMEM;
						d->evq = q;
						d->evcap *= 2;
					}
				}
				d->evq[d->evlen] = *ev;
				d->evq[d->evlen++].read_ns = read_ns; /* metrics */
				break;
			case UFFD_EVENT_REMOVE:
			case UFFD_EVENT_UNMAP:
				on_remove(d, ev->start, ev->end);
				break;
			case UFFD_EVENT_FORK:
				close(ev->fork_fd); /* the child's memory is not served */
				CNT(d, forks, 1);
				up_notes_flag(&d->notes, UP_FLAG_LOG);
				break;
			case UFFD_EVENT_REMAP:
				CNT(d, remaps, 1);
				up_notes_flag(&d->notes, UP_FLAG_LOG);
				break;
			default:
				break;
			}
		}
		if (n < EVENT_BATCH)
			return total;
	}
}

/* metrics: a fault served without the source, timed once placed (rc 0) */
static int served_locally(up_dest *d, uint64_t read_ns, int rc)
{
	if (!rc)
		up_hist_add(&d->hists, UP_CLASS_LOCAL, read_ns);
	return rc;
}

static int serve_fault(up_dest *d, uint64_t addr, uint32_t flags, uint64_t read_ns)
{
	const uint64_t ps = d->ps, page = addr & ~(ps - 1);
	CNT(d, faults, 1);
	int ri = region_by_addr(d, addr);
	if (ri < 0) {
		CNT(d, unknown_address, 1);
		STORE(&d->st.last_fault, addr);
		up_notes_flag(&d->notes, UP_FLAG_LOG);
		up_uffd_wake(d->uffd, page, ps); /* woken unserved: it faults again, logged */
		return 0;
	}
	const up_dest_region *r = &d->regions[ri];
	const uint64_t idx = (page - r->base) / ps;
	/* A MINOR fault: the page is in the page cache (precopied). Is that copy current, and is
	 * the page poisoned at the source? Its digest goes with the request. */
	int cached = 0;
	if (flags & UFFD_PAGEFAULT_FLAG_MINOR) {
		CNT(d, minor_faults, 1);
		if (!r->ledger->alias) { /* registered MINOR without the file: cannot be served */
			CNT(d, minor_unservable, 1);
			STORE(&d->st.last_fault, addr);
			up_notes_flag(&d->notes, UP_FLAG_LOG);
			return 0;
		}
		cached = 1;
	}
	int placed = 0;
	switch (up_ledger_claim(r->ledger, idx)) {
	case UP_MISSING:
	case UP_BACKGROUND: {
		uint8_t dg[8];
		if (cached)
			cached_digests(d, r, idx, 1, dg);
		pthread_mutex_lock(&d->lock);
		int rc = request_locked(d, r->offset + idx * ps, 1, cached ? dg : NULL, read_ns);
		pthread_mutex_unlock(&d->lock);
		if (!rc && d->evhead == d->evlen && d->ch[URGENT].fd >= 0)
			up_chan_flush(&d->ch[URGENT]); /* the last fault of a batch: on the wire now */
		if (rc) {
			unclaim(r, idx, 1); /* the vCPU stays blocked, nothing guessed */
			fail(d, UP_NOTE_FATAL, URGENT, -rc, "recording a request");
		}
		return 0;
	}
	case UP_REQUESTED:
		CNT(d, coalesced, 1);
		return 0;
	case UP_PRESENT: /* placed by the push between the fault and now */
		CNT(d, woken_present, 1);
		up_uffd_wake(d->uffd, page, ps);
		up_hist_add(&d->hists, UP_CLASS_PRESENT, read_ns); /* metrics */
		return 0;
	case UP_POISONED: /* the marker was discarded, or not placed yet: the page stays poisoned */
		CNT(d, repoisoned, 1);
		return served_locally(d, read_ns, place(d, ri, UP_OP_POISON, idx, 1, 0, 1, &placed));
	case UP_REMOVED:
		CNT(d, zero_after_remove, 1);
		return served_locally(d, read_ns, place(d, ri, UP_OP_ZERO, idx, 1, 0, 1, &placed));
	default:
		return 0;
	}
}

static int serve_queue(up_dest *d)
{
	while (d->evhead < d->evlen) {
		up_event ev = d->evq[d->evhead++]; /* by value: place() may grow the queue */
		int rc = serve_fault(d, ev.address, ev.flags, ev.read_ns);
		if (rc)
			return rc;
	}
	d->evhead = d->evlen = 0;
	return 0;
}

/* ---- frames -------------------------------------------------------------------------------- */

/* The next whole frame on `ch`: 1 a data frame that passed every check (f filled), 0 none
 * (more bytes needed, or the frame is held for the control plane, or the channel stopped). */
static int next_frame(up_dest *d, int ch, up_frame *f)
{
	up_chan *c = &d->ch[ch];
	char why[UP_WHY];
	if (c->held != UP_HELD_NONE)
		return 0;
	int r = up_chan_frame(c, f, why);
	if (r == 0)
		return 0;
	if (r > 0 && f->type == 0) {
		c->held = UP_HELD_FRAME;
		note(d, UP_NOTE_CONTROL, ch, 0, 0, 0, NULL);
		return 0;
	}
	if (r > 0 && !up_frame_check(f, d->ps, d->memory_size, ch, why)) {
		if (f->type == UP_WIRE_T_PAGES)
			return 1;
		strcpy(why, "Request sent by the source (only the destination sends it)");
	}
	c->held = UP_HELD_STOPPED;
	note(d, UP_NOTE_BAD_FRAME, ch, 0, 0, 0, why);
	return 0;
}

/* A reply must continue its request where the last one stopped and not run past its end. */
static int reply_ok(up_dest *d, const up_frame *f, char *why, uint64_t *fault_ns)
{
	pthread_mutex_lock(&d->lock);
	struct out_entry *o = lookup_locked(d, f->id);
	const uint64_t end = f->off + f->n * d->ps;
	unsigned long long id = f->id, off = f->off;
	int ok = 0;
	if (!o)
		snprintf(why, UP_WHY, "Pages reply for unknown request id %llu", id);
	else if (f->off != o->next)
		snprintf(why, UP_WHY, "Pages reply for id %llu at offset %llu %s (next expected "
			 "offset %llu)", id, off, f->off < o->next ? "overlaps what was already "
			 "answered" : "skips pages", (unsigned long long)o->next);
	else if (end > o->end)
		snprintf(why, UP_WHY, "Pages reply for id %llu runs past the end of its request", id);
	else if (f->kind == UP_WIRE_KIND_CLEAN && !o->digests)
		snprintf(why, UP_WHY, "CLEAN reply for id %llu, whose request had no digests", id);
	else {
		ok = 1;
		o->next = end;
		*fault_ns = o->next == o->end ? o->fault_ns : 0; /* metrics: timed when whole */
		if (o->next == o->end)
			answered_locked(d, o);
	}
	pthread_mutex_unlock(&d->lock);
	return ok;
}

/* Replies on URGENT: each checked and placed whole (a reply is a few pages). */
static int take_replies(up_dest *d)
{
	up_frame f;
	char why[UP_WHY];
	while (next_frame(d, URGENT, &f)) {
		uint64_t fault_ns = 0;
		if (!reply_ok(d, &f, why, &fault_ns)) {
			d->ch[URGENT].held = UP_HELD_STOPPED;
			note(d, UP_NOTE_BAD_FRAME, URGENT, 0, 0, 0, why);
			return 0;
		}
		CNT(d, replies, 1);
		int rc = place_run(d, f.kind, f.off, f.n, up_chan_payload(&d->ch[URGENT]), 1);
		up_hist_reply(&d->hists, f.kind, f.n, rc ? 0 : fault_ns); /* metrics */
		up_chan_consume(&d->ch[URGENT], &f);
		if (rc)
			return rc;
	}
	return 0;
}

/* One unit of BULK work: a slice of the push frame being placed, or one bounded receive (never
 * past the end of the frame being received, so a whole frame is placed from the buffer). */
static int bulk_step(up_dest *d)
{
	up_chan *c = &d->ch[BULK];
	if (!d->bk_active) {
		if (next_frame(d, BULK, &d->bk)) {
			d->bk_active = 1;
			d->bk_done = 0;
			return 0;
		}
		if (c->held != UP_HELD_NONE || !d->bulk_more)
			return 0;
		int r = up_chan_recv(c, UP_WIRE_RECV_PIECE, 1);
		if (r < 0) {
			c->held = UP_HELD_STOPPED;
			d->bulk_more = 0;
			note(d, errno ? UP_NOTE_SOCK_ERROR : UP_NOTE_EOF, BULK, errno, 0, 0, "receive");
			return 0;
		}
		d->bulk_more = r > 0;
		return 0;
	}
	const uint64_t slice = d->ps < UP_WIRE_PLACE_SLICE ? UP_WIRE_PLACE_SLICE / d->ps : 1;
	uint64_t k = d->bk.n - d->bk_done < slice ? d->bk.n - d->bk_done : slice;
	const uint8_t *payload = up_chan_payload(c) + d->bk_done * d->ps;
	int rc = place_run(d, d->bk.kind, d->bk.off + d->bk_done * d->ps, k,
			   d->bk.kind == UP_WIRE_KIND_DATA ? payload : NULL, 1);
	if (rc)
		return rc;
	d->bk_done += k;
	CNT(d, push_pages, k);
	if (d->bk_done == d->bk.n) {
		d->bk_active = 0;
		up_chan_consume(c, &d->bk);
		CNT(d, pushes, 1);
	}
	return 0;
}

/* ---- the loop ------------------------------------------------------------------------------ */

/* The oldest request older than the deadline: noted once per stall (the control plane logs it
 * and, the source being silent, reconnects). Returns ms until the oldest could stall. */
static int check_stall(up_dest *d)
{
	if (!d->timeout_ns || !connected(&d->ch[URGENT]))
		return -1; /* no source to be late: the control plane is finding one */
	pthread_mutex_lock(&d->lock);
	struct out_entry *o = lookup_locked(d, d->out_base);
	const uint64_t id = d->out_base, sent = o ? o->sent_ns : 0, off = o ? o->next : 0;
	pthread_mutex_unlock(&d->lock);
	if (!o || !sent) {
		d->noted_stall = 0;
		return -1;
	}
	const uint64_t now = now_ns();
	if (now - sent < d->timeout_ns)
		return (int)((sent + d->timeout_ns - now) / 1000000u) + 1;
	if (!d->noted_stall) {
		char why[UP_WHY];
		d->noted_stall = 1;
		CNT(d, stalls, 1);
		snprintf(why, UP_WHY, "request %llu (guest offset %#llx) unanswered for %llu ms",
			 (unsigned long long)id, (unsigned long long)off,
			 (unsigned long long)((now - sent) / 1000000u));
		note(d, UP_NOTE_SOCK_ERROR, URGENT, ETIMEDOUT, id, off, why);
	}
	return -1;
}

static void place_known_poison(up_dest *d)
{
	int placed = 0;
	for (uint64_t k = 0; k < d->npoison && !LOAD(&d->stop); k++) {
		int i = region_by_offset(d, d->poison[k]);
		const up_dest_region *r = &d->regions[i];
		if (place(d, i, UP_OP_POISON, (d->poison[k] - r->offset) / d->ps, 1, 0, 1, &placed))
			return;
	}
	d->npoison = 0;
}

/* The events `ch`'s socket is watched for: epoll_ctl only when they change (rarely: a held
 * frame, a full socket, a close). */
static void watch(up_dest *d, int ch, uint32_t events)
{
	if (events == d->watched[ch])
		return;
	struct epoll_event ev = {.events = events, .data.u32 = (uint32_t)ch + 1};
	int op = !events ? EPOLL_CTL_DEL : d->watched[ch] ? EPOLL_CTL_MOD : EPOLL_CTL_ADD;
	if (epoll_ctl(d->epfd, op, d->ch[ch].fd, &ev) == 0 || !events)
		d->watched[ch] = events;
}

/* A socket the control plane attached (a new source after a pause, or the first): URGENT
 * re-sends what is unanswered, BULK reads from a frame boundary. 1 if one was taken. */
static int take_socket(up_dest *d, int ch)
{
	pthread_mutex_lock(&d->lock); /* request_locked sees the channel before or after */
	int got = up_chan_take_next(&d->ch[ch]);
	if (got && ch == URGENT)
		resend_locked(d);
	pthread_mutex_unlock(&d->lock);
	if (got && ch == BULK) {
		d->bk_active = 0;
		d->bulk_more = 1;
	}
	d->noted_stall = 0;
	return got;
}

/* Let go of a channel the control plane closed: what was received or queued on it goes with
 * it (a push frame half placed is left: its pages are still MISSING). */
static void let_go(up_dest *d, int ch)
{
	up_chan *c = &d->ch[ch];
	watch(d, ch, 0);
	shutdown(c->fd, SHUT_RDWR); /* the source sees EOF; the fd is the control plane's */
	pthread_mutex_lock(&d->lock);
	up_chan_detach(c);
	pthread_mutex_unlock(&d->lock);
	if (ch == BULK)
		d->bk_active = d->bulk_more = 0;
	note(d, UP_NOTE_DETACHED, ch, 0, 0, 0, NULL);
}

/* Channel housekeeping each turn: a new socket, a released verdict, a close once what was
 * queued is out. Returns the poll events wanted. */
static short tend(up_dest *d, int ch)
{
	up_chan *c = &d->ch[ch];
	if (c->fd < 0 && !take_socket(d, ch))
		return 0;
	if (up_chan_released(c) && ch == BULK)
		d->bulk_more = 1; /* frames may already wait in the buffer */
	int q = up_chan_flush(c);
	if (q < 0 && c->held != UP_HELD_STOPPED) {
		c->held = UP_HELD_STOPPED;
		note(d, UP_NOTE_SOCK_ERROR, ch, -q, 0, 0, "send");
	}
	if (q <= 0 && LOAD(&c->closing)) {
		let_go(d, ch);
		return 0;
	}
	return (short)((c->held == UP_HELD_NONE ? POLLIN : 0) | (q > 0 ? POLLOUT : 0));
}

int up_dest_run(up_dest *d)
{
	if (__atomic_exchange_n(&d->running, 1, __ATOMIC_ACQ_REL))
		return -EBUSY;
	place_known_poison(d);
	while (!LOAD(&d->stop)) {
		const short ue = tend(d, URGENT), be = tend(d, BULK);
		watch(d, URGENT, (uint32_t)ue);
		watch(d, BULK, (uint32_t)be);
		const int bulk_busy = d->ch[BULK].fd >= 0 && (d->bk_active || d->bulk_more) &&
				      d->ch[BULK].held == UP_HELD_NONE;
		const int tls_held = up_chan_pending(&d->ch[URGENT]) || up_chan_pending(&d->ch[BULK]);
		const int busy = bulk_busy || d->evhead < d->evlen || tls_held;
		const int stall_ms = check_stall(d);
		struct epoll_event evs[4];
		uint32_t ready[4] = {0, 0, 0, 0}; /* by data: uffd, wake, URGENT, BULK */
		int n = epoll_wait(d->epfd, evs, 4, busy ? 0 : stall_ms);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			fail(d, UP_NOTE_FATAL, 0, errno, "epoll_wait");
			break;
		}
		for (int k = 0; k < n; k++)
			ready[evs[k].data.u32] = evs[k].events;
		if (ready[1])
			up_drain(d->wake_fd); /* instructions: looked at by tend() */
		if (ready[0]) {
			int pr = pump(d);
			if (pr == 0 && (ready[0] & (EPOLLERR | EPOLLHUP)))
				pr = -EIO; /* e.g. a blocking fd: it says EPOLLERR for ever */
			if (pr < 0) {
				fail(d, UP_NOTE_FATAL, 0, -pr, "reading the userfaultfd");
				break;
			}
		}
		if (d->evhead < d->evlen && serve_queue(d))
			continue; /* a failure was noted; faults on placed pages are still served */
		if ((ready[2] & (EPOLLIN | EPOLLHUP | EPOLLERR)) || up_chan_pending(&d->ch[URGENT])) {
			up_chan *c = &d->ch[URGENT];
			if (up_chan_recv(c, c->rcap, 0) < 0) {
				c->held = UP_HELD_STOPPED;
				note(d, errno ? UP_NOTE_SOCK_ERROR : UP_NOTE_EOF, URGENT, errno, 0, 0,
				     "receive");
			}
		}
		if (take_replies(d)) /* also what waited behind a control frame just judged */
			continue;
		if (ready[3] || up_chan_pending(&d->ch[BULK]))
			d->bulk_more = 1;
		if (d->ch[BULK].fd >= 0 && d->ch[BULK].held == UP_HELD_NONE &&
		    (d->bk_active || d->bulk_more))
			bulk_step(d);
		check_complete(d);
	}
	STORE(&d->stop, 0);
	STORE(&d->running, 0);
	return 0;
}

/* ---- ensure_present ------------------------------------------------------------------------ */

static int send_run(up_dest *d, const up_dest_region *r, uint64_t first, uint64_t n,
		    int digests)
{
	uint8_t dg[8 * DIGEST_RUN];
	if (digests)
		cached_digests(d, r, first, n, dg);
	pthread_mutex_lock(&d->lock);
	int rc = request_locked(d, r->offset + first * d->ps, n, digests ? dg : NULL, 0);
	pthread_mutex_unlock(&d->lock);
	up_wake(d->wake_fd); /* the engine sends what was queued */
	if (rc)
		unclaim(r, first, n);
	return rc;
}

int up_dest_request(up_dest *d, int region, uint64_t first, uint64_t count, uint64_t max_run,
		    int digests)
{
	if (region < 0 || region >= d->nregions)
		return -EINVAL;
	const up_dest_region *r = &d->regions[region];
	up_ledger *l = r->ledger;
	if (first > l->npages || count > l->npages - first)
		return -EINVAL;
	if (max_run == 0 || max_run > UP_WIRE_MAX_PAGES)
		max_run = UP_WIRE_MAX_PAGES;
	digests = digests && l->alias;
	if (digests && max_run > DIGEST_RUN)
		max_run = DIGEST_RUN;
	uint64_t run = 0, run_len = 0;
	int rc = 0;
	for (uint64_t i = first; i < first + count && !rc; i++) {
		int s = up_ledger_claim(l, i), placed = 0;
		if (s == UP_MISSING || s == UP_BACKGROUND) {
			if (run_len && run + run_len == i && run_len < max_run) {
				run_len++;
				continue;
			}
			if (run_len && (rc = send_run(d, r, run, run_len, digests))) {
				unclaim(r, i, 1);
				break;
			}
			run = i;
			run_len = 1;
			continue;
		}
		if (run_len) {
			rc = send_run(d, r, run, run_len, digests);
			run_len = 0;
		}
		if (!rc && (s == UP_REMOVED || s == UP_POISONED)) {
			CNT(d, zero_after_remove, s == UP_REMOVED);
			rc = place(d, region, s == UP_REMOVED ? UP_OP_ZERO : UP_OP_POISON, i, 1, 0, 0,
				   &placed);
			if (rc > 0)
				rc = -EIO; /* noted already: the session is failing */
		}
	}
	if (!rc && run_len)
		rc = send_run(d, r, run, run_len, digests);
	return rc;
}
