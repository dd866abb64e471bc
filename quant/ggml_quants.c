/* quant/ggml_quants.c — ggml block dequantizers and reference quantizers.
 *
 * Sources: ggml/src/ggml-common.h (block layouts), ggml/src/ggml-quants.c
 * (dequantize_row_q4_0/q4_1/q8_0/q4_K/q6_K, quantize_row_q4_0/q4_1/q8_0_ref,
 * get_scale_min_k4), ggml/src/ggml.c (type_traits sizes). Checked bit for bit
 * against gguf-py's gguf/quants.py by tests/test_gguf.c.
 *
 * Floating-point contraction is switched off below: fusing x*id + 0.5f into an
 * FMA changes which integer the quantizers truncate to, so their bytes would no
 * longer match ggml / gguf-py. (The dequantizers would survive it: every
 * product there is exact in fp32 — f16 scale × 6/8-bit ints — except Q6_K's
 * last multiply, which has no add to fuse with.)
 */
#include "quant/ggml_quants.h"

#include <assert.h>
#include <float.h>
#include <math.h>
#include <string.h>

#include "core/bf16.h"

#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

typedef struct type_row {
    const char *name;
    uint32_t blck, type_size;
} type_row;

/* Indexed by type number; name NULL = removed / unknown. Q8_1 is left out on
 * purpose: ggml (36 B) and gguf-py (40 B) disagree on its size and it never
 * appears in model files. */
static const type_row TYPES[] = {
    [0] = {"F32", 1, 4},          [1] = {"F16", 1, 2},
    [2] = {"Q4_0", 32, 18},       [3] = {"Q4_1", 32, 20},
    [6] = {"Q5_0", 32, 22},       [7] = {"Q5_1", 32, 24},
    [8] = {"Q8_0", 32, 34},       [10] = {"Q2_K", 256, 84},
    [11] = {"Q3_K", 256, 110},    [12] = {"Q4_K", 256, 144},
    [13] = {"Q5_K", 256, 176},    [14] = {"Q6_K", 256, 210},
    [15] = {"Q8_K", 256, 292},    [16] = {"IQ2_XXS", 256, 66},
    [17] = {"IQ2_XS", 256, 74},   [18] = {"IQ3_XXS", 256, 98},
    [19] = {"IQ1_S", 256, 50},    [20] = {"IQ4_NL", 32, 18},
    [21] = {"IQ3_S", 256, 110},   [22] = {"IQ2_S", 256, 82},
    [23] = {"IQ4_XS", 256, 136},  [24] = {"I8", 1, 1},
    [25] = {"I16", 1, 2},         [26] = {"I32", 1, 4},
    [27] = {"I64", 1, 8},         [28] = {"F64", 1, 8},
    [29] = {"IQ1_M", 256, 56},    [30] = {"BF16", 1, 2},
    [34] = {"TQ1_0", 256, 54},    [35] = {"TQ2_0", 256, 66},
    [39] = {"MXFP4", 32, 17},
};
#define N_TYPES (sizeof TYPES / sizeof TYPES[0])

int ggml_type_info(uint32_t type, uint32_t *blck, uint32_t *type_size) {
    if (type >= N_TYPES || !TYPES[type].name) return -1;
    if (blck) *blck = TYPES[type].blck;
    if (type_size) *type_size = TYPES[type].type_size;
    return 0;
}

const char *ggml_type_name(uint32_t type) {
    if (type >= N_TYPES || !TYPES[type].name) return "unknown";
    return TYPES[type].name;
}

int ggml_type_can_dequantize(uint32_t type) {
    switch (type) {
    case GGML_TYPE_F32: case GGML_TYPE_F16: case GGML_TYPE_BF16: case GGML_TYPE_Q8_0:
    case GGML_TYPE_Q4_0: case GGML_TYPE_Q4_1: case GGML_TYPE_Q4_K: case GGML_TYPE_Q6_K:
    case GGML_TYPE_Q5_0: case GGML_TYPE_Q5_1: case GGML_TYPE_Q5_K:
        return 1;
    default:
        return 0;
    }
}

/* Little-endian loads/stores that work at any alignment and host byte order. */
static inline uint16_t ld_u16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }
static inline float ld_f16(const uint8_t *p) { return f16_to_f32(ld_u16(p)); }
static inline void st_u16(uint8_t *p, uint16_t v) {
    p[0] = (uint8_t)(v & 0xff);
    p[1] = (uint8_t)(v >> 8);
}

void ggml_dequantize_row_f32(const void *src, float *dst, int64_t k) {
    const uint8_t *s = src;
    for (int64_t i = 0; i < k; i++) {
        uint32_t u = (uint32_t)s[4 * i] | (uint32_t)s[4 * i + 1] << 8 | (uint32_t)s[4 * i + 2] << 16 |
                     (uint32_t)s[4 * i + 3] << 24;
        memcpy(&dst[i], &u, 4);
    }
}

void ggml_dequantize_row_f16(const void *src, float *dst, int64_t k) {
    const uint8_t *s = src;
    for (int64_t i = 0; i < k; i++) dst[i] = ld_f16(s + 2 * i);
}

void ggml_dequantize_row_bf16(const void *src, float *dst, int64_t k) {
    const uint8_t *s = src;
    for (int64_t i = 0; i < k; i++) dst[i] = bf16_to_f32(ld_u16(s + 2 * i));
}

/* block_q8_0: f16 d; int8 qs[32]. */
void ggml_dequantize_row_q8_0(const void *src, float *dst, int64_t k) {
    assert(k % 32 == 0);
    const uint8_t *b = src;
    for (int64_t i = 0; i < k / 32; i++, b += 34, dst += 32) {
        const float d = ld_f16(b);
        const int8_t *qs = (const int8_t *)(b + 2);
        for (int j = 0; j < 32; j++) dst[j] = (float)qs[j] * d;
    }
}

/* block_q4_0: f16 d; u8 qs[16]; element j is the low nibble of qs[j], element
 * j+16 the high nibble. */
void ggml_dequantize_row_q4_0(const void *src, float *dst, int64_t k) {
    assert(k % 32 == 0);
    const uint8_t *b = src;
    for (int64_t i = 0; i < k / 32; i++, b += 18, dst += 32) {
        const float d = ld_f16(b);
        const uint8_t *qs = b + 2;
        for (int j = 0; j < 16; j++) {
            dst[j] = (float)((qs[j] & 0x0F) - 8) * d;
            dst[j + 16] = (float)((qs[j] >> 4) - 8) * d;
        }
    }
}

/* block_q4_1: f16 d; f16 m; u8 qs[16]; nibble order as Q4_0. */
void ggml_dequantize_row_q4_1(const void *src, float *dst, int64_t k) {
    assert(k % 32 == 0);
    const uint8_t *b = src;
    for (int64_t i = 0; i < k / 32; i++, b += 20, dst += 32) {
        const float d = ld_f16(b), m = ld_f16(b + 2);
        const uint8_t *qs = b + 4;
        for (int j = 0; j < 16; j++) {
            dst[j] = (float)(qs[j] & 0x0F) * d + m;
            dst[j + 16] = (float)(qs[j] >> 4) * d + m;
        }
    }
}

/* block_q5_0: f16 d; u8 qh[4] (the fifth bits, little-endian u32: bit j of element j, bit j+16 of element
 * j+16); u8 qs[16] (low nibbles as Q4_0). x = d·(q − 16). */
void ggml_dequantize_row_q5_0(const void *src, float *dst, int64_t k) {
    assert(k % 32 == 0);
    const uint8_t *b = src;
    for (int64_t i = 0; i < k / 32; i++, b += 22, dst += 32) {
        const float d = ld_f16(b);
        const uint32_t qh = (uint32_t)b[2] | (uint32_t)b[3] << 8 | (uint32_t)b[4] << 16 | (uint32_t)b[5] << 24;
        const uint8_t *qs = b + 6;
        for (int j = 0; j < 16; j++) {
            const int x0 = (int)((qs[j] & 0x0F) | (((qh >> j) << 4) & 0x10)) - 16;
            const int x1 = (int)((qs[j] >> 4) | ((qh >> (j + 12)) & 0x10)) - 16;
            dst[j] = (float)x0 * d;
            dst[j + 16] = (float)x1 * d;
        }
    }
}

/* block_q5_1: f16 d; f16 m; u8 qh[4]; u8 qs[16]; bits as Q5_0. x = d·q + m. */
void ggml_dequantize_row_q5_1(const void *src, float *dst, int64_t k) {
    assert(k % 32 == 0);
    const uint8_t *b = src;
    for (int64_t i = 0; i < k / 32; i++, b += 24, dst += 32) {
        const float d = ld_f16(b), m = ld_f16(b + 2);
        const uint32_t qh = (uint32_t)b[4] | (uint32_t)b[5] << 8 | (uint32_t)b[6] << 16 | (uint32_t)b[7] << 24;
        const uint8_t *qs = b + 8;
        for (int j = 0; j < 16; j++) {
            const int x0 = (int)((qs[j] & 0x0F) | (((qh >> j) << 4) & 0x10));
            const int x1 = (int)((qs[j] >> 4) | ((qh >> (j + 12)) & 0x10));
            dst[j] = (float)x0 * d + m;
            dst[j + 16] = (float)x1 * d + m;
        }
    }
}

/* ggml-quants.c get_scale_min_k4: 8 six-bit (scale, min) pairs packed in 12
 * bytes. j<4: low 6 bits of s[j] / s[j+4]; j>=4: low / high nibble of s[j+4]
 * with the top two bits taken from s[j-4] / s[j]. */
static inline void q4k_scale_min(int j, const uint8_t *s, uint8_t *sc, uint8_t *mn) {
    if (j < 4) {
        *sc = s[j] & 63;
        *mn = s[j + 4] & 63;
    } else {
        *sc = (uint8_t)((s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4));
        *mn = (uint8_t)((s[j + 4] >> 4) | ((s[j] >> 6) << 4));
    }
}

/* block_q4_K: f16 d; f16 dmin; u8 scales[12]; u8 qs[128]. Each 64-element
 * chunk c reads qs[32c .. 32c+31]: low nibbles are sub-block 2c, high nibbles
 * sub-block 2c+1. */
void ggml_dequantize_row_q4_k(const void *src, float *dst, int64_t k) {
    assert(k % GGML_QK_K == 0);
    const uint8_t *b = src;
    for (int64_t i = 0; i < k / GGML_QK_K; i++, b += 144) {
        const float d = ld_f16(b), dmin = ld_f16(b + 2);
        const uint8_t *scales = b + 4, *q = b + 16;
        for (int c = 0; c < 4; c++, q += 32) {
            uint8_t sc, mn;
            q4k_scale_min(2 * c, scales, &sc, &mn);
            const float d1 = d * (float)sc, m1 = dmin * (float)mn;
            q4k_scale_min(2 * c + 1, scales, &sc, &mn);
            const float d2 = d * (float)sc, m2 = dmin * (float)mn;
            for (int l = 0; l < 32; l++) *dst++ = d1 * (float)(q[l] & 0x0F) - m1;
            for (int l = 0; l < 32; l++) *dst++ = d2 * (float)(q[l] >> 4) - m2;
        }
    }
}

/* block_q5_K: f16 d; f16 dmin; u8 scales[12] (as Q4_K); u8 qh[32]; u8 qs[128]. Chunk c (64 elements) reads
 * qs[32c .. 32c+31] as Q4_K and adds 16 from bit 2c (sub-block 2c) or 2c+1 (sub-block 2c+1) of qh[l]. */
void ggml_dequantize_row_q5_k(const void *src, float *dst, int64_t k) {
    assert(k % GGML_QK_K == 0);
    const uint8_t *b = src;
    for (int64_t i = 0; i < k / GGML_QK_K; i++, b += 176) {
        const float d = ld_f16(b), dmin = ld_f16(b + 2);
        const uint8_t *scales = b + 4, *qh = b + 16, *q = b + 48;
        uint8_t u1 = 1, u2 = 2;
        for (int c = 0; c < 4; c++, q += 32, u1 = (uint8_t)(u1 << 2), u2 = (uint8_t)(u2 << 2)) {
            uint8_t sc, mn;
            q4k_scale_min(2 * c, scales, &sc, &mn);
            const float d1 = d * (float)sc, m1 = dmin * (float)mn;
            q4k_scale_min(2 * c + 1, scales, &sc, &mn);
            const float d2 = d * (float)sc, m2 = dmin * (float)mn;
            for (int l = 0; l < 32; l++) *dst++ = d1 * (float)((q[l] & 0x0F) + (qh[l] & u1 ? 16 : 0)) - m1;
            for (int l = 0; l < 32; l++) *dst++ = d2 * (float)((q[l] >> 4) + (qh[l] & u2 ? 16 : 0)) - m2;
        }
    }
}

/* block_q6_K: u8 ql[128] (low 4 bits); u8 qh[64] (high 2 bits); int8
 * scales[16] (one per 16 elements); f16 d. Each half of 128 elements uses 64
 * ql bytes, 32 qh bytes and 8 scales; element l + 32·t (t = 0..3, l < 32) takes
 * the low (t even) or high (t odd) nibble of ql[l + 32·(t&1)] and bits 2t..2t+1
 * of qh[l], with scale sc[l/16 + 2t]. */
void ggml_dequantize_row_q6_k(const void *src, float *dst, int64_t k) {
    assert(k % GGML_QK_K == 0);
    const uint8_t *b = src;
    for (int64_t i = 0; i < k / GGML_QK_K; i++, b += 210) {
        const float d = ld_f16(b + 208);
        const uint8_t *ql = b, *qh = b + 128;
        const int8_t *sc = (const int8_t *)(b + 192);
        for (int n = 0; n < GGML_QK_K; n += 128, ql += 64, qh += 32, sc += 8, dst += 128) {
            for (int l = 0; l < 32; l++) {
                const int is = l / 16;
                const int q1 = ((ql[l] & 0x0F) | (((qh[l] >> 0) & 3) << 4)) - 32;
                const int q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) - 32;
                const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                dst[l + 0] = d * (float)sc[is + 0] * (float)q1;
                dst[l + 32] = d * (float)sc[is + 2] * (float)q2;
                dst[l + 64] = d * (float)sc[is + 4] * (float)q3;
                dst[l + 96] = d * (float)sc[is + 6] * (float)q4;
            }
        }
    }
}

int ggml_dequantize_row(uint32_t type, const void *src, float *dst, int64_t k) {
    uint32_t blck;
    if (!ggml_type_can_dequantize(type) || ggml_type_info(type, &blck, NULL) != 0) return -1;
    if (k < 0 || k % blck != 0) return -1;
    switch (type) {
    case GGML_TYPE_F32: ggml_dequantize_row_f32(src, dst, k); break;
    case GGML_TYPE_F16: ggml_dequantize_row_f16(src, dst, k); break;
    case GGML_TYPE_BF16: ggml_dequantize_row_bf16(src, dst, k); break;
    case GGML_TYPE_Q8_0: ggml_dequantize_row_q8_0(src, dst, k); break;
    case GGML_TYPE_Q4_0: ggml_dequantize_row_q4_0(src, dst, k); break;
    case GGML_TYPE_Q4_1: ggml_dequantize_row_q4_1(src, dst, k); break;
    case GGML_TYPE_Q4_K: ggml_dequantize_row_q4_k(src, dst, k); break;
    case GGML_TYPE_Q6_K: ggml_dequantize_row_q6_k(src, dst, k); break;
    case GGML_TYPE_Q5_0: ggml_dequantize_row_q5_0(src, dst, k); break;
    case GGML_TYPE_Q5_1: ggml_dequantize_row_q5_1(src, dst, k); break;
    case GGML_TYPE_Q5_K: ggml_dequantize_row_q5_k(src, dst, k); break;
    default: return -1;
    }
    return 0;
}

/* ---- reference quantizers (ggml-quants.c quantize_row_*_ref) ---- */

void ggml_quantize_row_q8_0_ref(const float *src, void *dst, int64_t k) {
    assert(k % 32 == 0);
    uint8_t *b = dst;
    for (int64_t i = 0; i < k / 32; i++, b += 34, src += 32) {
        float amax = 0.0f;
        for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(src[j]));
        const float d = amax / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        st_u16(b, f32_to_f16(d));
        for (int j = 0; j < 32; j++) b[2 + j] = (uint8_t)(int8_t)roundf(src[j] * id);
    }
}

void ggml_quantize_row_q4_0_ref(const float *src, void *dst, int64_t k) {
    assert(k % 32 == 0);
    uint8_t *b = dst;
    for (int64_t i = 0; i < k / 32; i++, b += 18, src += 32) {
        float amax = 0.0f, max = 0.0f; /* max: the signed value of largest magnitude, first wins */
        for (int j = 0; j < 32; j++) {
            if (amax < fabsf(src[j])) {
                amax = fabsf(src[j]);
                max = src[j];
            }
        }
        const float d = max / -8.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        st_u16(b, f32_to_f16(d));
        for (int j = 0; j < 16; j++) {
            const int q0 = (int)(src[j] * id + 8.5f), q1 = (int)(src[j + 16] * id + 8.5f);
            b[2 + j] = (uint8_t)((q0 < 15 ? q0 : 15) | ((q1 < 15 ? q1 : 15) << 4));
        }
    }
}

void ggml_quantize_row_q4_1_ref(const float *src, void *dst, int64_t k) {
    assert(k % 32 == 0);
    uint8_t *b = dst;
    for (int64_t i = 0; i < k / 32; i++, b += 20, src += 32) {
        float min = FLT_MAX, max = -FLT_MAX;
        for (int j = 0; j < 32; j++) {
            if (src[j] < min) min = src[j];
            if (src[j] > max) max = src[j];
        }
        const float d = (max - min) / 15.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        st_u16(b, f32_to_f16(d));
        st_u16(b + 2, f32_to_f16(min));
        for (int j = 0; j < 16; j++) {
            const int q0 = (int)((src[j] - min) * id + 0.5f), q1 = (int)((src[j + 16] - min) * id + 0.5f);
            b[4 + j] = (uint8_t)((q0 < 15 ? q0 : 15) | ((q1 < 15 ? q1 : 15) << 4));
        }
    }
}
