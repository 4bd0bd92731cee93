/* The source's guest memory (see guest.h). */
#include "guest.h"
#include "digest.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#ifndef EHWPOISON
#define EHWPOISON 133
#endif

static int bit(const uint8_t *bits, uint64_t i)
{
	return (__atomic_load_n(&bits[i >> 3], __ATOMIC_RELAXED) >> (i & 7)) & 1;
}

static void set_bit(uint8_t *bits, uint64_t i)
{
	__atomic_fetch_or(&bits[i >> 3], (uint8_t)(1u << (i & 7)), __ATOMIC_RELAXED);
}

int up_guest_unit_poisoned(const up_guest *g, uint64_t off, uint64_t unit)
{
	for (uint64_t i = off / g->base_ps, end = (off + unit) / g->base_ps; i < end; i++)
		if (bit(g->poison, i))
			return 1;
	return 0;
}

static const up_guest_range *range_of(const up_guest *g, uint64_t off)
{
	for (uint32_t k = 0; k < g->nranges; k++)
		if (off >= g->ranges[k].goff && off - g->ranges[k].goff < g->ranges[k].len)
			return &g->ranges[k];
	return NULL;
}

#define SOFT_DIRTY (1ull << 55)

int up_guest_changed(const up_guest *g, uint64_t off, uint64_t len)
{
	if (g->mem)
		return 1;
	if (!g->is_process)
		return 0;
	if (g->pagemap_fd < 0)
		return 1;
	uint64_t entries[512];
	while (len) {
		const up_guest_range *r = range_of(g, off);
		if (!r)
			return 1;
		uint64_t take = r->len - (off - r->goff), addr = r->foff + (off - r->goff);
		if (take > len)
			take = len;
		if (take > 512 * g->sys_ps)
			take = 512 * g->sys_ps;
		const uint64_t n = (take + g->sys_ps - 1) / g->sys_ps;
		ssize_t got = pread(g->pagemap_fd, entries, n * 8, (off_t)(addr / g->sys_ps * 8));
		if (got == 0)
			return UP_GUEST_GONE;
		if (got != (ssize_t)(n * 8))
			return 1;
		/* written since the epoch, or not present: swapped, discarded, or a poison marker
		 * put there since (a marker is no write): read it to know */
		for (uint64_t k = 0; k < n; k++)
			if ((entries[k] & SOFT_DIRTY) || !(entries[k] >> 63))
				return 1;
		off += take;
		len -= take;
	}
	return 0;
}

/* A base page that cannot be read. pagemap (bit 62 swapped: a poison marker or hardware poison;
 * bit 63 present) says whether it is poison; an entry with neither is a hole. Without a pagemap
 * every unreadable page is poison. */
static int unreadable(const up_guest *g, uint64_t goff, uint64_t addr, char *why)
{
	if (g->pagemap_fd >= 0) {
		uint64_t entry;
		ssize_t r = pread(g->pagemap_fd, &entry, 8, (off_t)(addr / g->sys_ps * 8));
		if (r == 0)
			return UP_GUEST_GONE;
		if (r == 8 && !(entry >> 62)) {
			snprintf(why, UP_WHY,
				 "page at %#llx (guest offset %#llx) cannot be read and is not poisoned: "
				 "nothing is mapped there",
				 (unsigned long long)addr, (unsigned long long)goff);
			return UP_GUEST_FAILED;
		}
	}
	set_bit(g->poison, goff / g->base_ps);
	return UP_GUEST_OK;
}

/* Fill dst with guest [off, off + len), none of it known poisoned. A base page that cannot be
 * read is classified by unreadable() and, if poison, skipped (its bytes are not meaningful). */
static int read_span(const up_guest *g, uint8_t *dst, uint64_t off, uint64_t len, char *why)
{
	while (len) {
		const up_guest_range *r = range_of(g, off);
		if (!r) {
			snprintf(why, UP_WHY, "guest offset %#llx is in no range", (unsigned long long)off);
			return UP_GUEST_FAILED;
		}
		uint64_t take = r->len - (off - r->goff), addr = r->foff + (off - r->goff);
		if (take > len)
			take = len;
		ssize_t got = pread(g->data_fd, dst, take, (off_t)addr);
		if (got < 0 && errno == EINTR)
			continue;
		if (got < 0 && errno == ESRCH)
			return UP_GUEST_GONE;
		if (got == 0 && g->is_process)
			return UP_GUEST_GONE; /* the mm is gone: /proc/PID/mem reads as end of file */
		if (got == 0) {
			snprintf(why, UP_WHY, "image ended at %#llx (truncated while serving?)",
				 (unsigned long long)addr);
			return UP_GUEST_FAILED;
		}
		if (got < 0 && errno != EIO && errno != EFAULT && errno != EHWPOISON) {
			snprintf(why, UP_WHY, "reading guest offset %#llx: %s", (unsigned long long)off,
				 strerror(errno));
			return UP_GUEST_FAILED;
		}
		/* A short read stops at an unreadable page; a partial page is never served. */
		uint64_t whole = got < 0 ? 0 : (uint64_t)got / g->base_ps * g->base_ps;
		if (whole < take) {
			int rc = unreadable(g, off + whole, addr + whole, why);
			if (rc)
				return rc;
			whole += g->base_ps; /* poisoned now: its bytes are skipped */
		}
		dst += whole;
		off += whole;
		len -= whole;
	}
	return UP_GUEST_OK;
}

int up_guest_read(const up_guest *g, uint64_t off, uint64_t n, uint64_t unit, uint8_t *buf,
		  const uint8_t **data, uint8_t *kinds, char *why)
{
	*data = g->mem ? g->mem + off : buf;
	for (uint64_t i = 0; i < n; i++)
		kinds[i] = up_guest_unit_poisoned(g, off + i * unit, unit) ? UP_WIRE_KIND_POISONED
									    : UP_WIRE_KIND_DATA;
	if (!g->mem) {
		for (uint64_t i = 0; i < n;) { /* read each span of units not known poisoned */
			if (kinds[i] == UP_WIRE_KIND_POISONED) {
				i++;
				continue;
			}
			uint64_t j = i + 1;
			while (j < n && kinds[j] != UP_WIRE_KIND_POISONED)
				j++;
			int rc = read_span(g, buf + i * unit, off + i * unit, (j - i) * unit, why);
			if (rc)
				return rc;
			i = j;
		}
	}
	for (uint64_t i = 0; i < n; i++) { /* what a read found poisoned; zero pages */
		if (kinds[i] != UP_WIRE_KIND_DATA)
			continue;
		if (up_guest_unit_poisoned(g, off + i * unit, unit))
			kinds[i] = UP_WIRE_KIND_POISONED;
		else if (up_page_is_zero(*data + i * unit, unit))
			kinds[i] = UP_WIRE_KIND_ZERO;
	}
	return UP_GUEST_OK;
}
