/*
 * The source's data plane (see source_plane.h and docs/DESIGN.md, "The data planes").
 *
 * Each channel's loop is the only user of its socket. A frame it does not serve is held and
 * noted for the control plane, and the loop reads no further on that channel until the verdict
 * comes back (up_src_release, or up_src_close after queueing an Error). Both loops share the
 * session's offered bitmap (a unit is offered once: demanded, or pushed) and the latest-demand
 * hint, through atomics.
 */
#include "source_plane.h"
#include "digest.h"

#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define URGENT UP_WIRE_CHANNEL_URGENT
#define BULK UP_WIRE_CHANNEL_BULK
#define LOAD(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define STORE(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)
#define CNT(s, field, n) __atomic_add_fetch(&(s)->st.field, (uint64_t)(n), __ATOMIC_RELAXED)
#define NOTES 64
/* The largest frame a destination sends: a Request with a digest for each of its pages. */
#define MAX_IN (UP_FRAME_REQUEST + 8u * UP_WIRE_MAX_PAGES)

struct work { /* one loop's buffers for reading units and framing them */
	uint64_t max_units;
	uint8_t *buf;   /* max_units * unit bytes, read from the guest */
	uint8_t *kinds; /* per unit */
	uint8_t *hdr;   /* a frame header per unit (a run of one unit each, at worst) */
	struct iovec *iov;
	int cnt;        /* iovecs built */
	uint64_t bytes; /* bytes they hold */
};

struct loop {
	up_chan c;
	int wake_fd;
	int stop; /* atomic */
	struct work w;
	uint64_t recv_ns; /* metrics: when the last bytes were received */
};

struct up_src {
	const up_guest *g;
	up_pacer *pacer;
	uint64_t unit, nunits;
	int timeout_ms;
	uint8_t *offered; /* one bit per unit: sent, or being sent */
	uint64_t hint;    /* 1 + the unit just past the latest demand; 0: none (atomic) */
	uint64_t zero_digest;
	int vouched; /* up_src_vouch */
	up_notes notes;
	struct loop ch[3]; /* URGENT (1) and BULK (2) */
	up_src_stats st;
	up_hists hists; /* metrics: request service latencies (hist.c) */
};

/* ---- the pacer ---------------------------------------------------------------------------- */

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

up_pacer *up_pacer_new(double bytes_per_s)
{
	if (!(bytes_per_s > 0)) {
		errno = EINVAL;
		return NULL;
	}
	up_pacer *p = calloc(1, sizeof(*p));
	if (!p)
		return NULL;
	pthread_mutex_init(&p->lock, NULL);
	p->ns_per_byte = 1e9 / bytes_per_s;
	return p;
}

void up_pacer_free(up_pacer *p)
{
	if (p) {
		pthread_mutex_destroy(&p->lock);
		free(p);
	}
}

/* Nanoseconds to wait before sending `bytes`: their slot on the link. Idle time earns no
 * credit, so there is no burst. */
static uint64_t pacer_wait(up_pacer *p, uint64_t bytes)
{
	pthread_mutex_lock(&p->lock);
	uint64_t now = now_ns(), slot = p->clock_ns > now ? p->clock_ns : now;
	p->clock_ns = slot + (uint64_t)(bytes * p->ns_per_byte);
	pthread_mutex_unlock(&p->lock);
	return slot - now;
}

/* ---- bitmaps ------------------------------------------------------------------------------- */

static int bit(const uint8_t *bits, uint64_t i)
{
	return (__atomic_load_n(&bits[i >> 3], __ATOMIC_RELAXED) >> (i & 7)) & 1;
}

static void set_bits(uint8_t *bits, uint64_t i, uint64_t j)
{
	for (; i < j; i++)
		__atomic_fetch_or(&bits[i >> 3], (uint8_t)(1u << (i & 7)), __ATOMIC_RELAXED);
}

/* First clear bit in [i, n), or n. */
static uint64_t find_clear(const uint8_t *bits, uint64_t i, uint64_t n)
{
	while (i < n && (i & 63) && bit(bits, i))
		i++;
	while (i + 64 <= n) {
		uint64_t w;
		memcpy(&w, bits + (i >> 3), 8);
		if (w != ~0ull)
			break;
		i += 64;
	}
	while (i < n && bit(bits, i))
		i++;
	return i;
}

/* ---- life cycle ---------------------------------------------------------------------------- */

static int work_init(struct work *w, uint64_t budget, uint64_t unit, int buffered)
{
	w->max_units = budget / unit ? budget / unit : 1;
	w->buf = buffered ? malloc(w->max_units * unit) : NULL;
	w->kinds = malloc(w->max_units);
	w->hdr = malloc(w->max_units * UP_FRAME_PAGES);
	w->iov = malloc(2 * w->max_units * sizeof(*w->iov));
	return (buffered && !w->buf) || !w->kinds || !w->hdr || !w->iov ? -ENOMEM : 0;
}

static void work_free(struct work *w)
{
	free(w->buf);
	free(w->kinds);
	free(w->hdr);
	free(w->iov);
}

up_src *up_src_new(const up_guest *g, up_pacer *pacer, uint64_t unit, int partial_timeout_ms)
{
	if (!unit || unit % g->base_ps || (unit & (unit - 1)) || g->size % unit) {
		errno = EINVAL;
		return NULL;
	}
	up_src *s = calloc(1, sizeof(*s));
	if (!s)
		return NULL;
	s->g = g;
	s->pacer = pacer;
	s->unit = unit;
	s->nunits = g->size / unit;
	s->timeout_ms = partial_timeout_ms;
	up_hists_init(&s->hists); /* metrics */
	s->offered = calloc((s->nunits + 7) / 8 + 8, 1); /* + 8: find_clear reads whole words */
	uint8_t *zero = calloc(1, unit);
	int rc = !s->offered || !zero ? -ENOMEM : up_notes_init(&s->notes, NOTES);
	if (zero)
		s->zero_digest = up_xxh64(zero, unit, 0);
	free(zero);
	for (int ch = URGENT; !rc && ch <= BULK; ch++) {
		struct loop *L = &s->ch[ch];
		L->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
		rc = L->wake_fd < 0 ? -errno
				    : up_chan_init(&L->c, ch, L->wake_fd, 64 << 10, MAX_IN, 1 << 20);
		if (!rc)
			rc = work_init(&L->w, ch == URGENT ? UP_WIRE_DEMAND_PIECE : UP_WIRE_PUSH_CHUNK,
				       unit, g->mem == NULL);
	}
	if (rc) {
		up_src_free(s);
		errno = -rc;
		return NULL;
	}
	return s;
}

void up_src_free(up_src *s)
{
	if (!s)
		return;
	for (int ch = URGENT; ch <= BULK; ch++) {
		struct loop *L = &s->ch[ch];
		if (L->wake_fd > 0)
			close(L->wake_fd);
		up_chan_free(&L->c);
		work_free(&L->w);
	}
	up_notes_free(&s->notes);
	free(s->offered);
	free(s);
}

up_notes *up_src_notes(up_src *s)
{
	return &s->notes;
}

int up_src_attach(up_src *s, int channel, int fd, up_tls *tls)
{
	if (channel != URGENT && channel != BULK)
		return -EINVAL;
	s->ch[channel].c.fd = fd;
	s->ch[channel].c.tls = tls;
	return 0;
}

up_chan *up_src_chan(up_src *s, int channel)
{
	return channel == URGENT || channel == BULK ? &s->ch[channel].c : NULL;
}

void up_src_stop(up_src *s, int channel)
{
	STORE(&s->ch[channel].stop, 1);
	up_wake(s->ch[channel].wake_fd);
}

void up_src_get_stats(up_src *s, up_src_stats *out)
{
	const uint64_t *src = (const uint64_t *)&s->st;
	uint64_t *dst = (uint64_t *)out;
	for (size_t i = 0; i < sizeof(*out) / 8; i++)
		dst[i] = __atomic_load_n(&src[i], __ATOMIC_RELAXED);
	out->bytes_urgent = s->ch[URGENT].c.bytes_out;
	out->bytes_bulk = s->ch[BULK].c.bytes_out;
}

/* metrics: read on a scrape (hist.h) */
void up_src_get_timing(up_src *s, up_timing *out)
{
	up_hists_copy(&s->hists, &out->h);
	out->bytes_urgent = out->bytes_bulk = 0; /* the source's are in its stats */
}

void up_src_set_timing(up_src *s, int on)
{
	STORE(&s->hists.on, on);
}

void up_src_mark(up_src *s, int poisoned, uint64_t first, uint64_t n, const uint8_t *bits)
{
	const uint64_t per = s->unit / s->g->base_ps;
	for (uint64_t k = 0; k < n && first + k < s->nunits; k++) {
		if (!((bits[k >> 3] >> (k & 7)) & 1))
			continue;
		const uint64_t u = first + k;
		set_bits(s->offered, u, u + 1);
		if (poisoned)
			set_bits(s->g->poison, u * per, (u + 1) * per);
	}
}

/* ---- reading and framing units ------------------------------------------------------------- */

static uint64_t le64(const uint8_t *p) /* the wire's digests are little-endian */
{
	uint64_t v;
	memcpy(&v, p, 8);
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
	v = __builtin_bswap64(v);
#endif
	return v;
}

/* A note the control plane must get: waits (a millisecond at a time) while the queue is full.
 * 0, or 1 if stopped meanwhile. */
static int note(up_src *s, struct loop *L, int what, int err, uint64_t a, uint64_t b,
		const char *text)
{
	while (up_notes_put(&s->notes, what, L->c.channel, err, a, b, text) == -ENOSPC) {
		if (LOAD(&L->stop))
			return 1;
		struct pollfd p = {.fd = L->wake_fd, .events = POLLIN};
		poll(&p, 1, 1);
	}
	return 0;
}

void up_src_vouch(up_src *s)
{
	s->vouched = 1;
}

/* A vouched session's units, all unchanged since the epoch: CLEAN, or POISONED if known so,
 * without a read. 1 done, 0 some changed (read them), or UP_GUEST_GONE. */
static int vouch(up_src *s, struct work *w, uint64_t off, uint64_t n)
{
	int ch = up_guest_changed(s->g, off, n * s->unit);
	if (ch)
		return ch < 0 ? ch : 0;
	for (uint64_t i = 0; i < n; i++)
		w->kinds[i] = up_guest_unit_poisoned(s->g, off + i * s->unit, s->unit)
				      ? UP_WIRE_KIND_POISONED
				      : UP_WIRE_KIND_CLEAN;
	return 1;
}

/* Read units [off, off + n) (n <= max_units) and frame them as Pages with `id`, one frame per
 * run of one kind, into L->w's iovec. `digests` (or NULL): CLEAN where they match, or, in a
 * vouched session, where nothing changed since the epoch. */
static int load(up_src *s, struct loop *L, uint64_t id, uint64_t off, uint64_t n,
		const uint8_t *digests, char *why)
{
	struct work *w = &L->w;
	const uint64_t unit = s->unit;
	const uint8_t *data = NULL;
	int rc = digests && s->vouched ? vouch(s, w, off, n) : 0;
	if (rc < 0)
		return rc;
	if (rc == 1) {
		CNT(s, vouched_pages, n);
		digests = NULL; /* decided */
	} else if ((rc = up_guest_read(s->g, off, n, unit, w->buf, &data, w->kinds, why))) {
		return rc;
	}
	if (digests) {
		for (uint64_t i = 0; i < n; i++) {
			int k = w->kinds[i];
			if (k == UP_WIRE_KIND_POISONED)
				continue; /* poison is never CLEAN */
			uint64_t d = k == UP_WIRE_KIND_ZERO ? s->zero_digest
							    : up_xxh64(data + i * unit, unit, 0);
			if (d == le64(digests + 8 * i))
				w->kinds[i] = UP_WIRE_KIND_CLEAN;
		}
	}
	w->cnt = 0;
	w->bytes = 0;
	uint64_t runs = 0;
	for (uint64_t k = 0; k < n;) {
		uint64_t j = k + 1;
		while (j < n && w->kinds[j] == w->kinds[k])
			j++;
		const int kind = w->kinds[k];
		const uint64_t pl = kind == UP_WIRE_KIND_DATA ? (j - k) * unit : 0;
		uint8_t *h = w->hdr + UP_FRAME_PAGES * runs++;
		up_frame_put_pages(h, id, kind, off + k * unit, j - k, (uint32_t)pl);
		w->iov[w->cnt++] = (struct iovec){h, UP_FRAME_PAGES};
		if (pl)
			w->iov[w->cnt++] = (struct iovec){(void *)(data + k * unit), pl};
		w->bytes += UP_FRAME_PAGES + pl;
		if (kind == UP_WIRE_KIND_DATA)
			CNT(s, data_pages, j - k);
		else if (kind == UP_WIRE_KIND_ZERO)
			CNT(s, zero_pages, j - k);
		else if (kind == UP_WIRE_KIND_POISONED)
			CNT(s, poisoned_pages, j - k);
		else
			CNT(s, clean_pages, j - k);
		k = j;
	}
	return 0;
}

/* A read that failed: note it (the control plane answers with an Error) and stop reading the
 * channel (GONE: the control plane ends every session). 1 if stopped meanwhile. */
static int read_failed(up_src *s, struct loop *L, int rc, uint64_t id, uint64_t off,
		       const char *why)
{
	if (rc == UP_GUEST_GONE) {
		L->c.held = UP_HELD_STOPPED;
		return note(s, L, UP_NOTE_GONE, 0, id, off, "the served process exited");
	}
	CNT(s, read_failures, 1);
	if (L->c.channel == BULK)
		L->c.held = UP_HELD_STOPPED; /* the push cannot go on */
	return note(s, L, UP_NOTE_READ_FAILED, 0, id, off, why);
}

/* ---- the loops ----------------------------------------------------------------------------- */

/* One Request: its units in pieces of at most max_units, each sent whole. */
static int serve_request(up_src *s, struct loop *L, const up_frame *f, const uint8_t *digests)
{
	char why[UP_WHY];
	const uint64_t first = f->off / s->unit;
	set_bits(s->offered, first, first + f->n); /* the push skips them from now on */
	STORE(&s->hint, first + f->n + 1);
	CNT(s, requests, 1);
	CNT(s, request_pages, f->n);
	int cls = -1; /* metrics: the reply's class */
	for (uint64_t done = 0; done < f->n;) {
		uint64_t k = f->n - done < L->w.max_units ? f->n - done : L->w.max_units;
		uint64_t off = f->off + done * s->unit;
		int rc = load(s, L, f->id, off, k, digests ? digests + 8 * done : NULL, why);
		if (rc)
			return read_failed(s, L, rc, f->id, off, why);
		rc = up_chan_sendv(&L->c, L->w.iov, L->w.cnt, L->wake_fd, &L->stop, s->timeout_ms);
		if (rc)
			return rc;
		cls = up_hist_merge(cls, L->w.kinds, k); /* metrics */
		done += k;
	}
	up_hist_add(&s->hists, cls, L->recv_ns); /* metrics: received -> reply written */
	return 0;
}

/* Frames received on the channel: Requests served (URGENT), anything else held or noted.
 * 0 to go on; otherwise the loop returns it. */
static int take_frames(up_src *s, struct loop *L)
{
	up_chan *c = &L->c;
	char why[UP_WHY];
	while (c->held == UP_HELD_NONE) {
		up_frame f;
		int r = up_chan_frame(c, &f, why);
		if (r == 0)
			return 0;
		if (r > 0 && f.type == 0) {
			c->held = UP_HELD_FRAME;
			return note(s, L, UP_NOTE_CONTROL, 0, 0, 0, NULL);
		}
		if (r < 0 || up_frame_check(&f, s->unit, s->g->size, c->channel, why) ||
		    f.type != UP_WIRE_T_REQUEST) {
			if (r > 0 && f.type != UP_WIRE_T_REQUEST)
				strcpy(why, "Pages sent by the destination (only the source sends it)");
			c->held = UP_HELD_STOPPED;
			return note(s, L, UP_NOTE_BAD_FRAME, 0, 0, 0, why);
		}
		int rc = serve_request(s, L, &f, f.pl ? up_chan_payload(c) : NULL);
		if (rc)
			return rc;
		up_chan_consume(c, &f);
	}
	return 0;
}

/* The next run of units nobody has been offered, from the latest demand on: [*i, *j). */
static int next_push(up_src *s, uint64_t *cursor, uint64_t max, uint64_t *i, uint64_t *j)
{
	uint64_t h = __atomic_exchange_n(&s->hint, 0, __ATOMIC_ACQ_REL);
	if (h)
		*cursor = h - 1 < s->nunits ? h - 1 : 0;
	*i = find_clear(s->offered, *cursor, s->nunits);
	if (*i == s->nunits)
		*i = find_clear(s->offered, 0, s->nunits);
	if (*i == s->nunits)
		return 0;
	*j = *i + 1;
	while (*j < s->nunits && *j - *i < max && !bit(s->offered, *j))
		(*j)++;
	set_bits(s->offered, *i, *j);
	*cursor = *j;
	return 1;
}

/* One push frame group: read a run, wait for its slot under the cap, send it. */
static int push_once(up_src *s, struct loop *L, uint64_t *cursor, int *done)
{
	char why[UP_WHY];
	uint64_t i, j, max = L->w.max_units;
	if (s->pacer) { /* small frames keep a capped stream smooth: about 20 a second */
		uint64_t per = (uint64_t)(1e9 / 20 / s->pacer->ns_per_byte) / s->unit;
		max = per < 1 ? 1 : per < max ? per : max;
	}
	if (!next_push(s, cursor, max, &i, &j)) {
		*done = 1;
		return note(s, L, UP_NOTE_PUSH_DONE, 0, 0, 0, NULL);
	}
	int rc = load(s, L, UP_WIRE_PUSH_ID, i * s->unit, j - i, NULL, why);
	if (rc)
		return read_failed(s, L, rc, 0, i * s->unit, why);
	CNT(s, push_pages, j - i);
	CNT(s, pushes, 1);
	if (s->pacer) { /* asleep on the wake fd until the slot: only a stop ends it early */
		const uint64_t slot = now_ns() + pacer_wait(s->pacer, L->w.bytes);
		for (uint64_t now; (now = now_ns()) < slot;) {
			struct pollfd p = {.fd = L->wake_fd, .events = POLLIN};
			if (poll(&p, 1, (int)((slot - now + 999999) / 1000000)) > 0)
				up_drain(L->wake_fd); /* the loop looks at every flag anyway */
			if (LOAD(&L->stop))
				return 1;
		}
	}
	return up_chan_sendv(&L->c, L->w.iov, L->w.cnt, L->wake_fd, &L->stop, s->timeout_ms);
}

static void set_nice(int nice)
{
	if (nice != INT32_MIN)
		setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), nice);
}

int up_src_run(up_src *s, int channel, int nice, int base_nice)
{
	if (channel != URGENT && channel != BULK)
		return -EINVAL;
	struct loop *L = &s->ch[channel];
	up_chan *c = &L->c;
	const int push = channel == BULK;
	set_nice(push ? nice : base_nice);
	uint64_t cursor = 0;
	int done = !push, rc = 0;
	for (;;) {
		if (LOAD(&L->stop))
			break;
		up_chan_released(c);
		int q = up_chan_flush(c);
		if (q < 0) {
			note(s, L, UP_NOTE_SOCK_ERROR, -q, 0, 0, "send");
			break;
		}
		if (!q && LOAD(&c->closing)) {
			shutdown(c->fd, SHUT_WR); /* what was queued (an Error, Done) is out */
			break;
		}
		if ((rc = take_frames(s, L)))
			break;
		const int held_by_tls = c->held == UP_HELD_NONE && up_chan_pending(c);
		const int work = (!done && c->held == UP_HELD_NONE) || held_by_tls;
		struct pollfd p[2] = {
			{.fd = c->fd, .events = (short)((c->held == UP_HELD_NONE ? POLLIN : 0) |
							(q ? POLLOUT : 0))},
			{.fd = L->wake_fd, .events = POLLIN},
		};
		if (poll(p, 2, work ? 0 : -1) < 0 && errno != EINTR) {
			note(s, L, UP_NOTE_SOCK_ERROR, errno, 0, 0, "poll");
			break;
		}
		if (p[1].revents)
			up_drain(L->wake_fd);
		if ((p[0].revents & (POLLIN | POLLHUP | POLLERR)) || held_by_tls) {
			int r = up_chan_recv(c, c->rcap, 0);
			if (r > 0)
				L->recv_ns = up_hists_now(&s->hists); /* metrics */
			if (r < 0) {
				note(s, L, errno ? UP_NOTE_SOCK_ERROR : UP_NOTE_EOF, errno, 0, 0, "receive");
				break;
			}
		}
		if (!done && c->held == UP_HELD_NONE && (rc = push_once(s, L, &cursor, &done)))
			break;
	}
	if (rc < 0)
		note(s, L, UP_NOTE_SOCK_ERROR, -rc, 0, 0, "send");
	if (push)
		set_nice(base_nice);
	return 0;
}
