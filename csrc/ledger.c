/*
 * The page ledger: every placement goes through up_ledger_place(), which enforces the
 * never-un-poison invariant. The kernel lets COPY, CONTINUE and shmem ZEROPAGE replace a
 * poison marker (KERNEL-FACTS "Poison: what overwrites what"), so data ops are refused on
 * POISONED pages here, before any ioctl.
 *
 * Thread safety: every op that changes a state holds the ledger's mutex across check-state ->
 * ioctl -> record, so a COPY that classified a page MISSING can never land after a concurrent
 * POISON marked it (the kernel would let the COPY erase the marker). Readers (get, find,
 * count, the counters) take no lock: they see each byte either before or after a change.
 */
#include "ledger.h"
#include "digest.h"
#include "uffd_place.h"

#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

enum { PLACE, ALREADY, REFUSE, DROP };

/* The placement table of docs/DESIGN.md. */
static inline int classify(int op, int state)
{
	switch (state) {
	case UP_PRESENT:
		return ALREADY;
	case UP_POISONED:
		return op == UP_OP_POISON ? PLACE : REFUSE;
	case UP_REMOVED:
		return (op == UP_OP_COPY || op == UP_OP_CONTINUE) ? DROP : PLACE;
	default: /* MISSING, REQUESTED, BACKGROUND */
		return PLACE;
	}
}

static inline void set_state(up_ledger *l, uint64_t i, int s)
{
	l->counts[l->states[i]]--;
	l->counts[s]++;
	l->states[i] = (uint8_t)s;
}

/* The states a ledger kept in a file by an earlier owner: what was in flight is MISSING again
 * (the faults behind it are woken to fault anew), the rest is counted. -EINVAL if a byte is
 * no page state (not a ledger file). */
static int adopt_states(up_ledger *l)
{
	for (uint64_t i = 0; i < l->npages; i++) {
		uint8_t s = l->states[i];
		if (s >= UP_NSTATES)
			return -EINVAL;
		if (s == UP_REQUESTED || s == UP_BACKGROUND)
			l->states[i] = s = UP_MISSING;
		l->counts[UP_MISSING]--;
		l->counts[s]++;
	}
	return 0;
}

up_ledger *up_ledger_new(int fd, uint64_t base, uint64_t size, uint64_t page_size, int hugetlb,
			 int state_fd)
{
	if (page_size == 0 || (page_size & (page_size - 1)) || size % page_size || base % page_size) {
		errno = EINVAL;
		return NULL;
	}
	up_ledger *l = calloc(1, sizeof(*l));
	if (!l)
		return NULL;
	l->npages = size / page_size;
	l->map_len = l->npages ? l->npages : 1;
	l->counts[UP_MISSING] = l->npages;
	struct stat st;
	int err = 0;
	if (state_fd >= 0 && fstat(state_fd, &st))
		err = errno;
	else if (state_fd >= 0 && (uint64_t)st.st_size != l->npages &&
		 (st.st_size || ftruncate(state_fd, (off_t)l->npages)))
		err = st.st_size ? EINVAL : errno; /* a file of another region's size: not ours */
	void *p = err ? MAP_FAILED
		      : state_fd >= 0 ? mmap(NULL, l->map_len, PROT_READ | PROT_WRITE, MAP_SHARED,
					     state_fd, 0)
				      : mmap(NULL, l->map_len, PROT_READ | PROT_WRITE,
					     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (p == MAP_FAILED && !err)
		err = errno;
	if (!err) {
		l->states = p;
		if (state_fd >= 0 && adopt_states(l))
			err = EINVAL;
	}
	if (err) {
		if (p != MAP_FAILED)
			munmap(p, l->map_len);
		free(l);
		errno = err;
		return NULL;
	}
	l->fd = fd;
	l->base = base;
	l->page_size = page_size;
	l->hugetlb = hugetlb;
	pthread_mutex_init(&l->lock, NULL);
	return l;
}

void up_ledger_free(up_ledger *l)
{
	if (!l)
		return;
	pthread_mutex_destroy(&l->lock);
	munmap(l->states, l->map_len);
	if (l->zero_src)
		munmap((void *)(uintptr_t)l->zero_src, l->page_size);
	if (l->alias)
		munmap((void *)(uintptr_t)l->alias, l->npages * l->page_size);
	if (l->digests)
		munmap(l->digests, l->npages * 8);
	free(l);
}

int up_ledger_minor(up_ledger *l, int memfd, uint64_t file_offset)
{
	struct stat st;
	const uint64_t len = l->npages * l->page_size;
	if (l->alias || !len || file_offset % l->page_size)
		return -EINVAL;
	if (fstat(memfd, &st))
		return -errno;
	/* a write through the alias past the file's end would SIGBUS this process */
	if ((uint64_t)st.st_size < file_offset || (uint64_t)st.st_size - file_offset < len)
		return -EINVAL;
	void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, (off_t)file_offset);
	if (p == MAP_FAILED)
		return -errno;
	void *dg = mmap(NULL, l->npages * 8, PROT_READ | PROT_WRITE,
			MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (dg == MAP_FAILED) {
		int err = errno;
		munmap(p, len);
		return -err;
	}
	l->alias = (uint64_t)(uintptr_t)p;
	l->digests = dg;
	return 0;
}

uint64_t *up_ledger_digests(up_ledger *l)
{
	return l->digests;
}

static int zero_source(up_ledger *l)
{
	if (l->zero_src)
		return 0;
	/* Never written, so every read sees zeros; read-only so nothing can dirty it. */
	void *p = mmap(NULL, l->page_size, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
		       -1, 0);
	if (p == MAP_FAILED)
		return -errno;
	l->zero_src = (uint64_t)(uintptr_t)p;
	return 0;
}

static int issue(up_ledger *l, int op, uint64_t addr, uint64_t src, uint64_t len, int wake,
		 int64_t *prog)
{
	uint64_t mode = wake ? 0 : 1; /* every *_MODE_DONTWAKE is bit 0 */
	if (l->alias) { /* MINOR mode: the bytes go into the page cache, CONTINUE maps them */
		uint8_t *to = (uint8_t *)(uintptr_t)(l->alias + (addr - l->base));
		if (op == UP_OP_COPY)
			memcpy(to, (const void *)(uintptr_t)src, len);
		else if (op == UP_OP_ZERO)
			memset(to, 0, len);
		if (op == UP_OP_COPY || op == UP_OP_ZERO) /* hashed while in the CPU's cache */
			up_page_digests(to, len, l->page_size,
					l->digests + (addr - l->base) / l->page_size);
		if (l->fd < 0) { /* precopy: nothing is registered yet */
			*prog = (int64_t)len;
			return 0;
		}
		if (op != UP_OP_POISON)
			op = UP_OP_CONTINUE;
	}
	switch (op) {
	case UP_OP_COPY:
		return up_uffd_copy(l->fd, addr, src, len, mode, prog);
	case UP_OP_ZERO:
		if (l->hugetlb)
			return up_uffd_copy(l->fd, addr, l->zero_src, len, mode, prog);
		return up_uffd_zeropage(l->fd, addr, len, mode, prog);
	case UP_OP_CONTINUE:
		return up_uffd_continue(l->fd, addr, len, mode, prog);
	default:
		return up_uffd_poison(l->fd, addr, len, mode, prog);
	}
}

static int place_locked(up_ledger *l, int op, uint64_t first, uint64_t count, uint64_t src,
			int flags, up_place_result *res)
{
	memset(res, 0, sizeof(*res));
	res->stop = -1;
	if (op < UP_OP_COPY || op > UP_OP_POISON || first > l->npages || count > l->npages - first)
		return -EINVAL;
	if (op == UP_OP_COPY && src == 0)
		return -EINVAL;
	if (count == 0)
		return 0;
	const uint64_t end = first + count, ps = l->page_size;
	const int wake = flags & UP_PLACE_WAKE;
	const int target = op == UP_OP_POISON ? UP_POISONED : UP_PRESENT;

	if (op != UP_OP_POISON && (flags & UP_PLACE_STRICT)) {
		const uint8_t *hit = memchr(l->states + first, UP_POISONED, count);
		if (hit) {
			uint64_t n = 0, fp = (uint64_t)(hit - l->states);
			for (uint64_t i = fp; i < end; i++)
				n += l->states[i] == UP_POISONED;
			res->refused = n;
			res->stop = (int64_t)fp;
			l->refused += n;
			return UP_REFUSED_POISON;
		}
	}
	if (op == UP_OP_ZERO && l->hugetlb && !l->alias) {
		int zr = zero_source(l);
		if (zr)
			return zr;
	}

	int rc = 0, skipped = 0;
	uint64_t i = first;
	while (i < end) {
		int c = classify(op, l->states[i]);
		if (c != PLACE) {
			if (c == ALREADY)
				res->already++;
			else if (c == REFUSE)
				res->refused++;
			else
				res->dropped++;
			skipped = 1;
			i++;
			continue;
		}
		uint64_t j = i + 1;
		/* hugetlb ZERO copies from a single zero huge page: one page per ioctl */
		if (!(op == UP_OP_ZERO && l->hugetlb && !l->alias))
			while (j < end && classify(op, l->states[j]) == PLACE)
				j++;
		while (i < j) {
			int64_t prog;
			uint64_t s = op == UP_OP_COPY ? src + (i - first) * ps : 0;
			int r = issue(l, op, l->base + i * ps, s, (j - i) * ps, wake, &prog);
			if (r == 0) {
				for (; i < j; i++)
					set_state(l, i, target);
				break;
			}
			if (r == -EAGAIN && prog > 0) {
				/* partial: record what was done, resume at the page that stopped it */
				uint64_t done = (uint64_t)prog / ps;
				for (uint64_t k = 0; k < done; k++, i++)
					set_state(l, i, target);
				continue;
			}
			if (r == -EEXIST) {
				skipped = 1;
				if (op == UP_OP_POISON && l->states[i] == UP_POISONED) {
					res->already++; /* our marker is still there */
				} else {
					/* someone placed data first; PRESENT is never overwritten */
					set_state(l, i, UP_PRESENT);
					res->raced++;
				}
				i++;
				continue;
			}
			res->stop = (int64_t)i;
			res->progress = prog;
			rc = r;
			goto out;
		}
	}
out:;
	/* placed = pages that moved into the target state by our ioctls (full runs + partials) */
	uint64_t stop = res->stop >= 0 ? (uint64_t)res->stop : end;
	res->placed = (stop - first) - res->already - res->refused - res->dropped - res->raced;
	l->refused += res->refused;
	l->already += res->already;
	l->dropped += res->dropped;
	l->raced += res->raced;
	if (skipped && wake && stop > first)
		up_uffd_wake(l->fd, l->base + first * ps, (stop - first) * ps);
	return rc;
}

/* A non-strict call over many pages takes the lock one slice at a time (64 KiB, or one huge
 * page), so a demand placement on another thread waits behind at most one slice of a bulk
 * run, not the whole run. Each page's check -> ioctl -> record stays under the lock. A strict
 * call is all-or-nothing over its range, so it holds the lock throughout. */
#define UP_SLICE_BYTES (64u << 10)

int up_ledger_place(up_ledger *l, int op, uint64_t first, uint64_t count, uint64_t src,
		    int flags, up_place_result *res)
{
	const uint64_t slice = l->page_size < UP_SLICE_BYTES ? UP_SLICE_BYTES / l->page_size : 1;
	if ((flags & UP_PLACE_STRICT) || count <= slice || first > l->npages ||
	    count > l->npages - first) {
		pthread_mutex_lock(&l->lock);
		int rc = place_locked(l, op, first, count, src, flags, res);
		pthread_mutex_unlock(&l->lock);
		return rc;
	}
	up_place_result part, sum = {.stop = -1};
	for (uint64_t done = 0; done < count;) {
		uint64_t n = count - done < slice ? count - done : slice;
		uint64_t s = op == UP_OP_COPY ? src + done * l->page_size : src;
		pthread_mutex_lock(&l->lock);
		int rc = place_locked(l, op, first + done, n, s, flags, &part);
		pthread_mutex_unlock(&l->lock);
		sum.placed += part.placed;
		sum.already += part.already;
		sum.refused += part.refused;
		sum.dropped += part.dropped;
		sum.raced += part.raced;
		if (rc) {
			sum.stop = part.stop;
			sum.progress = part.progress;
			*res = sum;
			return rc;
		}
		done += n;
	}
	*res = sum;
	return 0;
}

int up_ledger_get(const up_ledger *l, uint64_t index)
{
	return index < l->npages ? l->states[index] : -EINVAL;
}

int up_ledger_claim(up_ledger *l, uint64_t index)
{
	if (index >= l->npages)
		return -EINVAL;
	pthread_mutex_lock(&l->lock);
	int old = l->states[index];
	if (old == UP_MISSING || old == UP_BACKGROUND)
		set_state(l, index, UP_REQUESTED);
	pthread_mutex_unlock(&l->lock);
	return old;
}

int64_t up_ledger_mark(up_ledger *l, uint64_t first, uint64_t count, unsigned from_mask, int to)
{
	if (first > l->npages || count > l->npages - first || to < 0 || to >= UP_NSTATES)
		return -EINVAL;
	/* POISONED is terminal: no caller can mark a page out of it (the next COPY would then
	 * erase the marker; the kernel lets it). Only POISON itself re-places one. */
	from_mask &= ~(1u << UP_POISONED);
	int64_t n = 0;
	pthread_mutex_lock(&l->lock);
	for (uint64_t i = first; i < first + count; i++) {
		int s = l->states[i];
		if (s != to && (from_mask >> s) & 1) {
			set_state(l, i, to);
			n++;
		}
	}
	pthread_mutex_unlock(&l->lock);
	return n;
}

int64_t up_ledger_find(const up_ledger *l, uint64_t start, unsigned mask)
{
	uint64_t i = start;
	if (!(mask & 1u)) {
		/* MISSING (0) not wanted: skip all-zero words of a sparse array fast */
		while (i < l->npages && (i & 7))
			if ((mask >> l->states[i++]) & 1)
				return (int64_t)i - 1;
		while (i + 8 <= l->npages) {
			uint64_t w;
			memcpy(&w, l->states + i, 8);
			if (w)
				break;
			i += 8;
		}
	}
	for (; i < l->npages; i++)
		if ((mask >> l->states[i]) & 1)
			return (int64_t)i;
	return -1;
}

int64_t up_ledger_count(const up_ledger *l, uint64_t first, uint64_t count, unsigned mask)
{
	if (first > l->npages || count > l->npages - first)
		return -EINVAL;
	int64_t n = 0;
	for (uint64_t i = first; i < first + count; i++)
		n += (mask >> l->states[i]) & 1;
	return n;
}
