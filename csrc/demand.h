#ifndef UP_DEMAND_H
#define UP_DEMAND_H
/* The destination's demand engine: userfaultfd faults -> ledger claim -> urgent Request ->
 * fast Pages reply -> up_ledger_place, all in C on one thread (docs/DESIGN.md, "The demand
 * engine"). While up_demand_run() runs it is the only reader of the userfaultfd and the only
 * user of the URGENT socket (except up_demand_request, which sends under the engine's lock). */
#include <stddef.h>
#include <stdint.h>
#include "ledger.h"

/* Why up_demand_run() returned. */
#define UP_DEMAND_STOPPED 0     /* up_demand_stop() */
#define UP_DEMAND_FOREIGN 1     /* a frame that is not the exact fast Pages encoding, or fails
                                 * its checks: up_demand_leftover() holds it and what follows */
#define UP_DEMAND_EOF 2         /* the source closed the URGENT connection */
#define UP_DEMAND_SOCK_ERROR 3  /* recv/send failed; errno in stats.last_errno */
#define UP_DEMAND_TARGET_GONE 4 /* a placement said ESRCH/ENOSPC: the VMM's mm is gone */
#define UP_DEMAND_PLACE_ERROR 5 /* a placement failed otherwise; errno in stats.last_errno */
#define UP_DEMAND_UFFD_ERROR 6  /* reading the userfaultfd failed; errno in stats.last_errno */
#define UP_DEMAND_NOMEM 7

typedef struct up_demand_region {
	uint64_t base;   /* host address */
	uint64_t size;
	uint64_t offset; /* guest offset (the source's byte offset) */
	up_ledger *ledger;
} up_demand_region;

/* Same names as uffdpoison.destination.placement.Stats, plus what only the engine sees. */
typedef struct up_demand_stats {
	uint64_t faults;
	uint64_t minor_faults;
	uint64_t demand_requests;
	uint64_t coalesced;
	uint64_t woken_present;
	uint64_t repoisoned;
	uint64_t zero_after_remove;
	uint64_t unknown_address;
	uint64_t removes;
	uint64_t copied;
	uint64_t zeroed;
	uint64_t poisoned;
	uint64_t refused;
	uint64_t dropped;
	uint64_t raced;
	uint64_t already;
	uint64_t retries;
	uint64_t range_gone;
	uint64_t forks;      /* FORK events: the child's fd was closed */
	uint64_t remaps;     /* REMAP events: not supported, logged by Python */
	uint64_t replies;    /* fast Pages frames accepted */
	uint64_t unsent;     /* requests that found no socket (after the source was let go) */
	uint64_t bulk_pages; /* pages of the pushes the engine took from BULK */
	uint64_t pushes;     /* push frames (fixed 32-byte encoding) the engine took */
	uint64_t last_fault; /* address of the last fault counted as unknown or minor */
	int32_t last_errno;
} up_demand_stats;

typedef struct up_demand up_demand;

/* regions sorted by base, not overlapping (RegionMap guarantees it); copied. sock is the
 * connected, handshaken URGENT socket; next_id the first request id to use. NULL + errno. */
up_demand *up_demand_new(int uffd, int sock, uint64_t page_size, uint64_t memory_size,
			 uint64_t next_id, const up_demand_region *regions, int nregions);
void up_demand_free(up_demand *e);
/* Serve until stopped or until something needs Python (UP_DEMAND_*). Blocks; call with the
 * GIL released (cffi does). May be called again after it returned. */
int up_demand_run(up_demand *e);
/* Thread-safe, async-signal-safe: make up_demand_run return UP_DEMAND_STOPPED. */
void up_demand_stop(up_demand *e);
/* Thread-safe: shut the URGENT socket down (the source sees EOF); the engine stops using it
 * and keeps serving what needs no source (present, poisoned, removed pages). */
void up_demand_release_socket(up_demand *e);
/* An eventfd that becomes readable when a placement made progress while notifications are
 * on (up_demand_notify), or when every ledger became complete. */
int up_demand_progress_fd(up_demand *e);
/* delta +1 / -1: a Python waiter wants to hear about every placement. */
void up_demand_notify(up_demand *e, int delta);
/* Thread-safe, for ensure_present: claim pages [first, first+count) of region `region`;
 * MISSING/BACKGROUND runs are requested from the source (one Request per run of at most
 * max_run pages), REMOVED pages are zeroed, POISONED ones re-poisoned. 0 or -errno
 * (-EAGAIN: a placement met a pending event; call again; -ENOTCONN: no source). */
int up_demand_request(up_demand *e, int region, uint64_t first, uint64_t count,
		      uint64_t max_run);
void up_demand_get_stats(up_demand *e, up_demand_stats *out);
int up_demand_running(up_demand *e);
uint64_t up_demand_next_id(up_demand *e);
/* Outstanding requests (not fully answered), oldest first: fills up to cap entries and
 * returns how many there are. */
int64_t up_demand_outstanding(up_demand *e, uint64_t *ids, uint64_t *next, uint64_t *end,
			      int64_t cap);
/* Bytes received but not consumed (from the frame that made run() return FOREIGN). */
size_t up_demand_leftover(up_demand *e, const uint8_t **out);
/* Bytes queued for the socket but not yet sent (after run() returned). */
size_t up_demand_unsent(up_demand *e, const uint8_t **out);
/* The BULK socket (docs/DESIGN.md, "The demand engine"): who owns it. */
#define UP_BULK_NONE 0     /* never attached: Python's bulk reader owns it */
#define UP_BULK_ENGINE 1   /* the engine reads it (while running) */
#define UP_BULK_RETURNED 2 /* the engine let go of it at a frame boundary: Python owns it and
			    * takes up_demand_bulk_leftover() first */
/* Thread-safe: the engine reads the push from `fd` (handshaken, at a frame boundary) from
 * now on, between faults, in slices. 0, or -EBUSY if a BULK socket was attached before. */
int up_demand_attach_bulk(up_demand *e, int fd);
int up_demand_bulk_state(up_demand *e);
/* Take BULK back: when the engine already returned it, or (not running) at once, after
 * placing the rest of the frame it was placing. 0, -EBUSY (running and still using it), or
 * a UP_DEMAND_* code (> 0) if that placement failed. State is then UP_BULK_RETURNED. */
int up_demand_bulk_detach(up_demand *e);
/* After UP_BULK_RETURNED: bytes received from BULK and not consumed (from the frame the
 * engine did not take on), and whether it had seen the peer's EOF after them. */
size_t up_demand_bulk_leftover(up_demand *e, const uint8_t **out, int *eof);
/* Encode the fast Request frame (48 bytes) the engine sends; for tests. */
void up_demand_encode_request(uint8_t out[48], uint64_t id, uint64_t offset, uint64_t count);
#endif
