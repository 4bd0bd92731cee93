/* TLS through OpenSSL's libssl (see tls.h). */
#include "tls.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef UP_HAVE_TLS
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

struct up_tls_ctx {
	SSL_CTX *ctx;
	int server;
};

struct up_tls {
	SSL *ssl;
	int want;
	char why[UP_WHY]; /* what the last failure was (an alert from the peer, say) */
};

/* OpenSSL's reason for the last failure (its error queue, then cleared). */
static void reason(char *why, const char *what, const SSL *ssl)
{
	unsigned long e = ERR_peek_last_error();
	char buf[120] = "";
	if (e)
		ERR_error_string_n(e, buf, sizeof(buf));
	long v = ssl ? SSL_get_verify_result(ssl) : X509_V_OK;
	if (v != X509_V_OK)
		snprintf(why, UP_WHY, "%s: certificate check failed: %s", what,
			 X509_verify_cert_error_string(v));
	else
		snprintf(why, UP_WHY, "%s: %s", what, e ? buf : "failed");
	ERR_clear_error();
}

int up_tls_available(void)
{
	return 1;
}

up_tls_ctx *up_tls_ctx_new(int server, const char *cert, const char *key, const char *ca,
			   char *why)
{
	const int has_cert = cert && *cert, has_ca = ca && *ca;
	if (server && !has_cert) {
		snprintf(why, UP_WHY, "a TLS server needs a certificate and its key");
		return NULL;
	}
	if (!server && !has_ca) {
		snprintf(why, UP_WHY, "a TLS client needs a CA to check the server against");
		return NULL;
	}
	SSL_CTX *ctx = SSL_CTX_new(server ? TLS_server_method() : TLS_client_method());
	const char *step = "creating a TLS context";
	int ok = ctx && SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION);
	if (ok) {
		SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE |
					      SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
		/* A peer that dies sends no close_notify: an EOF, which the frames then judge. */
		SSL_CTX_set_options(ctx, SSL_OP_IGNORE_UNEXPECTED_EOF);
	}
	if (ok && has_cert && (step = cert, SSL_CTX_use_certificate_chain_file(ctx, cert) != 1))
		ok = 0;
	if (ok && has_cert &&
	    (step = key ? key : cert,
	     SSL_CTX_use_PrivateKey_file(ctx, key ? key : cert, SSL_FILETYPE_PEM) != 1 ||
		     SSL_CTX_check_private_key(ctx) != 1))
		ok = 0;
	if (ok && has_ca && (step = ca, SSL_CTX_load_verify_locations(ctx, ca, NULL) != 1))
		ok = 0;
	if (!ok) {
		reason(why, step, NULL);
		SSL_CTX_free(ctx);
		return NULL;
	}
	if (has_ca)
		SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER | (server ? SSL_VERIFY_FAIL_IF_NO_PEER_CERT : 0),
				   NULL);
	up_tls_ctx *c = calloc(1, sizeof(*c));
	if (!c) {
		SSL_CTX_free(ctx);
		snprintf(why, UP_WHY, "no memory");
		return NULL;
	}
	c->ctx = ctx;
	c->server = server;
	return c;
}

void up_tls_ctx_free(up_tls_ctx *c)
{
	if (c) {
		SSL_CTX_free(c->ctx);
		free(c);
	}
}

up_tls *up_tls_new(up_tls_ctx *c, int fd, const char *host, char *why)
{
	up_tls *t = calloc(1, sizeof(*t));
	SSL *ssl = t ? SSL_new(c->ctx) : NULL;
	int ok = ssl && SSL_set_fd(ssl, fd) == 1;
	if (ok && c->server) {
		SSL_set_accept_state(ssl);
	} else if (ok) {
		SSL_set_connect_state(ssl);
		/* The name checked is the one dialled: an IP literal, else a DNS name (SNI too). */
		X509_VERIFY_PARAM *p = SSL_get0_param(ssl);
		if (host && *host && X509_VERIFY_PARAM_set1_ip_asc(p, host) != 1) {
			ERR_clear_error();
			ok = SSL_set1_host(ssl, host) == 1 && SSL_set_tlsext_host_name(ssl, host) == 1;
		}
	}
	if (!ok) {
		reason(why, "starting TLS", NULL);
		SSL_free(ssl);
		free(t);
		return NULL;
	}
	t->ssl = ssl;
	return t;
}

void up_tls_free(up_tls *t)
{
	if (t) {
		SSL_shutdown(t->ssl); /* a close_notify if the socket takes it; never waits */
		ERR_clear_error();
		SSL_free(t->ssl);
		free(t);
	}
}

/* SSL_ERROR_* after a call that did not succeed: -EAGAIN (and which way), 0 EOF, -errno. */
static long failed(up_tls *t, int r)
{
	int e = SSL_get_error(t->ssl, r);
	long rc = e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE ? -EAGAIN
		  : e == SSL_ERROR_ZERO_RETURN				   ? 0
		  : e == SSL_ERROR_SYSCALL && errno			   ? -errno
									   : -EPROTO;
	t->want = e == SSL_ERROR_WANT_WRITE ? UP_TLS_WANT_WRITE : UP_TLS_WANT_READ;
	if (rc == -EPROTO)
		reason(t->why, "TLS", t->ssl);
	else if (rc != -EAGAIN)
		ERR_clear_error();
	return rc;
}

int up_tls_handshake(up_tls *t, char *why)
{
	int r = SSL_do_handshake(t->ssl);
	if (r == 1)
		return 0;
	long rc = failed(t, r);
	if (rc == -EAGAIN)
		return t->want;
	reason(why, "TLS handshake", t->ssl);
	return -1;
}

long up_tls_read(up_tls *t, void *buf, size_t n)
{
	size_t got = 0;
	int r = SSL_read_ex(t->ssl, buf, n, &got);
	return r == 1 ? (long)got : failed(t, r);
}

long up_tls_write(up_tls *t, const void *buf, size_t n)
{
	size_t put = 0;
	int r = SSL_write_ex(t->ssl, buf, n, &put);
	return r == 1 ? (long)put : failed(t, r);
}

int up_tls_want(const up_tls *t)
{
	return t->want;
}

const char *up_tls_why(const up_tls *t)
{
	return t->why;
}

size_t up_tls_pending(const up_tls *t)
{
	return (size_t)SSL_pending(t->ssl);
}

#else /* built without OpenSSL's headers */

static const char NO_TLS[] =
	"this build of uffdpoison has no TLS (OpenSSL's headers were missing when it was built)";

int up_tls_available(void)
{
	return 0;
}

up_tls_ctx *up_tls_ctx_new(int server, const char *cert, const char *key, const char *ca,
			   char *why)
{
	snprintf(why, UP_WHY, "%s", NO_TLS);
	return NULL;
}

void up_tls_ctx_free(up_tls_ctx *c) {}

up_tls *up_tls_new(up_tls_ctx *c, int fd, const char *host, char *why)
{
	snprintf(why, UP_WHY, "%s", NO_TLS);
	return NULL;
}

void up_tls_free(up_tls *t) {}

int up_tls_handshake(up_tls *t, char *why)
{
	snprintf(why, UP_WHY, "%s", NO_TLS);
	return -1;
}

long up_tls_read(up_tls *t, void *buf, size_t n)
{
	return -EPROTO;
}

long up_tls_write(up_tls *t, const void *buf, size_t n)
{
	return -EPROTO;
}

int up_tls_want(const up_tls *t)
{
	return 0;
}

const char *up_tls_why(const up_tls *t)
{
	return NO_TLS;
}

size_t up_tls_pending(const up_tls *t)
{
	return 0;
}
#endif
