#ifndef UP_LEDGER_H
#define UP_LEDGER_H
#include <errno.h>
#include <pthread.h>
#include <stdint.h>

/* --- cffi: what Python sees (csrc/build_ffi.py reads it from here) --- */
/* Page states: one byte a page (docs/DESIGN.md, "Page states"). */
#define UP_MISSING 0
#define UP_REQUESTED 1
#define UP_BACKGROUND 2
#define UP_PRESENT 3
#define UP_POISONED 4
#define UP_REMOVED 5
#define UP_NSTATES 6

/* Placement ops. */
#define UP_OP_COPY 0
#define UP_OP_ZERO 1
#define UP_OP_CONTINUE 2
#define UP_OP_POISON 3

#define UP_PLACE_WAKE 1
#define UP_PLACE_STRICT 2

/* Returned by up_ledger_place when strict mode refused a data op over POISONED pages. */
#define UP_REFUSED_POISON (-EHWPOISON)

typedef struct up_ledger {
	uint8_t *states;      /* npages bytes, mmap(MAP_NORESERVE, or a state file): zero = all
			       * MISSING, no RSS until used */
	uint64_t npages;
	uint64_t base;
	uint64_t page_size;
	int fd;
	int hugetlb;          /* ZERO = COPY from a zero huge page (no ZEROPAGE on hugetlb) */
	uint64_t counts[UP_NSTATES];
	uint64_t refused;     /* cumulative over all calls */
	uint64_t already;
	uint64_t dropped;
	uint64_t raced;
	uint64_t zero_src;    /* hugetlb: page_size bytes of never-written anon memory, or 0 */
	uint64_t alias;       /* MINOR mode: an unregistered shared mapping of the same file
			       * pages (up_ledger_minor), or 0 */
	uint64_t *digests;    /* MINOR mode, or NULL: XXH64 of each page as the ledger wrote it
			       * through the alias (0: not known), npages entries */
	uint64_t map_len;
	/* Held by every state-changing op (place, mark, claim), so check-state -> ioctl -> record
	 * is atomic per ledger: the data plane's thread and another (ensure_present's, a test's)
	 * place through the same ledger at once. Only ever waits on the ioctl. */
	pthread_mutex_t lock;
} up_ledger;

typedef struct up_place_result {
	uint64_t placed;
	uint64_t already;
	uint64_t refused;
	uint64_t dropped;
	uint64_t raced;
	int64_t stop;         /* page index where the call stopped on an error, else -1 */
	int64_t progress;     /* the failing ioctl's progress field (bytes or -errno) */
} up_place_result;

/* state_fd >= 0: the states live in that file (MAP_SHARED), so they outlive this process: an
 * empty file is sized and starts all MISSING; a file of the right size is adopted (what was in
 * flight becomes MISSING again); any other file is EINVAL. -1: anonymous memory. */
up_ledger *up_ledger_new(int fd, uint64_t base, uint64_t size, uint64_t page_size, int hugetlb,
			 int state_fd);
void up_ledger_free(up_ledger *l);
/* MINOR mode (shmem or hugetlbfs registered MISSING|MINOR): the region's pages are the file
 * memfd's from file_offset on, mapped here a second time, unregistered (the alias). DATA and
 * ZERO are written through the alias, then UFFDIO_CONTINUE maps that page-cache page; CLEAN
 * is CONTINUE alone; POISON as ever. Only the ledger writes the alias, and only for a page it
 * may place (never PRESENT, never POISONED). Without a userfaultfd (fd < 0: precopy, before
 * the switchover) the write is all. -EINVAL: the file ends before the region does. */
int up_ledger_minor(up_ledger *l, int memfd, uint64_t file_offset);
/* The digests of the pages the ledger wrote through its alias (MINOR mode; else NULL), so a
 * precopy's can be handed to the session that serves the same file: a fault then sends the
 * digest instead of hashing the page. Writable: entries not 0 must match the page. */
uint64_t *up_ledger_digests(up_ledger *l);
int up_ledger_place(up_ledger *l, int op, uint64_t first, uint64_t count, uint64_t src,
		    int flags, up_place_result *res);
int up_ledger_get(const up_ledger *l, uint64_t index);
/* The demand path's claim: returns the page's state; MISSING or BACKGROUND become REQUESTED
 * (atomically), so exactly one claimant asks the source for it. -EINVAL out of range. */
int up_ledger_claim(up_ledger *l, uint64_t index);
int64_t up_ledger_mark(up_ledger *l, uint64_t first, uint64_t count, unsigned from_mask, int to);
int64_t up_ledger_find(const up_ledger *l, uint64_t start, unsigned mask);
int64_t up_ledger_count(const up_ledger *l, uint64_t first, uint64_t count, unsigned mask);
/* --- end cffi --- */
#endif
