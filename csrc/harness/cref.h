#ifndef UP_CREF_H
#define UP_CREF_H
/* The C reference ("the floor") that benchmarks compare against: plain C, pthreads, no Python
 * in the loop. See cref.c for the wire format of the minimal TCP page source. */
#include <stddef.h>
#include <stdint.h>

/* --- cffi: what Python sees (csrc/build_ffi.py reads it from here) --- */
/* Reply kinds of the reference source. */
#define UP_CREF_KIND_DATA 0
#define UP_CREF_KIND_ZERO 1
#define UP_CREF_KIND_POISONED 2
#define UP_CREF_KIND_ERROR 3
#define UP_CREF_KIND_CLEAN 4
/* Request flags: bit 0 asks the source to send all-zero pages as ZERO; bits 16-31 give the
 * number of padding bytes that follow the 16-byte request (ignored by the source). */
#define UP_CREF_FLAG_ZERO_DETECT 1u
#define UP_CREF_FLAG_DIGESTS 2u /* MINOR: count u64 digests follow (count <= 64) */

typedef struct up_cref_stats {
    uint64_t faults;      /* handler: page-fault messages read */
    uint64_t copies;      /* handler: UFFDIO_COPY done */
    uint64_t zeropages;   /* handler: UFFDIO_ZEROPAGE (or zero COPY on huge pages) done */
    uint64_t poisons;     /* handler: UFFDIO_POISON done */
    uint64_t eexist;      /* handler: page already there (two threads faulted on it) */
    uint64_t errors;      /* any failed syscall */
    uint64_t requests;    /* source: requests served; remote handler: requests sent */
    uint64_t pages;       /* source: pages described in replies */
    uint64_t connections; /* source: connections accepted */
    int32_t last_errno;
    int32_t cpu;          /* CPU the thread started on */
} up_cref_stats;

typedef struct up_cref_handler up_cref_handler;
typedef struct up_cref_source up_cref_source;

/* A userfaultfd (O_CLOEXEC|O_NONBLOCK, API done, POISON requested); fd or -errno. */
int up_cref_uffd_open(void);
/* UFFDIO_REGISTER in MISSING mode; 0 or -errno. */
int up_cref_uffd_register(int uffd, uint64_t base, uint64_t len);

/* (a) Local handler: resolves each fault in [base, base+size) with UFFDIO_COPY of the matching
 * page of src, or UFFDIO_POISON when bit (page index) of poison_bitmap is set (NULL: none).
 * cpu < 0: no pinning. 0 or -errno. */
int up_cref_local_start(up_cref_handler **out, int uffd, uint64_t base, uint64_t size,
                        uint64_t page_size, uint64_t src, const uint8_t *poison_bitmap, int cpu);
/* (c) Remote handler: one 16-byte request per fault over the connected stream sock_fd, then
 * COPY / ZEROPAGE / POISON according to the reply. 0 or -errno. */
int up_cref_remote_start(up_cref_handler **out, int uffd, uint64_t base, uint64_t size,
                         uint64_t page_size, int sock_fd, int cpu);
/* (c') MINOR remote handler: the memory is a file's mapping registered MISSING|MINOR; `alias` an
 * unregistered mapping of the same pages (their cache filled). Each fault's request carries the
 * cached copy's digest (digests[page] if given, else hashed at the fault); CLEAN is CONTINUE,
 * DATA is read into the cache through the alias then CONTINUE. 0 or -errno. */
int up_cref_minor_start(up_cref_handler **out, int uffd, uint64_t base, uint64_t size,
                        uint64_t page_size, int sock_fd, uint64_t alias,
                        const uint64_t *digests, int cpu);
void up_cref_handler_stats_get(up_cref_handler *h, up_cref_stats *out);
/* Stops the thread, joins it, stores its final counters in final_out (may be NULL) and frees
 * it. Fds given to it are not closed. */
int up_cref_handler_stop(up_cref_handler *h, up_cref_stats *final_out);

/* (b) TCP page source serving [buf, buf+size) with a poison bitmap (NULL: none). listen_fd < 0:
 * binds 127.0.0.1:0 itself. 0 or -errno. */
int up_cref_source_start(up_cref_source **out, int listen_fd, uint64_t buf, uint64_t size,
                         uint64_t page_size, const uint8_t *poison_bitmap, int cpu);
/* As up_cref_source_start; flags UP_CREF_SOURCE_THREADED serves each accepted connection on
 * a thread of its own (pinned like the source), so a request on one connection never waits
 * behind a reply on another (a demand request behind a bulk one). */
#define UP_CREF_SOURCE_THREADED 1u
/* MINOR: the buffer has not changed since the requester's copy was made (an epoch): a page
 * asked for with a digest is CLEAN without being hashed, unless poisoned. */
#define UP_CREF_SOURCE_VOUCH 2u
int up_cref_source_start_ex(up_cref_source **out, int listen_fd, uint64_t buf, uint64_t size,
                            uint64_t page_size, const uint8_t *poison_bitmap, int cpu,
                            uint32_t flags);
int up_cref_source_port(up_cref_source *s);
void up_cref_source_stats_get(up_cref_source *s, up_cref_stats *out);
int up_cref_source_stop(up_cref_source *s, up_cref_stats *final_out);

/* (d) n round trips on the connected stream fd: send req_len bytes of req, read reply_len bytes;
 * ns_out[i] = round trip i in ns. 0 or -errno (-EPIPE: peer closed). */
int up_cref_pingpong(int fd, const void *req, size_t req_len, size_t reply_len, size_t n,
                     uint64_t *ns_out);
/* Read exactly len bytes from a socket; -EPIPE on EOF (internal, shared by the refs). */
int up_cref_read_all(int fd, void *buf, size_t len);
/* --- end cffi --- */

#endif
