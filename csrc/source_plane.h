#ifndef UP_SOURCE_PLANE_H
#define UP_SOURCE_PLANE_H
/*
 * The source's data plane for one session (docs/DESIGN.md): a loop per channel, each in a
 * thread of its own, each the only user of its socket for the whole session. URGENT answers
 * demand Requests (digests: CLEAN where they match); BULK pushes every unit the destination
 * has not been offered, nearest the latest demand first, at a lower CPU priority and under
 * the server's bandwidth cap. Control frames go to the control plane (notes); what it sends
 * back (Error, Done) is queued on the channel.
 */
#include <pthread.h>
#include <stdint.h>
#include "chan.h"
#include "guest.h"
#include "hist.h"
#include "notes.h"

/* --- cffi: what Python sees (csrc/build_ffi.py reads it from here) --- */
/* The server-wide cap on pushed bytes per second (all sessions share one link). */
typedef struct up_pacer {
	pthread_mutex_t lock;
	double ns_per_byte;
	uint64_t clock_ns; /* when the link is free again */
} up_pacer;

typedef struct up_src_stats {
	uint64_t requests;
	uint64_t request_pages;
	uint64_t data_pages; /* DATA units sent, both channels */
	uint64_t zero_pages;
	uint64_t poisoned_pages;
	uint64_t clean_pages;
	uint64_t vouched_pages; /* CLEAN from the epoch alone: not read, not hashed */
	uint64_t push_pages; /* units offered by the push */
	uint64_t pushes;     /* push frames */
	uint64_t read_failures;
	uint64_t bytes_urgent;
	uint64_t bytes_bulk;
} up_src_stats;

typedef struct up_src up_src;

up_pacer *up_pacer_new(double bytes_per_s);
void up_pacer_free(up_pacer *p);

/* A session serving `g` in units of `unit` bytes; `pacer` may be NULL. NULL + errno. */
up_src *up_src_new(const up_guest *g, up_pacer *pacer, uint64_t unit, int partial_timeout_ms);
void up_src_free(up_src *s);
up_notes *up_src_notes(up_src *s);
/* The channel's socket (handshaken, non-blocking), before its loop runs. */
int up_src_attach(up_src *s, int channel, int fd, up_tls *tls);
/* Serve `channel` until stopped, closed or the peer is gone (a note says which). Blocks: run it
 * in a thread of its own. `nice`: BULK lowers its thread to it and restores `base_nice` before
 * returning; URGENT sets `base_nice` (a pooled thread may have been lowered). INT32_MIN: leave. */
int up_src_run(up_src *s, int channel, int nice, int base_nice);
/* Thread-safe instructions. */
void up_src_stop(up_src *s, int channel);
/* A channel, for the instructions of chan.h (send, release, close, held). */
up_chan *up_src_chan(up_src *s, int channel);
void up_src_get_stats(up_src *s, up_src_stats *out);
/* A resuming destination's Have (before the push starts): bit i (LSB first) of `bits` set
 * means unit first + i is not to be pushed; with `poisoned`, it is also poisoned (the guest's
 * poison bitmap learns it, for every session). */
void up_src_mark(up_src *s, int poisoned, uint64_t first, uint64_t n, const uint8_t *bits);
/* MINOR mode: this session's destination holds the precopy of the epoch the guest tracks
 * changes since (up_guest_changed): a unit asked for with a digest that has not changed is
 * CLEAN without being read or hashed. Before the loops run. */
void up_src_vouch(up_src *s);
/* metrics (hist.h): the request service latencies, copied out for a scrape; recording on (the
 * default) or off (only to measure what it costs). */
void up_src_get_timing(up_src *s, up_timing *out);
void up_src_set_timing(up_src *s, int on);
/* --- end cffi --- */
#endif
