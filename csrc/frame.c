/* Frames on the wire (see frame.h). The texts of the reasons follow protocol/connection.py. */
#include "frame.h"

#include <stdio.h>
#include <string.h>

static uint64_t get_be64(const uint8_t *p)
{
	uint64_t v;
	memcpy(&v, p, 8);
	return __builtin_bswap64(v);
}

static void put_be64(uint8_t *p, uint64_t v)
{
	v = __builtin_bswap64(v);
	memcpy(p, &v, 8);
}

static void put_prefix(uint8_t *p, uint32_t hl, uint32_t pl)
{
	p[0] = UP_WIRE_MAGIC0;
	p[1] = UP_WIRE_MAGIC1;
	p[2] = (uint8_t)(hl >> 8);
	p[3] = (uint8_t)hl;
	p[4] = (uint8_t)(pl >> 24);
	p[5] = (uint8_t)(pl >> 16);
	p[6] = (uint8_t)(pl >> 8);
	p[7] = (uint8_t)pl;
}

int up_frame_prefix(const uint8_t *p, uint32_t *hl, uint32_t *pl, char *why)
{
	*hl = (uint32_t)p[2] << 8 | p[3];
	*pl = (uint32_t)p[4] << 24 | (uint32_t)p[5] << 16 | (uint32_t)p[6] << 8 | p[7];
	if (p[0] != UP_WIRE_MAGIC0 || p[1] != UP_WIRE_MAGIC1)
		snprintf(why, UP_WHY, "bad frame magic %02x %02x (expected 'uP')", p[0], p[1]);
	else if (*hl == 0 || *hl > UP_WIRE_MAX_HEADER)
		snprintf(why, UP_WHY, "frame header length %u outside 1..%u", *hl, UP_WIRE_MAX_HEADER);
	else if (*pl > UP_WIRE_MAX_PAYLOAD)
		snprintf(why, UP_WHY, "frame announces a %u-byte payload > MAX_PAYLOAD %u", *pl,
			 UP_WIRE_MAX_PAYLOAD);
	else
		return 0;
	return -1;
}

static int matches(const uint8_t *h, const uint8_t *tmpl, const uint8_t *constant, size_t n)
{
	for (size_t i = 0; i < n; i++)
		if ((h[i] ^ tmpl[i]) & constant[i])
			return 0;
	return 1;
}

void up_frame_decode(const uint8_t *h, up_frame *f)
{
	f->type = 0;
	if (f->hl == UP_WIRE_REQUEST_HEADER &&
	    matches(h, UP_WIRE_REQUEST_TEMPLATE, UP_WIRE_REQUEST_CONSTANT, UP_WIRE_REQUEST_HEADER)) {
		f->type = UP_WIRE_T_REQUEST;
		f->kind = 0;
		f->id = get_be64(h + UP_WIRE_REQUEST_ID);
		f->off = get_be64(h + UP_WIRE_REQUEST_OFFSET);
		f->n = get_be64(h + UP_WIRE_REQUEST_COUNT);
	} else if (f->hl == UP_WIRE_PAGES_HEADER && h[UP_WIRE_PAGES_KIND] < 0x80 &&
		   matches(h, UP_WIRE_PAGES_TEMPLATE, UP_WIRE_PAGES_CONSTANT, UP_WIRE_PAGES_HEADER)) {
		f->type = UP_WIRE_T_PAGES;
		f->kind = h[UP_WIRE_PAGES_KIND];
		f->id = get_be64(h + UP_WIRE_PAGES_ID);
		f->off = get_be64(h + UP_WIRE_PAGES_OFFSET);
		f->n = get_be64(h + UP_WIRE_PAGES_COUNT);
	}
}

static const char *const KIND_NAMES[] = {"?", "DATA", "ZERO", "POISONED", "CLEAN"};

static int range_bad(const char *name, const up_frame *f, uint64_t ps, uint64_t mem, char *why)
{
	unsigned long long off = f->off, n = f->n;
	if (f->off % ps)
		snprintf(why, UP_WHY, "%s offset %llu is not aligned to page size %llu", name, off,
			 (unsigned long long)ps);
	else if (f->n == 0 || f->n > UP_WIRE_MAX_PAGES)
		snprintf(why, UP_WHY, "%s count %llu outside 1..%u", name, n, UP_WIRE_MAX_PAGES);
	else if (f->off > mem || f->n > (mem - f->off) / ps)
		snprintf(why, UP_WHY, "%s range %llu+%llu*%llu runs past memory_size %llu", name, off,
			 n, (unsigned long long)ps, (unsigned long long)mem);
	else
		return 0;
	return 1;
}

int up_frame_check(const up_frame *f, uint64_t ps, uint64_t mem, int channel, char *why)
{
	if (f->type == UP_WIRE_T_REQUEST) {
		if (channel != UP_WIRE_CHANNEL_URGENT)
			snprintf(why, UP_WHY, "Request on the BULK channel (requests go on URGENT)");
		else if (f->id == UP_WIRE_PUSH_ID)
			snprintf(why, UP_WHY, "Request id %u is reserved for the push", UP_WIRE_PUSH_ID);
		else if (range_bad("Request", f, ps, mem, why))
			return -1;
		else if (f->pl && f->pl != 8 * f->n)
			snprintf(why, UP_WHY, "Request digests are %u bytes, expected 8 * count = %llu",
				 f->pl, 8 * (unsigned long long)f->n);
		else
			return 0;
		return -1;
	}
	if (f->kind < UP_WIRE_KIND_DATA || f->kind > UP_WIRE_KIND_CLEAN)
		snprintf(why, UP_WHY, "Pages frame has unknown kind %d", f->kind);
	else if (range_bad("Pages", f, ps, mem, why))
		return -1;
	else if (f->kind == UP_WIRE_KIND_DATA && f->pl != f->n * ps)
		snprintf(why, UP_WHY, "DATA payload is %u bytes, expected count * page_size = %llu",
			 f->pl, (unsigned long long)(f->n * ps));
	else if (f->kind != UP_WIRE_KIND_DATA && f->pl)
		snprintf(why, UP_WHY, "%s Pages must carry no payload", KIND_NAMES[f->kind]);
	else if (f->id == UP_WIRE_PUSH_ID && channel != UP_WIRE_CHANNEL_BULK)
		snprintf(why, UP_WHY, "a push (Pages id 0) on the URGENT channel");
	else if (f->id == UP_WIRE_PUSH_ID && f->kind == UP_WIRE_KIND_CLEAN)
		snprintf(why, UP_WHY, "a push cannot be CLEAN (nothing was asked)");
	else if (f->id != UP_WIRE_PUSH_ID && channel != UP_WIRE_CHANNEL_URGENT)
		snprintf(why, UP_WHY, "Pages reply (id %llu) on the BULK channel",
			 (unsigned long long)f->id);
	else
		return 0;
	return -1;
}

void up_frame_put_request(uint8_t *out, uint64_t id, uint64_t off, uint64_t n, uint32_t pl)
{
	put_prefix(out, UP_WIRE_REQUEST_HEADER, pl);
	uint8_t *h = out + UP_WIRE_PREFIX_SIZE;
	memcpy(h, UP_WIRE_REQUEST_TEMPLATE, UP_WIRE_REQUEST_HEADER);
	put_be64(h + UP_WIRE_REQUEST_ID, id);
	put_be64(h + UP_WIRE_REQUEST_OFFSET, off);
	put_be64(h + UP_WIRE_REQUEST_COUNT, n);
}

void up_frame_put_pages(uint8_t *out, uint64_t id, int kind, uint64_t off, uint64_t n, uint32_t pl)
{
	put_prefix(out, UP_WIRE_PAGES_HEADER, pl);
	uint8_t *h = out + UP_WIRE_PREFIX_SIZE;
	memcpy(h, UP_WIRE_PAGES_TEMPLATE, UP_WIRE_PAGES_HEADER);
	put_be64(h + UP_WIRE_PAGES_ID, id);
	h[UP_WIRE_PAGES_KIND] = (uint8_t)kind;
	put_be64(h + UP_WIRE_PAGES_OFFSET, off);
	put_be64(h + UP_WIRE_PAGES_COUNT, n);
}
