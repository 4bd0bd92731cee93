#ifndef UP_DEST_PLANE_H
#define UP_DEST_PLANE_H
/*
 * The destination's data plane for one session (docs/DESIGN.md, "The data planes"): one
 * thread that is, for the whole session, the only reader of the userfaultfd and the only user
 * of the URGENT and BULK sockets. fault -> ledger claim -> Request -> Pages reply -> ledger
 * placement -> wake, and the source's push placed between faults, in slices. Control frames
 * (Done, Error, anything not a fixed-layout data frame) are held and noted for the control
 * plane (trio), whose verdict comes back as an instruction.
 */
#include <stddef.h>
#include <stdint.h>
#include "chan.h"
#include "hist.h"
#include "ledger.h"
#include "notes.h"

/* --- cffi: what Python sees (csrc/build_ffi.py reads it from here) --- */
typedef struct up_dest_region {
	uint64_t base;   /* host address */
	uint64_t size;
	uint64_t offset; /* guest offset (the source's byte offset) */
	up_ledger *ledger;
} up_dest_region;

/* Counters, named as the control plane reports them. */
typedef struct up_dest_stats {
	uint64_t faults;
	uint64_t minor_faults;
	uint64_t minor_unservable; /* MINOR faults in a region without its memory file */
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
	uint64_t continued;
	uint64_t refused;
	uint64_t dropped;
	uint64_t raced;
	uint64_t already;
	uint64_t retries;
	uint64_t range_gone;
	uint64_t forks;
	uint64_t remaps;
	uint64_t replies;    /* reply frames placed */
	uint64_t pushes;     /* push frames placed */
	uint64_t push_pages;
	uint64_t known_poison; /* pages the handshake's poison list named */
	uint64_t stalls;     /* requests older than the deadline, noted */
	uint64_t resent;     /* requests sent again on a new URGENT socket */
	uint64_t last_fault;   /* address of the last fault counted as unknown or unservable */
	uint64_t last_refused; /* guest offset of the last data refused over poison */
} up_dest_stats;

typedef struct up_dest up_dest;

/* regions sorted by base, not overlapping (RegionMap guarantees it); copied. `poison`: the
 * handshake's poison list (guest offsets): marked POISONED in the ledgers here, before anything
 * can place data, and the markers placed when run() starts. NULL + errno. */
up_dest *up_dest_new(int uffd, uint64_t page_size, uint64_t memory_size,
		     const up_dest_region *regions, int nregions, const uint64_t *poison,
		     uint64_t npoison, uint64_t request_timeout_ms);
void up_dest_free(up_dest *d);
up_notes *up_dest_notes(up_dest *d);
/* A channel's socket (handshaken, at a frame boundary, non-blocking): before run(), or while
 * it runs once the channel's old socket was let go (up_chan_close, then a DETACHED note). On
 * URGENT every unanswered request is sent again. */
int up_dest_attach(up_dest *d, int channel, int fd, up_tls *tls);
/* Serve until up_dest_stop(); a note says what went wrong, if anything did. Blocks: call it
 * in a thread of its own (cffi releases the GIL). 0, or -errno if it could not start. */
int up_dest_run(up_dest *d);
/* Thread-safe instructions. */
void up_dest_stop(up_dest *d);
/* A channel, for the instructions of chan.h (send, release, close, held). */
up_chan *up_dest_chan(up_dest *d, int channel);
/* +1 while a waiter wants UP_FLAG_PROGRESS on every placement, -1 after. */
void up_dest_notify(up_dest *d, int delta);
/* For ensure_present: claim pages [first, first + count) of region `region`; request the
 * missing ones (runs of at most max_run pages; while no source is attached they go out when
 * one is), zero the removed ones, re-poison the poisoned ones. `digests` (MINOR mode): with
 * the digests of the page-cache copies, so the source confirms what is current (CLEAN) and
 * sends only what changed. 0 or -errno (-EAGAIN: a placement met a pending event, call
 * again). */
int up_dest_request(up_dest *d, int region, uint64_t first, uint64_t count, uint64_t max_run,
		    int digests);
void up_dest_get_stats(up_dest *d, up_dest_stats *out);
/* What a resuming session tells the source (a Have), from its regions' ledgers, for units
 * [first, first + n) of the guest memory space (ps bytes each): bit i (LSB first) set when
 * unit first + i is not needed, being PRESENT, POISONED or REMOVED in every region that maps
 * it, or in none (`poisoned`: when it is POISONED in a region). bits: (n + 7) / 8 bytes. */
void up_dest_have(const up_dest_region *regions, int nregions, uint64_t ps, int poisoned,
		  uint64_t first, uint64_t n, uint8_t *bits);
int64_t up_dest_outstanding(up_dest *d);
/* metrics (hist.h): the fault-serve latencies and bytes received, copied out for a scrape;
 * recording on (the default) or off (only to measure what it costs). */
void up_dest_get_timing(up_dest *d, up_timing *out);
void up_dest_set_timing(up_dest *d, int on);
/* --- end cffi --- */
#endif
