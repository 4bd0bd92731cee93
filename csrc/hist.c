/* Latency histograms of the data planes (see hist.h). */
#include "hist.h"
#include "wire.h"

#include <stddef.h>
#include <time.h>

#define ADD(p, n) __atomic_add_fetch((p), (uint64_t)(n), __ATOMIC_RELAXED)

void up_hists_init(up_hists *h)
{
	*h = (up_hists){.on = 1};
}

void up_hists_copy(const up_hists *h, up_hists *out)
{
	const uint64_t *src = (const uint64_t *)h;
	uint64_t *dst = (uint64_t *)out;
	for (size_t i = 0; i < sizeof(*out) / 8; i++)
		dst[i] = __atomic_load_n(&src[i], __ATOMIC_RELAXED);
}

uint64_t up_hists_now(const up_hists *h)
{
	if (!__atomic_load_n(&h->on, __ATOMIC_RELAXED))
		return 0;
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* The bucket of a latency: the least i with ns <= 2^i us (whole microseconds, rounded up). */
static int bucket(uint64_t ns)
{
	const uint64_t us = (ns + 999) / 1000;
	const int i = us <= 1 ? 0 : 64 - __builtin_clzll(us - 1);
	return i < UP_HIST_BOUNDED ? i : UP_HIST_BOUNDED;
}

void up_hist_add(up_hists *h, int cls, uint64_t t0)
{
	const uint64_t now = up_hists_now(h);
	if (!t0 || !now || cls < 0 || cls >= UP_CLASSES)
		return;
	const uint64_t ns = now > t0 ? now - t0 : 0;
	up_hist *x = &h->lat[cls];
	ADD(&x->buckets[bucket(ns)], 1);
	ADD(&x->sum_ns, ns);
}

int up_hist_class(int kind)
{
	switch (kind) {
	case UP_WIRE_KIND_DATA:
		return UP_CLASS_DATA;
	case UP_WIRE_KIND_ZERO:
		return UP_CLASS_ZERO;
	case UP_WIRE_KIND_POISONED:
		return UP_CLASS_POISONED;
	default:
		return UP_CLASS_CLEAN;
	}
}

void up_hist_reply(up_hists *h, int kind, uint64_t n, uint64_t t0)
{
	const int cls = up_hist_class(kind);
	ADD(&h->pages[cls], n);
	up_hist_add(h, cls, t0);
}

int up_hist_merge(int cls, const uint8_t *kinds, uint64_t n)
{
	for (uint64_t i = 0; i < n && cls != UP_CLASS_MIXED; i++) {
		const int c = up_hist_class(kinds[i]);
		cls = cls < 0 || cls == c ? c : UP_CLASS_MIXED;
	}
	return cls;
}
