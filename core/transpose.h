/* core/transpose.h — a block of rows of a bf16 matrix written as columns of its transpose.
 *
 * The transposed dequantization (quant/nf4.c nf4_dequantize_t_bf16, the cpu backend's frozen_t_bf16) decodes
 * a tile of rows of W and stores it as columns of Wᵀ, for the input-gradient product dx = dy·(Wᵀ)ᵀ. */
#ifndef QLORA_CORE_TRANSPOSE_H
#define QLORA_CORE_TRANSPOSE_H

#include <stdint.h>

/* dst[i·ldd + r] = src[r·lds + i] for r < nr, i < nc (bf16 as uint16_t; src rows lds elements apart, dst rows
 * ldd apart). Where the compiler targets AVX-512 and nr == 32 with lds even: one dword gather per 16 rows and
 * column pair (its low halves are column i, its high halves column i + 1), nc a multiple of 2, and with
 * streaming = 1 non-temporal stores, which need every dst + i·ldd 64-byte aligned; the caller then issues an
 * sfence (_mm_sfence) before other threads read dst. Otherwise element by element (streaming ignored). */
void bf16_transpose_rows(const uint16_t *src, int64_t lds, int nr, int64_t nc, uint16_t *dst, int64_t ldd,
                         int streaming);

#endif
