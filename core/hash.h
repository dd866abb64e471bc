/* core/hash.h — XXH64, a fast non-cryptographic 64-bit hash (Yann Collet,
 * xxHash specification "XXH64", github.com/Cyan4973/xxHash doc/xxhash_spec.md),
 * computed by libxxhash (Debian libxxhash-dev). These names are the project's
 * one door to it, so a caller never depends on the library's spelling.
 *
 * Used for fingerprints (the base model and tokenizer a checkpoint was made
 * with, the training data) and for the integrity check of checkpoint files.
 * It detects accidental change, not tampering. The digest is the reference
 * implementation's for any split of the input into updates, so a user can
 * recompute a fingerprint with Python's `xxhash.xxh64`; the hashes are those
 * of the hand-written XXH64 the project carried before (tests/test_checkpoint.c
 * verifies a checkpoint written by that version, tests/fixtures/README.md).
 */
#ifndef QLORA_CORE_HASH_H
#define QLORA_CORE_HASH_H

#include <stddef.h>
#include <stdint.h>

#define XXH_STATIC_LINKING_ONLY /* the state's layout, so it can live on the stack */
#include <xxhash.h>

typedef XXH64_state_t xxh64_state; /* streaming state; no resources to free */

/* Start a digest with `seed`. */
void xxh64_init(xxh64_state *s, uint64_t seed);

/* Feed `len` bytes at `data` (any split of the input gives the same digest). */
void xxh64_update(xxh64_state *s, const void *data, size_t len);

/* The digest of everything fed so far; `s` may be fed further. */
uint64_t xxh64_digest(const xxh64_state *s);

/* One-shot: XXH64 of the `len` bytes at `data` with `seed`. */
uint64_t xxh64(const void *data, size_t len, uint64_t seed);

#endif
