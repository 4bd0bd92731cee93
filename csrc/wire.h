#ifndef UP_WIRE_H
#define UP_WIRE_H
/*
 * The fixed-layout frames of docs/PROTOCOL.md, for the C fast paths (demand.c, urgent.c):
 * protocol.py's _REQ_F (urgent Request), _PAGES_F (Pages with an id) and _PUSH_F (Pages with
 * id nil). Ordinary msgpack maps with every integer as uint64 (0xcf), so each encoder and
 * decoder here is a handful of fixed offsets; anything else is Python's to decode.
 * tests/test_demand_engine.py and tests/test_source_urgent.py check them against protocol.py.
 */
#include <stdint.h>
#include <string.h>

#define UP_WIRE_PREFIX 8          /* "uP", u16 header length, u32 payload length (big-endian) */
#define UP_WIRE_FAST_HEADER 40    /* Request, Pages with an id */
#define UP_WIRE_PUSH_HEADER 32    /* Pages with id nil (the bulk push) */
#define UP_WIRE_MAX_PAYLOAD (64u << 20)
#define UP_WIRE_MAX_PAGES (UP_WIRE_MAX_PAYLOAD / 4096) /* protocol.MAX_PAGES_PER_FRAME */
#define UP_KIND_DATA 1
#define UP_KIND_ZERO 2
#define UP_KIND_POISONED 3

static inline uint64_t up_be64(const uint8_t *p)
{
	uint64_t v;
	memcpy(&v, p, 8);
	return __builtin_bswap64(v);
}

static inline void up_put_be64(uint8_t *p, uint64_t v)
{
	v = __builtin_bswap64(v);
	memcpy(p, &v, 8);
}

/* The prefix at p: 1 and the lengths if the magic is right, else 0. */
static inline int up_wire_get_prefix(const uint8_t *p, uint32_t *hl, uint32_t *pl)
{
	*hl = (uint32_t)p[2] << 8 | p[3];
	*pl = (uint32_t)p[4] << 24 | (uint32_t)p[5] << 16 | (uint32_t)p[6] << 8 | p[7];
	return p[0] == 'u' && p[1] == 'P';
}

static inline void up_wire_put_prefix(uint8_t *p, uint32_t hl, uint32_t pl)
{
	p[0] = 'u';
	p[1] = 'P';
	p[2] = (uint8_t)(hl >> 8);
	p[3] = (uint8_t)hl;
	p[4] = (uint8_t)(pl >> 24);
	p[5] = (uint8_t)(pl >> 16);
	p[6] = (uint8_t)(pl >> 8);
	p[7] = (uint8_t)pl;
}

/* {"t":3,"i":id,"o":off,"n":n,"u":true}: h[7] id, h[18] off, h[29] n. */
static const uint8_t UP_WIRE_REQ_T[7] = {0x85, 0xa1, 't', 0x03, 0xa1, 'i', 0xcf};
static const uint8_t UP_WIRE_O[3] = {0xa1, 'o', 0xcf};
static const uint8_t UP_WIRE_N[3] = {0xa1, 'n', 0xcf};
static const uint8_t UP_WIRE_U_TRUE[3] = {0xa1, 'u', 0xc3};

/* A whole 48-byte urgent Request frame, no payload. */
static inline void up_wire_put_request(uint8_t *f, uint64_t id, uint64_t off, uint64_t n)
{
	up_wire_put_prefix(f, UP_WIRE_FAST_HEADER, 0);
	uint8_t *h = f + UP_WIRE_PREFIX;
	memcpy(h, UP_WIRE_REQ_T, 7);
	up_put_be64(h + 7, id);
	memcpy(h + 15, UP_WIRE_O, 3);
	up_put_be64(h + 18, off);
	memcpy(h + 26, UP_WIRE_N, 3);
	up_put_be64(h + 29, n);
	memcpy(h + 37, UP_WIRE_U_TRUE, 3);
}

/* The 40-byte header h: 1 if it is an urgent Request in the fixed layout. */
static inline int up_wire_get_request(const uint8_t *h, uint64_t *id, uint64_t *off, uint64_t *n)
{
	if (memcmp(h, UP_WIRE_REQ_T, 7) || memcmp(h + 15, UP_WIRE_O, 3) ||
	    memcmp(h + 26, UP_WIRE_N, 3) || memcmp(h + 37, UP_WIRE_U_TRUE, 3))
		return 0;
	*id = up_be64(h + 7);
	*off = up_be64(h + 18);
	*n = up_be64(h + 29);
	return 1;
}

/* {"t":4,"i":id,"k":kind,"o":off,"n":n}: h[7] id, h[17] kind, h[21] off, h[32] n. */
static const uint8_t UP_WIRE_PAGES_T[7] = {0x85, 0xa1, 't', 0x04, 0xa1, 'i', 0xcf};
static const uint8_t UP_WIRE_K[2] = {0xa1, 'k'};

/* The 48 bytes of prefix and header of a Pages frame with an id (payload pl follows). */
static inline void up_wire_put_pages(uint8_t *f, uint64_t id, int kind, uint64_t off, uint64_t n,
				     uint32_t pl)
{
	up_wire_put_prefix(f, UP_WIRE_FAST_HEADER, pl);
	uint8_t *h = f + UP_WIRE_PREFIX;
	memcpy(h, UP_WIRE_PAGES_T, 7);
	up_put_be64(h + 7, id);
	memcpy(h + 15, UP_WIRE_K, 2);
	h[17] = (uint8_t)kind;
	memcpy(h + 18, UP_WIRE_O, 3);
	up_put_be64(h + 21, off);
	memcpy(h + 29, UP_WIRE_N, 3);
	up_put_be64(h + 32, n);
}

/* The 40-byte header h: 1 if it is Pages with an id in the fixed layout. */
static inline int up_wire_get_pages(const uint8_t *h, uint64_t *id, int *kind, uint64_t *off,
				    uint64_t *n)
{
	if (memcmp(h, UP_WIRE_PAGES_T, 7) || memcmp(h + 15, UP_WIRE_K, 2) ||
	    memcmp(h + 18, UP_WIRE_O, 3) || memcmp(h + 29, UP_WIRE_N, 3))
		return 0;
	*id = up_be64(h + 7);
	*kind = h[17];
	*off = up_be64(h + 21);
	*n = up_be64(h + 32);
	return 1;
}

/* {"t":4,"i":nil,"k":kind,"o":off,"n":n}: h[9] kind, h[13] off, h[24] n. */
static const uint8_t UP_WIRE_PUSH_T[9] = {0x85, 0xa1, 't', 0x04, 0xa1, 'i', 0xc0, 0xa1, 'k'};

/* The 32-byte header h: 1 if it is a push in the fixed layout. */
static inline int up_wire_get_push(const uint8_t *h, int *kind, uint64_t *off, uint64_t *n)
{
	if (memcmp(h, UP_WIRE_PUSH_T, 9) || memcmp(h + 10, UP_WIRE_O, 3) ||
	    memcmp(h + 21, UP_WIRE_N, 3))
		return 0;
	*kind = h[9];
	*off = up_be64(h + 13);
	*n = up_be64(h + 24);
	return 1;
}
#endif
