#ifndef UP_URGENT_H
#define UP_URGENT_H
/*
 * The source's URGENT fast path: a C loop that answers demand Requests on one connection while
 * Python (trio) runs everything else. It serves only the common, valid case, exactly as
 * uffdpoison/protocol.py would: a fast-encoded Request (docs/PROTOCOL.md "Frame layout"), no
 * digests, within the guest, every page readable or already known to be poisoned. Anything else
 * (another encoding, digests, an Error, a read that fails) stops the loop *before a byte of the
 * reply is sent* and hands the frame back to Python's reference path, which serves it or names
 * the problem. So the C path never needs its own error replies, and poison found by a failed
 * read is always classified by the one Python rule (backends.ProcessBackend._unreadable).
 */
#include <stdint.h>

/* up_urgent_serve() outcomes. */
#define UP_URG_STOPPED 0  /* the stop eventfd became readable */
#define UP_URG_EOF 1      /* the peer closed; in[0..in_len) is what it sent before */
#define UP_URG_HANDOFF 2  /* in[0..in_len) starts with a frame for Python to handle */
#define UP_URG_ERROR 3    /* socket error before any byte of a reply (err = errno) */
#define UP_URG_BROKEN 4   /* a reply was cut short (err = errno, or ETIMEDOUT) */

/* Units per request served here (bigger ones go to Python): bounds the iovec, 2 per run. */
#define UP_URG_MAX_UNITS 256

typedef struct up_urgent {
	/* Set by Python before serving; read-only here. */
	int sock;                /* the connection (non-blocking; trio's) */
	int stopfd;              /* eventfd: readable = return UP_URG_STOPPED */
	int data_fd;             /* pread source: an image file or /proc/PID/mem; -1 with mem */
	const uint8_t *mem;      /* an in-memory guest, or NULL */
	uint64_t size;           /* guest memory bytes */
	uint64_t base_ps;        /* the backend's page size: one poison bit per base page */
	uint64_t unit;           /* the session's page size (a power-of-two multiple of base_ps) */
	const uint8_t *poison;   /* the backend's poison bitmap (bits set by Python; read here) */
	uint8_t *offered;        /* the session's offered bitmap, one bit per unit (atomic OR) */
	uint32_t nranges;        /* data_fd layout: guest offset, fd offset, length (u64 each) */
	const uint64_t *ranges;
	uint64_t max_bytes;      /* largest request served here; the buffers' size */
	int partial_timeout_ms;  /* once part of a reply is out, how long the rest may take */
	uint8_t *buf;            /* max_bytes: pages read from data_fd */
	uint8_t *inbuf;          /* receive buffer; unconsumed bytes stay at its start */
	uint64_t in_cap;
	uint64_t in_len;
	/* Written here. */
	uint64_t hint;           /* 1 + unit index just past the latest demand; 0 none (atomic) */
	uint64_t requests;
	uint64_t pages;
	uint64_t data_pages;
	uint64_t zero_pages;
	uint64_t poisoned_pages;
	uint64_t bytes_sent;
	int err;
} up_urgent;

int up_urgent_serve(up_urgent *u);
/* The latest demand hint, cleared (0 = none since the last call). Thread-safe. */
uint64_t up_urgent_take_hint(up_urgent *u);
#endif
