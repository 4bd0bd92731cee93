#ifndef UP_CHAN_H
#define UP_CHAN_H
/*
 * One channel of a session in a C data plane: its socket, owned by one loop for the whole
 * session, the frames received on it, and the bytes queued for it (the C transport; both data
 * planes use it). A frame that is not a fixed-layout data frame is *held*: the loop stops
 * reading the channel until the control plane has judged it (up_chan_release).
 */
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>
#include "frame.h"
#include "tls.h"

#define UP_HELD_NONE 0
#define UP_HELD_FRAME 1   /* the frame at rx + rpos awaits the control plane's verdict */
#define UP_HELD_STOPPED 2 /* reading stopped for good (a bad frame, EOF, an error) */

typedef struct up_chan {
	int fd;       /* -1: not attached */
	int next_fd;  /* atomic: a socket to take when detached (up_chan_attach), or -1 */
	up_tls *tls;  /* TLS on the socket (the control plane's object, borrowed), or NULL */
	up_tls *next_tls;
	int channel;  /* UP_WIRE_CHANNEL_URGENT or _BULK */
	int wake_fd;  /* eventfd that wakes the loop owning the channel */
	/* receive side: the loop's own */
	uint8_t *rx;
	size_t rcap, rlen, rpos;
	size_t rmax;  /* the largest frame (prefix + header + payload) this side accepts */
	int held;     /* UP_HELD_*; written by the loop, cleared by up_chan_release */
	/* send side: any thread, under lock */
	pthread_mutex_t lock;
	uint8_t *tx;
	size_t tcap, tlen, tpos;
	size_t tmax;  /* bound on queued bytes */
	int closing;  /* atomic: flush what is queued, then the loop lets go */
	int release;  /* atomic: the control plane judged the held frame */
	uint64_t bytes_in, bytes_out;
} up_chan;

int up_chan_init(up_chan *c, int channel, int wake_fd, size_t rcap, size_t rmax, size_t tmax);
void up_chan_free(up_chan *c);
/* recv at most `piece` bytes, never past the end of the frame being received when `exact`.
 * 1: got bytes; 0: nothing to read (EAGAIN); -1: EOF (errno 0) or an error (errno). */
int up_chan_recv(up_chan *c, size_t piece, int exact);
/* The next whole frame at rx + rpos: 1 (f filled), 0 (more bytes needed), -1 (why: a bad
 * prefix, or a frame larger than rmax). */
int up_chan_frame(up_chan *c, up_frame *f, char *why);
const uint8_t *up_chan_header(const up_chan *c);
const uint8_t *up_chan_payload(const up_chan *c);
void up_chan_consume(up_chan *c, const up_frame *f);
/* The control plane has judged the held frame (c->release): consume it; 1 if so. Loop only. */
int up_chan_released(up_chan *c);
/* Queue bytes to send, in order with everything queued before (thread-safe). 0 or -ENOSPC. */
int up_chan_queue(up_chan *c, const void *p, size_t n);
/* Loop only: let go of the socket (after shutdown), dropping what was received or queued on
 * it, so a socket attached later starts clean. */
void up_chan_detach(up_chan *c);
/* Loop only: take the socket up_chan_attach left, if any (0: none). */
int up_chan_take_next(up_chan *c);
/* Bytes TLS already decrypted and nobody read: readable though poll says the socket is not. */
int up_chan_pending(const up_chan *c);

/* --- cffi: what Python sees (csrc/build_ffi.py reads it from here) --- */
/* The control plane's instructions for a channel, from any thread; each wakes its loop. */
typedef struct up_chan up_chan;
/* Queue a control frame (bytes the protocol encoded) after what is queued. 0 or -ENOSPC. */
int up_chan_send(up_chan *c, const uint8_t *bytes, size_t len);
/* The held frame is judged: consume it and read on. */
void up_chan_release(up_chan *c);
/* Send what is queued, then let go of the channel (the peer sees EOF, the control plane a
 * DETACHED note). */
void up_chan_close(up_chan *c);
/* A new socket (handshaken, at a frame boundary; `tls` on it, or NULL) for a channel that is
 * detached or being closed: the loop takes it once the old one is let go. */
void up_chan_attach(up_chan *c, int fd, up_tls *tls);
/* The held frame's bytes (prefix, header, payload), or 0 bytes if none. */
size_t up_chan_held(up_chan *c, const uint8_t **out);
/* --- end cffi --- */
/* Write what is queued without waiting: 0 all sent, 1 some left (wait for POLLOUT), -errno. */
int up_chan_flush(up_chan *c);
int up_chan_queued(up_chan *c);
/* Send an iovec whole (after what is queued), waiting for POLLOUT. A write to `wake_fd` with
 * *stop set gives up at once: 1. 0 sent; -errno (-ETIMEDOUT: the peer took no byte of a
 * started frame for timeout_ms). */
int up_chan_sendv(up_chan *c, struct iovec *iov, int cnt, int wake_fd, const int *stop,
		  int timeout_ms);
/* Drain an eventfd (a wake-up has been seen). */
void up_drain(int fd);
void up_wake(int fd);
#endif
