/* quant/blockwise8.h — bitsandbytes' 8-bit blockwise quantization with its dynamic maps: the code
 * of NF4's double quantization (quant/nf4.c: the block scales) and of the 8-bit optimizer states
 * (optim/adamw8bit.c: AdamW's moments).
 *
 * A vector is cut into blocks of `blocksize` elements; each block keeps its fp32 absmax and each
 * element the index of a code in a 256-entry map, so x ≈ code[q] * absmax. The maps are
 * create_dynamic_map(signed, max_exponent_bits 7, total_bits 8) (Dettmers, "8-bit Approximations
 * for Parallelism in Deep Learning", arXiv:1511.04561; bitsandbytes functional.py), computed as
 * PyTorch computes them. The quantizer is the one bitsandbytes' native CPU library runs
 * (cquantize_blockwise_cpu_fp32): scaling by fl(1/absmax), clamping to [-1, 1], then a 65536-bin
 * lookup table built per map (bw8_build_lut), so a value near the midpoint of two codes goes
 * where its bin lands, not always to the nearest code. Checked bit for bit against the library by
 * tests/test_reference_nf4.c (double quantization) and tests/test_adamw8bit.c (optimizer states).
 */
#ifndef QLORA_QUANT_BLOCKWISE8_H
#define QLORA_QUANT_BLOCKWISE8_H

#include <stdint.h>

#define BW8_LUT_SIZE 65536

/* bitsandbytes' create_dynamic_map(signed=is_signed, max_exponent_bits=7, total_bits=8) as PyTorch
 * computes it (fp32 torch.linspace, whose `start + step*i` torch's vector kernel contracts into an
 * FMA; fp32 means; fp32 scaling): 256 ascending values. Signed: [0] = -0.99296875, [127] = 0,
 * [255] = 1. Unsigned: [0] = 0, [255] = 1. */
void bw8_dynamic_map(int is_signed, float out[256]);

/* The lookup table of a map: mid[k] = 0.5f * (code[k] + code[k+1]) (fp32), val(i) = -1 +
 * (2i)/65535 (fp32), lut[i] = the number of mid[k] below val(i). lut: BW8_LUT_SIZE bytes. */
void bw8_build_lut(const float code[256], uint8_t *lut);

/* The code index of x in a block whose reciprocal absmax is inv_absmax (fl(1/absmax)):
 * lut[(int)(((clamp(x * inv_absmax, -1, 1) + 1) * 0.5f) * 65535 + 0.5f)], each operation one fp32
 * rounding as the library's AVX2 intrinsics do; NaN clamps to -1. */
static inline uint8_t bw8_index(const uint8_t *lut, float x, float inv_absmax) {
    float v = x * inv_absmax;
    v = v > -1.0f ? v : -1.0f;
    v = v < 1.0f ? v : 1.0f;
    float t = v + 1.0f;
    t = t * 0.5f;
    t = t * (float)(BW8_LUT_SIZE - 1);
    t = t + 0.5f;
    return lut[(int)t];
}

/* Quantize one block x (n) into q (n) and *absmax: absmax = max |x|; an all-zero block is written
 * as index 0 everywhere (what the library writes; code[0] * 0 = 0 recovers it). */
void bw8_quantize_block(const float *x, int64_t n, const uint8_t *lut, uint8_t *q, float *absmax);

#endif
