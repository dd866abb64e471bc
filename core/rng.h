/* core/rng.h — counter-based random numbers.
 *
 * Every random draw is a pure function of (seed, stream, counter), so results do
 * not depend on thread count or on the order work is scheduled (the idea of
 * Philox / counter-based RNGs, Salmon et al. SC'11). The mixer is splitmix64
 * (Steele et al., "Fast splittable pseudorandom number generators", 2014).
 */
#ifndef QLORA_CORE_RNG_H
#define QLORA_CORE_RNG_H

#include <stdint.h>

static inline uint64_t rng_mix64(uint64_t z) {
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* 64 random bits for (seed, stream, counter). */
static inline uint64_t rng_u64(uint64_t seed, uint64_t stream, uint64_t counter) {
    return rng_mix64(rng_mix64(seed ^ rng_mix64(stream)) ^ counter);
}

/* Uniform float in [0, 1) with 24 random bits. */
static inline float rng_uniform(uint64_t seed, uint64_t stream, uint64_t counter) {
    return (float)(rng_u64(seed, stream, counter) >> 40) * (1.0f / 16777216.0f);
}

#endif
