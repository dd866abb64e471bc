/* core/hash.c — XXH64 (see hash.h; xxhash_spec.md, "XXH64 algorithm description"). */
#include "core/hash.h"

#include <string.h>

#define P1 0x9E3779B185EBCA87ull
#define P2 0xC2B2AE3D27D4EB4Full
#define P3 0x165667B19E3779F9ull
#define P4 0x85EBCA77C2B2AE63ull
#define P5 0x27D4EB2F165667C5ull

static inline uint64_t rotl64(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

/* Little-endian loads (memcpy, no alignment assumptions). */
static inline uint64_t rd64(const unsigned char *p) {
    uint64_t v;
    memcpy(&v, p, 8);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    return v;
}

static inline uint32_t rd32(const unsigned char *p) {
    uint32_t v;
    memcpy(&v, p, 4);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap32(v);
#endif
    return v;
}

static inline uint64_t round64(uint64_t acc, uint64_t input) {
    acc += input * P2;
    acc = rotl64(acc, 31);
    return acc * P1;
}

static inline uint64_t merge64(uint64_t acc, uint64_t val) {
    acc ^= round64(0, val);
    return acc * P1 + P4;
}

void xxh64_init(xxh64_state *s, uint64_t seed) {
    memset(s, 0, sizeof *s);
    s->seed = seed;
    s->v[0] = seed + P1 + P2;
    s->v[1] = seed + P2;
    s->v[2] = seed;
    s->v[3] = seed - P1;
}

/* One 32-byte stripe. */
static inline void stripe(uint64_t v[4], const unsigned char *p) {
    v[0] = round64(v[0], rd64(p));
    v[1] = round64(v[1], rd64(p + 8));
    v[2] = round64(v[2], rd64(p + 16));
    v[3] = round64(v[3], rd64(p + 24));
}

void xxh64_update(xxh64_state *s, const void *data, size_t len) {
    const unsigned char *p = data, *end = p + len;
    if (len == 0) return;
    s->total_len += len;
    if (s->mem_size + len < 32) {
        memcpy(s->mem + s->mem_size, p, len);
        s->mem_size += (unsigned)len;
        return;
    }
    if (s->mem_size) {
        size_t fill = 32 - s->mem_size;
        memcpy(s->mem + s->mem_size, p, fill);
        stripe(s->v, s->mem);
        p += fill;
        s->mem_size = 0;
    }
    uint64_t v[4] = {s->v[0], s->v[1], s->v[2], s->v[3]};
    while ((size_t)(end - p) >= 32) {
        stripe(v, p);
        p += 32;
    }
    memcpy(s->v, v, sizeof v);
    if (p < end) {
        memcpy(s->mem, p, (size_t)(end - p));
        s->mem_size = (unsigned)(end - p);
    }
}

uint64_t xxh64_digest(const xxh64_state *s) {
    uint64_t h;
    if (s->total_len >= 32) {
        h = rotl64(s->v[0], 1) + rotl64(s->v[1], 7) + rotl64(s->v[2], 12) + rotl64(s->v[3], 18);
        for (int i = 0; i < 4; i++) h = merge64(h, s->v[i]);
    } else {
        h = s->seed + P5;
    }
    h += s->total_len;
    const unsigned char *p = s->mem, *end = s->mem + s->mem_size;
    while (end - p >= 8) {
        h ^= round64(0, rd64(p));
        h = rotl64(h, 27) * P1 + P4;
        p += 8;
    }
    if (end - p >= 4) {
        h ^= (uint64_t)rd32(p) * P1;
        h = rotl64(h, 23) * P2 + P3;
        p += 4;
    }
    while (p < end) {
        h ^= (uint64_t)(*p) * P5;
        h = rotl64(h, 11) * P1;
        p++;
    }
    h ^= h >> 33;
    h *= P2;
    h ^= h >> 29;
    h *= P3;
    h ^= h >> 32;
    return h;
}

uint64_t xxh64(const void *data, size_t len, uint64_t seed) {
    xxh64_state s;
    xxh64_init(&s, seed);
    xxh64_update(&s, data, len);
    return xxh64_digest(&s);
}
