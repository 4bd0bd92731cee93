/* One channel's socket and buffers (see chan.h). */
#include "chan.h"

#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

int up_chan_init(up_chan *c, int channel, int wake_fd, size_t rcap, size_t rmax, size_t tmax)
{
	memset(c, 0, sizeof(*c));
	c->fd = c->next_fd = -1;
	c->channel = channel;
	c->wake_fd = wake_fd;
	c->rcap = rcap;
	c->rmax = rmax;
	c->tmax = tmax;
	c->tcap = 4096;
	c->rx = malloc(rcap);
	c->tx = malloc(c->tcap);
	if (!c->rx || !c->tx) {
		free(c->rx);
		free(c->tx);
		return -ENOMEM;
	}
	pthread_mutex_init(&c->lock, NULL);
	return 0;
}

void up_chan_free(up_chan *c)
{
	if (!c->rx)
		return;
	pthread_mutex_destroy(&c->lock);
	free(c->rx);
	free(c->tx);
	c->rx = c->tx = NULL;
}

/* The socket's I/O, through TLS when there is TLS: recv/send/sendmsg's return conventions. */
static ssize_t chan_read(up_chan *c, void *buf, size_t n)
{
	if (!c->tls)
		return recv(c->fd, buf, n, MSG_DONTWAIT);
	long r = up_tls_read(c->tls, buf, n);
	if (r < 0)
		errno = (int)-r;
	return r < 0 ? -1 : r;
}

static ssize_t chan_writev(up_chan *c, const struct iovec *iov, int cnt)
{
	if (!c->tls) {
		struct msghdr mh = {.msg_iov = (struct iovec *)iov, .msg_iovlen = (size_t)cnt};
		return sendmsg(c->fd, &mh, MSG_DONTWAIT | MSG_NOSIGNAL);
	}
	ssize_t total = 0; /* TLS has no sendmsg: each buffer in turn, as far as it goes */
	for (int k = 0; k < cnt; k++) {
		long w = up_tls_write(c->tls, iov[k].iov_base, iov[k].iov_len);
		if (w < 0) {
			if (total)
				return total;
			errno = (int)-w;
			return -1;
		}
		total += w;
		if ((size_t)w < iov[k].iov_len)
			break;
	}
	return total;
}

/* Bytes the frame at rpos still needs (0 if its prefix is not in yet: the prefix). */
static size_t frame_end(const up_chan *c)
{
	size_t have = c->rlen - c->rpos;
	if (have < UP_WIRE_PREFIX_SIZE)
		return c->rpos + UP_WIRE_PREFIX_SIZE;
	const uint8_t *p = c->rx + c->rpos;
	uint32_t hl = (uint32_t)p[2] << 8 | p[3];
	uint32_t pl = (uint32_t)p[4] << 24 | (uint32_t)p[5] << 16 | (uint32_t)p[6] << 8 | p[7];
	return c->rpos + UP_WIRE_PREFIX_SIZE + hl + pl;
}

int up_chan_recv(up_chan *c, size_t piece, int exact)
{
	if (c->rpos == c->rlen) {
		c->rpos = c->rlen = 0;
	} else if (c->rpos && c->rcap - c->rlen < piece) {
		memmove(c->rx, c->rx + c->rpos, c->rlen - c->rpos);
		c->rlen -= c->rpos;
		c->rpos = 0;
	}
	size_t room = c->rcap - c->rlen;
	if (exact) {
		size_t want = frame_end(c) - c->rlen;
		if (want < room)
			room = want;
	}
	if (room > piece)
		room = piece;
	if (room == 0)
		return 0; /* the buffer holds a whole frame already */
	ssize_t got = chan_read(c, c->rx + c->rlen, room);
	if (got > 0) {
		c->rlen += (size_t)got;
		c->bytes_in += (uint64_t)got;
		return 1;
	}
	if (got == 0) {
		errno = 0;
		return -1;
	}
	return (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) ? 0 : -1;
}

int up_chan_frame(up_chan *c, up_frame *f, char *why)
{
	size_t have = c->rlen - c->rpos;
	if (have < UP_WIRE_PREFIX_SIZE)
		return 0;
	if (up_frame_prefix(c->rx + c->rpos, &f->hl, &f->pl, why))
		return -1;
	size_t total = UP_WIRE_PREFIX_SIZE + (size_t)f->hl + f->pl;
	if (total > c->rmax) {
		snprintf(why, UP_WHY, "a %zu-byte frame is larger than any this side accepts (%zu)",
			 total, c->rmax);
		return -1;
	}
	if (have < total) {
		if (total > c->rcap - c->rpos) { /* make room for the whole frame */
			if (total > c->rcap) {
				uint8_t *b = malloc(total);
				if (!b) {
					snprintf(why, UP_WHY, "no memory for a %zu-byte frame", total);
					return -1;
				}
				memcpy(b, c->rx + c->rpos, have);
				free(c->rx);
				c->rx = b;
				c->rcap = total;
			} else {
				memmove(c->rx, c->rx + c->rpos, have);
			}
			c->rpos = 0;
			c->rlen = have;
		}
		return 0;
	}
	up_frame_decode(c->rx + c->rpos + UP_WIRE_PREFIX_SIZE, f);
	return 1;
}

const uint8_t *up_chan_header(const up_chan *c)
{
	return c->rx + c->rpos + UP_WIRE_PREFIX_SIZE;
}

const uint8_t *up_chan_payload(const up_chan *c)
{
	const uint8_t *p = c->rx + c->rpos;
	return p + UP_WIRE_PREFIX_SIZE + ((uint32_t)p[2] << 8 | p[3]);
}

void up_chan_consume(up_chan *c, const up_frame *f)
{
	c->rpos += UP_WIRE_PREFIX_SIZE + (size_t)f->hl + f->pl;
}

int up_chan_released(up_chan *c)
{
	if (!__atomic_exchange_n(&c->release, 0, __ATOMIC_ACQ_REL) || c->held != UP_HELD_FRAME)
		return 0;
	up_frame f;
	char why[UP_WHY];
	up_chan_frame(c, &f, why); /* the held frame, whole: it was judged */
	up_chan_consume(c, &f);
	c->held = UP_HELD_NONE;
	return 1;
}

size_t up_chan_held(up_chan *c, const uint8_t **out)
{
	*out = c->rx + c->rpos;
	if (c->held != UP_HELD_FRAME)
		return 0;
	return frame_end(c) - c->rpos;
}

int up_chan_queue(up_chan *c, const void *p, size_t n)
{
	int rc = 0;
	pthread_mutex_lock(&c->lock);
	if (c->tlen - c->tpos + n > c->tmax) {
		rc = -ENOSPC;
	} else {
		if (c->tpos && c->tlen + n > c->tcap) {
			const size_t left = c->tlen - c->tpos;
			memmove(c->tx, c->tx + c->tpos, left);
			/* tpos first: an unlocked look (up_chan_flush) never sees this as empty */
			__atomic_store_n(&c->tpos, 0, __ATOMIC_RELEASE);
			__atomic_store_n(&c->tlen, left, __ATOMIC_RELEASE);
		}
		if (c->tlen + n > c->tcap) {
			size_t cap = c->tcap;
			while (cap < c->tlen + n)
				cap *= 2;
			uint8_t *t = realloc(c->tx, cap);
			if (!t) {
				pthread_mutex_unlock(&c->lock);
				return -ENOMEM;
			}
			c->tx = t;
			c->tcap = cap;
		}
		memcpy(c->tx + c->tlen, p, n);
		__atomic_store_n(&c->tlen, c->tlen + n, __ATOMIC_RELEASE);
	}
	pthread_mutex_unlock(&c->lock);
	return rc;
}

int up_chan_send(up_chan *c, const uint8_t *bytes, size_t len)
{
	int rc = up_chan_queue(c, bytes, len);
	up_wake(c->wake_fd);
	return rc;
}

void up_chan_release(up_chan *c)
{
	__atomic_store_n(&c->release, 1, __ATOMIC_RELEASE);
	up_wake(c->wake_fd);
}

void up_chan_close(up_chan *c)
{
	__atomic_store_n(&c->closing, 1, __ATOMIC_RELEASE);
	up_wake(c->wake_fd);
}

void up_chan_attach(up_chan *c, int fd, up_tls *tls)
{
	c->next_tls = tls; /* published by the store below */
	__atomic_store_n(&c->next_fd, fd, __ATOMIC_RELEASE);
	up_wake(c->wake_fd);
}

void up_chan_detach(up_chan *c)
{
	c->fd = -1;
	c->tls = NULL;
	c->rlen = c->rpos = 0;
	c->held = UP_HELD_NONE;
	__atomic_store_n(&c->release, 0, __ATOMIC_RELEASE);
	pthread_mutex_lock(&c->lock);
	__atomic_store_n(&c->tpos, 0, __ATOMIC_RELEASE);
	__atomic_store_n(&c->tlen, 0, __ATOMIC_RELEASE);
	pthread_mutex_unlock(&c->lock);
	__atomic_store_n(&c->closing, 0, __ATOMIC_RELEASE);
}

int up_chan_take_next(up_chan *c)
{
	if (c->fd >= 0 || __atomic_load_n(&c->next_fd, __ATOMIC_ACQUIRE) < 0)
		return 0;
	__atomic_store_n(&c->closing, 0, __ATOMIC_RELEASE); /* a close meant the socket before */
	c->fd = __atomic_exchange_n(&c->next_fd, -1, __ATOMIC_ACQ_REL);
	c->tls = c->next_tls;
	return 1;
}

int up_chan_pending(const up_chan *c)
{
	return c->tls && c->fd >= 0 && up_tls_pending(c->tls) > 0;
}


int up_chan_queued(up_chan *c)
{
	pthread_mutex_lock(&c->lock);
	int q = c->tpos < c->tlen;
	pthread_mutex_unlock(&c->lock);
	return q;
}

int up_chan_flush(up_chan *c)
{
	int rc = 0;
	/* Unlocked first look: nothing queued is the common case on the fault path. A racing
	 * queue wakes the loop, which looks again. */
	if (__atomic_load_n(&c->tlen, __ATOMIC_ACQUIRE) == __atomic_load_n(&c->tpos, __ATOMIC_ACQUIRE))
		return 0;
	pthread_mutex_lock(&c->lock);
	while (c->tpos < c->tlen) {
		struct iovec one = {c->tx + c->tpos, c->tlen - c->tpos};
		ssize_t w = chan_writev(c, &one, 1);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			rc = (errno == EAGAIN || errno == EWOULDBLOCK) ? 1 : -errno;
			break;
		}
		__atomic_store_n(&c->tpos, c->tpos + (size_t)w, __ATOMIC_RELEASE);
		c->bytes_out += (uint64_t)w;
	}
	if (c->tpos == c->tlen) {
		__atomic_store_n(&c->tpos, 0, __ATOMIC_RELEASE);
		__atomic_store_n(&c->tlen, 0, __ATOMIC_RELEASE);
	}
	pthread_mutex_unlock(&c->lock);
	return rc;
}

static int64_t now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

void up_drain(int fd)
{
	uint64_t v;
	ssize_t r = read(fd, &v, sizeof(v));
	(void)r;
}

void up_wake(int fd)
{
	uint64_t one = 1;
	ssize_t r = write(fd, &one, sizeof(one));
	(void)r; /* EAGAIN: the counter is already non-zero, which is all it needs to be */
}

/* Wait for POLLOUT, or a wake-up: 1 if it means stop; otherwise it is drained and remembered
 * (*woke), to be signalled again once the send is over, for the loop to look at. */
static int wait_out(up_chan *c, int wake_fd, const int *stop, int *woke, int timeout_ms)
{
	struct pollfd p[2] = {{.fd = c->fd, .events = POLLOUT}, {.fd = wake_fd, .events = POLLIN}};
	int r = poll(p, 2, timeout_ms);
	if (r == 0)
		return -ETIMEDOUT;
	if (r > 0 && (p[1].revents & POLLIN)) {
		up_drain(wake_fd);
		if (__atomic_load_n(stop, __ATOMIC_ACQUIRE))
			return 1;
		*woke = 1;
	}
	return 0;
}

/* A stop ends the send at once, even mid-frame: the loop returns and the socket is closed, so
 * nothing can follow a torn frame. (A close finishes the frame first: the control plane's
 * Error or Done goes after it.) */
static int sendv(up_chan *c, struct iovec *iov, int cnt, int wake_fd, const int *stop,
		 int timeout_ms, int *woke)
{
	int started = 0;
	int64_t deadline = 0;
	for (;;) { /* what is queued goes first: frames stay whole and in order */
		int f = up_chan_flush(c);
		if (f <= 0) {
			if (f < 0)
				return f;
			break;
		}
		int r = wait_out(c, wake_fd, stop, woke, -1);
		if (r)
			return r;
	}
	while (cnt) {
		ssize_t w = chan_writev(c, iov, cnt < (int)UP_WIRE_IOV_MAX ? cnt : (int)UP_WIRE_IOV_MAX);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			if (errno != EAGAIN && errno != EWOULDBLOCK)
				return -errno;
			int left = -1; /* a started frame must go on within the timeout */
			if (started) {
				if (!deadline)
					deadline = now_ms() + timeout_ms;
				left = (int)(deadline - now_ms());
				if (left <= 0)
					return -ETIMEDOUT;
			}
			int r = wait_out(c, wake_fd, stop, woke, left);
			if (r)
				return r;
			continue;
		}
		started = 1;
		deadline = 0; /* progress: a new window */
		c->bytes_out += (uint64_t)w;
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

int up_chan_sendv(up_chan *c, struct iovec *iov, int cnt, int wake_fd, const int *stop,
		  int timeout_ms)
{
	int woke = 0;
	int rc = sendv(c, iov, cnt, wake_fd, stop, timeout_ms, &woke);
	if (woke)
		up_wake(wake_fd);
	return rc;
}
