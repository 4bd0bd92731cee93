#ifndef UP_HIST_H
#define UP_HIST_H
/*
 * Latency histograms of a data plane, recorded in C as it serves (no Python per fault) and
 * copied out on a scrape: the destination's fault-serve time (the fault read off the
 * userfaultfd -> its page placed and the thread woken), the source's request service time (the
 * request received -> its reply written). Power-of-two buckets from 1 us, like QEMU's
 * postcopy-latency-dist: bucket i < UP_HIST_BOUNDED counts latencies <= 2^i us (and above
 * 2^(i-1) us), the last one everything longer. Each histogram has one writer (the loop thread
 * that serves it); readers copy it with atomic loads at any time.
 */
#include <stdint.h>

/* --- cffi: what Python sees (csrc/build_ffi.py reads it from here) --- */
#define UP_HIST_BOUNDED 25 /* bounded buckets: <= 1 us, <= 2 us, ..., <= 2^24 us (16.8 s) */
#define UP_HIST_BUCKETS 26 /* ... and one for longer */

/* What was served, one histogram each. */
#define UP_CLASS_DATA 0     /* the source sent the page's bytes */
#define UP_CLASS_ZERO 1     /* the source said it is a zero page */
#define UP_CLASS_POISONED 2 /* the source said it is poisoned */
#define UP_CLASS_CLEAN 3    /* the source said our copy is current (MINOR mode) */
#define UP_CLASS_PRESENT 4  /* destination: the push placed it before the fault was served */
#define UP_CLASS_LOCAL 5    /* destination: served without the source (re-poisoned, or zeroed
			       after the guest discarded it) */
#define UP_CLASS_MIXED 6    /* source: a request answered with more than one kind */
#define UP_CLASSES 7

typedef struct up_hist {
	uint64_t buckets[UP_HIST_BUCKETS]; /* not cumulative; their sum is the count */
	uint64_t sum_ns;
} up_hist;

typedef struct up_hists {
	int32_t on; /* record latencies (1 from up_hists_init; 0 only to measure their cost) */
	int32_t pad;
	up_hist lat[UP_CLASSES];
	uint64_t pages[UP_CLASSES]; /* destination: pages in demand replies, by class */
} up_hists;

/* What a scrape reads of a plane besides its counters (up_dest_get_timing, up_src_get_timing). */
typedef struct up_timing {
	up_hists h;
	uint64_t bytes_urgent; /* destination: bytes received on URGENT (the demand replies) */
	uint64_t bytes_bulk;   /* destination: bytes received on BULK (the push) */
} up_timing;
/* --- end cffi --- */

void up_hists_init(up_hists *h);
/* A copy for a scrape, each word loaded atomically. */
void up_hists_copy(const up_hists *h, up_hists *out);
/* CLOCK_MONOTONIC in ns when recording is on, else 0 (a start time of 0 records nothing). */
uint64_t up_hists_now(const up_hists *h);
/* One latency of class `cls`, from `t0` (up_hists_now) to now; nothing when t0 is 0. */
void up_hist_add(up_hists *h, int cls, uint64_t t0);
/* A demand reply of `n` pages of wire kind `kind`: counted, and its fault's latency added. */
void up_hist_reply(up_hists *h, int kind, uint64_t n, uint64_t t0);
/* The class of a wire kind (UP_WIRE_KIND_*). */
int up_hist_class(int kind);
/* The class of a reply so far (-1: nothing yet) after `n` more units of kinds `kinds`. */
int up_hist_merge(int cls, const uint8_t *kinds, uint64_t n);
#endif
