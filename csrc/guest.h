#ifndef UP_GUEST_H
#define UP_GUEST_H
/*
 * The source's guest memory, read without ever touching a poisoned page: an image file, a live
 * (stopped) process through /proc/PID/mem (a poisoned page there is an EIO, never a SIGBUS), or
 * a buffer in this process. Every read classifies each unit as DATA, ZERO or POISONED; a page
 * found unreadable is poisoned from then on (its bit is set), unless pagemap says nothing is
 * mapped there at all (a hole: the read fails instead, never data, never zero, no false poison).
 */
#include <stdint.h>
#include "frame.h"

/* --- cffi: what Python sees (csrc/build_ffi.py reads it from here) --- */
#define UP_GUEST_OK 0
#define UP_GUEST_FAILED (-1) /* a page cannot be read and is not poison: why says which */
#define UP_GUEST_GONE (-2)   /* the served process exited */

typedef struct up_guest_range {
	uint64_t goff; /* guest offset */
	uint64_t foff; /* where it is in data_fd (file offset, or the process's address) */
	uint64_t len;
} up_guest_range;

typedef struct up_guest {
	int data_fd;           /* image file or /proc/PID/mem; -1 with mem */
	int pagemap_fd;        /* /proc/PID/pagemap (classifies an unreadable page), or -1 */
	int is_process;        /* end of file means the process is gone, not a truncated image */
	const uint8_t *mem;    /* an in-memory guest, or NULL */
	uint64_t size;         /* guest memory bytes */
	uint64_t base_ps;      /* one poison bit per base page */
	uint64_t sys_ps;       /* pagemap granularity */
	uint32_t nranges;
	const up_guest_range *ranges;
	uint8_t *poison;       /* the poison bitmap; Python sets bits too (atomic OR) */
} up_guest;

/* Read units [off, off + n * unit): kinds[i] = UP_WIRE_KIND_DATA / ZERO / POISONED and, for
 * DATA units, the bytes at data[0] + i * unit (in buf, or in the guest buffer itself; buf holds
 * n * unit bytes). UP_GUEST_OK, FAILED (why set, kinds up to the failing unit valid) or GONE. */
int up_guest_read(const up_guest *g, uint64_t off, uint64_t n, uint64_t unit, uint8_t *buf,
		  const uint8_t **data, uint8_t *kinds, char *why);
int up_guest_unit_poisoned(const up_guest *g, uint64_t off, uint64_t unit);
/* Whether guest [off, off + len) may have changed since the precopy epoch began (a live
 * process: the kernel's soft-dirty bit, pagemap bit 55, after `4 > clear_refs`): 0 no, 1 yes
 * or cannot tell (an in-memory guest), UP_GUEST_GONE. An image never changes while served. */
int up_guest_changed(const up_guest *g, uint64_t off, uint64_t len);
/* --- end cffi --- */
#endif
