#ifndef UP_XXH64_H
#define UP_XXH64_H
/* XXH64 (Yann Collet's xxHash, 64-bit variant), header-only so any csrc/ component can include
 * it. Byte-exact with the reference: up_xxh64("", 0, 0) == 0xEF46DB3751D8E999. Unaligned loads
 * go through memcpy, which compiles to plain loads on x86-64. Little-endian hosts only. */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define UP_XXH_P1 0x9E3779B185EBCA87ULL
#define UP_XXH_P2 0xC2B2AE3D27D4EB4FULL
#define UP_XXH_P3 0x165667B19E3779F9ULL
#define UP_XXH_P4 0x85EBCA77C2B2AE63ULL
#define UP_XXH_P5 0x27D4EB2F165667C5ULL

static inline uint64_t up_xxh_rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

static inline uint64_t up_xxh_read64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

static inline uint32_t up_xxh_read32(const uint8_t *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

static inline uint64_t up_xxh_round(uint64_t acc, uint64_t input)
{
    acc += input * UP_XXH_P2;
    acc = up_xxh_rotl(acc, 31);
    return acc * UP_XXH_P1;
}

static inline uint64_t up_xxh_merge(uint64_t acc, uint64_t val)
{
    acc ^= up_xxh_round(0, val);
    return acc * UP_XXH_P1 + UP_XXH_P4;
}

static inline uint64_t up_xxh64(const void *input, size_t len, uint64_t seed)
{
    const uint8_t *p = (const uint8_t *)input;
    const uint8_t *end = p + len;
    uint64_t h;

    if (len >= 32) {
        const uint8_t *limit = end - 32;
        uint64_t v1 = seed + UP_XXH_P1 + UP_XXH_P2;
        uint64_t v2 = seed + UP_XXH_P2;
        uint64_t v3 = seed;
        uint64_t v4 = seed - UP_XXH_P1;
        do {
            v1 = up_xxh_round(v1, up_xxh_read64(p));
            v2 = up_xxh_round(v2, up_xxh_read64(p + 8));
            v3 = up_xxh_round(v3, up_xxh_read64(p + 16));
            v4 = up_xxh_round(v4, up_xxh_read64(p + 24));
            p += 32;
        } while (p <= limit);
        h = up_xxh_rotl(v1, 1) + up_xxh_rotl(v2, 7) + up_xxh_rotl(v3, 12) + up_xxh_rotl(v4, 18);
        h = up_xxh_merge(h, v1);
        h = up_xxh_merge(h, v2);
        h = up_xxh_merge(h, v3);
        h = up_xxh_merge(h, v4);
    } else {
        h = seed + UP_XXH_P5;
    }
    h += (uint64_t)len;

    while (p + 8 <= end) {
        h ^= up_xxh_round(0, up_xxh_read64(p));
        h = up_xxh_rotl(h, 27) * UP_XXH_P1 + UP_XXH_P4;
        p += 8;
    }
    if (p + 4 <= end) {
        h ^= (uint64_t)up_xxh_read32(p) * UP_XXH_P1;
        h = up_xxh_rotl(h, 23) * UP_XXH_P2 + UP_XXH_P3;
        p += 4;
    }
    while (p < end) {
        h ^= (uint64_t)(*p) * UP_XXH_P5;
        h = up_xxh_rotl(h, 11) * UP_XXH_P1;
        p++;
    }
    h ^= h >> 33;
    h *= UP_XXH_P2;
    h ^= h >> 29;
    h *= UP_XXH_P3;
    h ^= h >> 32;
    return h;
}
#endif
