/* autograd/lora_gemm.c — the LoRA products on AMX tiles (see lora_gemm.h), gemm() for everything else. */
#include "autograd/lora_gemm.h"

#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "autograd/prof.h"
#include "core/bf16.h"
#include "core/clock.h"
#include "core/parse.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BW__)
#define LG_AMX 1
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

static int64_t g_calls;
static double g_seconds, g_flops;

void lora_gemm_amx_stats(int64_t *calls, double *seconds, double *flops) {
    if (calls) *calls = g_calls;
    if (seconds) *seconds = g_seconds;
    if (flops) *flops = g_flops;
}

void lora_gemm_amx_stats_reset(void) {
    g_calls = 0;
    g_seconds = 0.0;
    g_flops = 0.0;
}

#ifdef LG_AMX
enum { LG_TILE = 16, LG_KSTEP = 32, LG_MAXN = 64 };

typedef struct lg_tilecfg {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} lg_tilecfg;

/* tmm0-3: C (16 × 16 fp32); tmm4: A (16 rows × 16 bf16 pairs); tmm5: B (16 pairs × 16 columns × 2);
 * tmm6, tmm7: A and B of a short-K product (16 rows × kp pairs, kp pairs × 16 columns), kp = 1..16. */
static void lg_config_k(int kp) {
    lg_tilecfg c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 6; t++) {
        c.rows[t] = 16;
        c.colsb[t] = 64;
    }
    c.rows[6] = 16;
    c.colsb[6] = (uint16_t)(4 * kp);
    c.rows[7] = (uint8_t)kp;
    c.colsb[7] = 64;
    _tile_loadconfig(&c);
}

static void lg_config(void) { lg_config_k(16); }

static void lg_zero(int t) {
    switch (t) {
    case 0: _tile_zero(0); break;
    case 1: _tile_zero(1); break;
    case 2: _tile_zero(2); break;
    default: _tile_zero(3); break;
    }
}

static void lg_dp(int t) { /* C tile t += tmm4 · tmm5 */
    switch (t) {
    case 0: _tile_dpbf16ps(0, 4, 5); break;
    case 1: _tile_dpbf16ps(1, 4, 5); break;
    case 2: _tile_dpbf16ps(2, 4, 5); break;
    default: _tile_dpbf16ps(3, 4, 5); break;
    }
}

static void lg_store(int t, float *dst) { /* 16 × 16 fp32, row stride 64 B */
    switch (t) {
    case 0: _tile_stored(0, dst, 64); break;
    case 1: _tile_stored(1, dst, 64); break;
    case 2: _tile_stored(2, dst, 64); break;
    default: _tile_stored(3, dst, 64); break;
    }
}

/* A process-wide buffer grown to n bytes (the calls come from one thread; aborts on out of memory). */
static void *lg_buf(void **p, size_t *have, size_t n) {
    if (*have < n) {
        free(*p);
        *p = aligned_alloc(64, (n + 63) / 64 * 64);
        if (!*p) {
            fprintf(stderr, "[lora_gemm] out of memory (%zu bytes)\n", n);
            abort();
        }
        *have = (n + 63) / 64 * 64;
    }
    return *p;
}

static void *g_yp, *g_st, *g_thr;
static size_t g_yp_n, g_st_n, g_thr_n;

/* C (M, N) (+)= alpha · X (M, K) · Y (K, N); X bf16 row-major (ldx), Y in pair layout yp[(kp·Np + n)·2 + e]
 * = Y[2kp + e][n] (0 for n >= N), Np = N rounded up to 16, K a multiple of 32. Token tiles of 16 rows in
 * parallel; a last partial tile is copied into a zero-padded per-thread buffer. */
static void lg_skinny_out(int64_t M, int64_t N, int64_t K, float alpha, const bf16 *X, int64_t ldx,
                          const bf16 *yp, float beta, float *C, int64_t ldc) {
    const int64_t Np = (N + 15) / 16 * 16, nc = Np / 16, ntile = (M + LG_TILE - 1) / LG_TILE;
    const size_t per = (size_t)LG_TILE * (size_t)K * sizeof(bf16) + (size_t)LG_MAXN * LG_TILE * sizeof(float);
    char *thr = lg_buf(&g_thr, &g_thr_n, per * (size_t)omp_get_max_threads());
#pragma omp parallel if (!omp_in_parallel())
    {
        lg_config();
        bf16 *pad = (bf16 *)(thr + per * (size_t)omp_get_thread_num());
        float *T = (float *)((char *)pad + (size_t)LG_TILE * (size_t)K * sizeof(bf16));
#pragma omp for schedule(static)
        for (int64_t it = 0; it < ntile; it++) {
            const int64_t i0 = it * LG_TILE, rows = M - i0 < LG_TILE ? M - i0 : LG_TILE;
            const bf16 *Ap = X + i0 * ldx;
            int64_t as = ldx * (int64_t)sizeof(bf16);
            if (rows < LG_TILE) {
                for (int64_t r = 0; r < LG_TILE; r++)
                    if (r < rows) memcpy(pad + r * K, X + (i0 + r) * ldx, (size_t)K * sizeof(bf16));
                    else memset(pad + r * K, 0, (size_t)K * sizeof(bf16));
                Ap = pad;
                as = K * (int64_t)sizeof(bf16);
            }
            for (int c = 0; c < nc; c++) lg_zero(c);
            for (int64_t k0 = 0; k0 < K; k0 += LG_KSTEP) {
                _tile_loadd(4, Ap + k0, as);
                for (int c = 0; c < nc; c++) {
                    _tile_loadd(5, yp + ((k0 / 2) * Np + 16 * c) * 2, Np * 2 * (int64_t)sizeof(bf16));
                    lg_dp(c);
                }
            }
            for (int c = 0; c < nc; c++) lg_store(c, T + c * 256);
            for (int64_t r = 0; r < rows; r++)
                for (int64_t n = 0; n < N; n++) {
                    const float v = alpha * T[(n / 16) * 256 + r * 16 + n % 16];
                    float *cp = C + (i0 + r) * ldc + n;
                    *cp = beta != 0.0f ? *cp + v : v;
                }
        }
        _tile_release();
    }
}

/* C (M, N) = alpha · A (M, K) · Y (K, N) for a short K (2..32, even): the K = r products y = s·u·Bᵀ and
 * dx = du·A with a fresh output. yp is Y in pair layout (as lg_skinny_out's, Np = N here, a multiple of 16);
 * each 16 × 16 output tile is one tdpbf16ps, scaled by alpha in fp32 (as oneDNN's output scale) and stored
 * once (plain stores: streaming ones, which skip the read-for-ownership, measured slower in the step, the
 * frozen product and SwiGLU read C next). Token tiles of 16 rows in parallel; a last partial tile via a
 * zero-padded copy of its rows of A. */
static void lg_short_k(int64_t M, int64_t N, int64_t K, float alpha, const bf16 *A, int64_t lda, const bf16 *yp,
                       float *C, int64_t ldc) {
    const int kp = (int)(K / 2);
    const int64_t ntile = (M + LG_TILE - 1) / LG_TILE;
    const size_t per = (size_t)LG_TILE * 32 * sizeof(bf16) + 256 * sizeof(float);
    char *thr = lg_buf(&g_thr, &g_thr_n, per * (size_t)omp_get_max_threads());
    const __m512 va = _mm512_set1_ps(alpha);
#pragma omp parallel if (!omp_in_parallel())
    {
        lg_config_k(kp);
        bf16 *pad = (bf16 *)(thr + per * (size_t)omp_get_thread_num());
        float *T = (float *)((char *)pad + (size_t)LG_TILE * 32 * sizeof(bf16));
#pragma omp for schedule(static)
        for (int64_t it = 0; it < ntile; it++) {
            const int64_t i0 = it * LG_TILE, rows = M - i0 < LG_TILE ? M - i0 : LG_TILE;
            if (rows < LG_TILE) {
                for (int64_t r = 0; r < LG_TILE; r++)
                    if (r < rows) memcpy(pad + r * K, A + (i0 + r) * lda, (size_t)K * sizeof(bf16));
                    else memset(pad + r * K, 0, (size_t)K * sizeof(bf16));
                _tile_loadd(6, pad, K * (int64_t)sizeof(bf16));
            } else {
                _tile_loadd(6, A + i0 * lda, lda * (int64_t)sizeof(bf16));
            }
            for (int64_t n0 = 0; n0 < N; n0 += 16) {
                _tile_loadd(7, yp + n0 * 2, N * 2 * (int64_t)sizeof(bf16));
                _tile_zero(0);
                _tile_dpbf16ps(0, 6, 7);
                _tile_stored(0, T, 64);
                for (int64_t r = 0; r < rows; r++)
                    _mm512_storeu_ps(C + (i0 + r) * ldc + n0, _mm512_mul_ps(_mm512_load_ps(T + r * 16), va));
            }
        }
        _tile_release();
    }
}

/* out[j][w] = Σ_t S[t][j] · X[t][w] for j < R, w < W (W a multiple of 16), t < K; then C (+)= alpha · out,
 * C[j][w] (transposed = 0) or C[w][j] (transposed = 1), ldc. st is S transposed and padded: st[j·Kp + t],
 * Rp × Kp bf16 (Rp = R rounded up to 16, Kp = K rounded up to 32, zeros outside). Groups of 16-column
 * chunks of X in parallel, each summed over all tokens by one thread; per 32 tokens the group's token pairs
 * of X are interleaved into a per-thread buffer (the tiles' B layout). */
static void lg_skinny_reduce(int64_t R, int64_t W, int64_t K, float alpha, const bf16 *st, const bf16 *X,
                             int64_t ldx, float beta, float *C, int64_t ldc, int transposed) {
    const int64_t Rp = (R + 15) / 16 * 16, jc = Rp / 16, Kp = (K + 31) / 32 * 32;
    const int wc = jc == 1 ? 4 : jc == 2 ? 2 : 1; /* column chunks per group: jc · wc <= 4 C tiles */
    const int64_t W16 = W / 16, ng = (W16 + wc - 1) / wc;
    const size_t per = 4 * 16 * 16 * sizeof(uint32_t) + 4 * 256 * sizeof(float);
    char *thr = lg_buf(&g_thr, &g_thr_n, per * (size_t)omp_get_max_threads());
    /* word interleave of two 16-word rows: dword i = (a[i], b[i]) */
    const __m512i idx = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6,
                                         37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
#pragma omp parallel if (!omp_in_parallel())
    {
        lg_config();
        uint32_t *Q = (uint32_t *)(thr + per * (size_t)omp_get_thread_num());
        float *T = (float *)(Q + 4 * 16 * 16);
#pragma omp for schedule(dynamic, 1)
        for (int64_t g = 0; g < ng; g++) {
            const int64_t w0 = g * wc * 16;
            const int nw = (int)(W16 - g * wc < wc ? W16 - g * wc : wc);
            for (int t = 0; t < jc * nw; t++) lg_zero(t);
            for (int64_t t0 = 0; t0 < K; t0 += 32) {
                for (int tp = 0; tp < 16; tp++) {
                    const int64_t ta = t0 + 2 * tp, tb = ta + 1;
                    for (int c = 0; c < nw; c++) {
                        const __m256i a = ta < K ? _mm256_loadu_si256((const __m256i *)(X + ta * ldx + w0 + 16 * c))
                                                 : _mm256_setzero_si256();
                        const __m256i b = tb < K ? _mm256_loadu_si256((const __m256i *)(X + tb * ldx + w0 + 16 * c))
                                                 : _mm256_setzero_si256();
                        _mm512_storeu_si512(Q + (c * 16 + tp) * 16,
                                            _mm512_permutex2var_epi16(_mm512_castsi256_si512(a), idx,
                                                                      _mm512_castsi256_si512(b)));
                    }
                }
                for (int jj = 0; jj < jc; jj++) {
                    _tile_loadd(4, st + (jj * 16) * Kp + t0, Kp * (int64_t)sizeof(bf16));
                    for (int c = 0; c < nw; c++) {
                        _tile_loadd(5, Q + c * 256, 64);
                        lg_dp(jc == 1 ? c : jc == 2 ? jj * 2 + c : jj);
                    }
                }
            }
            for (int jj = 0; jj < jc; jj++)
                for (int c = 0; c < nw; c++) {
                    const int t = jc == 1 ? c : jc == 2 ? jj * 2 + c : jj;
                    lg_store(t, T + t * 256);
                    for (int64_t j = jj * 16; j < R && j < jj * 16 + 16; j++)
                        for (int w = 0; w < 16; w++) {
                            const float v = alpha * T[t * 256 + (j - jj * 16) * 16 + w];
                            float *cp = transposed ? C + (w0 + 16 * c + w) * ldc + j : C + j * ldc + w0 + 16 * c + w;
                            *cp = beta != 0.0f ? *cp + v : v;
                        }
                }
        }
        _tile_release();
    }
}
#endif

#ifdef LG_AMX
/* QLORA_LORA_SHORTK=0: the K = r products on oneDNN (an A/B of lg_short_k alone in one binary). */
static int lg_short_k_on(void) {
    static int on = -1;
    if (on < 0) on = !env_switch_off("QLORA_LORA_SHORTK");
    return on;
}
#endif

int lora_gemm_amx_active(void) {
#ifdef LG_AMX
    static int ok = -1;
    if (ok < 0) {
        unsigned a, b, c, d;
        int has = __get_cpuid_count(7, 0, &a, &b, &c, &d) && (d >> 22 & 1) && (d >> 24 & 1);
        ok = !env_switch_off("QLORA_CPU_AMX") && !env_switch_off("QLORA_LORA_AMX") && has &&
             syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
    }
    return ok;
#else
    return 0;
#endif
}

#ifdef LG_AMX
/* op(B) (K, N) in pair layout, padded to Np columns: yp[(kp·Np + n)·2 + e] = op(B)[2kp + e][n], 0 for n >= N. */
static const bf16 *lg_pack_pairs(const bf16 *B, int64_t ldb, int trans_b, int64_t K, int64_t N, int64_t Np) {
    bf16 *yp = lg_buf(&g_yp, &g_yp_n, (size_t)(K * Np) * sizeof(bf16));
    for (int64_t k = 0; k < K; k++)
        for (int64_t n = 0; n < Np; n++)
            yp[((k / 2) * Np + n) * 2 + (k & 1)] = n < N ? (trans_b ? B[n * ldb + k] : B[k * ldb + n]) : (bf16)0;
    return yp;
}
#endif

void lora_gemm(int trans_a, int trans_b, int64_t M, int64_t N, int64_t K, float alpha, const void *A,
               int64_t lda, const void *B, int64_t ldb, float beta, float *C, int64_t ldc, gemm_dtype dt) {
#ifdef LG_AMX
    enum { NONE, SHORT_K, OUT, RED_A, RED_B } kind = NONE;
    if (dt == GEMM_BF16 && M > 0 && N > 0 && !omp_in_parallel() && lora_gemm_amx_active()) {
        if (!trans_a && K >= 2 && K <= 32 && K % 2 == 0 && N % 16 == 0 && beta == 0.0f && lg_short_k_on())
            kind = SHORT_K; /* y = s u Bᵀ, a fresh dx = du A: K = r */
        else if (!trans_a && N <= LG_MAXN && K >= LG_KSTEP && K % LG_KSTEP == 0)
            kind = OUT; /* u = x Aᵀ, du = s dy B */
        else if (trans_a && !trans_b && K >= LG_KSTEP && M <= LG_MAXN && N % 16 == 0)
            kind = RED_A; /* dA = duᵀ x */
        else if (trans_a && !trans_b && K >= LG_KSTEP && N <= LG_MAXN && M % 16 == 0)
            kind = RED_B; /* dB = s dyᵀ u */
    }
    if (kind != NONE) {
        const double flops = 2.0 * (double)M * (double)N * (double)K;
        const int pc = ag_prof_push(AG_PROF_GEMM);
        ag_prof_add_gemm_flops(flops);
        const double t0 = clock_now_sec();
        if (kind == SHORT_K) {
            lg_short_k(M, N, K, alpha, A, lda, lg_pack_pairs(B, ldb, trans_b, K, N, N), C, ldc);
        } else if (kind == OUT) {
            lg_skinny_out(M, N, K, alpha, A, lda, lg_pack_pairs(B, ldb, trans_b, K, N, (N + 15) / 16 * 16), beta, C,
                          ldc);
        } else { /* the skinny side S (K, R) transposed into st (Rp, Kp); X the wide side (K, W) */
            const int ra = kind == RED_A;
            const bf16 *S = ra ? A : B, *X = ra ? B : A;
            const int64_t R = ra ? M : N, W = ra ? N : M, lds = ra ? lda : ldb, ldx = ra ? ldb : lda;
            const int64_t Rp = (R + 15) / 16 * 16, Kp = (K + 31) / 32 * 32;
            bf16 *st = lg_buf(&g_st, &g_st_n, (size_t)(Rp * Kp) * sizeof(bf16));
            for (int64_t j = 0; j < Rp; j++)
                for (int64_t t = 0; t < Kp; t++) st[j * Kp + t] = j < R && t < K ? S[t * lds + j] : (bf16)0;
            lg_skinny_reduce(R, W, K, alpha, st, X, ldx, beta, C, ldc, !ra);
        }
        g_calls++;
        g_seconds += clock_now_sec() - t0;
        g_flops += flops;
        ag_prof_pop(pc);
        return;
    }
#endif
    gemm(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, dt);
}
