#ifndef UP_DIGEST_H
#define UP_DIGEST_H
#include <stdint.h>
#include <stddef.h>
/* --- cffi: what Python sees (csrc/build_ffi.py reads it from here) --- */
/* XXH64 (xxHash, 64-bit variant) with the given seed; the wire protocol uses seed 0. */
uint64_t up_xxh64(const void *data, size_t len, uint64_t seed);
/* out[i] = XXH64(page i, seed 0) for the len / page_size pages of buf. */
void up_page_digests(const void *buf, size_t len, size_t page_size, uint64_t *out);
int up_page_is_zero(const void *page, size_t page_size);
/* --- end cffi --- */
#endif
