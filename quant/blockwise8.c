/* quant/blockwise8.c — bitsandbytes' 8-bit blockwise quantization (see blockwise8.h).
 *
 * No -ffast-math anywhere near this file: the rounding is the specification. GCC with -std=c11
 * does not contract a*b+c into an FMA; where torch's kernel does contract (linspace), fmaf says so.
 */
#include "quant/blockwise8.h"

#include <float.h>
#include <math.h>
#include <string.h>

void bw8_dynamic_map(int is_signed, float out[256]) {
    /* create_dynamic_map(signed, max_exponent_bits=7, total_bits=8): non_sign_bits = 7,
     * additional_items = 2^(7-7) - 1 = 0; for i in 0..6:
     *   fraction_items = 2^i + 1 (signed) or 2^(i+1) + 1 (unsigned)
     *   boundaries = torch.linspace(0.1, 1, fraction_items)  (fp32)
     *   means = (boundaries[:-1] + boundaries[1:]) / 2.0
     *   data += 10^(i-6) * means  (and, signed, -(10^(i-6)) * means)
     * then 0 and 1.0; sorted ascending. 254 + 2 = 256 values either way. */
    float data[256];
    int n = 0;
    for (int i = 0; i < 7; i++) {
        const int steps = (1 << (is_signed ? i : i + 1)) + 1;
        const float start = 0.1f, end = 1.0f;
        const float step = (end - start) / (float)(steps - 1);
        const int halfway = steps / 2;
        float b[129];
        /* RangeFactoriesKernel.cpp linspace_kernel, with the FMA torch's AVX2/AVX-512 builds make
         * of `start + step*i` (without it 21 entries of the signed map differ by one ulp from a
         * published dump and from bitsandbytes' own map, tests/test_adamw8bit.c) */
        for (int j = 0; j < steps; j++)
            b[j] = j < halfway ? fmaf(step, (float)j, start) : fmaf(-step, (float)(steps - j - 1), end);
        const float scale = (float)pow(10.0, (double)(i - 6));
        for (int j = 0; j < steps - 1; j++) {
            float m = b[j] + b[j + 1];
            m = m / 2.0f;
            const float v = scale * m;
            data[n++] = v;
            if (is_signed) data[n++] = -v;
        }
    }
    data[n++] = 0.0f;
    data[n++] = 1.0f;
    for (int i = 1; i < 256; i++) { /* insertion sort, ascending */
        float v = data[i];
        int j = i - 1;
        while (j >= 0 && data[j] > v) {
            data[j + 1] = data[j];
            j--;
        }
        data[j + 1] = v;
    }
    memcpy(out, data, sizeof data);
}

void bw8_build_lut(const float code[256], uint8_t *lut) {
    float mid[255];
    for (int k = 0; k < 255; k++) {
        const float sum = code[k] + code[k + 1];
        mid[k] = 0.5f * sum;
    }
    int k = 0;
    for (int i = 0; i < BW8_LUT_SIZE; i++) {
        const float frac = (2.0f * (float)i) / (float)(BW8_LUT_SIZE - 1);
        const float val = -1.0f + frac;
        while (k < 255 && mid[k] < val) k++;
        lut[i] = (uint8_t)k;
    }
}

void bw8_quantize_block(const float *x, int64_t n, const uint8_t *lut, uint8_t *q, float *absmax) {
    float amax = -FLT_MAX;
    for (int64_t i = 0; i < n; i++) amax = fmaxf(amax, fabsf(x[i]));
    *absmax = amax;
    if (amax == 0.0f) {
        memset(q, 0, (size_t)n);
        return;
    }
    const float inv = 1.0f / amax;
    for (int64_t i = 0; i < n; i++) q[i] = bw8_index(lut, x[i], inv);
}
