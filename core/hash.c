/* core/hash.c — XXH64 through libxxhash (see hash.h). */
#include "core/hash.h"

void xxh64_init(xxh64_state *s, uint64_t seed) { (void)XXH64_reset(s, seed); }

void xxh64_update(xxh64_state *s, const void *data, size_t len) {
    if (len) (void)XXH64_update(s, data, len); /* XXH64_update rejects a NULL pointer even for 0 bytes */
}

uint64_t xxh64_digest(const xxh64_state *s) { return XXH64_digest(s); }

uint64_t xxh64(const void *data, size_t len, uint64_t seed) { return XXH64(len ? data : "", len, seed); }
