#ifndef UP_TLS_H
#define UP_TLS_H
/*
 * TLS for a channel, through OpenSSL's libssl (never hand-written crypto). One connection's
 * TLS state lives in one C object from the first byte to the last: trio drives the TLS
 * handshake and the protocol's handshake through it (non-blocking, waiting on the fd), then
 * the data plane reads and writes through the very same object (chan.c), so the session's
 * keys never change hands. TLS 1.3 only: no renegotiation. Built without OpenSSL's headers,
 * every call fails with a reason (up_tls_available() is 0).
 */
#include <stddef.h>
#include "frame.h"

/* --- cffi: what Python sees (csrc/build_ffi.py reads it from here) --- */
#define UP_TLS_WANT_READ 1
#define UP_TLS_WANT_WRITE 2

typedef struct up_tls_ctx up_tls_ctx;
typedef struct up_tls up_tls;

int up_tls_available(void);
/* A context: `server` presents cert/key; a client must be given a CA to verify the server
 * with (and may present cert/key). A server given a CA requires client certificates signed by
 * it. NULL and why on failure. */
up_tls_ctx *up_tls_ctx_new(int server, const char *cert, const char *key, const char *ca,
			   char *why);
void up_tls_ctx_free(up_tls_ctx *c);
/* TLS on a connected, non-blocking socket; a client checks the server's name (DNS name or IP
 * literal `host`) against its certificate. NULL and why on failure. */
up_tls *up_tls_new(up_tls_ctx *c, int fd, const char *host, char *why);
void up_tls_free(up_tls *t);
/* The TLS handshake, without blocking: 0 done, UP_TLS_WANT_READ/WRITE (wait, call again), -1
 * failed (why: which certificate check, or which alert). */
int up_tls_handshake(up_tls *t, char *why);
/* Like recv/send without blocking: bytes, 0 the peer closed, -EAGAIN (up_tls_want says which
 * way to wait), -EPROTO or -errno. */
long up_tls_read(up_tls *t, void *buf, size_t n);
long up_tls_write(up_tls *t, const void *buf, size_t n);
int up_tls_want(const up_tls *t);
/* After -EPROTO: why (OpenSSL's reason, e.g. the peer's alert). */
const char *up_tls_why(const up_tls *t);
/* Bytes already decrypted and not read yet: readable though the socket may not be. */
size_t up_tls_pending(const up_tls *t);
/* --- end cffi --- */
#endif
