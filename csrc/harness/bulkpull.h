#ifndef UP_BULKPULL_H
#define UP_BULKPULL_H
/* The C reference's background stream: a thread that pulls the whole region from a reference
 * page source (cref.c wire format) in chunks over its own connection and places each run with
 * one range ioctl, optionally capped at a byte rate. Runs beside a cref RemoteHandler on the
 * same userfaultfd, as uffdpoison's bulk stream runs beside its demand path. */
#include <stdint.h>

/* --- cffi: what Python sees (csrc/build_ffi.py reads it from here) --- */
typedef struct up_cref_bulk_stats {
    uint64_t requests;    /* chunk requests sent */
    uint64_t bytes;       /* page data bytes received */
    uint64_t placed;      /* pages placed by this thread (COPY, ZEROPAGE or POISON) */
    uint64_t skipped;     /* pages already there (the demand handler got there first) */
    uint64_t errors;      /* failed syscalls */
    int32_t last_errno;
    int32_t cpu;          /* CPU the thread started on */
    int32_t done;         /* 1 once the whole region was pulled */
    int32_t pad;
    uint64_t elapsed_ns;  /* start to done (or to now while running) */
} up_cref_bulk_stats;

typedef struct up_cref_bulk up_cref_bulk;

/* Pull [base, base+size) in chunk_pages requests over sock_fd (connected, blocking; not closed
 * here). rate: bytes/s cap on page data (0: none). cpu < 0: no pinning. 0 or -errno. */
int up_cref_bulk_start(up_cref_bulk **out, int uffd, uint64_t base, uint64_t size,
                       uint64_t page_size, int sock_fd, uint32_t chunk_pages, uint64_t rate,
                       int cpu);
void up_cref_bulk_stats_get(up_cref_bulk *b, up_cref_bulk_stats *out);
/* Waits up to timeout_ms (< 0: forever) for the pull to finish; 1 done, 0 not yet. */
int up_cref_bulk_wait(up_cref_bulk *b, int timeout_ms);
/* Stops the thread (shuts the socket down to end a blocked read: the connection is
 * dedicated to it), joins it, stores its final counters (final_out may be NULL), frees it. */
int up_cref_bulk_stop(up_cref_bulk *b, up_cref_bulk_stats *final_out);
/* --- end cffi --- */
#endif
