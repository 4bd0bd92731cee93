#ifndef UP_DIGEST_H
#define UP_DIGEST_H
#include <stdint.h>
#include <stddef.h>
/* XXH64 (xxHash, 64-bit variant) with the given seed; the wire protocol uses seed 0. */
uint64_t up_xxh64(const void *data, size_t len, uint64_t seed);
/* out[i] = XXH64(page i, seed 0) for the len / page_size pages of buf. */
void up_page_digests(const void *buf, size_t len, size_t page_size, uint64_t *out);
/* Runs of all-zero / non-zero pages, in order: runs[k] = (npages << 1) | is_zero.
 * At most len / page_size runs; returns how many were written. */
size_t up_zero_runs(const void *buf, size_t len, size_t page_size, uint64_t *runs);
int up_page_is_zero(const void *page, size_t page_size);
#endif
