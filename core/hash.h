/* core/hash.h — XXH64, a fast non-cryptographic 64-bit hash (Yann Collet,
 * xxHash specification "XXH64", github.com/Cyan4973/xxHash doc/xxhash_spec.md).
 *
 * Used for fingerprints (the base model and tokenizer a checkpoint was made
 * with, the training data) and for the integrity check of checkpoint files.
 * It detects accidental change, not tampering. The digest equals the
 * reference implementation's for any split of the input into updates, so a
 * user can recompute a fingerprint with Python's `xxhash.xxh64`.
 */
#ifndef QLORA_CORE_HASH_H
#define QLORA_CORE_HASH_H

#include <stddef.h>
#include <stdint.h>

typedef struct xxh64_state {
    uint64_t total_len;
    uint64_t v[4];
    uint64_t seed;
    unsigned char mem[32];
    unsigned mem_size;
} xxh64_state;

void xxh64_init(xxh64_state *s, uint64_t seed);
void xxh64_update(xxh64_state *s, const void *data, size_t len);
uint64_t xxh64_digest(const xxh64_state *s);

/* One-shot: xxh64(data, len, seed). */
uint64_t xxh64(const void *data, size_t len, uint64_t seed);

#endif
