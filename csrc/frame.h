#ifndef UP_FRAME_H
#define UP_FRAME_H
/*
 * Frames on the wire, for the C data planes: the prefix, the fixed-layout data frames
 * (Request, Pages: docs/PROTOCOL.md "Fixed layouts", csrc/wire.h generated from
 * uffdpoison/protocol/layout.py) and the one C check of a data frame. Every other frame is a
 * control frame: the data plane hands it, whole, to the control plane (Python) to judge.
 */
#include <stddef.h>
#include <stdint.h>
#include "wire.h"

#define UP_FRAME_REQUEST (UP_WIRE_PREFIX_SIZE + UP_WIRE_REQUEST_HEADER) /* bytes before digests */
#define UP_FRAME_PAGES (UP_WIRE_PREFIX_SIZE + UP_WIRE_PAGES_HEADER)     /* bytes before data */
#define UP_WHY 160 /* room for a reason: one line naming what was wrong */

/* --- cffi: what Python sees (csrc/build_ffi.py reads it from here) --- */
typedef struct up_frame {
	uint32_t hl, pl; /* header and payload lengths, from the prefix */
	int type;        /* UP_WIRE_T_REQUEST, UP_WIRE_T_PAGES, or 0: a control frame */
	int kind;        /* Pages */
	uint64_t id, off, n;
} up_frame;

/* The 8-byte prefix at p: 0, or -1 with why set (bad magic, header length, oversize). */
int up_frame_prefix(const uint8_t *p, uint32_t *hl, uint32_t *pl, char *why);
/* The header h (f->hl bytes): fills f->type and the fields of a fixed-layout data frame;
 * f->type = 0 for anything else (a control frame, or a data frame in another encoding). */
void up_frame_decode(const uint8_t *h, up_frame *f);
/* The one C check of a data frame on `channel` of a session of this geometry: 0, or -1 with
 * why set. Request ids and coverage of outstanding requests are the caller's to check. */
int up_frame_check(const up_frame *f, uint64_t page_size, uint64_t memory_size, int channel,
		   char *why);
void up_frame_put_request(uint8_t *out, uint64_t id, uint64_t off, uint64_t n, uint32_t pl);
void up_frame_put_pages(uint8_t *out, uint64_t id, int kind, uint64_t off, uint64_t n,
			uint32_t pl);
/* --- end cffi --- */
#endif
