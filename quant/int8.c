/* quant/int8.c — bitsandbytes' row-wise int8 weights (quant/int8.h).
 *
 * Every rounding below is bitsandbytes 0.50.2's on a machine without a GPU
 * (the "default" kernels of bitsandbytes/_ops.py and backends/default/ops.py,
 * torch's CPU tensor arithmetic around them), checked bit for bit by
 * tests/test_reference_int8.c against fixtures written by the library itself
 * (scripts/make_int8_reference.py).
 *
 * No -ffast-math: the rounding is the specification. Each fp32 product is a
 * separate statement (no FMA contraction with -std=c11).
 */
#include "quant/int8.h"

#include <math.h>
#include <string.h>

#include "core/bf16.h"

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define INT8_USE_AVX512 1
#endif

int int8_quantize_rows(const float *w, int64_t rows, int64_t cols, int8_t *cb, float *scb, qerr *e) {
    if (rows < 1 || cols < 1)
        return qerr_set(e, "int8 quantize: expected rows, cols >= 1, got %lld x %lld", (long long)rows,
                        (long long)cols);
    int64_t bad = -1; /* the first element that is not finite in fp16 */
#pragma omp parallel for schedule(static) if (rows * cols > 65536)
    for (int64_t r = 0; r < rows; r++) {
        const float *wr = w + r * cols;
        int8_t *q = cb + r * cols;
        /* Int8Params._quantize: B = W.to(torch.float16); int8_vectorwise_quant: row_stats = max |A| (.float()) */
        float s = 0.0f;
        int64_t nonfinite = -1;
        for (int64_t j = 0; j < cols; j++) {
            const float a = fabsf(f16_to_f32(f32_to_f16(wr[j])));
            if (!(a <= 65504.0f) && nonfinite < 0) nonfinite = j;
            if (a > s) s = a;
        }
        if (nonfinite >= 0) {
#pragma omp critical(int8_bad)
            if (bad < 0 || r * cols + nonfinite < bad) bad = r * cols + nonfinite;
            continue;
        }
        scb[r] = s;
        /* out_row = torch.round(A * (127.0 / row_stats.unsqueeze(-1))).to(torch.int8). `127.0 / tensor` is
         * Tensor.__rtruediv__, which torch implements as self.reciprocal() * other: two fp32 roundings,
         * fl(fl(1/s) * 127), not the quotient 127/s (they differ in the last bit for some s, and then a
         * product lands on the other side of a .5). The product in fp32 (fp16 * fp32 tensor promotes),
         * round half to even, then the cast. */
        const float rcp = 1.0f / s;
        const float inv = rcp * 127.0f;
        for (int64_t j = 0; j < cols; j++) {
            const float a = f16_to_f32(f32_to_f16(wr[j]));
            const float x = a * inv;
            /* a zero row: 0 * inf = NaN, and torch's NaN -> int8 cast on x86 gives 0 (cvttss2si's
             * 0x80000000, low byte); |x| <= 127 otherwise */
            q[j] = x != x ? 0 : (int8_t)nearbyintf(x);
        }
    }
    if (bad >= 0)
        return qerr_set(e, "int8 quantize: weight [%lld, %lld] = %g is not finite in fp16 (bitsandbytes converts to "
                           "float16 before LLM.int8 quantization; |w| must stay below 65520)",
                        (long long)(bad / cols), (long long)(bad % cols), (double)w[bad]);
    return 0;
}

void int8_dequantize_f32(const int8_t *cb, const float *scb, int64_t rows, int64_t cols, float *dst) {
#pragma omp parallel for schedule(static) if (rows * cols > 65536)
    for (int64_t r = 0; r < rows; r++) {
        const float s = scb[r];
        for (int64_t j = 0; j < cols; j++) {
            const float p = (float)cb[r * cols + j] * s; /* A * stats.view(-1, 1) */
            dst[r * cols + j] = p * INT8_INV127;         /* * 7.874015718698502e-3 (an fp32 scalar) */
        }
    }
}

void int8_dequantize_rows_f32_ref(const int8_t *cb, const float *scb, int64_t cols, int64_t row0, int64_t nrows,
                                  float *dst) {
    for (int64_t i = 0; i < nrows; i++) {
        const float rs = scb[row0 + i] * INT8_INV127; /* SCB.unsqueeze(1).mul(1.0 / 127.0) */
        const int8_t *q = cb + (row0 + i) * cols;
        for (int64_t j = 0; j < cols; j++) dst[i * cols + j] = (float)q[j] * rs; /* CB.to(dtype).mul_(...) */
    }
}

void int8_dequantize_rows_bf16_ref(const int8_t *cb, const float *scb, int64_t cols, int64_t row0,
                                   int64_t nrows, uint16_t *dst) {
    for (int64_t i = 0; i < nrows; i++) {
        const float rs = scb[row0 + i] * INT8_INV127;
        const int8_t *q = cb + (row0 + i) * cols;
        for (int64_t j = 0; j < cols; j++) dst[i * cols + j] = f32_to_bf16((float)q[j] * rs);
    }
}

#ifdef INT8_USE_AVX512
/* 16 fp32 -> bf16 (in the low half of each u32 lane), exactly as f32_to_bf16. */
static inline __m512i int8_avx512_bf16_rne(__m512 v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i hi = _mm512_srli_epi32(u, 16);
    const __m512i lsb = _mm512_and_si512(hi, _mm512_set1_epi32(1));
    const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                                  _mm512_set1_epi32(0x7f800000));
    return _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(hi, _mm512_set1_epi32(0x40)));
}
#endif

/* One row: cols codes times rs into dst (fp32, or bf16 when out_bf16). */
static void int8_row(const int8_t *q, int64_t cols, float rs, void *dst, int out_bf16) {
    int64_t j = 0;
#ifdef INT8_USE_AVX512
    const __m512 vs = _mm512_set1_ps(rs);
    for (; j + 16 <= cols; j += 16) {
        const __m128i b = _mm_loadu_si128((const __m128i *)(q + j));
        const __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)), vs); /* exact convert, one mul */
        if (out_bf16)
            _mm256_storeu_si256((__m256i *)((uint16_t *)dst + j), _mm512_cvtepi32_epi16(int8_avx512_bf16_rne(v)));
        else
            _mm512_storeu_ps((float *)dst + j, v);
    }
#endif
    for (; j < cols; j++) {
        const float v = (float)q[j] * rs;
        if (out_bf16)
            ((uint16_t *)dst)[j] = f32_to_bf16(v);
        else
            ((float *)dst)[j] = v;
    }
}

static void int8_rows(const int8_t *cb, const float *scb, int64_t cols, int64_t row0, int64_t nrows, void *dst,
                      int out_bf16) {
#pragma omp parallel for schedule(static) if (nrows * cols > 32768)
    for (int64_t i = 0; i < nrows; i++) {
        const float rs = scb[row0 + i] * INT8_INV127;
        void *o = out_bf16 ? (void *)((uint16_t *)dst + i * cols) : (void *)((float *)dst + i * cols);
        int8_row(cb + (row0 + i) * cols, cols, rs, o, out_bf16);
    }
}

void int8_dequantize_rows_f32(const int8_t *cb, const float *scb, int64_t cols, int64_t row0, int64_t nrows,
                              float *dst) {
    int8_rows(cb, scb, cols, row0, nrows, dst, 0);
}

void int8_dequantize_rows_bf16(const int8_t *cb, const float *scb, int64_t cols, int64_t row0, int64_t nrows,
                               uint16_t *dst) {
    int8_rows(cb, scb, cols, row0, nrows, dst, 1);
}
