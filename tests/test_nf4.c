/* tests/test_nf4.c — NF4 quantization: code table, nearest-code rule, nibble
 * order, double quantization, fast dequant == reference, thread independence.
 *
 * The independent oracle here is a literal transcription of bitsandbytes'
 * CPU/default quantize_4bit as of bitsandbytes 0.50.2 (backends/default/ops.py:
 * bounds = fp32 midpoints of the code, absmax, scaled = x * fl(1/max(absmax,
 * 1e-38)) (a division for the partial last block, whose clamped absmax is
 * stored), bucketize (count of bounds < scaled), scaled padded with 0 for an
 * odd count, high nibble first), written without reusing anything from
 * quant/nf4.c but the code table. The library itself is the oracle of
 * tests/test_reference_nf4.c (fixtures from scripts/make_reference.py); the
 * transcription here was updated to it when that test showed where the
 * earlier argmin transcription and bnb 0.50.2 differ (fp32 bounds, the 1e-38
 * clamp, the partial block, the pad nibble, the 8-bit LUT quantizer).
 */
#include <float.h>
#include <math.h>
#include <omp.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "core/bf16.h"
#include "quant/nf4.h"

/* ------------------------------------------------------------ helpers */

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static uint64_t rng_next(void) { /* splitmix64 */
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
static double rng_uniform(void) { return (double)(rng_next() >> 11) * (1.0 / 9007199254740992.0); }
static float rng_normal(void) {
    double u1 = rng_uniform(), u2 = rng_uniform();
    if (u1 < 1e-300) u1 = 1e-300;
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}
static float *random_matrix(int64_t n, float scale) {
    float *w = malloc((size_t)n * sizeof(float));
    for (int64_t i = 0; i < n; i++) w[i] = rng_normal() * scale;
    return w;
}

/* bitsandbytes' argmin(|s - code|): the first minimum wins. */
static uint8_t argmin_code(float s) {
    int best = 0;
    float bd = fabsf(s - nf4_code[0]);
    for (int k = 1; k < 16; k++) {
        float d = fabsf(s - nf4_code[k]);
        if (d < bd) {
            bd = d;
            best = k;
        }
    }
    return (uint8_t)best;
}

/* bnb's torch.bucketize(s, bounds) with bounds = (code[:-1] + code[1:]) / 2
 * in fp32: the number of bounds strictly below s. */
static uint8_t bucketize_code(float s) {
    int c = 0;
    for (int k = 0; k < 15; k++) {
        volatile float sum = nf4_code[k] + nf4_code[k + 1]; /* rounded to fp32 before halving */
        if ((float)(sum / 2.0f) < s) c++;
    }
    return (uint8_t)c;
}

/* Literal bnb quantize_4bit (default backend, bnb 0.50.2) on the flattened
 * tensor: returns packed bytes and fp32 absmax. */
static void bnb_quantize_4bit(const float *a, int64_t n, int bs, uint8_t *packed, float *absmax) {
    int64_t nb = (n + bs - 1) / bs;
    uint8_t *q = calloc((size_t)n + 1, 1);
    for (int64_t b = 0; b < nb; b++) {
        int64_t i0 = b * bs, i1 = i0 + bs < n ? i0 + bs : n;
        int partial = i1 - i0 < bs;
        float m = 0.0f;
        for (int64_t i = i0; i < i1; i++) m = fabsf(a[i]) > m ? fabsf(a[i]) : m;
        float mc = m > 1e-38f ? m : 1e-38f; /* absmax.clamp(min=1e-38) */
        absmax[b] = partial ? mc : m;
        float r = 1.0f / mc;
        for (int64_t i = i0; i < i1; i++) {
            float s = partial ? a[i] / mc : a[i] * r;
            s = s < -1.0f ? -1.0f : (s > 1.0f ? 1.0f : s);
            q[i] = bucketize_code(s);
        }
    }
    if (n & 1) q[n] = 7; /* scaled padded with 0.0 -> index 7 */
    for (int64_t i = 0; i < (n + 1) / 2; i++) packed[i] = (uint8_t)(q[2 * i] << 4 | q[2 * i + 1]);
    free(q);
}

static float max_half_gap_nf4(void) {
    float g = 0.0f;
    for (int k = 0; k < 15; k++) g = fmaxf(g, (nf4_code[k + 1] - nf4_code[k]) / 2.0f);
    return g;
}

static int64_t ngroups_of(const nf4_tensor *t) { return (t->nblocks + 255) / 256; }

/* ------------------------------------------------------------ code table */

static void test_code_table(void **state) {
    (void)state;
    static const double expect[16] = {-1.0,
                                      -0.6961928009986877,
                                      -0.5250730514526367,
                                      -0.39491748809814453,
                                      -0.28444138169288635,
                                      -0.18477343022823334,
                                      -0.09105003625154495,
                                      0.0,
                                      0.07958029955625534,
                                      0.16093020141124725,
                                      0.24611230194568634,
                                      0.33791524171829224,
                                      0.44070982933044434,
                                      0.5626170039176941,
                                      0.7229568362236023,
                                      1.0};
    for (int k = 0; k < 16; k++) {
        assert_true(nf4_code[k] == (float)expect[k]);
        /* the decimals are the exact fp32 values printed as doubles */
        assert_true((double)nf4_code[k] == expect[k]);
        if (k) assert_true(nf4_code[k] > nf4_code[k - 1]);
        assert_int_equal(nf4_code_index(nf4_code[k]), k);
    }
    assert_true(nf4_code[7] == 0.0f);
}

/* ---------------------------------------------------------- midpoint rule */

static void test_midpoint_rule(void **state) {
    (void)state;
    int rounded_up = 0;
    for (int k = 0; k < 15; k++) {
        volatile float sum = nf4_code[k] + nf4_code[k + 1];
        const float b = sum / 2.0f; /* bnb's fp32 bound */
        /* on the bound: LOWER code; one ulp above: upper */
        assert_int_equal(nf4_code_index(b), k);
        assert_int_equal(bucketize_code(b), k);
        assert_int_equal(nf4_code_index(nextafterf(b, INFINITY)), k + 1);
        assert_int_equal(nf4_code_index(nextafterf(b, -INFINITY)), k);
        const double mid = ((double)nf4_code[k] + (double)nf4_code[k + 1]) / 2.0;
        assert_true(fabs((double)b - mid) <= 0.5 * ((double)nextafterf(fabsf(b), INFINITY) - fabs((double)b)));
        if ((double)b > mid) rounded_up++; /* there, the float b is nearer code k+1 but goes to k */
    }
    assert_true(rounded_up >= 1);
    /* the decision-tree constant from bnb's kernels.cu for the 7|8 split */
    assert_int_equal(nf4_code_index(0.03979014977812767f), 7);
    assert_int_equal(nf4_code_index(nextafterf(0.03979014977812767f, 1.0f)), 8);
    assert_int_equal(nf4_code_index(NAN), 0);
    assert_int_equal(nf4_code_index(-1.0f), 0);
    assert_int_equal(nf4_code_index(1.0f), 15);
}

/* The same rule end to end through nf4_quantize: a block whose absmax is 1
 * (so scaled == x exactly) holding every bound and its float neighbours. */
static void test_midpoint_rule_quantizer(void **state) {
    (void)state;
    float w[64] = {0};
    uint8_t expect[64];
    int n = 0;
    w[n] = 1.0f;
    expect[n++] = 15;
    for (int k = 0; k < 15 && n + 3 <= 64; k++) {
        volatile float sum = nf4_code[k] + nf4_code[k + 1];
        const float b = sum / 2.0f;
        w[n] = b;
        expect[n++] = (uint8_t)k;
        w[n] = nextafterf(b, INFINITY);
        expect[n++] = (uint8_t)(k + 1);
        w[n] = nextafterf(b, -INFINITY);
        expect[n++] = (uint8_t)k;
    }
    for (int i = n; i < 64; i++) expect[i] = 7;
    nf4_tensor t;
    qerr e = {{0}};
    assert_int_equal(nf4_quantize(w, 1, 64, 64, 0, &t, &e), 0);
    assert_true(t.absmax[0] == 1.0f);
    for (int i = 0; i < 64; i++) {
        const uint8_t q = (uint8_t)(i & 1 ? t.packed[i / 2] & 0x0f : t.packed[i / 2] >> 4);
        assert_int_equal(q, expect[i]);
        assert_int_equal(q, bucketize_code(w[i]));
    }
    nf4_free(&t);
}

/* Our 15-comparison rule == bnb's bucketize on every float within 4e-6 of
 * every midpoint, and on 1e6 random values; and == the nearest code (argmin)
 * everywhere except the floats between an exact midpoint and a bound that
 * fp32 rounded up past it (at most one float per such bound). */
static void test_index_equals_argmin(void **state) {
    (void)state;
    int64_t checked = 0, not_nearest = 0;
    for (int k = 0; k < 15; k++) {
        double mid = ((double)nf4_code[k] + (double)nf4_code[k + 1]) / 2.0;
        float s = (float)(mid - 4e-6), end = (float)(mid + 4e-6);
        for (; s <= end; s = nextafterf(s, INFINITY), checked++) {
            assert_int_equal(nf4_code_index(s), bucketize_code(s));
            if (nf4_code_index(s) != argmin_code(s)) {
                not_nearest++;
                volatile float sum = nf4_code[k] + nf4_code[k + 1];
                assert_true(s == sum / 2.0f && (double)s > mid); /* exactly the rounded-up bound */
                assert_int_equal(nf4_code_index(s), k);
                assert_int_equal(argmin_code(s), k + 1);
            }
        }
    }
    assert_true(checked > 2000);
    assert_true(not_nearest >= 1 && not_nearest <= 15);
    for (int i = 0; i < 1000000; i++) {
        float s = (float)(2.0 * rng_uniform() - 1.0);
        assert_int_equal(nf4_code_index(s), bucketize_code(s));
    }
}

/* ---------------------------------------------------- nibble order, lengths */

static void test_nibble_order(void **state) {
    (void)state;
    /* absmax 1: 1.0 -> 15, 0 -> 7, -1 -> 0, 0.5 -> 12 (0.5 < (0.4407+0.5626)/2), -0.1 -> 6 */
    const float w[5] = {1.0f, 0.0f, -1.0f, 0.5f, -0.1f};
    nf4_tensor t;
    qerr e = {{0}};
    assert_int_equal(nf4_quantize(w, 1, 5, 32, 0, &t, &e), 0);
    assert_int_equal(t.nblocks, 1);
    assert_true(t.absmax[0] == 1.0f);
    assert_int_equal(t.packed[0], 0xF7);
    assert_int_equal(t.packed[1], 0x0C);
    assert_int_equal(t.packed[2], 0x67); /* odd count: bnb pads the scaled values with 0.0 -> nibble 7 */
    float d[5];
    nf4_dequantize_rows_f32(&t, 0, 1, d);
    assert_true(d[0] == 1.0f && d[1] == 0.0f && d[2] == -1.0f && d[3] == nf4_code[12] && d[4] == nf4_code[6]);
    nf4_free(&t);
}

static void test_matches_bnb_transcription(void **state) {
    (void)state;
    const int64_t shapes[][2] = {{1, 1}, {1, 5}, {3, 7}, {7, 33}, {13, 100}, {64, 64}, {5, 577}, {33, 129}};
    const int bss[] = {32, 64, 128, 256, 4096};
    for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++) {
        for (size_t bi = 0; bi < sizeof bss / sizeof bss[0]; bi++) {
            int64_t r = shapes[si][0], c = shapes[si][1], n = r * c;
            float *w = random_matrix(n, 0.02f);
            int64_t nb = (n + bss[bi] - 1) / bss[bi];
            uint8_t *pk = malloc((size_t)(n + 1) / 2);
            float *am = malloc((size_t)nb * sizeof(float));
            bnb_quantize_4bit(w, n, bss[bi], pk, am);
            nf4_tensor t;
            qerr e = {{0}};
            assert_int_equal(nf4_quantize(w, r, c, bss[bi], 0, &t, &e), 0);
            assert_int_equal(t.nblocks, nb);
            assert_memory_equal(t.packed, pk, (size_t)(n + 1) / 2);
            assert_memory_equal(t.absmax, am, (size_t)nb * sizeof(float));
            nf4_free(&t);
            /* the nibbles do not depend on double quantization (bnb quantizes
             * with the exact absmax, then compresses the absmax) */
            assert_int_equal(nf4_quantize(w, r, c, bss[bi], 1, &t, &e), 0);
            assert_memory_equal(t.packed, pk, (size_t)(n + 1) / 2);
            nf4_free(&t);
            free(w);
            free(pk);
            free(am);
        }
    }
}

static void test_odd_lengths(void **state) {
    (void)state;
    const int64_t shapes[][2] = {{1, 3}, {3, 7}, {11, 13}, {1, 65}};
    for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++) {
        int64_t r = shapes[si][0], c = shapes[si][1], n = r * c;
        float *w = random_matrix(n, 1.0f);
        for (int dq = 0; dq < 2; dq++) {
            nf4_tensor t;
            qerr e = {{0}};
            assert_int_equal(nf4_quantize(w, r, c, 32, dq, &t, &e), 0);
            assert_int_equal(t.packed[(n - 1) / 2] & 0x0f, 7); /* pad nibble: code 0.0 */
            float *d = malloc((size_t)n * sizeof(float));
            nf4_dequantize_rows_f32(&t, 0, r, d);
            for (int64_t i = 0; i < n; i++) {
                float a = nf4_block_absmax(&t, i / 32);
                assert_true(fabsf(d[i] - w[i]) <= max_half_gap_nf4() * a * 1.02f + 1e-6f);
            }
            free(d);
            nf4_free(&t);
        }
        free(w);
    }
}

/* ---------------------------------------------------- degenerate magnitudes */

static void test_all_zero_block(void **state) {
    (void)state;
    const int64_t r = 4, c = 64; /* 4 blocks of 64, block 1 all zero */
    float *w = random_matrix(r * c, 0.05f);
    memset(w + 64, 0, 64 * sizeof(float));
    for (int dq = 0; dq < 2; dq++) {
        nf4_tensor t;
        qerr e = {{0}};
        assert_int_equal(nf4_quantize(w, r, c, 64, dq, &t, &e), 0);
        for (int i = 32; i < 64; i++) assert_int_equal(t.packed[i], 0x77);
        if (!dq) assert_true(t.absmax[1] == 0.0f);
        float d[64];
        uint16_t h[64];
        nf4_dequantize_rows_f32(&t, 1, 1, d);
        nf4_dequantize_rows_bf16(&t, 1, 1, h);
        for (int i = 0; i < 64; i++) {
            assert_true(d[i] == 0.0f && !signbit(d[i]));
            assert_int_equal(h[i], 0);
        }
        /* every row finite */
        float all[256];
        nf4_dequantize_rows_f32(&t, 0, r, all);
        for (int i = 0; i < 256; i++) assert_true(isfinite(all[i]));
        nf4_free(&t);
    }
    /* the whole tensor zero, with double quantization (nested absmax 0) */
    float z[128] = {0};
    nf4_tensor t;
    qerr e = {{0}};
    assert_int_equal(nf4_quantize(z, 2, 64, 64, 1, &t, &e), 0);
    assert_true(t.offset == 0.0f && t.nested_absmax[0] == 0.0f);
    float d[128];
    nf4_dequantize_rows_f32(&t, 0, 2, d);
    for (int i = 0; i < 128; i++) assert_true(d[i] == 0.0f);
    nf4_free(&t);
    free(w);
}

static void check_relative_roundtrip(float scale) {
    const int64_t r = 16, c = 96, n = r * c;
    float *w = random_matrix(n, scale);
    for (int dq = 0; dq < 2; dq++) {
        nf4_tensor t;
        qerr e = {{0}};
        assert_int_equal(nf4_quantize(w, r, c, 64, dq, &t, &e), 0);
        float *d = malloc((size_t)n * sizeof(float));
        nf4_dequantize_rows_f32(&t, 0, r, d);
        for (int64_t i = 0; i < n; i++) {
            float true_amax = 0.0f;
            for (int64_t j = (i / 64) * 64; j < (i / 64 + 1) * 64; j++)
                true_amax = fabsf(w[j]) > true_amax ? fabsf(w[j]) : true_amax;
            const float dq_err = fabsf(nf4_block_absmax(&t, i / 64) - true_amax);
            assert_true(isfinite(d[i]));
            assert_true(fabsf(d[i] - w[i]) <= true_amax * max_half_gap_nf4() * 1.0001f + dq_err);
        }
        free(d);
        nf4_free(&t);
    }
    free(w);
}

static void test_tiny_and_huge(void **state) {
    (void)state;
    check_relative_roundtrip(1e-30f);
    check_relative_roundtrip(1e30f);
    check_relative_roundtrip(1e-36f);
    /* the largest finite magnitude: 1/absmax is subnormal but nonzero */
    float w[64];
    for (int i = 0; i < 64; i++) w[i] = (i & 1 ? 1.0f : -1.0f) * (FLT_MAX * ((float)(i + 1) / 64.0f));
    nf4_tensor t;
    qerr e = {{0}};
    assert_int_equal(nf4_quantize(w, 1, 64, 64, 0, &t, &e), 0);
    assert_true(t.absmax[0] == FLT_MAX);
    assert_int_equal(t.packed[31] & 0x0f, 15); /* the +FLT_MAX element */
    nf4_free(&t);
    /* a subnormal absmax below bnb's clamp: scaled by 1/1e-38, not 1/absmax
     * (bnb: absmax.clamp(min=1e-38)); the stored absmax is the true one */
    for (int i = 0; i < 64; i++) w[i] = (i == 5) ? -1e-39f : (i == 9 ? 5e-40f : 0.0f);
    assert_int_equal(nf4_quantize(w, 1, 64, 64, 0, &t, &e), 0);
    assert_true(t.absmax[0] == 1e-39f);
    assert_int_equal(t.packed[2] & 0x0f, 6);      /* element 5: -0.1 -> code 6 (-0.091) */
    assert_int_equal(t.packed[4] & 0x0f, 8);      /* element 9: 0.05 -> code 8 (0.0796) */
    assert_int_equal(t.packed[0], 0x77);          /* zeros stay at code 0 */
    nf4_free(&t);
}

/* ------------------------------------------------------ error bounds, DQ */

static void test_roundtrip_bound(void **state) {
    (void)state;
    const int64_t r = 96, c = 320, n = r * c; /* 480 blocks of 64 -> 2 nested groups */
    float *w = random_matrix(n, 0.03f);
    for (int i = 0; i < 40; i++) w[rng_next() % n] *= 25.0f; /* outliers widen the absmax spread */
    const float hg = max_half_gap_nf4();
    assert_true(fabsf(hg - 0.15190360f) < 1e-6f); /* the -1 .. -0.696 gap */
    for (int dq = 0; dq < 2; dq++) {
        nf4_tensor t;
        qerr e = {{0}};
        assert_int_equal(nf4_quantize(w, r, c, 64, dq, &t, &e), 0);
        float *d = malloc((size_t)n * sizeof(float));
        nf4_dequantize_rows_f32(&t, 0, r, d);
        for (int64_t b = 0; b < t.nblocks; b++) {
            float true_amax = 0.0f;
            for (int64_t j = b * 64; j < (b + 1) * 64; j++) true_amax = fmaxf(true_amax, fabsf(w[j]));
            const float rec = nf4_block_absmax(&t, b);
            const float dq_err = fabsf(rec - true_amax);
            for (int64_t j = b * 64; j < (b + 1) * 64; j++)
                assert_true(fabsf(w[j] - d[j]) <= true_amax * hg + dq_err + 4.0f * FLT_EPSILON * true_amax);
        }
        free(d);
        nf4_free(&t);
    }
    free(w);
}

static void test_double_quant(void **state) {
    (void)state;
    const int64_t r = 200, c = 640, n = r * c; /* 2000 blocks -> 8 groups, last partial */
    float *w = random_matrix(n, 0.02f);
    for (int i = 0; i < 200; i++) w[rng_next() % n] *= 10.0f;
    nf4_tensor t, t0;
    qerr e = {{0}};
    assert_int_equal(nf4_quantize(w, r, c, 64, 1, &t, &e), 0);
    assert_int_equal(nf4_quantize(w, r, c, 64, 0, &t0, &e), 0);
    assert_true(t.absmax == NULL && t.absmax_q && t.nested_absmax);
    assert_int_equal(ngroups_of(&t), 8);

    float map[256];
    nf4_dynamic_map(map); /* bnb 0.50.2 keeps code[0] = -0.99296875 */
    assert_memory_equal(t.nested_code, map, sizeof map);

    /* offset: the mean of the fp32 absmax (our cascade order vs a double sum) */
    double mean = 0.0;
    for (int64_t b = 0; b < t0.nblocks; b++) mean += t0.absmax[b];
    mean /= (double)t0.nblocks;
    assert_true(fabs(t.offset - mean) <= 1e-5 * mean);

    for (int64_t g = 0; g < ngroups_of(&t); g++) {
        float amax = 0.0f;
        for (int64_t b = g * 256; b < (g + 1) * 256 && b < t.nblocks; b++)
            amax = fmaxf(amax, fabsf(t0.absmax[b] - t.offset));
        assert_true(t.nested_absmax[g] == amax);
    }
    double rel_sum = 0.0;
    for (int64_t b = 0; b < t.nblocks; b++) {
        const uint8_t q = t.absmax_q[b];
        const float nested = t.nested_absmax[b / 256];
        /* recovery is fl(fl(code*nested) + offset): emulate with doubles */
        const float prod = (float)((double)map[q] * (double)nested);
        const float rec = (float)((double)prod + (double)t.offset);
        assert_true(nf4_block_absmax(&t, b) == rec);
        /* within half the local gap of the dynamic map plus one bin of bnb's
         * 65536-bin lookup (2/65535 in normalized units; the bin, not the
         * nearest code, decides near a midpoint) */
        float gap = 0.0f;
        if (q > 0) gap = fmaxf(gap, map[q] - map[q - 1]);
        if (q < 255) gap = fmaxf(gap, map[q + 1] - map[q]);
        const float err = fabsf(rec - t0.absmax[b]);
        assert_true(err <= nested * (gap / 2.0f + 2.0f / 65535.0f) * 1.0001f + 4.0f * FLT_EPSILON * t0.absmax[b]);
        rel_sum += err / t0.absmax[b];
    }
    assert_true(rel_sum / (double)t.nblocks < 0.01); /* typically ~0.2% */
    /* the nibbles are those of the fp32 path; only the scales differ */
    assert_memory_equal(t.packed, t0.packed, (size_t)(n + 1) / 2);
    nf4_free(&t);
    nf4_free(&t0);
    free(w);
}

static void test_dynamic_map(void **state) {
    (void)state;
    float m[256], mc[256];
    nf4_dynamic_map(m);
    nf4_dynamic_map_cpu(mc);
    assert_true(m[0] == -0.99296875f);
    assert_true(m[127] == 0.0f);
    assert_true(m[255] == 1.0f);
    assert_true(m[254] == 0.99296875f);
    for (int i = 1; i < 256; i++) assert_true(m[i] > m[i - 1]);
    for (int i = 0; i < 255; i++) assert_true(m[i] == -m[254 - i]);
    assert_true(m[128] == 5.500000384017767e-07f);
    /* entries where torch's FMA-contracted linspace differs from a plain
     * start + step*i (or end - step*k) by one ulp; values as dumped from a
     * PyTorch install */
    assert_true((double)m[18] == -0.7398437261581421);
    assert_true((double)m[20] == -0.7117187976837158);
    assert_true((double)m[102] == -0.006343749817460775);
    assert_true((double)m[72] == -0.07609374821186066);
    assert_true((double)m[34] == -0.5148437023162842); /* these from the first half of linspace */
    assert_true((double)m[58] == -0.17734375596046448);
    assert_true((double)m[87] == -0.033906251192092896);
    assert_true((double)m[116] == -0.000493750034365803);
    assert_true(mc[0] == -1.0f);
    assert_memory_equal(mc + 1, m + 1, 255 * sizeof(float));
}

/* ------------------------------------------------ fast path == reference */

static void compare_fast_ref(const nf4_tensor *t, int64_t row0, int64_t nrows) {
    const int64_t cnt = nrows * t->cols;
    float *f1 = malloc((size_t)cnt * sizeof(float) + 4), *f2 = malloc((size_t)cnt * sizeof(float) + 4);
    uint16_t *h1 = malloc((size_t)cnt * 2 + 2), *h2 = malloc((size_t)cnt * 2 + 2);
    nf4_dequantize_rows_f32(t, row0, nrows, f1);
    nf4_dequantize_rows_f32_ref(t, row0, nrows, f2);
    nf4_dequantize_rows_bf16(t, row0, nrows, h1);
    nf4_dequantize_rows_bf16_ref(t, row0, nrows, h2);
    assert_memory_equal(f1, f2, (size_t)cnt * sizeof(float));
    assert_memory_equal(h1, h2, (size_t)cnt * 2);
    for (int64_t i = 0; i < cnt; i++) assert_int_equal(h2[i], f32_to_bf16(f2[i]));
    free(f1);
    free(f2);
    free(h1);
    free(h2);
}

static void test_fast_equals_reference(void **state) {
    (void)state;
    const int64_t shapes[][2] = {{64, 576}, {33, 100}, {17, 67}, {8, 4096}, {5, 1}};
    const int bss[] = {32, 64, 256, 4096};
    for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++) {
        int64_t r = shapes[si][0], c = shapes[si][1];
        float *w = random_matrix(r * c, 0.05f);
        for (size_t bi = 0; bi < sizeof bss / sizeof bss[0]; bi++) {
            for (int dq = 0; dq < 2; dq++) {
                nf4_tensor t;
                qerr e = {{0}};
                assert_int_equal(nf4_quantize(w, r, c, bss[bi], dq, &t, &e), 0);
                compare_fast_ref(&t, 0, r);
                compare_fast_ref(&t, 1, r - 1);
                compare_fast_ref(&t, r / 2, r - r / 2);
                compare_fast_ref(&t, r - 1, 1);
                compare_fast_ref(&t, 0, 0);
                nf4_free(&t);
            }
        }
        free(w);
    }
}

/* ----------------------------------------------- OpenMP thread independence */

static void test_thread_independence(void **state) {
    (void)state;
    const int64_t r = 384, c = 576, n = r * c; /* 3456 blocks, 14 nested groups */
    float *w = random_matrix(n, 0.02f);
    const int saved = omp_get_max_threads();
    nf4_tensor t1, t2;
    qerr e = {{0}};
    omp_set_num_threads(1);
    assert_int_equal(nf4_quantize(w, r, c, 64, 1, &t1, &e), 0);
    float *d1 = malloc((size_t)n * sizeof(float));
    uint16_t *h1 = malloc((size_t)n * 2);
    nf4_dequantize_rows_f32(&t1, 0, r, d1);
    nf4_dequantize_rows_bf16(&t1, 0, r, h1);
    omp_set_num_threads(2);
    assert_int_equal(nf4_quantize(w, r, c, 64, 1, &t2, &e), 0);
    float *d2 = malloc((size_t)n * sizeof(float));
    uint16_t *h2 = malloc((size_t)n * 2);
    nf4_dequantize_rows_f32(&t2, 0, r, d2);
    nf4_dequantize_rows_bf16(&t2, 0, r, h2);
    omp_set_num_threads(saved);

    assert_memory_equal(t1.packed, t2.packed, (size_t)(n + 1) / 2);
    assert_memory_equal(t1.absmax_q, t2.absmax_q, (size_t)t1.nblocks);
    assert_memory_equal(t1.nested_absmax, t2.nested_absmax, (size_t)ngroups_of(&t1) * sizeof(float));
    assert_true(t1.offset == t2.offset);
    assert_memory_equal(d1, d2, (size_t)n * sizeof(float));
    assert_memory_equal(h1, h2, (size_t)n * 2);
    free(d1);
    free(d2);
    free(h1);
    free(h2);
    nf4_free(&t1);
    nf4_free(&t2);
    free(w);
}

/* ---------------------------------------------------------- misc API */

static void test_bf16_source(void **state) {
    (void)state;
    const int64_t r = 10, c = 130, n = r * c;
    float *w = random_matrix(n, 0.1f);
    uint16_t *h = malloc((size_t)n * 2);
    for (int64_t i = 0; i < n; i++) {
        h[i] = f32_to_bf16(w[i]);
        w[i] = bf16_to_f32(h[i]);
    }
    nf4_tensor a, b;
    qerr e = {{0}};
    assert_int_equal(nf4_quantize(w, r, c, 64, 1, &a, &e), 0);
    assert_int_equal(nf4_quantize_bf16(h, r, c, 64, 1, &b, &e), 0);
    assert_memory_equal(a.packed, b.packed, (size_t)(n + 1) / 2);
    assert_memory_equal(a.absmax_q, b.absmax_q, (size_t)a.nblocks);
    assert_true(a.offset == b.offset);
    nf4_free(&a);
    nf4_free(&b);
    free(w);
    free(h);
}

static void test_nbytes(void **state) {
    (void)state;
    float *w = random_matrix(576 * 1536, 0.02f);
    nf4_tensor t;
    qerr e = {{0}};
    assert_int_equal(nf4_quantize(w, 1536, 576, 64, 1, &t, &e), 0);
    const size_t n = 576 * 1536, nb = n / 64, ng = (nb + 255) / 256;
    assert_int_equal(nf4_nbytes(&t), n / 2 + nb + 4 * ng + 4);
    const double bpp = (double)nf4_nbytes(&t) / (double)n;
    assert_true(bpp > 0.5155 && bpp < 0.5162);
    nf4_free(&t);
    assert_int_equal(nf4_quantize(w, 1536, 576, 64, 0, &t, &e), 0);
    assert_int_equal(nf4_nbytes(&t), n / 2 + 4 * nb);
    nf4_free(&t);
    nf4_free(&t); /* second free is harmless */
    free(w);
}

static void test_errors(void **state) {
    (void)state;
    float w[128];
    for (int i = 0; i < 128; i++) w[i] = (float)i - 64.0f;
    nf4_tensor t;
    qerr e = {{0}};
    const int bad_bs[] = {0, 16, 48, 100, 8192, -64};
    for (size_t i = 0; i < sizeof bad_bs / sizeof bad_bs[0]; i++) {
        assert_int_equal(nf4_quantize(w, 2, 64, bad_bs[i], 0, &t, &e), -1);
        assert_non_null(strstr(e.msg, "blocksize"));
        assert_null(t.packed);
    }
    assert_int_equal(nf4_quantize(w, 0, 64, 64, 0, &t, &e), -1);
    assert_non_null(strstr(e.msg, "rows"));
    assert_int_equal(nf4_quantize(NULL, 2, 64, 64, 0, &t, &e), -1);
    w[70] = NAN;
    assert_int_equal(nf4_quantize(w, 2, 64, 64, 1, &t, &e), -1);
    assert_non_null(strstr(e.msg, "row 1, col 6"));
    assert_null(t.packed);
    w[70] = 0.0f;
    w[3] = -INFINITY;
    assert_int_equal(nf4_quantize(w, 2, 64, 64, 0, &t, &e), -1);
    assert_non_null(strstr(e.msg, "row 0, col 3"));
    /* nf4_alloc for loaders */
    assert_int_equal(nf4_alloc(&t, 3, 70, 64, 1, &e), 0);
    assert_int_equal(t.nblocks, 4);
    assert_true(t.nested_code[0] == -0.99296875f && t.nested_code[255] == 1.0f);
    nf4_free(&t);
}

/* A view over caller memory (one allocation holding several tensors, as a
 * model layer does) quantized in place holds the same bytes as nf4_quantize's
 * own buffers, for f32 and bf16 sources, odd shapes, several groups, with and
 * without double quantization; the bytes around the view stay untouched and
 * nf4_free on a view frees nothing. */
static void test_view_quantize_into(void **state) {
    (void)state;
    static const int64_t shapes[][2] = {{3, 70}, {257, 129}, {136, 200}, {1, 65}};
    qerr e = {{0}};
    for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++)
        for (int dq = 0; dq < 2; dq++)
            for (int src_bf16 = 0; src_bf16 < 2; src_bf16++) {
                const int64_t r = shapes[si][0], c = shapes[si][1], n = r * c, nb = (n + 63) / 64,
                              ng = (nb + 255) / 256;
                float *w = random_matrix(n, 0.03f);
                uint16_t *h = malloc((size_t)n * sizeof(uint16_t));
                for (int64_t i = 0; i < n; i++) h[i] = f32_to_bf16(w[i]);
                nf4_tensor ref, v;
                int rc = src_bf16 ? nf4_quantize_bf16(h, r, c, 64, dq, &ref, &e) : nf4_quantize(w, r, c, 64, dq, &ref, &e);
                assert_int_equal(rc, 0);
                /* one buffer: guard | packed | guard | scales | guard | nested | guard */
                const size_t pk = (size_t)(n + 1) / 2, sc = (size_t)nb * (dq ? 1 : 4), ne = (size_t)ng * 4, g = 16;
                const size_t o_pk = g, o_sc = (o_pk + pk + g + 3) / 4 * 4, o_ne = (o_sc + sc + g + 3) / 4 * 4,
                             total = o_ne + ne + g;
                uint8_t *buf = malloc(total), *guard = malloc(total);
                for (size_t i = 0; i < total; i++) buf[i] = (uint8_t)(0xa5 ^ i);
                memcpy(guard, buf, total);
                assert_int_equal(nf4_view(&v, r, c, 64, dq, buf + o_pk, buf + o_sc, dq ? (float *)(buf + o_ne) : NULL, &e), 0);
                assert_int_equal(v.is_view, 1);
                assert_int_equal(v.nblocks, nb);
                rc = src_bf16 ? nf4_quantize_bf16_into(h, &v, &e) : nf4_quantize_into(w, &v, &e);
                assert_int_equal(rc, 0);
                assert_memory_equal(v.packed, ref.packed, pk);
                if (dq) {
                    assert_memory_equal(v.absmax_q, ref.absmax_q, (size_t)nb);
                    assert_memory_equal(v.nested_absmax, ref.nested_absmax, ne);
                    assert_memory_equal(&v.offset, &ref.offset, sizeof(float));
                    assert_memory_equal(v.nested_code, ref.nested_code, sizeof v.nested_code);
                } else {
                    assert_memory_equal(v.absmax, ref.absmax, sc);
                }
                for (size_t i = 0; i < total; i++) {
                    const int inside = (i >= o_pk && i < o_pk + pk) || (i >= o_sc && i < o_sc + sc) ||
                                       (dq && i >= o_ne && i < o_ne + ne);
                    if (!inside) assert_int_equal(buf[i], guard[i]);
                }
                nf4_free(&v); /* a view: forgets, frees nothing (ASan would see a bad free) */
                assert_null(v.packed);
                assert_int_equal(buf[0], guard[0]);
                nf4_free(&ref);
                free(buf);
                free(guard);
                free(w);
                free(h);
            }
    /* errors: geometry, missing buffers, a NULL or non-finite weight (the view keeps its buffers) */
    uint8_t mem[256];
    nf4_tensor v;
    assert_int_equal(nf4_view(&v, 2, 64, 48, 0, mem, mem + 64, NULL, &e), -1);
    assert_non_null(strstr(e.msg, "blocksize"));
    assert_int_equal(nf4_view(&v, 2, 64, 64, 1, mem, mem + 64, NULL, &e), -1);
    assert_non_null(strstr(e.msg, "nested absmax"));
    assert_null(v.packed);
    float w[128];
    for (int i = 0; i < 128; i++) w[i] = (float)i - 64.0f;
    assert_int_equal(nf4_view(&v, 2, 64, 64, 1, mem, mem + 64, (float *)(mem + 128), &e), 0);
    assert_int_equal(nf4_quantize_into(NULL, &v, &e), -1);
    w[70] = NAN;
    assert_int_equal(nf4_quantize_into(w, &v, &e), -1);
    assert_non_null(strstr(e.msg, "row 1, col 6"));
    assert_ptr_equal(v.packed, mem);
    nf4_free(&v);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_code_table),
        cmocka_unit_test(test_midpoint_rule),
        cmocka_unit_test(test_midpoint_rule_quantizer),
        cmocka_unit_test(test_index_equals_argmin),
        cmocka_unit_test(test_nibble_order),
        cmocka_unit_test(test_matches_bnb_transcription),
        cmocka_unit_test(test_odd_lengths),
        cmocka_unit_test(test_all_zero_block),
        cmocka_unit_test(test_tiny_and_huge),
        cmocka_unit_test(test_roundtrip_bound),
        cmocka_unit_test(test_double_quant),
        cmocka_unit_test(test_dynamic_map),
        cmocka_unit_test(test_fast_equals_reference),
        cmocka_unit_test(test_thread_independence),
        cmocka_unit_test(test_bf16_source),
        cmocka_unit_test(test_nbytes),
        cmocka_unit_test(test_errors),
        cmocka_unit_test(test_view_quantize_into),
    };
    return cmocka_run_group_tests_name("nf4", tests, NULL, NULL);
}
