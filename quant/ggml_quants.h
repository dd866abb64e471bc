/* quant/ggml_quants.h — ggml block types: geometry, dequantisation to fp32, and
 * the reference quantisers for Q8_0 / Q4_0 / Q4_1.
 *
 * Block layouts and formulas: ggml/src/ggml-common.h (block_q4_0 ... block_q6_K)
 * and ggml/src/ggml-quants.c (dequantize_row_*, quantize_row_*_ref); see
 * docs/formats.md §3. Every function works on one contiguous run
 * of blocks ("a row"); the caller parallelises over rows. Block bytes are read
 * byte by byte (no struct casts), so `src`/`dst` need no alignment.
 */
#ifndef QLORA_QUANT_GGML_QUANTS_H
#define QLORA_QUANT_GGML_QUANTS_H

#include <stddef.h>
#include <stdint.h>

/* ggml tensor types this code can dequantize (numbers from ggml.h). Files may
 * hold other types: ggml_type_info knows the size of every current ggml type. */
typedef enum ggml_type {
    GGML_TYPE_F32 = 0, GGML_TYPE_F16 = 1, GGML_TYPE_Q4_0 = 2, GGML_TYPE_Q4_1 = 3,
    GGML_TYPE_Q5_0 = 6, GGML_TYPE_Q5_1 = 7, GGML_TYPE_Q8_0 = 8, GGML_TYPE_Q4_K = 12, GGML_TYPE_Q5_K = 13, GGML_TYPE_Q6_K = 14, GGML_TYPE_BF16 = 30,
} ggml_type;

/* Elements per block of the K-quants (QK_K in ggml-common.h). */
#define GGML_QK_K 256

/* Geometry of a ggml type: *blck = elements per block, *type_size = bytes per
 * block (ggml.c type_traits; gguf-py constants.GGML_QUANT_SIZES). Returns 0 for a
 * type whose layout is known (even if it cannot be dequantized here), -1 for an
 * unknown or removed type number. */
int ggml_type_info(uint32_t type, uint32_t *blck, uint32_t *type_size);

/* "Q4_K", "F32", ...; "unknown" for an unknown type number. */
const char *ggml_type_name(uint32_t type);

/* 1 if ggml_dequantize_row supports `type`, else 0. */
int ggml_type_can_dequantize(uint32_t type);

/* Dequantize k elements (k a multiple of the type's block size) of `type` from
 * the packed blocks at src (k / blck * type_size bytes) into dst (k fp32).
 * Returns -1 for an unsupported type or a k that is not a multiple of the
 * block size, without touching dst. */
int ggml_dequantize_row(uint32_t type, const void *src, float *dst, int64_t k);

/* Per-type row dequantizers: src holds k / blck blocks, dst receives k fp32.
 * k must be a multiple of the block size (32 for Q*_0/Q4_1, 256 for K-quants).
 * Formulas (ggml-quants.c dequantize_row_*), with d, m, dmin stored as f16:
 *   Q8_0 (34 B / 32): x = d·q,                q int8
 *   Q4_0 (18 B / 32): x = (q − 8)·d,          q nibble; low nibbles are elements 0..15, high 16..31
 *   Q4_1 (20 B / 32): x = d·q + m,            same nibble order
 *   Q5_0 (22 B / 32): x = d·(q − 16),        q 5-bit: nibble as Q4_0, fifth bit j of the u32 qh
 *   Q5_1 (24 B / 32): x = d·q + m,            q as Q5_0
 *   Q4_K (144 B / 256): x = (d·sc)·q − dmin·mn, 8 sub-blocks of 32 with 6-bit sc/mn
 *   Q5_K (176 B / 256): as Q4_K with q 5-bit (fifth bits in qh[32], bit 2c/2c+1 for chunk c)
 *   Q6_K (210 B / 256): x = (d·sc)·(q − 32),  q 6-bit from ql/qh, sc int8 per 16
 * Products are evaluated in fp32 in exactly this order (no FMA), which is what
 * gguf-py's numpy dequantizers compute; results match it bit for bit. */
void ggml_dequantize_row_f32(const void *src, float *dst, int64_t k);
void ggml_dequantize_row_f16(const void *src, float *dst, int64_t k);
void ggml_dequantize_row_bf16(const void *src, float *dst, int64_t k);
void ggml_dequantize_row_q8_0(const void *src, float *dst, int64_t k);
void ggml_dequantize_row_q4_0(const void *src, float *dst, int64_t k);
void ggml_dequantize_row_q4_1(const void *src, float *dst, int64_t k);
void ggml_dequantize_row_q4_k(const void *src, float *dst, int64_t k);
void ggml_dequantize_row_q6_k(const void *src, float *dst, int64_t k);
void ggml_dequantize_row_q5_0(const void *src, float *dst, int64_t k);
void ggml_dequantize_row_q5_1(const void *src, float *dst, int64_t k);
void ggml_dequantize_row_q5_k(const void *src, float *dst, int64_t k);

/* Reference quantisers (ggml-quants.c quantize_row_*_ref; identical bytes to
 * gguf-py quants.quantize). src: k fp32 (k a multiple of 32, finite values);
 * dst: k / 32 blocks (34, 18, 20 bytes each).
 *   Q8_0: d = amax/127, q = roundf(x/d)  (round half away from zero)
 *   Q4_0: d = x_amax/−8 (signed value of largest magnitude), q = min(15, trunc(x·(1/d) + 8.5))
 *   Q4_1: d = (max−min)/15, m = min, q = min(15, trunc((x−min)·(1/d) + 0.5))
 * d and m are stored as f16 (round to nearest even); 1/d uses the unrounded d. */
void ggml_quantize_row_q8_0_ref(const float *src, void *dst, int64_t k);
void ggml_quantize_row_q4_0_ref(const float *src, void *dst, int64_t k);
void ggml_quantize_row_q4_1_ref(const float *src, void *dst, int64_t k);

#endif
