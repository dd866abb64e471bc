/* core/transpose.c — see transpose.h. */
#include "core/transpose.h"

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#endif

void bf16_transpose_rows(const uint16_t *src, int64_t lds, int nr, int64_t nc, uint16_t *dst, int64_t ldd,
                         int streaming) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
    if (nr == 32 && lds % 2 == 0 && nc % 2 == 0 && lds / 2 * 16 < INT32_MAX) {
        const __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                               _mm512_set1_epi32((int)(lds / 2)));
        const int *lo = (const int *)src, *hi = (const int *)(src + 16 * lds);
        for (int64_t i = 0; i < nc; i += 2) {
            const __m512i a = _mm512_i32gather_epi32(idx, lo + i / 2, 4), b = _mm512_i32gather_epi32(idx, hi + i / 2, 4);
            const __m512i c0 = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi32_epi16(a)),
                                                  _mm512_cvtepi32_epi16(b), 1);
            const __m512i c1 = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi32_epi16(_mm512_srli_epi32(a, 16))),
                                                  _mm512_cvtepi32_epi16(_mm512_srli_epi32(b, 16)), 1);
            if (streaming) {
                _mm512_stream_si512((void *)(dst + i * ldd), c0);
                _mm512_stream_si512((void *)(dst + (i + 1) * ldd), c1);
            } else {
                _mm512_storeu_si512((void *)(dst + i * ldd), c0);
                _mm512_storeu_si512((void *)(dst + (i + 1) * ldd), c1);
            }
        }
        return;
    }
#endif
    (void)streaming;
    for (int64_t i = 0; i < nc; i++)
        for (int r = 0; r < nr; r++) dst[i * ldd + r] = src[(int64_t)r * lds + i];
}
