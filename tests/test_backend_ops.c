/* tests/test_backend_ops.c — every backend-table entry (autograd/backend.h)
 * checked against the reference backend, as ggml's test-backend-ops checks
 * every backend against the CPU.
 *
 * The reference is `cpu-ref`: the CPU kernels built from their scalar
 * branches, the scalar NF4 dequantization and a plain double-accumulating
 * GEMM (autograd/backend_cpu_ref.c). Every other backend name the code knows
 * (ag_backend_names: `cpu`, and `cuda` once a later issue builds it) is run on
 * the same inputs in the same binary; a backend that is not available prints
 * "SKIPPED: <name> not available" per case and the case counts as skipped.
 *
 * Comparison per entry:
 *   - bit for bit where both run the same operations in the same order:
 *     memory calls, NF4/bf16/fp32 rows, fp32 -> bf16 (ties, NaN, Inf,
 *     subnormals), dropout masks, embedding, RMSNorm, RoPE, SwiGLU (the
 *     AVX-512 exp is exp_poly lane by lane), add/axpy, the cached attention,
 *     AdamW, bitsandbytes' 8-bit and 32-bit AdamW, Sophia, the sum of squares, scaling, the non-finite count, and
 *     the sampled labels of the LM-head cross-entropy (on inputs whose GEMM is
 *     exact, see test_lm_head_ce_sampled);
 *   - a bounded normalised mean squared error NMSE = Σ(x − ref)² / Σ ref²
 *     where the fast path reassociates sums (the GEMM, the 16-lane softmax
 *     sums of attention and of the LM head); each bound's reasoning is
 *     written at its constant.
 * Inputs are random with fixed seeds; sizes are not multiples of 16, so the
 * masked tails of the vector loops run.
 */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "autograd/backend.h"
#include "autograd/lora_gemm.h"
#include "autograd/tensor.h"
#include "core/bf16.h"
#include "core/rng.h"
#include "quant/blockwise8.h"
#include "quant/int8.h"
#include "quant/nf4.h"

/* fp32 GEMM, fp32 accumulation against double accumulation: each of the K ≤
 * ~1000 terms adds at most one fp32 rounding (2^-24 relative to the running
 * sum), so the relative error of an element is ≲ √K·2^-24 ≈ 2e-6 for random
 * signs, NMSE ≲ 4e-12; 1e-10 leaves margin and still catches any wrong term
 * (one wrong product out of K moves NMSE by ~1/K ≫ 1e-10). bf16 operands
 * multiply exactly in fp32 (8-bit mantissas), so the same bound holds. */
#define NMSE_GEMM 1e-10
/* Attention and the LM head in fp32 mode: the GEMMs above plus the softmax
 * sums reassociated into 16 lanes (one fp32 rounding per term either way). */
#define NMSE_SOFTMAX_F32 1e-10
/* The same in bf16 mode: the probabilities and the logit gradients are
 * rounded to bf16 before their GEMM, and an fp32 difference of one ulp can
 * move a value across a bf16 rounding boundary, changing that term by up to
 * 2^-8 relative. Such flips are rare (≈ 2^-16 of the terms), so NMSE stays
 * ≲ 1e-7; 1e-5 still catches a wrong row (≈ 1/rows ≫ 1e-5). */
#define NMSE_SOFTMAX_BF16 1e-5
/* The `cuda` backend (autograd/backend_cuda.cu) where it sums in another order:
 *  - RMSNorm's row sums (double, a block tree instead of j order): the double sums differ in
 *    their last bits (≈ D·2^-53 relative), which moves the fp32 rstd, y and dx by at most one
 *    ulp in rare rows: NMSE ≲ 2^-46 ≈ 1e-14; 1e-12 still fails on any wrong element (≥ 1/(N·D)
 *    of the signal ≈ 5e-5);
 *  - the KV-cached attention's expf (CUDA's, ≤ 2 ulp, against glibc's): the same argument;
 *  - attention in bf16 mode, two kernels (QLORA_CUDA_ATTN): the one-thread-per-row kernels keep P
 *    and dS in fp32 registers where the CPU rounds them to bf16 as GEMM operands; each term then
 *    differs by the bf16 rounding, a relative error uniform in ±2^-9 (variance 2^-18/3 ≈ 1.3e-6),
 *    and the errors of independent terms add like the terms themselves, so NMSE ≈ 1.3e-6 per
 *    rounded operand; dq and dk see two (P in dP's row sum, dS): ≲ 4e-6. The tensor-core (flash)
 *    kernels round P and dS to bf16 as the CPU does, but the forward's P is exp(s − running max)
 *    before the division by the sum (the CPU rounds the normalised P), and the sums of S, dP, O
 *    and the gradients run in the tensor cores' order: two roundings that differ but are
 *    independent, NMSE ≲ 2·1.3e-6 per operand, ≲ 8e-6 for dq and dk. 3e-5 leaves a factor of
 *    3.5 to 7 and still fails a wrong row (≈ 1/rows ≈ 1e-3) or one wrong tile of a row. */
#define NMSE_CUDA_ROWSUM 1e-12
#define NMSE_CUDA_ATTN_BF16 3e-5

static const char *g_ref_name = "cpu-ref";

/* The entries the `cuda` backend computes in another summation order (bounds above). */
static int is_cuda(const ag_backend *be) { return strcmp(be->name, "cuda") == 0; }

/* Bit for bit, or within `bound` on the cuda backend. */
static void assert_bits_or_nmse(const ag_backend *be, const char *what, const float *x, const float *ref, int64_t n,
                                double bound);

/* ------------------------------------------------------------------ helpers */

static float frand(uint64_t seed, uint64_t i) { return 2.0f * rng_uniform(seed, 77, i) - 1.0f; }

static float *host_rand(int64_t n, uint64_t seed, float amp) {
    float *x = malloc((size_t)(n ? n : 1) * sizeof(float));
    assert_non_null(x);
    for (int64_t i = 0; i < n; i++) x[i] = amp * frand(seed, (uint64_t)i);
    return x;
}

/* A copy of host memory in backend memory. */
static void *to_dev(const ag_backend *be, const void *host, size_t bytes) {
    void *d = be->alloc(bytes);
    assert_non_null(d);
    be->copy_h2d(d, host, bytes);
    return d;
}

/* A host copy of backend memory (after a sync). */
static void *to_host(const ag_backend *be, const void *dev, size_t bytes) {
    void *h = malloc(bytes ? bytes : 1);
    assert_non_null(h);
    be->sync();
    be->copy_d2h(h, dev, bytes);
    return h;
}

static double nmse(const float *x, const float *ref, int64_t n) {
    double num = 0.0, den = 0.0;
    for (int64_t i = 0; i < n; i++) {
        double d = (double)x[i] - (double)ref[i];
        num += d * d;
        den += (double)ref[i] * ref[i];
    }
    return den > 0.0 ? num / den : num;
}

static void assert_nmse(const char *what, const float *x, const float *ref, int64_t n, double bound) {
    double e = nmse(x, ref, n);
    if (!(e <= bound)) fail_msg("%s: NMSE %.3g exceeds %.3g", what, e, bound);
}

static void assert_bits(const char *what, const void *x, const void *ref, size_t bytes) {
    if (memcmp(x, ref, bytes) != 0) {
        const unsigned char *a = x, *b = ref;
        size_t i = 0;
        while (a[i] == b[i]) i++;
        fail_msg("%s: differs from the reference at byte %zu of %zu", what, i, bytes);
    }
}

static void assert_bits_or_nmse(const ag_backend *be, const char *what, const float *x, const float *ref, int64_t n,
                                double bound) {
    if (is_cuda(be)) assert_nmse(what, x, ref, n, bound);
    else assert_bits(what, x, ref, (size_t)n * sizeof(float));
}

/* Equal values (±0 equal: a written gradient may be −0 where zero + −0 gave +0), NaN nowhere. */
static void assert_same_values(const char *what, const float *x, const float *y, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        if (!(x[i] == y[i])) fail_msg("%s: element %lld is %.9g, expected %.9g", what, (long long)i, x[i], y[i]);
}

/* A bf16 array that is the rounding of its own fp32 array (the backend's copy). */
static void assert_bf16_copy(const char *what, const bf16 *b, const float *f, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        if (b[i] != f32_to_bf16(f[i])) fail_msg("%s: element %lld is not the bf16 of its fp32 value", what, (long long)i);
}

/* A case runs one entry on backend `be` and on the reference `ref`. */
typedef void (*case_fn)(const ag_backend *be, const ag_backend *ref);

typedef struct case_state {
    const char *backend;
    case_fn fn;
} case_state;

static void run_case(void **state) {
    const case_state *cs = *state;
    const ag_backend *ref = ag_backend_find(g_ref_name);
    assert_non_null(ref);
    const ag_backend *be = ag_backend_find(cs->backend);
    if (!be) {
        if (!strcmp(cs->backend, "cuda"))
            printf(ag_backend_cuda_built() ? "SKIPPED: no CUDA device\n"
                                           : "SKIPPED: no CUDA device (backend not built into this binary)\n");
        else printf("SKIPPED: %s not available\n", cs->backend);
        skip();
    }
    cs->fn(be, ref);
}

/* ------------------------------------------------------------------ memory */

static void case_memory(const ag_backend *be, const ag_backend *ref) {
    (void)ref;
    const int64_t n = 1003;
    float *h = host_rand(n, 1, 3.0f);
    float *d = to_dev(be, h, (size_t)n * sizeof(float));
    float *d2 = be->alloc((size_t)n * sizeof(float));
    assert_non_null(d2);
    be->copy_d2d(d2, d, (size_t)n * sizeof(float));
    float *back = to_host(be, d2, (size_t)n * sizeof(float));
    assert_bits("copy h2d/d2d/d2h", back, h, (size_t)n * sizeof(float));
    free(back);
    be->zero(d2 + 5, 17 * sizeof(float));
    be->fill_f32(d2 + 100, 31, NAN);
    be->fill_f32(d2 + 200, 1, -2.5f);
    back = to_host(be, d2, (size_t)n * sizeof(float));
    for (int64_t i = 0; i < n; i++) {
        float want = h[i];
        if (i >= 5 && i < 22) want = 0.0f;
        if (i >= 100 && i < 131) want = NAN;
        if (i == 200) want = -2.5f;
        if (isnan(want)) assert_true(isnan(back[i]));
        else assert_true(memcmp(&back[i], &want, sizeof want) == 0);
    }
    free(back);
    void *z = be->alloc(0); /* a valid, freeable pointer */
    assert_non_null(z);
    be->free(z);
    be->free(NULL);
    be->free(d);
    be->free(d2);
    free(h);
}

/* ------------------------------------------------------------------ GEMM */

static void gemm_one_entry(const ag_backend *be, const ag_backend *ref, int lora, int ta, int tb, int64_t M, int64_t N,
                           int64_t K, float alpha, float beta, gemm_dtype dt, uint64_t seed) {
    int64_t lda = ta ? M : K, ldb = tb ? K : N, ldc = N + 3; /* C with a padded leading dimension */
    size_t es = dt == GEMM_BF16 ? 2 : 4;
    float *Af = host_rand(M * K, seed, 1.0f), *Bf = host_rand(K * N, seed + 1, 1.0f);
    float *C0 = host_rand(M * ldc, seed + 2, 1.0f);
    void *A = Af, *B = Bf;
    bf16 *Ab = NULL, *Bb = NULL;
    if (dt == GEMM_BF16) {
        Ab = malloc((size_t)(M * K) * 2);
        Bb = malloc((size_t)(K * N) * 2);
        for (int64_t i = 0; i < M * K; i++) Ab[i] = f32_to_bf16(Af[i]);
        for (int64_t i = 0; i < K * N; i++) Bb[i] = f32_to_bf16(Bf[i]);
        A = Ab;
        B = Bb;
    }
    float *out[2];
    const ag_backend *bes[2] = {be, ref};
    for (int w = 0; w < 2; w++) {
        void *dA = to_dev(bes[w], A, (size_t)(M * K) * es), *dB = to_dev(bes[w], B, (size_t)(K * N) * es);
        float *dC = to_dev(bes[w], C0, (size_t)(M * ldc) * sizeof(float));
        (lora ? bes[w]->lora_gemm : bes[w]->gemm)(ta, tb, M, N, K, alpha, dA, lda, dB, ldb, beta, dC, ldc, dt);
        out[w] = to_host(bes[w], dC, (size_t)(M * ldc) * sizeof(float));
        bes[w]->free(dA);
        bes[w]->free(dB);
        bes[w]->free(dC);
    }
    char what[96];
    snprintf(what, sizeof what, "%s %s ta %d tb %d %lldx%lldx%lld beta %g", lora ? "lora_gemm" : "gemm",
             dt == GEMM_BF16 ? "bf16" : "f32", ta, tb, (long long)M, (long long)N, (long long)K, beta);
    assert_nmse(what, out[0], out[1], M * ldc, NMSE_GEMM);
    for (int64_t i = 0; i < M; i++) /* the padding columns are not written */
        for (int64_t j = N; j < ldc; j++) assert_true(out[0][i * ldc + j] == C0[i * ldc + j]);
    free(out[0]);
    free(out[1]);
    free(Af);
    free(Bf);
    free(C0);
    free(Ab);
    free(Bb);
}

static void gemm_one(const ag_backend *be, const ag_backend *ref, int ta, int tb, int64_t M, int64_t N, int64_t K,
                     float alpha, float beta, gemm_dtype dt, uint64_t seed) {
    gemm_one_entry(be, ref, 0, ta, tb, M, N, K, alpha, beta, dt, seed);
}

/* The LoRA products' shapes (autograd/lora_gemm.h) through lora_gemm, against cpu-ref's GEMM under the GEMM's
 * bound: the skinny-output kernel (u = x Aᵀ with B transposed, du = s dy B plain; token tails, r 8, 16 and a
 * group's 48, K 64 to 160), the skinny-reduction kernel (dA = duᵀ x and dB = s dyᵀ u: token counts that are not
 * multiples of 32, r 8 to 64 in one to four 16-row tiles), the short-K kernel (y = s u Bᵀ and dx = du A with
 * K = r = 8, 16, 32 and a fresh output), and shapes that go to gemm (K not a multiple of 32, fp32, an
 * accumulated K = r product, N not a multiple of 16). Returns how many of the calls the AMX kernels can take. */
static int lora_gemm_cases(const ag_backend *be, const ag_backend *ref) {
    gemm_one_entry(be, ref, 1, 0, 1, 37, 8, 64, 1.0f, 0.0f, GEMM_BF16, 60);    /* u, 37 tokens, r 8 */
    gemm_one_entry(be, ref, 1, 0, 1, 300, 48, 96, 1.0f, 0.0f, GEMM_BF16, 61);  /* grouped u, r 3·16 */
    gemm_one_entry(be, ref, 1, 0, 0, 130, 16, 160, 2.0f, 0.0f, GEMM_BF16, 62); /* du = s dy B */
    gemm_one_entry(be, ref, 1, 0, 0, 100, 16, 96, 0.5f, 1.0f, GEMM_BF16, 63);  /* accumulated */
    gemm_one_entry(be, ref, 1, 1, 0, 16, 96, 75, 1.0f, 1.0f, GEMM_BF16, 64);   /* dA, 75 tokens */
    gemm_one_entry(be, ref, 1, 1, 0, 48, 64, 128, 1.0f, 0.0f, GEMM_BF16, 65);  /* grouped dA, 3 row tiles */
    gemm_one_entry(be, ref, 1, 1, 0, 40, 32, 64, 1.0f, 1.0f, GEMM_BF16, 66);   /* r 40: a partial row tile */
    gemm_one_entry(be, ref, 1, 1, 0, 64, 48, 45, 1.0f, 0.0f, GEMM_BF16, 67);   /* 4 row tiles, 45 tokens */
    gemm_one_entry(be, ref, 1, 1, 0, 96, 16, 70, 2.0f, 1.0f, GEMM_BF16, 68);   /* dB = s dyᵀ u, 70 tokens */
    gemm_one_entry(be, ref, 1, 1, 0, 80, 8, 33, 2.0f, 1.0f, GEMM_BF16, 69);    /* dB, r 8, 33 tokens */
    gemm_one_entry(be, ref, 1, 0, 1, 90, 96, 16, 2.0f, 0.0f, GEMM_BF16, 72);   /* y = s u Bᵀ (K = r), 90 tokens */
    gemm_one_entry(be, ref, 1, 0, 0, 37, 160, 8, 1.0f, 0.0f, GEMM_BF16, 73);   /* dx = du A, r 8 */
    gemm_one_entry(be, ref, 1, 0, 1, 48, 64, 32, 0.5f, 0.0f, GEMM_BF16, 74);   /* K = r = 32 */
    const int amx_calls = 13;
    gemm_one_entry(be, ref, 1, 0, 0, 64, 16, 72, 1.0f, 0.0f, GEMM_BF16, 70);   /* K % 32 != 0: gemm */
    gemm_one_entry(be, ref, 1, 0, 1, 50, 16, 64, 1.0f, 0.0f, GEMM_F32, 71);    /* fp32: gemm */
    gemm_one_entry(be, ref, 1, 0, 0, 40, 96, 48, 1.0f, 1.0f, GEMM_BF16, 75);   /* a group's dx += du A: gemm */
    gemm_one_entry(be, ref, 1, 0, 1, 40, 40, 16, 1.0f, 0.0f, GEMM_BF16, 76);   /* N % 16 != 0: gemm */
    return amx_calls;
}

static void case_lora_gemm(const ag_backend *be, const ag_backend *ref) { (void)lora_gemm_cases(be, ref); }

/* The cpu backend's lora_gemm took the AMX kernels for every call they are for (where this processor has
 * AMX; elsewhere the case is SKIPPED: the kernels are not compiled in or not allowed to run). */
static void case_lora_gemm_amx(const ag_backend *be, const ag_backend *ref) {
    if (strcmp(be->name, "cpu") != 0 && strcmp(be->name, "cpu-fenced") != 0) {
        printf("SKIPPED: lora_gemm's AMX kernels are the cpu backend's (%s runs the LoRA products as gemm)\n", be->name);
        skip();
    }
    if (!lora_gemm_amx_active()) {
        printf("SKIPPED: no AMX-BF16 on this processor (or not compiled for it, or QLORA_CPU_AMX / QLORA_LORA_AMX "
               "= 0): lora_gemm ran as gemm\n");
        skip();
    }
    int64_t c0 = 0, c1 = 0;
    lora_gemm_amx_stats(&c0, NULL, NULL);
    const int expect = lora_gemm_cases(be, ref);
    lora_gemm_amx_stats(&c1, NULL, NULL);
    assert_int_equal(c1 - c0, expect);
}

static void case_gemm(const ag_backend *be, const ag_backend *ref) {
    gemm_one(be, ref, 0, 0, 37, 53, 71, 1.0f, 0.0f, GEMM_F32, 10);
    gemm_one(be, ref, 0, 1, 129, 45, 200, 0.5f, 1.0f, GEMM_F32, 11);
    gemm_one(be, ref, 1, 0, 33, 17, 130, 2.0f, 1.0f, GEMM_BF16, 12);
    gemm_one(be, ref, 0, 1, 64, 1003, 72, 1.0f, 0.0f, GEMM_BF16, 13);
    gemm_one(be, ref, 1, 1, 19, 23, 29, 1.0f, 0.0f, GEMM_BF16, 14);
}

/* ------------------------------------------------------------------ frozen rows, bf16, dropout, embedding */

typedef struct frozen_set {
    nf4_tensor nf4;
    bf16 *wb;
    float *wf;
    frozen_weight w[3]; /* NF4, bf16, fp32 */
} frozen_set;

static void frozen_set_init(frozen_set *fs, int64_t rows, int64_t cols, uint64_t seed) {
    qerr e = {0};
    float *w = host_rand(rows * cols, seed, 0.1f);
    assert_int_equal(nf4_quantize(w, rows, cols, 64, 1, &fs->nf4, &e), 0);
    fs->wb = malloc((size_t)(rows * cols) * sizeof(bf16));
    for (int64_t i = 0; i < rows * cols; i++) fs->wb[i] = f32_to_bf16(w[i]);
    fs->wf = w;
    fs->w[0] = (frozen_weight){.out = rows, .in = cols, .kind = FROZEN_NF4, .nf4 = &fs->nf4};
    fs->w[1] = (frozen_weight){.out = rows, .in = cols, .kind = FROZEN_BF16, .w_bf16 = fs->wb};
    fs->w[2] = (frozen_weight){.out = rows, .in = cols, .kind = FROZEN_F32, .w_f32 = fs->wf};
}

static void frozen_set_free(frozen_set *fs) {
    nf4_free(&fs->nf4);
    free(fs->wb);
    free(fs->wf);
}

static void case_frozen_rows(const ag_backend *be, const ag_backend *ref) {
    frozen_set fs;
    frozen_set_init(&fs, 41, 320, 20); /* 41·320 = 205 blocks of 64; rows cut blocks */
    const int64_t row0 = 7, n = 29, cols = 320;
    for (int k = 0; k < 3; k++) {
        float *f[2];
        bf16 *b[2];
        const ag_backend *bes[2] = {be, ref};
        for (int w = 0; w < 2; w++) {
            float *df = bes[w]->alloc((size_t)(n * cols) * sizeof(float));
            bf16 *db = bes[w]->alloc((size_t)(n * cols) * sizeof(bf16));
            bes[w]->frozen_rows_f32(&fs.w[k], row0, n, df);
            bes[w]->frozen_rows_bf16(&fs.w[k], row0, n, db);
            f[w] = to_host(bes[w], df, (size_t)(n * cols) * sizeof(float));
            b[w] = to_host(bes[w], db, (size_t)(n * cols) * sizeof(bf16));
            bes[w]->free(df);
            bes[w]->free(db);
        }
        /* frozen_data: the stored bf16/fp32 array as backend memory, NULL for NF4 */
        const void *fd = be->frozen_data(&fs.w[k]);
        if (k == 0) assert_null(fd);
        else {
            size_t wb = (size_t)(41 * cols) * (k == 1 ? sizeof(bf16) : sizeof(float));
            void *back = to_host(be, fd, wb);
            assert_bits("frozen_data", back, k == 1 ? (const void *)fs.wb : (const void *)fs.wf, wb);
            free(back);
        }
        assert_bits("frozen_rows_f32", f[0], f[1], (size_t)(n * cols) * sizeof(float));
        assert_bits("frozen_rows_bf16", b[0], b[1], (size_t)(n * cols) * sizeof(bf16));
        free(f[0]);
        free(f[1]);
        free(b[0]);
        free(b[1]);
    }
    frozen_set_free(&fs);
}

/* frozen_t_bf16 of one weight: the backend's Wᵀ is bit for bit the transpose of the reference's frozen_rows_bf16
 * (the entry's definition), and the reference's own frozen_t_bf16 is too. A backend without the entry (NULL:
 * its GEMM transposes op(B) itself) is not asked. */
static void frozen_t_check(const ag_backend *be, const ag_backend *ref, const frozen_weight *w, const char *what) {
    const int64_t R = w->out, C = w->in;
    const size_t bytes = (size_t)(R * C) * sizeof(bf16);
    bf16 *rows = malloc(bytes);
    assert_non_null(rows);
    ref->frozen_rows_bf16(w, 0, R, rows);
    const ag_backend *bes[2] = {be, ref};
    for (int k = 0; k < 2; k++) {
        if (!bes[k]->frozen_t_bf16) continue;
        bf16 *d = bes[k]->alloc(bytes);
        assert_non_null(d);
        bes[k]->frozen_t_bf16(w, d);
        bf16 *t = to_host(bes[k], d, bytes);
        bes[k]->free(d);
        for (int64_t o = 0; o < R; o++)
            for (int64_t i = 0; i < C; i++)
                if (t[i * R + o] != rows[o * C + i])
                    fail_msg("frozen_t_bf16 (%s, %s, %lld x %lld): element (%lld, %lld) is not W's", bes[k]->name, what,
                             (long long)R, (long long)C, (long long)o, (long long)i);
        free(t);
    }
    free(rows);
}

/* Shapes: rows that end in a partial 32-row tile, columns that are and are not multiples of 64 (the NF4 kernel's
 * 64-column segments, else element by element), blocksizes 64 and 128, double quantization on and off, and one
 * weight over 16 MiB as bf16 with rows a multiple of 32 (the NF4 kernel's streaming stores). */
static void case_frozen_t(const ag_backend *be, const ag_backend *ref) {
    frozen_set fs;
    frozen_set_init(&fs, 41, 320, 21);
    for (int k = 0; k < 3; k++) frozen_t_check(be, ref, &fs.w[k], k == 0 ? "nf4" : k == 1 ? "bf16" : "fp32");
    frozen_set_free(&fs);
    frozen_set_init(&fs, 70, 100, 22); /* 100 columns: 64-column segments cross quantization blocks */
    for (int k = 0; k < 3; k++) frozen_t_check(be, ref, &fs.w[k], k == 0 ? "nf4" : k == 1 ? "bf16" : "fp32");
    frozen_set_free(&fs);
    const struct { int64_t R, C; int bs, dq; } sh[] = {{96, 384, 128, 0}, {33, 64, 64, 1}, {4096, 2112, 64, 1}};
    for (size_t j = 0; j < sizeof sh / sizeof sh[0]; j++) {
        qerr e = {0};
        float *w = host_rand(sh[j].R * sh[j].C, 23 + j, 0.1f);
        nf4_tensor t;
        assert_int_equal(nf4_quantize(w, sh[j].R, sh[j].C, sh[j].bs, sh[j].dq, &t, &e), 0);
        const frozen_weight fw = {.out = sh[j].R, .in = sh[j].C, .kind = FROZEN_NF4, .nf4 = &t};
        frozen_t_check(be, ref, &fw, "nf4");
        nf4_free(&t);
        free(w);
    }
    { /* bitsandbytes' Int8Params: the generic tile path */
        qerr e = {0};
        const int64_t R = 45, C = 130;
        float *w = host_rand(R * C, 29, 0.1f);
        int8_t *cb = malloc((size_t)(R * C));
        float *scb = malloc((size_t)R * sizeof(float));
        assert_int_equal(int8_quantize_rows(w, R, C, cb, scb, &e), 0);
        const frozen_weight fw = {.out = R, .in = C, .kind = FROZEN_INT8, .cb = cb, .scb = scb};
        frozen_t_check(be, ref, &fw, "int8");
        free(cb);
        free(scb);
        free(w);
    }
}

static void case_to_bf16(const ag_backend *be, const ag_backend *ref) {
    const int64_t n = 70001; /* several 4096-element chunks, parallel, and a tail */
    float *x = host_rand(n, 30, 100.0f);
    const uint32_t specials[] = {0x7fc00000u, 0xffc00001u, 0x7f800001u, 0x7f800000u, 0xff800000u, 0x00000001u,
                                 0x807fffffu, 0x3f808000u, 0x3f818000u, 0x3f80ffffu, 0x7f7fffffu, 0x80000000u};
    for (size_t i = 0; i < sizeof specials / sizeof specials[0]; i++) memcpy(&x[i * 997], &specials[i], 4);
    bf16 *out[2];
    const ag_backend *bes[2] = {be, ref};
    for (int w = 0; w < 2; w++) {
        float *dx = to_dev(bes[w], x, (size_t)n * sizeof(float));
        bf16 *dy = bes[w]->alloc((size_t)n * sizeof(bf16));
        bes[w]->to_bf16(dx, dy, n);
        out[w] = to_host(bes[w], dy, (size_t)n * sizeof(bf16));
        bes[w]->free(dx);
        bes[w]->free(dy);
    }
    assert_bits("to_bf16", out[0], out[1], (size_t)n * sizeof(bf16));
    for (int64_t i = 0; i < n; i++) assert_int_equal(out[1][i], f32_to_bf16(x[i])); /* the reference is core/bf16.h's */
    free(out[0]);
    free(out[1]);
    free(x);
}

/* round_f16: fp16 mode's operand rounding, against core/bf16.h's scalar f32_round_f16 bit for bit: ties,
 * the overflow edge (65519.99 stays finite, 65520 becomes inf), subnormals, inf and NaN; in place too. */
static void case_round_f16(const ag_backend *be, const ag_backend *ref) {
    const int64_t n = 70001;
    float *x = host_rand(n, 31, 70000.0f);
    const uint32_t specials[] = {0x7fc00000u, 0x7f800000u, 0xff800000u, 0x00000001u, 0x33000000u, 0x33000001u,
                                 0x387fc000u, 0x38800000u, 0x3f801000u, 0x3f803000u, 0x477fefffu, 0x477ff000u,
                                 0xc77ff000u, 0x80000000u, 0x3f800fffu, 0x47800000u};
    for (size_t i = 0; i < sizeof specials / sizeof specials[0]; i++) memcpy(&x[i * 997 + 3], &specials[i], 4);
    float *out[2];
    const ag_backend *bes[2] = {be, ref};
    for (int w = 0; w < 2; w++) {
        float *dx = to_dev(bes[w], x, (size_t)n * sizeof(float));
        float *dy = bes[w]->alloc((size_t)n * sizeof(float));
        bes[w]->round_f16(dx, dy, n);
        bes[w]->round_f16(dx, dx, n); /* in place: the same bits */
        out[w] = to_host(bes[w], dy, (size_t)n * sizeof(float));
        float *again = to_host(bes[w], dx, (size_t)n * sizeof(float));
        assert_bits("round_f16 in place", again, out[w], (size_t)n * sizeof(float));
        free(again);
        bes[w]->free(dx);
        bes[w]->free(dy);
    }
    assert_bits("round_f16", out[0], out[1], (size_t)n * sizeof(float));
    for (int64_t i = 0; i < n; i++) {
        float r = f32_round_f16(x[i]);
        if (memcmp(&r, &out[1][i], 4) && !(isnan(r) && isnan(out[1][i])))
            fail_msg("round_f16: element %lld (%a) gave %a, core/bf16.h %a", (long long)i, (double)x[i],
                     (double)out[1][i], (double)r);
    }
    float edge[2];
    memcpy(&edge[0], &specials[10], 4);
    memcpy(&edge[1], &specials[11], 4);
    assert_true(isfinite(f32_round_f16(edge[0])) && isinf(f32_round_f16(edge[1])));
    free(out[0]);
    free(out[1]);
    free(x);
}

static void case_dropout(const ag_backend *be, const ag_backend *ref) {
    const int64_t n = 33 * 577;
    float *x = host_rand(n, 40, 1.0f), *g = host_rand(n, 41, 1.0f), *dx0 = host_rand(n, 42, 1.0f);
    float *y[2], *dx[2];
    const ag_backend *bes[2] = {be, ref};
    for (int w = 0; w < 2; w++) {
        float *dX = to_dev(bes[w], x, (size_t)n * 4), *dY = bes[w]->alloc((size_t)n * 4);
        float *dG = to_dev(bes[w], g, (size_t)n * 4), *dDX = to_dev(bes[w], dx0, (size_t)n * 4);
        bes[w]->dropout_fwd(dX, dY, n, 0.1f, 1234, 0x10007);
        bes[w]->dropout_bwd(dG, dDX, n, 0.1f, 1234, 0x10007);
        y[w] = to_host(bes[w], dY, (size_t)n * 4);
        dx[w] = to_host(bes[w], dDX, (size_t)n * 4);
        bes[w]->free(dX);
        bes[w]->free(dY);
        bes[w]->free(dG);
        bes[w]->free(dDX);
    }
    assert_bits("dropout_fwd", y[0], y[1], (size_t)n * 4);
    assert_bits("dropout_bwd", dx[0], dx[1], (size_t)n * 4);
    int64_t dropped = 0; /* the mask is the one forward and backward share */
    for (int64_t i = 0; i < n; i++) {
        int kept = y[1][i] != 0.0f;
        dropped += !kept;
        assert_true(kept ? dx[1][i] != dx0[i] || g[i] == 0.0f : dx[1][i] == dx0[i]);
    }
    assert_true(dropped > n / 20 && dropped < n / 7); /* p = 0.1 */
    free(y[0]);
    free(y[1]);
    free(dx[0]);
    free(dx[1]);
    free(x);
    free(g);
    free(dx0);
}

/* embedding_bwd: the scatter-add of a trainable table's gradient, repeated ids and an unused row, into
 * a non-zero table; bit for bit (the same additions in the same order: tokens in order per column). */
static void case_embedding_bwd(const ag_backend *be, const ag_backend *ref) {
    const int64_t V = 31, D = 200, n = 70;
    int32_t ids[70];
    for (int64_t i = 0; i < n; i++) ids[i] = (int32_t)((i * 7 + 3) % (V - 1)); /* row V-1 unused */
    float *dx = malloc((size_t)(n * D) * 4), *t0 = malloc((size_t)(V * D) * 4);
    for (int64_t i = 0; i < n * D; i++) dx[i] = 2.0f * rng_uniform(71, 1, (uint64_t)i) - 1.0f;
    for (int64_t i = 0; i < V * D; i++) t0[i] = 2.0f * rng_uniform(71, 2, (uint64_t)i) - 1.0f;
    float *got[2];
    const ag_backend *bes[2] = {be, ref};
    for (int w = 0; w < 2; w++) {
        float *ddx = to_dev(bes[w], dx, (size_t)(n * D) * 4), *dt = to_dev(bes[w], t0, (size_t)(V * D) * 4);
        bes[w]->embedding_bwd(ddx, ids, n, D, dt);
        got[w] = to_host(bes[w], dt, (size_t)(V * D) * 4);
        bes[w]->free(ddx);
        bes[w]->free(dt);
    }
    assert_bits("embedding_bwd", got[0], got[1], (size_t)(V * D) * 4);
    assert_memory_equal(got[0] + (V - 1) * D, t0 + (V - 1) * D, (size_t)D * 4);
    free(got[0]);
    free(got[1]);
    free(dx);
    free(t0);
}

static void case_embedding(const ag_backend *be, const ag_backend *ref) {
    frozen_set fs;
    frozen_set_init(&fs, 97, 192, 50);
    const int64_t n = 45;
    int32_t ids[45];
    for (int64_t i = 0; i < n; i++) ids[i] = (int32_t)((i * 37 + 5) % 97);
    for (int k = 0; k < 3; k++) {
        float *x[2];
        const ag_backend *bes[2] = {be, ref};
        for (int w = 0; w < 2; w++) {
            float *dx = bes[w]->alloc((size_t)(n * 192) * 4);
            bes[w]->embedding(&fs.w[k], ids, n, dx);
            x[w] = to_host(bes[w], dx, (size_t)(n * 192) * 4);
            bes[w]->free(dx);
        }
        assert_bits("embedding", x[0], x[1], (size_t)(n * 192) * 4);
        free(x[0]);
        free(x[1]);
    }
    frozen_set_free(&fs);
}

/* ------------------------------------------------------------------ norm, rope, swiglu, add, axpy */


/* An op run again with no fp32 output (y NULL: only its bf16 copy is read, autograd/ops.c memo_output) must
 * write the same bf16 copy, bit for bit, on the same backend. */
static void check_memo_only(const ag_backend *b, const char *what, const bf16 *dev_with_y, const bf16 *dev_memo_only,
                            int64_t n) {
    bf16 *a = to_host(b, dev_with_y, (size_t)n * 2), *c = to_host(b, dev_memo_only, (size_t)n * 2);
    if (memcmp(a, c, (size_t)n * 2)) fail_msg("%s on %s: bf16 copy without the fp32 output differs", what, b->name);
    free(a);
    free(c);
}

static void case_rmsnorm(const ag_backend *be, const ag_backend *ref) {
    const int64_t N = 37, D = 579;
    float *x = host_rand(N * D, 60, 2.0f), *wt = host_rand(D, 61, 1.0f), *dy = host_rand(N * D, 62, 1.0f);
    float *dx0 = host_rand(N * D, 63, 0.1f), *dw0 = host_rand(D, 64, 0.1f);
    float *y[2], *rs[2], *dx[2], *dw[2];
    bf16 *yb[2];
    const ag_backend *bes[2] = {be, ref};
    for (int w = 0; w < 2; w++) {
        const ag_backend *b = bes[w];
        float *dX = to_dev(b, x, (size_t)(N * D) * 4), *dW = to_dev(b, wt, (size_t)D * 4);
        float *dY = b->alloc((size_t)(N * D) * 4), *dR = b->alloc((size_t)N * 4);
        bf16 *dYb = b->alloc((size_t)(N * D) * 2);
        float *dDY = to_dev(b, dy, (size_t)(N * D) * 4), *dDX = to_dev(b, dx0, (size_t)(N * D) * 4);
        float *dDW = to_dev(b, dw0, (size_t)D * 4);
        b->rmsnorm_fwd(dX, dW, dY, dYb, dR, N, D, 1e-5f);
        {
            bf16 *dYb2 = b->alloc((size_t)(N * D) * 2);
            b->rmsnorm_fwd(dX, dW, NULL, dYb2, dR, N, D, 1e-5f);
            check_memo_only(b, "rmsnorm y bf16", dYb, dYb2, N * D);
            b->free(dYb2);
        }
        b->rmsnorm_bwd(dX, dW, dR, dDY, dDX, dDW, N, D);
        y[w] = to_host(b, dY, (size_t)(N * D) * 4);
        yb[w] = to_host(b, dYb, (size_t)(N * D) * 2);
        rs[w] = to_host(b, dR, (size_t)N * 4);
        dx[w] = to_host(b, dDX, (size_t)(N * D) * 4);
        dw[w] = to_host(b, dDW, (size_t)D * 4);
        void *ptrs[] = {dX, dW, dY, dR, dYb, dDY, dDX, dDW};
        for (size_t i = 0; i < sizeof ptrs / sizeof ptrs[0]; i++) b->free(ptrs[i]);
    }
    assert_bits_or_nmse(be, "rmsnorm y", y[0], y[1], N * D, NMSE_CUDA_ROWSUM);
    if (is_cuda(be)) assert_bf16_copy("rmsnorm y bf16", yb[0], y[0], N * D);
    else assert_bits("rmsnorm y bf16", yb[0], yb[1], (size_t)(N * D) * 2);
    assert_bits_or_nmse(be, "rmsnorm rstd", rs[0], rs[1], N, NMSE_CUDA_ROWSUM);
    assert_bits_or_nmse(be, "rmsnorm dx", dx[0], dx[1], N * D, NMSE_CUDA_ROWSUM);
    if (is_cuda(be)) { /* dw on cuda: the CPU's row order, from its own rstd: check it against the reference's
                        * formula on the backend's rstd (bit for bit), and the NMSE against the reference */
        for (int64_t j = 0; j < D; j++) {
            float acc = dw0[j];
            for (int64_t i = 0; i < N; i++) acc += dy[i * D + j] * x[i * D + j] * rs[0][i];
            if (memcmp(&acc, &dw[0][j], 4) != 0) fail_msg("rmsnorm dw (cuda) at %lld", (long long)j);
        }
        assert_nmse("rmsnorm dw", dw[0], dw[1], D, NMSE_CUDA_ROWSUM);
    } else {
        assert_bits("rmsnorm dw", dw[0], dw[1], (size_t)D * 4);
    }
    for (int w = 0; w < 2; w++) {
        free(y[w]);
        free(yb[w]);
        free(rs[w]);
        free(dx[w]);
        free(dw[w]);
    }
    free(x);
    free(wt);
    free(dy);
    free(dx0);
    free(dw0);
}

static void case_rope(const ag_backend *be, const ag_backend *ref) {
    const int64_t N = 29;
    const int nh = 3, hd = 64;
    rope_table rt = {.max_pos = 64, .head_dim = hd};
    rt.cos = host_rand(64 * hd / 2, 70, 1.0f);
    rt.sin = host_rand(64 * hd / 2, 71, 1.0f);
    int32_t pos[29];
    for (int i = 0; i < N; i++) pos[i] = (i * 7) % 64;
    const int64_t n = N * nh * hd;
    float *x = host_rand(n, 72, 1.0f), *dy = host_rand(n, 73, 1.0f), *dx0 = host_rand(n, 74, 0.5f);
    float *y[2], *dx[2];
    bf16 *yb[2];
    const ag_backend *bes[2] = {be, ref};
    for (int w = 0; w < 2; w++) {
        const ag_backend *b = bes[w];
        float *dX = to_dev(b, x, (size_t)n * 4), *dY = b->alloc((size_t)n * 4);
        bf16 *dYb = b->alloc((size_t)n * 2);
        float *dDY = to_dev(b, dy, (size_t)n * 4), *dDX = to_dev(b, dx0, (size_t)n * 4);
        b->rope_fwd(dX, dY, dYb, N, nh, &rt, pos);
        {
            bf16 *dYb2 = b->alloc((size_t)n * 2);
            b->rope_fwd(dX, NULL, dYb2, N, nh, &rt, pos);
            check_memo_only(b, "rope y bf16", dYb, dYb2, n);
            b->free(dYb2);
        }
        b->rope_bwd(dDY, dDX, N, nh, &rt, pos, 0);
        { /* write 1: dx = rot(−θ) dy into a buffer whose old contents (NaN) must not be read; equals the sum
           * onto zeros */
            float *dW = b->alloc((size_t)n * 4), *dZ = b->alloc((size_t)n * 4);
            b->fill_f32(dW, n, NAN);
            b->zero(dZ, (size_t)n * 4);
            b->rope_bwd(dDY, dW, N, nh, &rt, pos, 1);
            b->rope_bwd(dDY, dZ, N, nh, &rt, pos, 0);
            float *hw = to_host(b, dW, (size_t)n * 4), *hz = to_host(b, dZ, (size_t)n * 4);
            assert_same_values("rope dx written", hw, hz, n);
            free(hw);
            free(hz);
            b->free(dW);
            b->free(dZ);
        }
        y[w] = to_host(b, dY, (size_t)n * 4);
        yb[w] = to_host(b, dYb, (size_t)n * 2);
        dx[w] = to_host(b, dDX, (size_t)n * 4);
        b->free(dX);
        b->free(dY);
        b->free(dYb);
        b->free(dDY);
        b->free(dDX);
    }
    assert_bits("rope y", y[0], y[1], (size_t)n * 4);
    assert_bits("rope y bf16", yb[0], yb[1], (size_t)n * 2);
    assert_bits("rope dx", dx[0], dx[1], (size_t)n * 4);
    for (int w = 0; w < 2; w++) {
        free(y[w]);
        free(yb[w]);
        free(dx[w]);
    }
    free(x);
    free(dy);
    free(dx0);
    free(rt.cos);
    free(rt.sin);
}

/* The gated MLP's activation kernels, silu (swiglu_*) or the tanh GELU (geglu_*: a CUDA table is held to
 * NMSE there, its tanhf is not glibc's): forward with its three bf16 copies, backward from fp32 and from
 * bf16 saved inputs, accumulating into existing gradients (modes 0, 1), and from bf16 writing gradients
 * whose old contents (NaN here) must not be read (mode 2): dg0 + written == accumulated, bit for bit; and
 * writing them as bf16 (write 2, op_glu's gradients for the gate and up projections): each value the
 * bf16 rounding (nearest even) of the same backend's fp32 written value, bit for bit. */
static void case_glu(const ag_backend *be, const ag_backend *ref, int gelu) {
    const char *nm = gelu ? "geglu" : "swiglu";
    const int64_t n = 3 * 4096 + 1013; /* chunks of 4096, then a tail that is not a multiple of 16 */
    float *g = host_rand(n, 80, 6.0f), *u = host_rand(n, 81, 2.0f), *dy = host_rand(n, 82, 1.0f);
    float *dg0 = host_rand(n, 83, 0.1f), *du0 = host_rand(n, 84, 0.1f);
    g[17] = 100.0f; /* exp_poly's clamps; tanh saturates */
    g[18] = -100.0f;
    g[19] = 0.0f;
    bf16 *gb16 = malloc((size_t)n * 2), *ub16 = malloc((size_t)n * 2);
    float *nan0 = malloc((size_t)n * 4);
    for (int64_t i = 0; i < n; i++) {
        gb16[i] = f32_to_bf16(g[i]);
        ub16[i] = f32_to_bf16(u[i]);
        nan0[i] = NAN;
    }
    const ag_backend *bes[2] = {be, ref};
    enum { NMODE = 3 };
    float *y[2], *dg[2][NMODE], *du[2][NMODE];
    bf16 *yb[2], *gb[2], *ub[2], *dgw[2], *duw[2];
    for (int w = 0; w < 2; w++) {
        const ag_backend *b = bes[w];
        float *dG = to_dev(b, g, (size_t)n * 4), *dU = to_dev(b, u, (size_t)n * 4), *dY = b->alloc((size_t)n * 4);
        bf16 *dYb = b->alloc((size_t)n * 2), *dGb = b->alloc((size_t)n * 2), *dUb = b->alloc((size_t)n * 2);
        (gelu ? b->geglu_fwd : b->swiglu_fwd)(dG, dU, dY, dYb, dGb, dUb, n);
        {
            bf16 *dYb2 = b->alloc((size_t)n * 2);
            (gelu ? b->geglu_fwd : b->swiglu_fwd)(dG, dU, NULL, dYb2, NULL, NULL, n);
            check_memo_only(b, gelu ? "geglu y bf16" : "swiglu y bf16", dYb, dYb2, n);
            b->free(dYb2);
        }
        y[w] = to_host(b, dY, (size_t)n * 4);
        yb[w] = to_host(b, dYb, (size_t)n * 2);
        gb[w] = to_host(b, dGb, (size_t)n * 2);
        ub[w] = to_host(b, dUb, (size_t)n * 2);
        float *dDY = to_dev(b, dy, (size_t)n * 4);
        for (int mode = 0; mode < NMODE; mode++) { /* saved inputs fp32, then bf16; then bf16 written */
            const int isb = mode > 0, wr = mode == 2;
            const void *sg = isb ? (const void *)to_dev(b, gb16, (size_t)n * 2) : (const void *)dG;
            const void *su = isb ? (const void *)to_dev(b, ub16, (size_t)n * 2) : (const void *)dU;
            float *dDG = to_dev(b, wr ? nan0 : dg0, (size_t)n * 4), *dDU = to_dev(b, wr ? nan0 : du0, (size_t)n * 4);
            (gelu ? b->geglu_bwd : b->swiglu_bwd)(sg, su, isb, dDY, dDG, dDU, n, wr);
            dg[w][mode] = to_host(b, dDG, (size_t)n * 4);
            du[w][mode] = to_host(b, dDU, (size_t)n * 4);
            if (isb) {
                b->free((void *)sg);
                b->free((void *)su);
            }
            b->free(dDG);
            b->free(dDU);
        }
        { /* write 2: bf16 gradients, from bf16 saved inputs */
            const void *sg = to_dev(b, gb16, (size_t)n * 2), *su = to_dev(b, ub16, (size_t)n * 2);
            bf16 *dDG = b->alloc((size_t)n * 2), *dDU = b->alloc((size_t)n * 2);
            (gelu ? b->geglu_bwd : b->swiglu_bwd)(sg, su, 1, dDY, (float *)dDG, (float *)dDU, n, 2);
            dgw[w] = to_host(b, dDG, (size_t)n * 2);
            duw[w] = to_host(b, dDU, (size_t)n * 2);
            void *p2[] = {(void *)sg, (void *)su, dDG, dDU};
            for (size_t i = 0; i < sizeof p2 / sizeof p2[0]; i++) b->free(p2[i]);
        }
        void *ptrs[] = {dG, dU, dY, dYb, dGb, dUb, dDY};
        for (size_t i = 0; i < sizeof ptrs / sizeof ptrs[0]; i++) b->free(ptrs[i]);
    }
    char what[64];
#define GLU_NAME(s) (snprintf(what, sizeof what, "%s %s", nm, s), what)
    if (gelu) assert_bits_or_nmse(be, GLU_NAME("y"), y[0], y[1], n, 1e-12);
    else assert_bits(GLU_NAME("y"), y[0], y[1], (size_t)n * 4);
    if (!gelu || !is_cuda(be)) assert_bits(GLU_NAME("y bf16"), yb[0], yb[1], (size_t)n * 2);
    assert_bits(GLU_NAME("g bf16"), gb[0], gb[1], (size_t)n * 2);
    assert_bits(GLU_NAME("u bf16"), ub[0], ub[1], (size_t)n * 2);
    for (int mode = 0; mode < NMODE; mode++) {
        if (gelu) {
            assert_bits_or_nmse(be, GLU_NAME("dg"), dg[0][mode], dg[1][mode], n, 1e-12);
            assert_bits_or_nmse(be, GLU_NAME("du"), du[0][mode], du[1][mode], n, 1e-12);
        } else {
            assert_bits(GLU_NAME("dg"), dg[0][mode], dg[1][mode], (size_t)n * 4);
            assert_bits(GLU_NAME("du"), du[0][mode], du[1][mode], (size_t)n * 4);
        }
    }
    for (int w = 0; w < 2; w++) /* written = the term accumulated in mode 1 */
        for (int64_t i = 0; i < n; i++) {
            const float ag = dg0[i] + dg[w][2][i], au = du0[i] + du[w][2][i];
            if (memcmp(&ag, &dg[w][1][i], 4) || memcmp(&au, &du[w][1][i], 4))
                fail_msg("%s write mode at %lld on %s", nm, (long long)i, bes[w]->name);
        }
    for (int w = 0; w < 2; w++) /* bf16 written = bf16(fp32 written) */
        for (int64_t i = 0; i < n; i++)
            if (dgw[w][i] != f32_to_bf16(dg[w][2][i]) || duw[w][i] != f32_to_bf16(du[w][2][i]))
                fail_msg("%s bf16 write mode at %lld on %s: %04x %04x, expected %04x %04x", nm, (long long)i,
                         bes[w]->name, dgw[w][i], duw[w][i], f32_to_bf16(dg[w][2][i]), f32_to_bf16(du[w][2][i]));
#undef GLU_NAME
    for (int w = 0; w < 2; w++) {
        free(dgw[w]);
        free(duw[w]);
        free(y[w]);
        free(yb[w]);
        free(gb[w]);
        free(ub[w]);
        for (int mode = 0; mode < NMODE; mode++) {
            free(dg[w][mode]);
            free(du[w][mode]);
        }
    }
    free(g);
    free(u);
    free(dy);
    free(dg0);
    free(du0);
    free(gb16);
    free(ub16);
    free(nan0);
}

static void case_swiglu(const ag_backend *be, const ag_backend *ref) { case_glu(be, ref, 0); }
static void case_geglu(const ag_backend *be, const ag_backend *ref) { case_glu(be, ref, 1); }

/* copy_cols: a column block out of a wider matrix and accumulated back into another */
static void case_copy_cols(const ag_backend *be, const ag_backend *ref) {
    const int64_t rows = 37, C = 1000, c0 = 613, c = 259;
    float *x = host_rand(rows * C, 93, 1.0f), *g = host_rand(rows * C, 94, 1.0f);
    const ag_backend *bes[2] = {be, ref};
    float *y[2], *dx[2];
    for (int w = 0; w < 2; w++) {
        const ag_backend *b = bes[w];
        float *dX = to_dev(b, x, (size_t)(rows * C) * 4), *dG = to_dev(b, g, (size_t)(rows * C) * 4);
        float *dY = b->alloc((size_t)(rows * c) * 4);
        b->copy_cols(dY, c, dX + c0, C, rows, c, 0);
        y[w] = to_host(b, dY, (size_t)(rows * c) * 4);
        b->copy_cols(dG + c0, C, dY, c, rows, c, 1); /* g[:, c0:c0+c] += y */
        dx[w] = to_host(b, dG, (size_t)(rows * C) * 4);
        b->free(dX);
        b->free(dG);
        b->free(dY);
    }
    assert_bits("copy_cols", y[0], y[1], (size_t)(rows * c) * 4);
    assert_bits("copy_cols accumulate", dx[0], dx[1], (size_t)(rows * C) * 4);
    for (int64_t i = 0; i < rows; i++)
        for (int64_t j = 0; j < C; j++) {
            if (j < c) assert_true(y[1][i * c + j] == x[i * C + c0 + j]);
            float want = j >= c0 && j < c0 + c ? g[i * C + j] + x[i * C + j] : g[i * C + j];
            assert_true(dx[1][i * C + j] == want);
        }
    for (int w = 0; w < 2; w++) {
        free(y[w]);
        free(dx[w]);
    }
    free(x);
    free(g);
}

static void case_add_axpy(const ag_backend *be, const ag_backend *ref) {
    const int64_t n = 50003;
    float *a = host_rand(n, 90, 1.0f), *bb = host_rand(n, 91, 1.0f), *dy = host_rand(n, 92, 1.0f);
    const ag_backend *bes[2] = {be, ref};
    float *y[2], *da[2], *db[2], *ax[2];
    for (int w = 0; w < 2; w++) {
        const ag_backend *b = bes[w];
        float *dA = to_dev(b, a, (size_t)n * 4), *dB = to_dev(b, bb, (size_t)n * 4), *dY = b->alloc((size_t)n * 4);
        float *dDY = to_dev(b, dy, (size_t)n * 4);
        b->add(dA, dB, dY, n);
        y[w] = to_host(b, dY, (size_t)n * 4);
        b->add_bwd(dDY, dA, NULL, n); /* da += dy, db untouched */
        b->add_bwd(dDY, dA, dB, n);
        da[w] = to_host(b, dA, (size_t)n * 4);
        db[w] = to_host(b, dB, (size_t)n * 4);
        b->axpy(dY, -0.37f, dDY, n);
        ax[w] = to_host(b, dY, (size_t)n * 4);
        b->free(dA);
        b->free(dB);
        b->free(dY);
        b->free(dDY);
    }
    assert_bits("add", y[0], y[1], (size_t)n * 4);
    assert_bits("add_bwd da", da[0], da[1], (size_t)n * 4);
    assert_bits("add_bwd db", db[0], db[1], (size_t)n * 4);
    assert_bits("axpy", ax[0], ax[1], (size_t)n * 4);
    for (int64_t i = 0; i < n; i++) assert_true(y[1][i] == a[i] + bb[i]);
    for (int w = 0; w < 2; w++) {
        free(y[w]);
        free(da[w]);
        free(db[w]);
        free(ax[w]);
    }
    free(a);
    free(bb);
    free(dy);
}

/* ------------------------------------------------------------------ attention */

/* Runs attention forward and backward of one configuration on backend b with
 * a context of its own; returns o, dq, dk, dv, rmax (host copies). */
typedef struct attn_out {
    float *o, *dq, *dk, *dv, *rmax, *rinv;
    bf16 *ob;
} attn_out;

static void attn_run(const ag_backend *b, int B, int T, int H, int KVH, int hd, int bf, const int32_t *seq_ids,
                     int window, uint64_t seed, attn_out *out) {
    ag_ctx ctx;
    qerr e = {0};
    assert_int_equal(ag_ctx_init_backend(&ctx, b, 64u << 20, &e), 0);
    const int64_t nq = (int64_t)B * T * H * hd, nk = (int64_t)B * T * KVH * hd, nst = (int64_t)B * H * T;
    float *q = host_rand(nq, seed, 2.0f), *k = host_rand(nk, seed + 1, 2.0f), *v = host_rand(nk, seed + 2, 1.0f);
    float *dout = host_rand(nq, seed + 3, 1.0f);
    size_t es = bf ? 2 : 4;
    void *qo = malloc((size_t)nq * es), *ko = malloc((size_t)nk * es), *vo = malloc((size_t)nk * es),
         *doo = malloc((size_t)nq * es);
    for (int64_t i = 0; i < nq; i++) {
        if (bf) {
            ((bf16 *)qo)[i] = f32_to_bf16(q[i]);
            ((bf16 *)doo)[i] = f32_to_bf16(dout[i]);
        } else {
            ((float *)qo)[i] = q[i];
            ((float *)doo)[i] = dout[i];
        }
    }
    for (int64_t i = 0; i < nk; i++) {
        if (bf) {
            ((bf16 *)ko)[i] = f32_to_bf16(k[i]);
            ((bf16 *)vo)[i] = f32_to_bf16(v[i]);
        } else {
            ((float *)ko)[i] = k[i];
            ((float *)vo)[i] = v[i];
        }
    }
    ag_attn a = {.qb = to_dev(b, qo, (size_t)nq * es), .kb = to_dev(b, ko, (size_t)nk * es),
                 .vb = to_dev(b, vo, (size_t)nk * es), .seq_ids = seq_ids, .B = B, .T = T, .H = H, .KVH = KVH,
                 .hd = hd, .bf16 = bf, .window = window};
    a.rmax = b->alloc((size_t)nst * 4);
    a.rinv = b->alloc((size_t)nst * 4);
    a.seglo = b->alloc((size_t)B * T * 4);
    a.seg_ok = b->alloc((size_t)B);
    float *o = b->alloc((size_t)nq * 4);
    bf16 *ob = b->alloc((size_t)nq * 2);
    b->attention_fwd(&ctx, &a, o, ob);
    float *dq = b->alloc((size_t)nq * 4), *dk = b->alloc((size_t)nk * 4), *dv = b->alloc((size_t)nk * 4);
    b->zero(dq, (size_t)nq * 4);
    b->zero(dk, (size_t)nk * 4);
    b->zero(dv, (size_t)nk * 4);
    void *dob = to_dev(b, doo, (size_t)nq * es);
    b->attention_bwd(&ctx, &a, dob, dq, dk, dv, 0);
    { /* write 1 (gradients not yet started): into NaN-filled buffers, the same values as the sum onto zeros */
        float *wq = b->alloc((size_t)nq * 4), *wk = b->alloc((size_t)nk * 4), *wv = b->alloc((size_t)nk * 4);
        b->fill_f32(wq, nq, NAN);
        b->fill_f32(wk, nk, NAN);
        b->fill_f32(wv, nk, NAN);
        b->attention_bwd(&ctx, &a, dob, wq, wk, wv, 1);
        float *hq = to_host(b, wq, (size_t)nq * 4), *hk = to_host(b, wk, (size_t)nk * 4), *hv = to_host(b, wv, (size_t)nk * 4);
        float *zq = to_host(b, dq, (size_t)nq * 4), *zk = to_host(b, dk, (size_t)nk * 4), *zv = to_host(b, dv, (size_t)nk * 4);
        assert_same_values("attention dq written", hq, zq, nq);
        assert_same_values("attention dk written", hk, zk, nk);
        assert_same_values("attention dv written", hv, zv, nk);
        float *fr[] = {hq, hk, hv, zq, zk, zv};
        for (int i = 0; i < 6; i++) free(fr[i]);
        b->free(wq);
        b->free(wk);
        b->free(wv);
    }
    out->o = to_host(b, o, (size_t)nq * 4);
    out->ob = to_host(b, ob, (size_t)nq * 2);
    out->dq = to_host(b, dq, (size_t)nq * 4);
    out->dk = to_host(b, dk, (size_t)nk * 4);
    out->dv = to_host(b, dv, (size_t)nk * 4);
    out->rmax = to_host(b, a.rmax, (size_t)nst * 4);
    out->rinv = to_host(b, a.rinv, (size_t)nst * 4);
    void *ptrs[] = {(void *)a.qb, (void *)a.kb, (void *)a.vb, a.rmax, a.rinv, a.seglo, a.seg_ok, o, ob, dq, dk, dv, dob};
    for (size_t i = 0; i < sizeof ptrs / sizeof ptrs[0]; i++) b->free(ptrs[i]);
    free(q);
    free(k);
    free(v);
    free(dout);
    free(qo);
    free(ko);
    free(vo);
    free(doo);
    ag_ctx_free(&ctx);
}

static void attn_out_free(attn_out *o) {
    free(o->o);
    free(o->ob);
    free(o->dq);
    free(o->dk);
    free(o->dv);
    free(o->rmax);
    free(o->rinv);
}

static void attn_compare_window(const ag_backend *be, const ag_backend *ref, int B, int T, int H, int KVH, int hd,
                                const int32_t *seq_ids, int window, uint64_t seed) {
    for (int bf = 0; bf < 2; bf++) {
        attn_out x, r;
        attn_run(be, B, T, H, KVH, hd, bf, seq_ids, window, seed, &x);
        attn_run(ref, B, T, H, KVH, hd, bf, seq_ids, window, seed, &r);
        const int64_t nq = (int64_t)B * T * H * hd, nk = (int64_t)B * T * KVH * hd, nst = (int64_t)B * H * T;
        double bound = bf ? (is_cuda(be) ? NMSE_CUDA_ATTN_BF16 : NMSE_SOFTMAX_BF16) : NMSE_SOFTMAX_F32;
        assert_nmse(bf ? "attention o (bf16)" : "attention o (f32)", x.o, r.o, nq, bound);
        assert_nmse("attention row max", x.rmax, r.rmax, nst, bound);
        assert_nmse("attention row 1/sum", x.rinv, r.rinv, nst, bound);
        assert_nmse("attention dq", x.dq, r.dq, nq, bound);
        assert_nmse("attention dk", x.dk, r.dk, nk, bound);
        assert_nmse("attention dv", x.dv, r.dv, nk, bound);
        for (int64_t i = 0; i < nq; i++) assert_int_equal(x.ob[i], f32_to_bf16(x.o[i])); /* ob is o's bf16 copy */
        if (is_cuda(be)) { /* no atomics, sums in a fixed order: a second run repeats every bit */
            attn_out y;
            attn_run(be, B, T, H, KVH, hd, bf, seq_ids, window, seed, &y);
            assert_memory_equal(y.o, x.o, (size_t)nq * 4);
            assert_memory_equal(y.dq, x.dq, (size_t)nq * 4);
            assert_memory_equal(y.dk, x.dk, (size_t)nk * 4);
            assert_memory_equal(y.dv, x.dv, (size_t)nk * 4);
            attn_out_free(&y);
        }
        attn_out_free(&x);
        attn_out_free(&r);
    }
}

static void attn_compare(const ag_backend *be, const ag_backend *ref, int B, int T, int H, int KVH, int hd,
                         const int32_t *seq_ids, uint64_t seed) {
    attn_compare_window(be, ref, B, T, H, KVH, hd, seq_ids, 0, seed);
}

static void case_attention_shapes(const ag_backend *be, const ag_backend *ref);

/* The cpu backend's bf16 attention has two register-tiled kernels (autograd/backend_cpu_nn.inc):
 * AMX tiles where the processor and Linux grant them, vdpbf16ps otherwise (QLORA_CPU_AMX=0
 * forces it); the cuda backend has the tensor-core (flash) kernels for bf16 with head_dim a
 * multiple of 16 and the one-thread-per-row kernels (QLORA_CUDA_ATTN=simple forces them, the
 * second oracle). Both of a backend's kernels run here. */
static void case_attention(const ag_backend *be, const ag_backend *ref) {
    const char *var = is_cuda(be) ? "QLORA_CUDA_ATTN" : "QLORA_CPU_AMX", *second = is_cuda(be) ? "simple" : "0";
    const char *was = getenv(var);
    char keep[16] = "";
    if (was) snprintf(keep, sizeof keep, "%s", was);
    if (is_cuda(be)) unsetenv(var);
    case_attention_shapes(be, ref);
    setenv(var, second, 1);
    case_attention_shapes(be, ref);
    if (was) setenv(var, keep, 1);
    else unsetenv(var);
}

static void case_attention_shapes(const ag_backend *be, const ag_backend *ref) {
    /* T = 150: two query blocks of ATT_BQ = 128 (of ATT_BQB = 96 on the bf16 path), the second a tail;
     * GQA 6:2; hd 64 (SmolLM2) */
    enum { B = 2, T = 150 };
    attn_compare(be, ref, B, T, 6, 2, 64, NULL, 100);
    int32_t packed[B * T], scattered[B * T];
    for (int i = 0; i < B * T; i++) {
        int t = i % T;
        packed[i] = t < 37 ? 0 : (t < 120 ? 1 : 2); /* examples as contiguous runs: the vector-row path */
        scattered[i] = (t / 5) % 3;                 /* ids recurring after others: the general mask path */
    }
    attn_compare(be, ref, B, T, 6, 2, 64, packed, 101);
    attn_compare(be, ref, B, T, 4, 4, 40, scattered, 102);
    /* the register-tiled bf16 path (hd a multiple of 64): its general mask path, and T = 101
     * (an odd last tile of query rows, a key tile cut by T) with hd 128 and runs not 64-aligned */
    attn_compare(be, ref, B, T, 4, 2, 64, scattered, 103);
    enum { T2 = 101 };
    int32_t packed2[B * T2];
    for (int i = 0; i < B * T2; i++) {
        int t = i % T2;
        packed2[i] = t < 70 ? 0 : (t < 77 ? 1 : 2);
    }
    attn_compare(be, ref, B, T2, 4, 1, 128, packed2, 104);
    attn_compare(be, ref, 1, T2, 2, 2, 64, NULL, 105);
    /* a sliding window (Gemma 3's local layers, ag_attn.window): causal, packed and the general mask, on
     * the tiled kernels (hd 64) and the GEMM path (hd 40); on cuda the flash kernels (hd 64, tiles
     * outside the window skipped) and the simple ones (hd 40) */
    attn_compare_window(be, ref, B, T, 6, 2, 64, NULL, 40, 106);
    attn_compare_window(be, ref, B, T, 6, 2, 64, packed, 33, 107);
    attn_compare_window(be, ref, B, T, 4, 2, 64, scattered, 29, 108);
    attn_compare_window(be, ref, B, T, 4, 4, 40, scattered, 29, 109);
    /* a window longer than a 64-key tile, T past two query tiles of 64, hd 256 (Gemma 3 270M's; the
     * flash kernels' smallest tiles) and hd 16 */
    enum { T3 = 200 };
    attn_compare_window(be, ref, 1, T3, 4, 1, 256, NULL, 70, 110);
    attn_compare_window(be, ref, 1, T3, 2, 2, 16, NULL, 0, 111);
}

static void case_attention_cached(const ag_backend *be, const ag_backend *ref) {
    const int H = 6, KVH = 2, hd = 64, n = 5, max_pos = 40;
    const int64_t kvd = (int64_t)KVH * hd;
    float *K = host_rand(max_pos * kvd, 110, 2.0f), *V = host_rand(max_pos * kvd, 111, 1.0f);
    float *q = host_rand((int64_t)n * H * hd, 112, 2.0f);
    int32_t pos[5] = {31, 32, 33, 34, 35};
    for (int bf = 0; bf < 2; bf++) {
        float *out[2];
        const ag_backend *bes[2] = {be, ref};
        for (int w = 0; w < 2; w++) {
            const ag_backend *b = bes[w];
            ag_ctx ctx;
            qerr e = {0};
            assert_int_equal(ag_ctx_init_backend(&ctx, b, 4u << 20, &e), 0);
            ag_attn_cached a = {.q = to_dev(b, q, (size_t)n * H * hd * 4), .k = to_dev(b, K, (size_t)(max_pos * kvd) * 4),
                                .v = to_dev(b, V, (size_t)(max_pos * kvd) * 4), .pos = pos, .kv_dim = kvd, .n = n,
                                .H = H, .KVH = KVH, .hd = hd, .bf16 = bf, .window = bf ? 0 : 9}; /* fp32: a window */
            float *o = b->alloc((size_t)n * H * hd * 4);
            b->attention_cached(&ctx, &a, o);
            out[w] = to_host(b, o, (size_t)n * H * hd * 4);
            b->free((void *)a.q);
            b->free((void *)a.k);
            b->free((void *)a.v);
            b->free(o);
            ag_ctx_free(&ctx);
        }
        assert_bits_or_nmse(be, "attention_cached", out[0], out[1], (int64_t)n * H * hd, NMSE_CUDA_ROWSUM);
        free(out[0]);
        free(out[1]);
    }
    free(K);
    free(V);
    free(q);
}

/* ------------------------------------------------------------------ LM head + cross-entropy */

typedef struct ce_out {
    double loss;
    int64_t count;
    float *dh;
    int32_t *labels;
} ce_out;

/* h and W take values k/16, |k| <= 16, so every logit is an exact fp32 sum
 * in any order (products k·k'/256, sums of D ≤ 72 of them stay far inside
 * 24 bits): both backends see the same logits bit for bit whatever their GEMM,
 * and only the softmax sums differ in rounding. */
static float *host_grid(int64_t n, uint64_t seed) {
    float *x = malloc((size_t)n * sizeof(float));
    for (int64_t i = 0; i < n; i++) x[i] = floorf(16.0f * frand(seed, (uint64_t)i)) / 16.0f;
    return x;
}

static void ce_run(const ag_backend *b, int64_t N, int64_t D, int64_t V, const float *h, const float *W,
                   const int32_t *targets, ag_ce_mode mode, int bf, int grad, ce_out *out) {
    ag_ctx ctx;
    qerr e = {0};
    assert_int_equal(ag_ctx_init_backend(&ctx, b, 16u << 20, &e), 0);
    void *wop;
    if (bf) {
        bf16 *wb = malloc((size_t)(V * D) * 2);
        for (int64_t i = 0; i < V * D; i++) wb[i] = f32_to_bf16(W[i]);
        wop = to_dev(b, wb, (size_t)(V * D) * 2);
        free(wb);
    } else {
        wop = to_dev(b, W, (size_t)(V * D) * 4);
    }
    float *dh = grad ? b->alloc((size_t)(N * D) * 4) : NULL;
    if (dh) b->zero(dh, (size_t)(N * D) * 4);
    float *hd = to_dev(b, h, (size_t)(N * D) * 4);
    out->labels = malloc((size_t)N * sizeof(int32_t));
    ag_ce_args a = {.h = hd, .w = wop, .N = N, .D = D, .V = V, .targets = targets, .mode = mode, .seed = 0xabcdef,
                    .scale = 1.0f / 97.0f, .dh = dh, .labels = out->labels, .bf16 = bf};
    out->loss = b->lm_head_ce(&ctx, &a, &out->count);
    out->dh = dh ? to_host(b, dh, (size_t)(N * D) * 4) : NULL;
    b->free(wop);
    b->free(dh);
    b->free(hd);
    ag_ctx_free(&ctx);
}

static void case_lm_head_ce(const ag_backend *be, const ag_backend *ref) {
    /* N = 300 rows: chunks of 128, 128 and a 44-row tail; V = 1003 (a tail of 11 lanes) */
    const int64_t N = 300, D = 72, V = 1003;
    float *h = host_grid(N * D, 120), *W = host_grid(V * D, 121);
    int32_t *targets = malloc((size_t)N * sizeof(int32_t));
    for (int64_t i = 0; i < N; i++) targets[i] = i % 7 == 3 ? -100 : (int32_t)((i * 131) % V);
    for (int64_t i = 0; i < 128; i++) targets[128 + i] = i % 2 ? -100 : targets[128 + i];
    for (int mode = 0; mode < 2; mode++)
        for (int bf = 0; bf < 2; bf++)
            for (int grad = 0; grad < 2; grad++) {
                ce_out x, r;
                ce_run(be, N, D, V, h, W, targets, (ag_ce_mode)mode, bf, grad, &x);
                ce_run(ref, N, D, V, h, W, targets, (ag_ce_mode)mode, bf, grad, &r);
                assert_int_equal(x.count, r.count);
                /* the sampled labels (and the given ones) are identical: same logits, and the draw
                 * reads the softmax through scalar exp_poly in both */
                assert_bits("lm_head_ce labels", x.labels, r.labels, (size_t)N * sizeof(int32_t));
                for (int64_t i = 0; i < N; i++) {
                    if (targets[i] == -100) assert_int_equal(r.labels[i], -100);
                    else if (mode == AG_CE_TARGETS) assert_int_equal(r.labels[i], targets[i]);
                    else assert_true(r.labels[i] >= 0 && r.labels[i] < V);
                }
                double rel = fabs(x.loss - r.loss) / fabs(r.loss);
                if (!(rel < 1e-6)) fail_msg("lm_head_ce loss %.9g vs %.9g", x.loss, r.loss);
                if (grad) assert_nmse("lm_head_ce dh", x.dh, r.dh, N * D, bf ? NMSE_SOFTMAX_BF16 : NMSE_SOFTMAX_F32);
                free(x.dh);
                free(r.dh);
                free(x.labels);
                free(r.labels);
            }
    /* the sampled mode draws different labels from different seeds' streams but the same
     * labels from the same seed: run twice on the same backend */
    ce_out s1, s2;
    ce_run(be, N, D, V, h, W, NULL, AG_CE_SAMPLED, 1, 0, &s1);
    ce_run(be, N, D, V, h, W, NULL, AG_CE_SAMPLED, 1, 0, &s2);
    assert_int_equal(s1.count, N);
    assert_bits("sampled labels, same seed", s1.labels, s2.labels, (size_t)N * sizeof(int32_t));
    free(s1.labels);
    free(s2.labels);
    free(h);
    free(W);
    free(targets);
}

/* ------------------------------------------------------------------ optimizer, clipping */

static void case_adamw(const ag_backend *be, const ag_backend *ref) {
    const int64_t n = 70001;
    float *p = host_rand(n, 130, 1.0f), *g = host_rand(n, 131, 0.01f), *m = host_rand(n, 132, 0.001f);
    float *v = host_rand(n, 133, 1e-5f);
    for (int64_t i = 0; i < n; i++) v[i] = fabsf(v[i]);
    uint8_t *mask = malloc((size_t)n);
    for (int64_t i = 0; i < n; i++) mask[i] = (uint8_t)(i % 5 != 0);
    const ag_adamw_coef cs[2] = {
        {.decay = 1, .lerp_small = 1, .decay_f = 0.99996f, .lerp_coeff = 0.1f, .beta2_f = 0.999f,
         .one_minus_beta2_f = 0.001f, .bc2_sqrt_f = 0.0316f, .eps_f = 1e-8f, .neg_step_f = -4e-4f},
        {.decay = 0, .lerp_small = 0, .decay_f = 1.0f, .lerp_coeff = -0.3f, .beta2_f = 0.99f,
         .one_minus_beta2_f = 0.01f, .bc2_sqrt_f = 0.5f, .eps_f = 1e-6f, .neg_step_f = -1e-3f}};
    for (int c = 0; c < 2; c++) {
        float *out[2][3];
        const ag_backend *bes[2] = {be, ref};
        for (int w = 0; w < 2; w++) {
            const ag_backend *b = bes[w];
            float *dp = to_dev(b, p, (size_t)n * 4), *dg = to_dev(b, g, (size_t)n * 4);
            float *dm = to_dev(b, m, (size_t)n * 4), *dv = to_dev(b, v, (size_t)n * 4);
            b->adamw_update(dp, dg, dm, dv, n, c ? NULL : mask, &cs[c]);
            out[w][0] = to_host(b, dp, (size_t)n * 4);
            out[w][1] = to_host(b, dm, (size_t)n * 4);
            out[w][2] = to_host(b, dv, (size_t)n * 4);
            b->free(dp);
            b->free(dg);
            b->free(dm);
            b->free(dv);
        }
        for (int k = 0; k < 3; k++) {
            assert_bits("adamw_update", out[0][k], out[1][k], (size_t)n * 4);
            free(out[0][k]);
            free(out[1][k]);
        }
    }
    free(p);
    free(g);
    free(m);
    free(v);
    free(mask);
}

static void case_sophia(const ag_backend *be, const ag_backend *ref) {
    const int64_t n = 70001;
    float *p = host_rand(n, 140, 1.0f), *g = host_rand(n, 141, 0.01f), *m = host_rand(n, 142, 0.01f);
    float *h = host_rand(n, 143, 1e-3f);
    for (int64_t i = 0; i < n; i++) h[i] = i % 11 == 0 ? 0.0f : fabsf(h[i]);
    uint8_t *mask = malloc((size_t)n);
    for (int64_t i = 0; i < n; i++) mask[i] = (uint8_t)(i % 3 != 0);
    const ag_sophia_coef co = {.decay_f = 0.99999f, .beta1_f = 0.965f, .one_minus_beta1_f = 0.035f,
                               .rho_bs_f = 0.04f * 1024.0f, .eps_f = 1e-15f, .neg_lr_f = -1e-4f};
    float *out[2][3];
    int64_t wins[2];
    const ag_backend *bes[2] = {be, ref};
    for (int w = 0; w < 2; w++) {
        const ag_backend *b = bes[w];
        float *dp = to_dev(b, p, (size_t)n * 4), *dg = to_dev(b, g, (size_t)n * 4);
        float *dm = to_dev(b, m, (size_t)n * 4), *dh = to_dev(b, h, (size_t)n * 4);
        wins[w] = b->sophia_update(dp, dg, dm, dh, n, mask, &co);
        b->sophia_hessian(dh, dg, n, 0.99f, 0.01f);
        out[w][0] = to_host(b, dp, (size_t)n * 4);
        out[w][1] = to_host(b, dm, (size_t)n * 4);
        out[w][2] = to_host(b, dh, (size_t)n * 4);
        b->free(dp);
        b->free(dg);
        b->free(dm);
        b->free(dh);
    }
    assert_int_equal(wins[0], wins[1]);
    assert_true(wins[1] > 0 && wins[1] < n);
    for (int k = 0; k < 3; k++) {
        assert_bits(k < 2 ? "sophia_update" : "sophia_hessian", out[0][k], out[1][k], (size_t)n * 4);
        free(out[0][k]);
        free(out[1][k]);
    }
    free(p);
    free(g);
    free(m);
    free(h);
    free(mask);
}

/* A parameter vector after a bitsandbytes-style update on `cuda`: the device takes the IEEE square root
 * where the CPU takes torch's AVX-512 root (one ulp apart for ~0.7 % of inputs, backend_cuda_elem.h), so an
 * element may differ by the step that one ulp of the root makes: ≤ 4 ulp of the parameter here (the step is
 * ~1e-4 of the parameter, its relative change 1.2e-7), in at most 2 % of the elements. */
static void assert_root_ulp_close(const char *what, const float *x, const float *ref, int64_t n) {
    int64_t diff = 0;
    for (int64_t i = 0; i < n; i++) {
        if (memcmp(&x[i], &ref[i], 4) == 0) continue;
        diff++;
        const float tol = 4.0f * (nextafterf(fabsf(ref[i]), INFINITY) - fabsf(ref[i]));
        if (!(fabsf(x[i] - ref[i]) <= tol))
            fail_msg("%s at %lld: %.9g vs %.9g (more than 4 ulp)", what, (long long)i, (double)x[i], (double)ref[i]);
    }
    if (diff * 50 > n) fail_msg("%s: %lld of %lld elements differ (> 2 %%)", what, (long long)diff, (long long)n);
}

/* bitsandbytes' 8-bit AdamW and its 32-bit update (optim/adamw8bit.c): bit for bit (same scalar sequence,
 * the same quantizer table) — on `cuda` the parameters within the root's ulp (assert_root_ulp_close), the
 * moments, absmax and codes bit for bit; 70001 elements in blocks of 256, the last one partial, one
 * all-zero block. */
static void case_adamw8bit(const ag_backend *be, const ag_backend *ref) {
    const int64_t n = 70001, nb = (n + 255) / 256;
    float *p = host_rand(n, 150, 0.05f), *g = host_rand(n, 151, 0.01f), *m = host_rand(n, 152, 0.001f);
    float *v = host_rand(n, 153, 1e-5f);
    for (int64_t i = 0; i < n; i++) v[i] = fabsf(v[i]);
    for (int64_t i = 256; i < 512; i++) g[i] = 0.0f; /* block 1: zero gradient, zero moments */
    uint8_t *q1 = malloc((size_t)n), *q2 = malloc((size_t)n), *lut1 = malloc(BW8_LUT_SIZE), *lut2 = malloc(BW8_LUT_SIZE);
    float *a1 = malloc((size_t)nb * 4), *a2 = malloc((size_t)nb * 4), map1[256], map2[256];
    bw8_dynamic_map(1, map1);
    bw8_dynamic_map(0, map2);
    bw8_build_lut(map1, lut1);
    bw8_build_lut(map2, lut2);
    for (int64_t b = 0; b < nb; b++) { /* a state that dequantizes to m, v */
        const int64_t i0 = b * 256, len = n - i0 < 256 ? n - i0 : 256;
        if (b == 1) memset(m + i0, 0, 256 * 4), memset(v + i0, 0, 256 * 4);
        bw8_quantize_block(m + i0, len, lut1, q1 + i0, &a1[b]);
        bw8_quantize_block(v + i0, len, lut2, q2 + i0, &a2[b]);
    }
    const ag_adamw8bit_coef co = {.decay = 1, .decay_f = 0.99999f, .beta1_f = 0.9f, .one_minus_beta1_f = 0.1f,
                                  .beta2_f = 0.999f, .one_minus_beta2_f = 0.001f, .correction2_f = 0.0447f,
                                  .eps_f = 1e-8f, .step8_f = -5.2e-3f, .eps_c2_f = 4.47e-10f, .step32_f = -2.3e-4f};
    void *out[2][7];
    const ag_backend *bes[2] = {be, ref};
    for (int w = 0; w < 2; w++) {
        const ag_backend *b = bes[w];
        float *dp = to_dev(b, p, (size_t)n * 4), *dg = to_dev(b, g, (size_t)n * 4);
        uint8_t *dq1 = to_dev(b, q1, (size_t)n), *dq2 = to_dev(b, q2, (size_t)n);
        float *da1 = to_dev(b, a1, (size_t)nb * 4), *da2 = to_dev(b, a2, (size_t)nb * 4);
        float *dm1 = to_dev(b, map1, sizeof map1), *dm2 = to_dev(b, map2, sizeof map2);
        uint8_t *dl1 = to_dev(b, lut1, BW8_LUT_SIZE), *dl2 = to_dev(b, lut2, BW8_LUT_SIZE);
        b->adamw8bit_update(dp, dg, dq1, dq2, da1, da2, dm1, dm2, dl1, dl2, n, 256, &co);
        float *dp32 = to_dev(b, p, (size_t)n * 4), *dm = to_dev(b, m, (size_t)n * 4), *dv = to_dev(b, v, (size_t)n * 4);
        b->adamw_bnb32_update(dp32, dg, dm, dv, n, &co);
        out[w][0] = to_host(b, dp, (size_t)n * 4);
        out[w][1] = to_host(b, dq1, (size_t)n);
        out[w][2] = to_host(b, dq2, (size_t)n);
        out[w][3] = to_host(b, da1, (size_t)nb * 4);
        out[w][4] = to_host(b, dp32, (size_t)n * 4);
        out[w][5] = to_host(b, dm, (size_t)n * 4);
        out[w][6] = to_host(b, dv, (size_t)n * 4);
        void *fr[] = {dp, dg, dq1, dq2, da1, da2, dm1, dm2, dl1, dl2, dp32, dm, dv};
        for (size_t k = 0; k < sizeof fr / sizeof fr[0]; k++) b->free(fr[k]);
    }
    const size_t bytes[7] = {(size_t)n * 4, (size_t)n, (size_t)n, (size_t)nb * 4, (size_t)n * 4, (size_t)n * 4,
                             (size_t)n * 4};
    for (int k = 0; k < 7; k++) {
        const char *what = k < 4 ? "adamw8bit_update" : "adamw_bnb32_update";
        if ((k == 0 || k == 4) && strcmp(be->name, "cuda") == 0)
            assert_root_ulp_close(what, out[0][k], out[1][k], n);
        else
            assert_bits(what, out[0][k], out[1][k], bytes[k]);
        free(out[0][k]);
        free(out[1][k]);
    }
    free(p), free(g), free(m), free(v), free(q1), free(q2), free(lut1), free(lut2), free(a1), free(a2);
}

static void case_sumsq_scale_nonfinite(const ag_backend *be, const ag_backend *ref) {
    const int64_t sizes[] = {0, 1, 7, 8191, 100003, 3000001};
    for (size_t s = 0; s < sizeof sizes / sizeof sizes[0]; s++) {
        const int64_t n = sizes[s];
        float *x = host_rand(n, 150 + s, 0.05f);
        double ss[2];
        float *sc[2];
        int64_t bad[2];
        const ag_backend *bes[2] = {be, ref};
        for (int w = 0; w < 2; w++) {
            const ag_backend *b = bes[w];
            float *dx = to_dev(b, x, (size_t)n * 4);
            ss[w] = b->sum_squares(dx, n);
            b->scale(dx, n, 0.731f);
            sc[w] = to_host(b, dx, (size_t)n * 4);
            if (n > 7) {
                b->fill_f32(dx + 3, 1, NAN);
                b->fill_f32(dx + n - 1, 1, -INFINITY);
            }
            bad[w] = b->count_nonfinite(dx, n);
            b->free(dx);
        }
        assert_true(memcmp(&ss[0], &ss[1], sizeof ss[0]) == 0);
        double plain = 0.0;
        for (int64_t i = 0; i < n; i++) plain += (double)x[i] * x[i];
        /* a sum of n positive doubles in any order is within n·2^-53 (relative) of the exact sum */
        assert_true(fabs(ss[1] - plain) <= 2.0 * (double)n * 0x1p-53 * plain);
        assert_bits("scale", sc[0], sc[1], (size_t)n * 4);
        assert_int_equal(bad[0], bad[1]);
        assert_int_equal(bad[1], n > 7 ? 2 : 0);
        free(sc[0]);
        free(sc[1]);
        free(x);
    }
}

/* ------------------------------------------------------------------ driver */

/* ------------------------------------------------------------------ host offload */

/* host_alloc, offload_start both ways, offload_wait, host_free: bits round-trip. The d2h and the h2d
 * of the same host buffer are started back to back: they run in start order (the copy stream), so the
 * h2d reads what the d2h wrote without a wait in between; a kernel after the h2d's wait reads its
 * result; a d2h started after a kernel copies what the kernel wrote. */
static void case_offload(const ag_backend *be, const ag_backend *ref) {
    (void)ref;
    const int64_t n = 70001;
    const size_t bytes = (size_t)n * sizeof(float);
    float *h = host_rand(n, 21, 2.0f);
    float *d = to_dev(be, h, bytes), *d2 = be->alloc(bytes);
    assert_non_null(d2);
    float *pin = be->host_alloc(bytes);
    assert_non_null(pin);
    uint64_t t1 = be->offload_start(pin, d, bytes, 1);
    uint64_t t2 = be->offload_start(d2, pin, bytes, 0);
    assert_true(t1 > 0 && t2 > 0);
    be->offload_wait(t2);
    be->scale(d2, n, 2.0f); /* runs after the copy into d2 */
    be->offload_wait(t1);
    be->fill_f32(d, n, 0.0f); /* the d2h source, written only after its wait */
    float *back = to_host(be, d2, bytes);
    for (int64_t i = 0; i < n; i++) h[i] *= 2.0f;
    assert_bits("d2h, h2d, scale", back, h, bytes);
    free(back);
    uint64_t t3 = be->offload_start(pin, d2, bytes, 1); /* after the scale */
    be->offload_wait(t3);
    be->sync();
    assert_bits("d2h after a kernel", pin, h, bytes);
    be->host_free(pin);
    be->host_free(NULL);
    be->free(d);
    be->free(d2);
    free(h);
}

static const struct {
    const char *name;
    case_fn fn;
} g_cases[] = {
    {"memory", case_memory},
    {"gemm", case_gemm},
    {"lora_gemm", case_lora_gemm},
    {"lora_gemm_amx", case_lora_gemm_amx},
    {"frozen_rows", case_frozen_rows},
    {"frozen_t", case_frozen_t},
    {"to_bf16", case_to_bf16},
    {"round_f16", case_round_f16},
    {"dropout", case_dropout},
    {"embedding", case_embedding},
    {"embedding_bwd", case_embedding_bwd},
    {"rmsnorm", case_rmsnorm},
    {"rope", case_rope},
    {"swiglu", case_swiglu},
    {"geglu", case_geglu},
    {"add_axpy", case_add_axpy},
    {"copy_cols", case_copy_cols},
    {"attention", case_attention},
    {"attention_cached", case_attention_cached},
    {"lm_head_ce", case_lm_head_ce},
    {"adamw", case_adamw},
    {"adamw8bit", case_adamw8bit},
    {"sophia", case_sophia},
    {"sumsq_scale_nonfinite", case_sumsq_scale_nonfinite},
    {"offload", case_offload},
};

/* Every table entry is named by some case (a new entry must add one). */
static void test_every_entry_covered(void **state) {
    (void)state;
    const char *covered[] = {"alloc", "free", "copy_h2d", "copy_d2h", "copy_d2d", "zero", "fill_f32", "sync",
                             "gemm", "lora_gemm", "frozen_rows_f32", "frozen_rows_bf16", "frozen_t_bf16", "frozen_data", "to_bf16", "dropout_fwd", "dropout_bwd",
                             "embedding", "rmsnorm_fwd", "rmsnorm_bwd", "rope_fwd", "rope_bwd", "attention_fwd",
                             "attention_bwd", "attention_cached", "swiglu_fwd", "swiglu_bwd", "geglu_fwd", "geglu_bwd", "add", "add_bwd",
                             "axpy", "copy_cols", "lm_head_ce", "adamw_update", "adamw8bit_update", "adamw_bnb32_update",
                             "sophia_update", "sophia_hessian", "sum_squares",
                             "scale", "count_nonfinite", "embedding_bwd", "host_alloc", "host_free", "offload_start", "offload_wait",
                             "round_f16"};
    /* the table is `name` plus one function pointer per entry */
    size_t n_entries = (sizeof(ag_backend) - offsetof(ag_backend, alloc)) / sizeof(void (*)(void));
    assert_int_equal(n_entries, sizeof covered / sizeof covered[0]);
    for (const char *const *nm = ag_backend_names; *nm; nm++) { /* every available table is complete */
        const ag_backend *b = ag_backend_find(*nm);
        if (!b) continue;
        void (*const *fp)(void) = (void (*const *)(void))((const char *)b + offsetof(ag_backend, alloc));
        for (size_t i = 0; i < n_entries; i++) /* frozen_t_bf16 may be NULL: backend.h (cuda's GEMM transposes op(B)) */
            if (!fp[i] && strcmp(covered[i], "frozen_t_bf16") != 0) fail_msg("backend %s: entry %s is NULL", *nm, covered[i]);
    }
}

int main(void) {
    size_t n_cases = sizeof g_cases / sizeof g_cases[0], n_be = 0;
    for (const char *const *nm = ag_backend_names; *nm; nm++)
        if (strcmp(*nm, g_ref_name) != 0) n_be++;
    struct CMUnitTest *tests = calloc(n_cases * n_be + 1, sizeof *tests);
    case_state *states = calloc(n_cases * n_be, sizeof *states);
    char (*names)[64] = calloc(n_cases * n_be, sizeof *names);
    if (!tests || !states || !names) return 1;
    size_t k = 0;
    tests[k++] = (struct CMUnitTest){"every_entry_covered", test_every_entry_covered, NULL, NULL, NULL};
    for (const char *const *nm = ag_backend_names; *nm; nm++) {
        if (strcmp(*nm, g_ref_name) == 0) continue;
        for (size_t c = 0; c < n_cases; c++, k++) {
            size_t i = k - 1;
            states[i] = (case_state){*nm, g_cases[c].fn};
            snprintf(names[i], sizeof names[i], "%s/%s", *nm, g_cases[c].name);
            tests[k] = (struct CMUnitTest){names[i], run_case, NULL, NULL, &states[i]};
        }
    }
    int rc = _cmocka_run_group_tests("backend_ops", tests, k, NULL, NULL);
    free(tests);
    free(states);
    free(names);
    return rc;
}
