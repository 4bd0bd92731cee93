/*
 * The source's URGENT fast path (see urgent.h). Byte layouts are protocol.py's fixed 40-byte
 * headers (_REQ_F / _PAGES_F); tests/test_source_urgent.py checks both against protocol.py.
 */
#include "urgent.h"
#include "digest.h"
#include "wire.h"

#include <errno.h>
#include <poll.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define FRAME (UP_WIRE_PREFIX + UP_WIRE_FAST_HEADER)
#define MAX_UNITS UP_URG_MAX_UNITS

enum { PARSED, NEED_MORE, NOT_OURS };

/* Is the frame at p (len bytes buffered) a fast urgent Request this loop may serve? */
static int parse_request(const up_urgent *u, const uint8_t *p, uint64_t len, uint64_t *id,
			 uint64_t *off, uint64_t *n)
{
	uint32_t hl, pl;
	if (len < UP_WIRE_PREFIX)
		return NEED_MORE;
	/* Header length 40, no payload (digests): else not ours. */
	if (!up_wire_get_prefix(p, &hl, &pl) || hl != UP_WIRE_FAST_HEADER || pl)
		return NOT_OURS;
	if (len < FRAME)
		return NEED_MORE;
	if (!up_wire_get_request(p + UP_WIRE_PREFIX, id, off, n))
		return NOT_OURS;
	uint64_t unit = u->unit;
	/* Out of range is Python's to name (ProtocolError); too big is Python's to serve. */
	if (*off % unit || *n == 0 || *n > MAX_UNITS || *n > u->max_bytes / unit ||
	    *off > u->size || *n * unit > u->size - *off)
		return NOT_OURS;
	return PARSED;
}

static inline int bit(const uint8_t *bits, uint64_t i)
{
	return (__atomic_load_n(&bits[i >> 3], __ATOMIC_RELAXED) >> (i & 7)) & 1;
}

static int unit_poisoned(const up_urgent *u, uint64_t off)
{
	uint64_t first = off / u->base_ps, last = first + u->unit / u->base_ps;
	for (uint64_t i = first; i < last; i++)
		if (bit(u->poison, i))
			return 1;
	return 0;
}

/* Read guest [off, off+len) into dst through the range table; 0, or -1 on any failure (an
 * error, end of file, a short read at an unreadable page): Python then serves the request. */
static int read_guest(const up_urgent *u, uint8_t *dst, uint64_t off, uint64_t len)
{
	while (len) {
		const uint64_t *r = NULL;
		for (uint32_t k = 0; k < u->nranges; k++) {
			const uint64_t *c = u->ranges + 3 * k;
			if (off >= c[0] && off - c[0] < c[2]) {
				r = c;
				break;
			}
		}
		if (!r)
			return -1;
		uint64_t take = r[2] - (off - r[0]);
		if (take > len)
			take = len;
		ssize_t got = pread(u->data_fd, dst, take, (off_t)(r[1] + (off - r[0])));
		if (got < 0 && errno == EINTR)
			continue;
		if (got <= 0)
			return -1;
		dst += got;
		off += (uint64_t)got;
		len -= (uint64_t)got;
	}
	return 0;
}

static int64_t now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Write the whole iovec. UP_URG_ERROR if nothing went out, UP_URG_BROKEN if part did. */
static int send_all(up_urgent *u, struct iovec *iov, int cnt)
{
	int sent_any = 0;
	int64_t deadline = 0;
	struct msghdr mh = {0};
	while (cnt) {
		mh.msg_iov = iov;
		mh.msg_iovlen = (size_t)cnt;
		ssize_t w = sendmsg(u->sock, &mh, MSG_NOSIGNAL);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			if (errno != EAGAIN) {
				u->err = errno;
				return sent_any ? UP_URG_BROKEN : UP_URG_ERROR;
			}
			if (!deadline)
				deadline = now_ms() + u->partial_timeout_ms;
			int64_t left = deadline - now_ms();
			struct pollfd p = {.fd = u->sock, .events = POLLOUT};
			if (left <= 0 || poll(&p, 1, (int)left) == 0) {
				u->err = ETIMEDOUT;
				return sent_any ? UP_URG_BROKEN : UP_URG_ERROR;
			}
			continue;
		}
		sent_any = 1;
		u->bytes_sent += (uint64_t)w;
		size_t left = (size_t)w;
		while (cnt && left >= iov->iov_len) {
			left -= iov->iov_len;
			iov++;
			cnt--;
		}
		if (cnt) {
			iov->iov_base = (uint8_t *)iov->iov_base + left;
			iov->iov_len -= left;
		}
	}
	return 0;
}

/* Answer one parsed Request: 0, UP_URG_HANDOFF (a read failed; nothing sent), or a send
 * failure. */
static int serve_request(up_urgent *u, uint64_t id, uint64_t off, uint64_t n)
{
	const uint64_t unit = u->unit;
	uint8_t kind[MAX_UNITS];
	const uint8_t *src[MAX_UNITS];

	for (uint64_t k = 0; k < n; k++)
		kind[k] = unit_poisoned(u, off + k * unit) ? UP_KIND_POISONED : UP_KIND_DATA;
	/* Read every readable segment; a poisoned page is never read (EIO on /proc/PID/mem). */
	for (uint64_t k = 0; k < n;) {
		if (kind[k] == UP_KIND_POISONED) {
			k++;
			continue;
		}
		uint64_t j = k + 1;
		while (j < n && kind[j] != UP_KIND_POISONED)
			j++;
		if (u->mem) {
			for (uint64_t q = k; q < j; q++)
				src[q] = u->mem + off + q * unit;
		} else {
			if (read_guest(u, u->buf + k * unit, off + k * unit, (j - k) * unit))
				return UP_URG_HANDOFF;
			for (uint64_t q = k; q < j; q++)
				src[q] = u->buf + q * unit;
		}
		for (uint64_t q = k; q < j; q++)
			if (up_page_is_zero(src[q], unit))
				kind[q] = UP_KIND_ZERO;
		k = j;
	}

	/* One frame per run of one kind (docs/PROTOCOL.md: a reply is split per kind). */
	uint8_t hdr[MAX_UNITS][FRAME];
	struct iovec iov[2 * MAX_UNITS];
	int cnt = 0, runs = 0;
	for (uint64_t k = 0; k < n;) {
		uint64_t j = k + 1;
		while (j < n && kind[j] == kind[k] &&
		       (kind[k] != UP_KIND_DATA || src[j] == src[j - 1] + unit))
			j++;
		uint8_t *h = hdr[runs++];
		uint64_t pl = kind[k] == UP_KIND_DATA ? (j - k) * unit : 0;
		up_wire_put_pages(h, id, kind[k], off + k * unit, j - k, (uint32_t)pl);
		iov[cnt++] = (struct iovec){h, FRAME};
		if (pl)
			iov[cnt++] = (struct iovec){(void *)src[k], pl};
		if (kind[k] == UP_KIND_DATA)
			u->data_pages += j - k;
		else if (kind[k] == UP_KIND_ZERO)
			u->zero_pages += j - k;
		else
			u->poisoned_pages += j - k;
		k = j;
	}
	/* Offered before sent, as server.py does: the push skips these units from now on. */
	uint64_t first = off / unit;
	for (uint64_t i = first; i < first + n; i++)
		__atomic_fetch_or(&u->offered[i >> 3], (uint8_t)(1u << (i & 7)), __ATOMIC_RELAXED);
	__atomic_store_n(&u->hint, first + n + 1, __ATOMIC_RELAXED);
	u->requests++;
	u->pages += n;
	return send_all(u, iov, cnt);
}

static void consume(up_urgent *u, uint64_t pos)
{
	if (pos) {
		memmove(u->inbuf, u->inbuf + pos, u->in_len - pos);
		u->in_len -= pos;
	}
}

int up_urgent_serve(up_urgent *u)
{
	for (;;) {
		uint64_t pos = 0;
		for (;;) {
			uint64_t id, off, n;
			int p = parse_request(u, u->inbuf + pos, u->in_len - pos, &id, &off, &n);
			if (p == NEED_MORE)
				break;
			if (p == NOT_OURS) {
				consume(u, pos);
				return UP_URG_HANDOFF;
			}
			int rc = serve_request(u, id, off, n);
			if (rc == UP_URG_HANDOFF) {
				consume(u, pos);
				return rc;
			}
			pos += FRAME;
			if (rc) {
				consume(u, pos);
				return rc;
			}
		}
		consume(u, pos);

		struct pollfd p[2] = {{.fd = u->sock, .events = POLLIN},
				      {.fd = u->stopfd, .events = POLLIN}};
		if (poll(p, 2, -1) < 0) {
			if (errno == EINTR)
				continue;
			u->err = errno;
			return UP_URG_ERROR;
		}
		if (p[1].revents)
			return UP_URG_STOPPED;
		/* A frame we wait on is at most FRAME bytes (longer ones are handed off at their
		 * prefix), so the buffer always has room. */
		ssize_t r = recv(u->sock, u->inbuf + u->in_len, u->in_cap - u->in_len, 0);
		if (r == 0)
			return UP_URG_EOF;
		if (r < 0) {
			if (errno == EAGAIN || errno == EINTR)
				continue;
			u->err = errno;
			return UP_URG_ERROR;
		}
		u->in_len += (uint64_t)r;
	}
}

uint64_t up_urgent_take_hint(up_urgent *u)
{
	return __atomic_exchange_n(&u->hint, 0, __ATOMIC_RELAXED);
}
