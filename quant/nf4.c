/* quant/nf4.c — bitsandbytes-exact NF4 quantization with double quantization.
 *
 * Reference implementation reproduced, checked bit for bit against the
 * installed library by tests/test_reference_nf4.c (fixture from
 * scripts/make_reference.py; bitsandbytes 0.50.2 with torch 2.15.0, CPU):
 *   - quantize_4bit: backends/default/ops.py (the CPU backend registers no
 *     quantize_4bit of its own, so this is what runs without a GPU):
 *         bounds  = (code[:-1] + code[1:]) / 2             # fp32 midpoints
 *         absmax  = abs(A_block).max()                     # stored as is
 *         scaled  = clamp(A * (1.0 / absmax.clamp(min=1e-38)), -1, 1)
 *         last partial block: am = max|.|.clamp(min=1e-38) (stored CLAMPED),
 *                             scaled = clamp(A / am, -1, 1)  # a division
 *         scaled padded with one 0.0 when the element count is odd
 *         q       = bucketize(scaled, bounds)              # count(bounds < s)
 *         packed  = q[::2] << 4 | q[1::2]
 *   - double quantization: functional.py::quantize_4bit
 *         offset  = absmax.mean()                          # torch CPU float32 mean
 *         qabsmax, state2 = quantize_blockwise(absmax - offset, blocksize=256)
 *     where quantize_blockwise on CPU is the native cquantize_blockwise_cpu_fp32
 *     (multiplication by fl(1/group absmax), then a 65536-bin lookup table,
 *     see quant/blockwise8.h) with the unmodified create_dynamic_map()
 *     (state2.code[0] = -0.99296875).
 *   - dequantize_4bit: native cdequantize_blockwise_cpu_nf4_* (the default
 *     backend for an odd last dimension, same arithmetic)
 *         v = code[q] * absmax   (fp32)  -> bf16 round-to-nearest-even
 *     and, with double quantization, absmax = dequantize_blockwise(...) + offset,
 *     i.e. fl(fl(code8[q] * nested_absmax) + offset): two fp32 roundings, no FMA.
 *
 * Choices, and why:
 *   - Scaling multiplies by the fp32 reciprocal (x * fl(1/absmax)) for full
 *     blocks and divides for the partial last block, as bnb does (torch's
 *     `1.0 / t` is reciprocal(t), an IEEE fp32 division). The clamp to
 *     [-1, 1] never changes an index (anything above 0.8614 is code 15) so it
 *     is omitted. The 1e-38 clamp is kept: it decides the indices of blocks
 *     whose absmax is a subnormal below it (they scale by 1e38, not 1/absmax).
 *   - Nearest code: bnb's bucketize against its fp32 midpoints, i.e. 15
 *     comparisons `s > bound_k` with bound_k = fl(code[k] + code[k+1]) / 2. A
 *     value exactly on a bound goes to the LOWER code. Where the fp32 sum
 *     rounds up, the bound is one ulp above the real midpoint, and that one
 *     float goes lower than a true nearest-code rule would send it.
 *   - All-zero block: 0 * fl(1/1e-38) = 0 -> code index 7 (0.0); absmax 0
 *     (or the clamp value 1e-38 for a partial last block, as bnb stores it).
 *   - Double-quant offset: torch's CPU `mean` of a float32 vector is
 *     sum(float32 cascade sum, SumKernel.cpp) / n in fp32. torch 2.15 on this
 *     project's AVX-512 machines sums in 8-lane vectors (measured: the 8-lane
 *     order matches torch for every length tried, the 16-lane one does not).
 *     Above 32768 elements torch splits the sum across its threads, so bnb's
 *     offset for tensors of more than 32768 blocks (e.g. a 4096 x 11008
 *     weight) depends on torch's thread count; we reproduce torch with ONE
 *     thread, so the result does not depend on the machine
 *     (tests/test_reference_nf4.c shows the 1-thread case bit-exact and how
 *     far the 2-thread result is).
 *   - Double quant of a tensor whose block scales are all equal: every
 *     deviation is 0, the group absmax is 0, and bnb's kernel writes index 0
 *     for such a group. We store index 0 too (it recovers code[0] * 0 +
 *     offset = offset, the exact scale).
 *   - The 8-bit map: create_dynamic_map() computed the way PyTorch computes it:
 *     fp32 torch.linspace whose `start + step*i` is contracted to an FMA in
 *     torch's AVX2/AVX-512 kernel builds (this reproduces a published dump of
 *     the map bit for bit; without the FMA 21 entries differ by one ulp), fp32
 *     means, fp32 scaling. Double quantization uses and stores it unchanged
 *     (bitsandbytes 0.50.2 does not overwrite code[0] with -1.0f any more;
 *     nf4_dynamic_map_cpu keeps that older variant for reading old states).
 *
 * No -ffast-math anywhere near this file: the rounding is the specification.
 * GCC with -std=c11 does not contract a*b+c into an FMA; the two roundings that
 * must stay separate are also written as separate statements.
 */
#include "quant/nf4.h"

#include "quant/blockwise8.h"

#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/bf16.h"
#include "core/transpose.h"

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define NF4_USE_AVX512 1
#endif

/* SIMD width (fp32 lanes) of the torch sum kernel whose order we reproduce. */
#define TORCH_SUM_LANES 8

const float nf4_code[16] = {
    -1.0f,
    -0.6961928009986877f,
    -0.5250730514526367f,
    -0.39491748809814453f,
    -0.28444138169288635f,
    -0.18477343022823334f,
    -0.09105003625154495f,
    0.0f,
    0.07958029955625534f,
    0.16093020141124725f,
    0.24611230194568634f,
    0.33791524171829224f,
    0.44070982933044434f,
    0.5626170039176941f,
    0.7229568362236023f,
    1.0f,
};

/* ---------------------------------------------------------------- code index */

/* thr[k] = bnb's bound fl(code[k] + code[k+1]) / 2, all in fp32
 * (backends/default/ops.py _get_4bit_quantize_bounds). Two statements: the
 * sum is rounded to fp32 before the (exact) halving. */
static void nf4_thresholds(float thr[15]) {
    for (int k = 0; k < 15; k++) {
        const float sum = nf4_code[k] + nf4_code[k + 1];
        thr[k] = sum / 2.0f;
    }
}

/* bnb's absmax.clamp(min=1e-38) as an fp32 value (a subnormal, 9.99999935e-39). */
static const float NF4_BNB_ABSMAX_MIN = 1e-38f;

/* The one place the code rule lives (nf4_code_index and the block quantizer
 * both call it): count of bounds strictly below s (torch.bucketize,
 * right=False). NaN compares false everywhere -> 0. */
static inline uint8_t nf4_index_thr(float s, const float thr[15]) {
    int c = 0;
    for (int k = 0; k < 15; k++) c += s > thr[k];
    return (uint8_t)c;
}

uint8_t nf4_code_index(float scaled) {
    float thr[15];
    nf4_thresholds(thr);
    return nf4_index_thr(scaled, thr);
}

/* ------------------------------------------------------- torch float32 mean */

static int64_t torch_ceil_log2(int64_t x) { /* aten/src/ATen/native/cpu/utils.h CeilLog2 */
    if (x <= 2) return 1;
    uint64_t v = (uint64_t)(x - 1);
    int64_t bits = 0;
    while (v) {
        bits++;
        v >>= 1;
    }
    return bits;
}

/* torch SumKernel.cpp multi_row_sum<nrows=4>: `size` rows; row i, column k is
 * the unit (4*i + k), a unit being `w` consecutive floats summed lane-wise. */
static void torch_multi_row_sum4(const float *x, int64_t size, int w, float out[4][TORCH_SUM_LANES]) {
    const int64_t level_power = torch_ceil_log2(size) / 4 > 4 ? torch_ceil_log2(size) / 4 : 4;
    const int64_t level_step = (int64_t)1 << level_power;
    const int64_t level_mask = level_step - 1;
    float acc[4][4][TORCH_SUM_LANES];
    memset(acc, 0, sizeof acc);

    int64_t i = 0;
    while (i + level_step <= size) {
        for (int64_t j = 0; j < level_step; ++j, ++i)
            for (int k = 0; k < 4; k++)
                for (int l = 0; l < w; l++) acc[0][k][l] += x[(4 * i + k) * w + l];
        for (int j = 1; j < 4; ++j) {
            for (int k = 0; k < 4; k++)
                for (int l = 0; l < w; l++) {
                    acc[j][k][l] += acc[j - 1][k][l];
                    acc[j - 1][k][l] = 0.0f;
                }
            if ((i & (level_mask << (j * level_power))) != 0) break;
        }
    }
    for (; i < size; ++i)
        for (int k = 0; k < 4; k++)
            for (int l = 0; l < w; l++) acc[0][k][l] += x[(4 * i + k) * w + l];
    for (int j = 1; j < 4; ++j)
        for (int k = 0; k < 4; k++)
            for (int l = 0; l < w; l++) acc[0][k][l] += acc[j][k][l];
    memcpy(out, acc[0], sizeof acc[0]);
}

/* torch row_sum (ilp_factor 4) over `size` units of width w. */
static void torch_row_sum(const float *x, int64_t size, int w, float out[TORCH_SUM_LANES]) {
    const int64_t size_ilp = size / 4;
    float p[4][TORCH_SUM_LANES];
    torch_multi_row_sum4(x, size_ilp, w, p);
    for (int64_t i = size_ilp * 4; i < size; ++i)
        for (int l = 0; l < w; l++) p[0][l] += x[i * w + l];
    for (int k = 1; k < 4; k++)
        for (int l = 0; l < w; l++) p[0][l] += p[k][l];
    memcpy(out, p[0], sizeof p[0]);
}

/* `x.mean()` for a contiguous float32 vector on torch CPU: cascade_sum
 * (vectorized_inner_sum when n >= lanes, scalar row_sum otherwise), stored by
 * accumulating into a zero-filled output, then div_ by n in fp32
 * (ReduceOps.cpp mean_out: sum_out(...).div_(dim_prod)). */
static float torch_mean_f32(const float *x, int64_t n) {
    float sum, v[TORCH_SUM_LANES];
    if (n >= TORCH_SUM_LANES) {
        const int64_t nvec = n / TORCH_SUM_LANES;
        torch_row_sum(x, nvec, TORCH_SUM_LANES, v);
        float fin = 0.0f;
        for (int64_t k = nvec * TORCH_SUM_LANES; k < n; k++) fin += x[k];
        for (int l = 0; l < TORCH_SUM_LANES; l++) fin += v[l];
        sum = fin;
    } else {
        torch_row_sum(x, n, 1, v);
        sum = v[0];
    }
    sum = 0.0f + sum;
    return sum / (float)n;
}

/* ------------------------------------------------------------ dynamic map */

void nf4_dynamic_map(float out[256]) { bw8_dynamic_map(1, out); }

void nf4_dynamic_map_cpu(float out[256]) {
    nf4_dynamic_map(out);
    out[0] = -1.0f;
}

/* ------------------------------------------------------------- quantization */

int nf4_check_geometry(int64_t rows, int64_t cols, int blocksize, qerr *e) {
    if (rows < 1 || cols < 1)
        return qerr_set(e, "nf4: matrix shape (%lld, %lld) must have rows >= 1 and cols >= 1", (long long)rows,
                        (long long)cols);
    if (rows > INT64_MAX / 2 / cols)
        return qerr_set(e, "nf4: matrix shape (%lld, %lld) is too large", (long long)rows, (long long)cols);
    if (blocksize < NF4_MIN_BLOCKSIZE || blocksize > NF4_MAX_BLOCKSIZE || (blocksize & (blocksize - 1)) != 0)
        return qerr_set(e, "nf4: blocksize %d must be a power of two in [%d, %d] (bitsandbytes default 64)", blocksize,
                        NF4_MIN_BLOCKSIZE, NF4_MAX_BLOCKSIZE);
    return 0;
}

int nf4_alloc(nf4_tensor *t, int64_t rows, int64_t cols, int blocksize, int double_quant, qerr *e) {
    memset(t, 0, sizeof *t);
    if (nf4_check_geometry(rows, cols, blocksize, e)) return -1;
    t->rows = rows;
    t->cols = cols;
    t->n = rows * cols;
    t->blocksize = blocksize;
    t->nblocks = (t->n + blocksize - 1) / blocksize;
    t->double_quant = double_quant ? 1 : 0;
    t->packed = qcalloc((size_t)((t->n + 1) / 2), 1, e);
    if (!t->packed) goto fail;
    if (t->double_quant) {
        const int64_t ngroups = (t->nblocks + NF4_NESTED_BLOCKSIZE - 1) / NF4_NESTED_BLOCKSIZE;
        t->absmax_q = qcalloc((size_t)t->nblocks, 1, e);
        t->nested_absmax = qcalloc((size_t)ngroups, sizeof(float), e);
        if (!t->absmax_q || !t->nested_absmax) goto fail;
        nf4_dynamic_map(t->nested_code);
    } else {
        t->absmax = qcalloc((size_t)t->nblocks, sizeof(float), e);
        if (!t->absmax) goto fail;
    }
    return 0;
fail:
    nf4_free(t);
    return qerr_prefix(e, "nf4: allocating a (%lld, %lld) tensor", (long long)rows, (long long)cols);
}

int nf4_view(nf4_tensor *t, int64_t rows, int64_t cols, int blocksize, int double_quant, uint8_t *packed,
             void *scales, float *nested_absmax, qerr *e) {
    memset(t, 0, sizeof *t);
    if (nf4_check_geometry(rows, cols, blocksize, e)) return -1;
    if (!packed || !scales || (double_quant && !nested_absmax))
        return qerr_set(e, "nf4: a view of (%lld, %lld) needs its packed, scale%s buffers", (long long)rows,
                        (long long)cols, double_quant ? " and nested absmax" : "");
    t->rows = rows;
    t->cols = cols;
    t->n = rows * cols;
    t->blocksize = blocksize;
    t->nblocks = (t->n + blocksize - 1) / blocksize;
    t->double_quant = double_quant ? 1 : 0;
    t->packed = packed;
    if (t->double_quant) {
        t->absmax_q = scales;
        t->nested_absmax = nested_absmax;
        nf4_dynamic_map(t->nested_code);
    } else {
        t->absmax = scales;
    }
    t->is_view = 1;
    return 0;
}

void nf4_free(nf4_tensor *t) {
    if (!t) return;
    if (!t->is_view) {
        free(t->packed);
        free(t->absmax);
        free(t->absmax_q);
        free(t->nested_absmax);
    }
    memset(t, 0, sizeof *t);
}

size_t nf4_nbytes(const nf4_tensor *t) {
    size_t b = (size_t)((t->n + 1) / 2);
    if (t->double_quant) {
        const int64_t ngroups = (t->nblocks + NF4_NESTED_BLOCKSIZE - 1) / NF4_NESTED_BLOCKSIZE;
        b += (size_t)t->nblocks + (size_t)ngroups * sizeof(float) + sizeof(float);
    } else {
        b += (size_t)t->nblocks * sizeof(float);
    }
    return b;
}

/* Quantize one block of len (<= blocksize) f32 values starting at an even
 * element index: writes ceil(len/2) bytes of packed and *absmax_out (NaN if the
 * block holds a NaN or an infinity). partial: this is the last block and
 * shorter than blocksize (bnb treats it apart: clamped absmax stored, division). */
static void nf4_quant_block(const float *x, int64_t len, int partial, const float thr[15], uint8_t *packed,
                            float *absmax_out) {
    /* max |x| over the bit patterns: for non-negative floats the u32 order is
     * the float order, and any NaN/inf shows up as a pattern >= 0x7f800000
     * (an integer max reduction also vectorizes, a NaN-aware float one does not) */
    uint32_t umax = 0;
    for (int64_t i = 0; i < len; i++) {
        uint32_t u;
        memcpy(&u, &x[i], 4);
        u &= 0x7fffffffu;
        umax = u > umax ? u : umax;
    }
    if (umax >= 0x7f800000u) {
        *absmax_out = NAN;
        return;
    }
    float amax;
    memcpy(&amax, &umax, 4);
    /* clamp(min=1e-38): an all-zero block scales by 1e38 -> every value 0 -> code 7 */
    const float amax_c = amax > NF4_BNB_ABSMAX_MIN ? amax : NF4_BNB_ABSMAX_MIN;

    uint8_t q[NF4_MAX_BLOCKSIZE];
    if (partial) {
        *absmax_out = amax_c; /* bnb stores the clamped value for this block only */
        for (int64_t i = 0; i < len; i++) q[i] = nf4_index_thr(x[i] / amax_c, thr);
    } else {
        *absmax_out = amax;
        const float r = 1.0f / amax_c; /* <= 1e38: never overflows */
        for (int64_t i = 0; i < len; i++) q[i] = nf4_index_thr(x[i] * r, thr);
    }
    int64_t i = 0;
    for (; i + 1 < len; i += 2) packed[i / 2] = (uint8_t)(q[i] << 4 | q[i + 1]);
    /* odd count: bnb pads the scaled values with 0.0, whose index is 7 */
    if (i < len) packed[i / 2] = (uint8_t)(q[i] << 4 | 7);
}

/* Double quantization of the fp32 absmax vector into t (absmax_q,
 * nested_absmax, offset; nested_code already set by nf4_alloc). Returns -1 on
 * out of memory (the 64 KiB bin table). */
static int nf4_double_quant(nf4_tensor *t, const float *absmax, qerr *e) {
    uint8_t *lut = qmalloc(BW8_LUT_SIZE, e);
    if (!lut) return -1;
    bw8_build_lut(t->nested_code, lut);
    const int64_t nb = t->nblocks;
    const int64_t ngroups = (nb + NF4_NESTED_BLOCKSIZE - 1) / NF4_NESTED_BLOCKSIZE;
    const float offset = torch_mean_f32(absmax, nb);
    t->offset = offset;
#pragma omp parallel for schedule(static) if (ngroups >= 8)
    for (int64_t g = 0; g < ngroups; g++) {
        const int64_t b0 = g * NF4_NESTED_BLOCKSIZE;
        const int64_t len = nb - b0 < NF4_NESTED_BLOCKSIZE ? nb - b0 : NF4_NESTED_BLOCKSIZE;
        float dev[NF4_NESTED_BLOCKSIZE];
        float amax = -FLT_MAX;
        for (int64_t j = 0; j < len; j++) {
            dev[j] = absmax[b0 + j] - offset; /* torch: _absmax - offset, fp32 */
            amax = fmaxf(amax, fabsf(dev[j]));
        }
        t->nested_absmax[g] = amax;
        const float inv = amax == 0.0f ? 0.0f : 1.0f / amax;
        for (int64_t j = 0; j < len; j++) {
            /* all deviations 0 (e.g. a single group of equal scales): bnb
             * writes index 0; code[0] * 0 + offset recovers the exact scale. */
            t->absmax_q[b0 + j] = amax == 0.0f ? 0 : bw8_index(lut, dev[j], inv);
        }
    }
    free(lut);
    return 0;
}

/* Quantize src (t->rows, t->cols), f32 or bf16 (u16 patterns) when src_bf16,
 * into t's buffers. On error t keeps its buffers (contents undefined). */
static int nf4_quantize_impl(const void *src, int src_bf16, nf4_tensor *t, qerr *e) {
    const int64_t rows = t->rows, cols = t->cols;
    if (!src) return qerr_set(e, "nf4: NULL weight pointer");
    float *absmax = t->absmax;
    if (t->double_quant) {
        absmax = qmalloc((size_t)t->nblocks * sizeof(float), e);
        if (!absmax) return qerr_prefix(e, "nf4: quantizing (%lld, %lld)", (long long)rows, (long long)cols);
    }
    float thr[15];
    nf4_thresholds(thr);

    const int64_t n = t->n, bs = t->blocksize, nb = t->nblocks;
    uint8_t *const packed = t->packed;
#pragma omp parallel for schedule(static) if (nb >= 16)
    for (int64_t b = 0; b < nb; b++) {
        const int64_t i0 = b * bs;
        const int64_t len = n - i0 < bs ? n - i0 : bs;
        if (src_bf16) {
            float xb[NF4_MAX_BLOCKSIZE];
            const uint16_t *s = (const uint16_t *)src + i0;
            for (int64_t i = 0; i < len; i++) xb[i] = bf16_to_f32(s[i]);
            nf4_quant_block(xb, len, len < bs, thr, packed + i0 / 2, &absmax[b]);
        } else {
            nf4_quant_block((const float *)src + i0, len, len < bs, thr, packed + i0 / 2, &absmax[b]);
        }
    }

    for (int64_t b = 0; b < nb; b++) {
        if (absmax[b] == absmax[b]) continue;
        int64_t bad = b * bs;
        for (int64_t i = b * bs; i < (b + 1) * bs && i < n; i++) {
            const float v = src_bf16 ? bf16_to_f32(((const uint16_t *)src)[i]) : ((const float *)src)[i];
            if (!(fabsf(v) <= FLT_MAX)) {
                bad = i;
                break;
            }
        }
        if (t->double_quant) free(absmax);
        return qerr_set(e, "nf4: weight (%lld, %lld) has a non-finite value at row %lld, col %lld", (long long)rows,
                        (long long)cols, (long long)(bad / cols), (long long)(bad % cols));
    }

    if (t->double_quant) {
        const int rc = nf4_double_quant(t, absmax, e);
        free(absmax);
        if (rc) return qerr_prefix(e, "nf4: quantizing (%lld, %lld)", (long long)rows, (long long)cols);
    }
    return 0;
}

void nf4_absmax_blocks(const float *w, int64_t n, int blocksize, float *absmax) {
    float thr[15];
    nf4_thresholds(thr);
    const int64_t bs = blocksize, nb = (n + bs - 1) / bs;
#pragma omp parallel for schedule(static) if (nb >= 16)
    for (int64_t b = 0; b < nb; b++) {
        uint8_t scratch[NF4_MAX_BLOCKSIZE / 2 + 1];
        const int64_t i0 = b * bs, len = n - i0 < bs ? n - i0 : bs;
        nf4_quant_block(w + i0, len, len < bs, thr, scratch, &absmax[b]);
    }
}

int nf4_quantize_range(const float *w, int64_t x0, int64_t x1, const nf4_tensor *t, const float *absmax_all,
                       uint8_t *packed, void *scales, float *nested, float *offset, qerr *e) {
    const int64_t bs = t->blocksize, n = t->n, nb = t->nblocks;
    if (x0 < 0 || x0 > x1 || x0 % bs || x1 % bs || x1 > nb * bs || (t->double_quant && !absmax_all))
        return qerr_set(e, "nf4: range [%lld, %lld) of a %lld-element tensor: expected block boundaries%s",
                        (long long)x0, (long long)x1, (long long)n, t->double_quant ? " and every block's absmax" : "");
    if (x0 == x1) return 0;
    const int64_t b0 = x0 / bs, b1 = x1 / bs;
    float thr[15];
    nf4_thresholds(thr);
    float *am = t->double_quant ? qmalloc((size_t)(b1 - b0) * sizeof(float), e) : (float *)scales;
    if (!am) return -1;
#pragma omp parallel for schedule(static) if (b1 - b0 >= 16)
    for (int64_t b = b0; b < b1; b++) {
        const int64_t i0 = b * bs, len = n - i0 < bs ? n - i0 : bs;
        nf4_quant_block(w + (i0 - x0), len, len < bs, thr, packed + (i0 - x0) / 2, &am[b - b0]);
    }
    for (int64_t b = b0; b < b1; b++) {
        if (am[b - b0] == am[b - b0]) continue;
        int64_t bad = b * bs;
        for (int64_t i = b * bs; i < (b + 1) * bs && i < n; i++)
            if (!(fabsf(w[i - x0]) <= FLT_MAX)) {
                bad = i;
                break;
            }
        if (t->double_quant) free(am);
        return qerr_set(e, "nf4: weight (%lld, %lld) has a non-finite value at row %lld, col %lld", (long long)t->rows,
                        (long long)t->cols, (long long)(bad / t->cols), (long long)(bad % t->cols));
    }
    if (!t->double_quant) return 0;
    free(am);
    uint8_t *lut = qmalloc(BW8_LUT_SIZE, e);
    if (!lut) return -1;
    bw8_build_lut(t->nested_code, lut);
    /* as nf4_double_quant, over the groups the range touches, from every block's absmax */
    const float off = torch_mean_f32(absmax_all, nb);
    *offset = off;
    const int64_t g0 = b0 / NF4_NESTED_BLOCKSIZE, g1 = (b1 - 1) / NF4_NESTED_BLOCKSIZE + 1;
    uint8_t *codes = scales;
    for (int64_t g = g0; g < g1; g++) {
        const int64_t gb0 = g * NF4_NESTED_BLOCKSIZE;
        const int64_t len = nb - gb0 < NF4_NESTED_BLOCKSIZE ? nb - gb0 : NF4_NESTED_BLOCKSIZE;
        float dev[NF4_NESTED_BLOCKSIZE];
        float amax = -FLT_MAX;
        for (int64_t j = 0; j < len; j++) {
            dev[j] = absmax_all[gb0 + j] - off;
            amax = fmaxf(amax, fabsf(dev[j]));
        }
        nested[g - g0] = amax;
        const float inv = amax == 0.0f ? 0.0f : 1.0f / amax;
        for (int64_t j = 0; j < len; j++) {
            const int64_t b = gb0 + j;
            if (b < b0 || b >= b1) continue;
            codes[b - b0] = amax == 0.0f ? 0 : bw8_index(lut, dev[j], inv);
        }
    }
    free(lut);
    return 0;
}

int nf4_quantize_into(const float *w, nf4_tensor *t, qerr *e) { return nf4_quantize_impl(w, 0, t, e); }

int nf4_quantize_bf16_into(const uint16_t *w, nf4_tensor *t, qerr *e) { return nf4_quantize_impl(w, 1, t, e); }

/* A fresh tensor (nf4_alloc) filled by nf4_quantize_impl; *out zeroed on error. */
static int nf4_quantize_new(const void *src, int src_bf16, int64_t rows, int64_t cols, int blocksize,
                            int double_quant, nf4_tensor *out, qerr *e) {
    if (!src) {
        memset(out, 0, sizeof *out);
        return qerr_set(e, "nf4: NULL weight pointer");
    }
    if (nf4_alloc(out, rows, cols, blocksize, double_quant, e)) return -1;
    if (nf4_quantize_impl(src, src_bf16, out, e)) {
        nf4_free(out);
        return -1;
    }
    return 0;
}

int nf4_quantize(const float *w, int64_t rows, int64_t cols, int blocksize, int double_quant, nf4_tensor *out,
                 qerr *e) {
    return nf4_quantize_new(w, 0, rows, cols, blocksize, double_quant, out, e);
}

int nf4_quantize_bf16(const uint16_t *w, int64_t rows, int64_t cols, int blocksize, int double_quant,
                      nf4_tensor *out, qerr *e) {
    return nf4_quantize_new(w, 1, rows, cols, blocksize, double_quant, out, e);
}

/* ---------------------------------------------------------- dequantization */

float nf4_block_absmax(const nf4_tensor *t, int64_t b) {
    if (!t->double_quant) return t->absmax[b];
    /* two statements: the product and the sum are separate fp32 roundings */
    const float s = t->nested_code[t->absmax_q[b]] * t->nested_absmax[b / NF4_NESTED_BLOCKSIZE];
    const float a = s + t->offset;
    return a;
}

static inline uint8_t nf4_nibble(const uint8_t *packed, int64_t i) {
    const uint8_t byte = packed[i >> 1];
    return (i & 1) ? (uint8_t)(byte & 0x0f) : (uint8_t)(byte >> 4);
}

void nf4_dequantize_rows_f32_ref(const nf4_tensor *t, int64_t row0, int64_t nrows, float *dst) {
    const int64_t e0 = row0 * t->cols, e1 = e0 + nrows * t->cols;
    for (int64_t i = e0; i < e1; i++) {
        const float a = nf4_block_absmax(t, i / t->blocksize);
        dst[i - e0] = nf4_code[nf4_nibble(t->packed, i)] * a;
    }
}

void nf4_dequantize_rows_bf16_ref(const nf4_tensor *t, int64_t row0, int64_t nrows, uint16_t *dst) {
    const int64_t e0 = row0 * t->cols, e1 = e0 + nrows * t->cols;
    for (int64_t i = e0; i < e1; i++) {
        const float a = nf4_block_absmax(t, i / t->blocksize);
        const float v = nf4_code[nf4_nibble(t->packed, i)] * a;
        dst[i - e0] = f32_to_bf16(v);
    }
}

#ifdef NF4_USE_AVX512
/* 16 fp32 -> bf16 (in the low half of each u32 lane), exactly as f32_to_bf16. */
static inline __m512i nf4_avx512_bf16_rne(__m512 v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i hi = _mm512_srli_epi32(u, 16);
    const __m512i lsb = _mm512_and_si512(hi, _mm512_set1_epi32(1));
    const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                                  _mm512_set1_epi32(0x7f800000));
    return _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(hi, _mm512_set1_epi32(0x40)));
}

/* A whole block: nbytes (a multiple of 16) packed bytes -> 2*nbytes values. */
static void nf4_block_f32_avx512(const uint8_t *p, int64_t nbytes, float a, float *out) {
    const __m512 tv = _mm512_mul_ps(_mm512_loadu_ps(nf4_code), _mm512_set1_ps(a));
    const __m128i m4 = _mm_set1_epi8(0x0f);
    for (int64_t i = 0; i < nbytes; i += 16) {
        const __m128i v = _mm_loadu_si128((const __m128i *)(p + i));
        const __m128i hi = _mm_and_si128(_mm_srli_epi16(v, 4), m4);
        const __m128i lo = _mm_and_si128(v, m4);
        const __m128i i0 = _mm_unpacklo_epi8(hi, lo); /* elements 2i .. 2i+15 */
        const __m128i i1 = _mm_unpackhi_epi8(hi, lo); /* elements 2i+16 .. 2i+31 */
        _mm512_storeu_ps(out + 2 * i, _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(i0), tv));
        _mm512_storeu_ps(out + 2 * i + 16, _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(i1), tv));
    }
}

static void nf4_block_bf16_avx512(const uint8_t *p, int64_t nbytes, float a, uint16_t *out) {
    const __m512 tv = _mm512_mul_ps(_mm512_loadu_ps(nf4_code), _mm512_set1_ps(a));
    const __m512i tb = _mm512_zextsi256_si512(_mm512_cvtepi32_epi16(nf4_avx512_bf16_rne(tv)));
    const __m128i m4 = _mm_set1_epi8(0x0f);
    for (int64_t i = 0; i < nbytes; i += 16) {
        const __m128i v = _mm_loadu_si128((const __m128i *)(p + i));
        const __m128i hi = _mm_and_si128(_mm_srli_epi16(v, 4), m4);
        const __m128i lo = _mm_and_si128(v, m4);
        const __m256i idx8 = _mm256_set_m128i(_mm_unpackhi_epi8(hi, lo), _mm_unpacklo_epi8(hi, lo));
        _mm512_storeu_si512((void *)(out + 2 * i), _mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(idx8), tb));
    }
}

#else
/* Portable whole-block kernels: a 16-entry table per block, two lookups per byte. */
static void nf4_block_f32_plain(const uint8_t *p, int64_t nbytes, float a, float *out) {
    float tbl[16];
    for (int k = 0; k < 16; k++) tbl[k] = nf4_code[k] * a;
    for (int64_t i = 0; i < nbytes; i++) {
        out[2 * i] = tbl[p[i] >> 4];
        out[2 * i + 1] = tbl[p[i] & 0x0f];
    }
}

static void nf4_block_bf16_plain(const uint8_t *p, int64_t nbytes, float a, uint16_t *out) {
    uint16_t tbl[16];
    for (int k = 0; k < 16; k++) tbl[k] = f32_to_bf16(nf4_code[k] * a);
    for (int64_t i = 0; i < nbytes; i++) {
        out[2 * i] = tbl[p[i] >> 4];
        out[2 * i + 1] = tbl[p[i] & 0x0f];
    }
}
#endif

/* Elements [e0, e1) of W into dst (f32 when bf16 == 0, else bf16): parallel
 * over the blocks the range touches; whole blocks take the SIMD kernel, the
 * partial blocks at the ends (rows not aligned to blocks) go one by one. */
static void nf4_dequant_range(const nf4_tensor *t, int64_t e0, int64_t e1, void *dst, int out_bf16) {
    if (e1 <= e0) return;
    const int64_t bs = t->blocksize;
    const int64_t b0 = e0 / bs, b1 = (e1 + bs - 1) / bs;
#pragma omp parallel for schedule(static) if (b1 - b0 >= 32)
    for (int64_t b = b0; b < b1; b++) {
        const int64_t lo = b * bs > e0 ? b * bs : e0;
        const int64_t hi = (b + 1) * bs < e1 ? (b + 1) * bs : e1;
        const float a = nf4_block_absmax(t, b);
        if (lo == b * bs && hi == (b + 1) * bs) {
            const uint8_t *p = t->packed + lo / 2;
            if (out_bf16) {
                uint16_t *o = (uint16_t *)dst + (lo - e0);
#ifdef NF4_USE_AVX512
                nf4_block_bf16_avx512(p, bs / 2, a, o);
#else
                nf4_block_bf16_plain(p, bs / 2, a, o);
#endif
            } else {
                float *o = (float *)dst + (lo - e0);
#ifdef NF4_USE_AVX512
                nf4_block_f32_avx512(p, bs / 2, a, o);
#else
                nf4_block_f32_plain(p, bs / 2, a, o);
#endif
            }
        } else {
            for (int64_t i = lo; i < hi; i++) {
                const float v = nf4_code[nf4_nibble(t->packed, i)] * a;
                if (out_bf16)
                    ((uint16_t *)dst)[i - e0] = f32_to_bf16(v);
                else
                    ((float *)dst)[i - e0] = v;
            }
        }
    }
}

/* Wᵀ in tiles of NF4_T_ROWS rows × NF4_T_COLS columns of W (4 KiB of bf16, in L1): each tile row decoded
 * with the block kernel (a 64-column segment of a row lies in one quantization block when blocksize and cols
 * are multiples of 64; otherwise element by element), then written as NF4_T_COLS rows of Wᵀ of NF4_T_ROWS
 * values (64 bytes). Each element gets exactly the value of the rows kernels. */
enum { NF4_T_ROWS = 32, NF4_T_COLS = 64, NF4_T_SPAN = 512 };

void nf4_dequantize_t_bf16(const nf4_tensor *t, uint16_t *dst) {
    const int64_t R = t->rows, C = t->cols, bs = t->blocksize;
    /* tasks: a 64-column chunk of W (64 rows of Wᵀ) × a range of NF4_T_SPAN rows of W, in that order, so a
     * thread's writes run along rows of Wᵀ (1 KiB per row and task) instead of touching a new page per 64 bytes */
    const int64_t nci = (C + NF4_T_COLS - 1) / NF4_T_COLS, nro = (R + NF4_T_SPAN - 1) / NF4_T_SPAN;
    const int whole = bs % NF4_T_COLS == 0 && C % NF4_T_COLS == 0;
    /* a Wᵀ larger than the caches (16 MiB: the 7-8B projections) is written with streaming stores, which skip
     * the read for ownership of lines the GEMM reads from memory anyway (Llama-3-8B's 14336 × 4096: 23 -> 14 ms);
     * a small one stays in cache for the product that follows */
    const int nt = R % NF4_T_ROWS == 0 && ((uintptr_t)dst & 63) == 0 && R * C * 2 > ((int64_t)16 << 20);
#pragma omp parallel for schedule(static) if (nci * nro > 1)
    for (int64_t task = 0; task < nci * nro; task++) {
        uint16_t tile[NF4_T_ROWS * NF4_T_COLS] __attribute__((aligned(64)));
        const int64_t i0 = task / nro * NF4_T_COLS, r0 = task % nro * NF4_T_SPAN;
        const int64_t r1 = r0 + NF4_T_SPAN < R ? r0 + NF4_T_SPAN : R;
        const int nc = (int)(C - i0 < NF4_T_COLS ? C - i0 : NF4_T_COLS);
        for (int64_t o0 = r0; o0 < r1; o0 += NF4_T_ROWS) {
            const int nr = (int)(r1 - o0 < NF4_T_ROWS ? r1 - o0 : NF4_T_ROWS);
            for (int r = 0; r < nr; r++) {
                const int64_t e = (o0 + r) * C + i0;
                uint16_t *tr = tile + r * NF4_T_COLS;
#ifdef NF4_USE_AVX512
                if (whole) {
                    nf4_block_bf16_avx512(t->packed + e / 2, NF4_T_COLS / 2, nf4_block_absmax(t, e / bs), tr);
                    continue;
                }
#else
                (void)whole;
#endif
                for (int k = 0; k < nc; k++)
                    tr[k] = f32_to_bf16(nf4_code[nf4_nibble(t->packed, e + k)] * nf4_block_absmax(t, (e + k) / bs));
            }
            bf16_transpose_rows(tile, NF4_T_COLS, nr, nc, dst + i0 * R + o0, R, nt);
        }
#ifdef NF4_USE_AVX512
        if (nt) _mm_sfence(); /* the streaming stores visible before the GEMM's threads read them */
#endif
    }
}

void nf4_dequantize_t_bf16_ref(const nf4_tensor *t, uint16_t *dst) {
    for (int64_t o = 0; o < t->rows; o++)
        for (int64_t i = 0; i < t->cols; i++) {
            const int64_t e = o * t->cols + i;
            dst[i * t->rows + o] = f32_to_bf16(nf4_code[nf4_nibble(t->packed, e)] * nf4_block_absmax(t, e / t->blocksize));
        }
}

void nf4_dequantize_rows_f32(const nf4_tensor *t, int64_t row0, int64_t nrows, float *dst) {
    nf4_dequant_range(t, row0 * t->cols, (row0 + nrows) * t->cols, dst, 0);
}

void nf4_dequantize_rows_bf16(const nf4_tensor *t, int64_t row0, int64_t nrows, uint16_t *dst) {
    nf4_dequant_range(t, row0 * t->cols, (row0 + nrows) * t->cols, dst, 1);
}
