/* autograd/ops.c — forward and backward of the Llama ops on the CPU (see ops.h).
 *
 * Temporaries (bf16 operand copies, dropout masks) are allocated after an
 * arena mark and released before the op returns; only outputs and what the
 * backward pass needs survive. Loops are OpenMP-parallel over rows with static
 * scheduling, so results depend only on the thread count, not on timing.
 */
#include "autograd/ops.h"

#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "autograd/exp_poly.h"
#include "autograd/gemm.h"
#include "autograd/prof.h"
#include "core/rng.h"

/* ------------------------------------------------------------------ helpers */

static void row_to_bf16(const float *src, bf16 *dst, int64_t n);

static void f32_to_bf16_n(const float *src, bf16 *dst, int64_t n) {
    int pc = ag_prof_push(AG_PROF_CONVERT);
    int64_t nchunk = (n + 4095) / 4096;
#pragma omp parallel for schedule(static) if (n > 16384)
    for (int64_t c = 0; c < nchunk; c++) {
        int64_t j0 = c * 4096, len = n - j0 < 4096 ? n - j0 : 4096;
        row_to_bf16(src + j0, dst + j0, len);
    }
    ag_prof_pop(pc);
}

/* An fp32 buffer as a GEMM operand: a bf16 copy in the arena when ctx->bf16. */
static const void *operand(ag_ctx *ctx, const float *src, int64_t n) {
    if (!ctx->bf16) return src;
    bf16 *b = ag_alloc(ctx, (size_t)n * sizeof(bf16));
    f32_to_bf16_n(src, b, n);
    return b;
}

/* A tensor as a GEMM operand that backward may read again: its memoised bf16
 * copy (one conversion however many ops read it; kept for backward inside a
 * segment), or its fp32 data (kept) in fp32 mode. Call before any local mark. */
static const void *operand_of(ag_ctx *ctx, tensor *t) {
    if (ctx->bf16) return ag_bf16_of(ctx, t, 1);
    return ag_keep(ctx, t);
}

/* The bf16 copy of t that operand_of() would make, to be filled by the op that
 * produces t in the same pass (saves a conversion pass and its fork/join). */
static bf16 *memo_bf16_alloc(ag_ctx *ctx, tensor *t) {
    if (!ctx->bf16 || t->dtype != AG_F32) return NULL;
    t->kept_bf16 = ag_alloc_keep(ctx, (size_t)t->numel * sizeof(bf16));
    return t->kept_bf16;
}

/* Per-row statistics and other small saved buffers: keep arena inside a segment. */
static void *alloc_saved(ag_ctx *ctx, size_t bytes) {
    return ctx->saving ? ag_alloc_keep(ctx, bytes) : ag_alloc(ctx, bytes);
}

static gemm_dtype gdt(const ag_ctx *ctx) { return ctx->bf16 ? GEMM_BF16 : GEMM_F32; }

static void *scratch_grow(void **buf, size_t *size, size_t need) {
    if (*size < need) {
        free(*buf);
        *buf = aligned_alloc(64, (need + 63) & ~(size_t)63);
        if (!*buf) {
            fprintf(stderr, "[autograd] out of memory for a %zu-byte weight scratch\n", need);
            abort();
        }
        *size = need;
    }
    return *buf;
}

void frozen_rows_f32(const frozen_weight *w, int64_t row0, int64_t n, float *dst) {
    int pc = ag_prof_push(AG_PROF_DEQUANT);
    switch (w->kind) {
    case FROZEN_NF4:
        nf4_dequantize_rows_f32(w->nf4, row0, n, dst);
        break;
    case FROZEN_BF16: {
        const bf16 *src = w->w_bf16 + row0 * w->in;
#pragma omp parallel for schedule(static) if (n * w->in > 16384)
        for (int64_t i = 0; i < n * w->in; i++) dst[i] = bf16_to_f32(src[i]);
        break;
    }
    case FROZEN_F32:
        memcpy(dst, w->w_f32 + row0 * w->in, (size_t)(n * w->in) * sizeof(float));
        break;
    }
    ag_prof_pop(pc);
}

void frozen_rows_bf16(const frozen_weight *w, int64_t row0, int64_t n, bf16 *dst) {
    int pc = ag_prof_push(AG_PROF_DEQUANT);
    switch (w->kind) {
    case FROZEN_NF4:
        nf4_dequantize_rows_bf16(w->nf4, row0, n, dst);
        break;
    case FROZEN_BF16:
        memcpy(dst, w->w_bf16 + row0 * w->in, (size_t)(n * w->in) * sizeof(bf16));
        break;
    case FROZEN_F32:
        f32_to_bf16_n(w->w_f32 + row0 * w->in, dst, n * w->in);
        break;
    }
    ag_prof_pop(pc);
}

/* The whole frozen weight as a GEMM operand, in the context's weight scratch
 * (bf16 weights are used in place when the GEMM is bf16). */
static const void *frozen_operand(ag_ctx *ctx, const frozen_weight *w) {
    int64_t n = w->out * w->in;
    if (ctx->bf16) {
        if (w->kind == FROZEN_BF16) return w->w_bf16;
        bf16 *dst = scratch_grow(&ctx->wscratch, &ctx->wscratch_size, (size_t)n * sizeof(bf16));
        frozen_rows_bf16(w, 0, w->out, dst);
        return dst;
    }
    if (w->kind == FROZEN_F32) return w->w_f32;
    float *dst = scratch_grow(&ctx->wscratch, &ctx->wscratch_size, (size_t)n * sizeof(float));
    frozen_rows_f32(w, 0, w->out, dst);
    return dst;
}

/* ------------------------------------------------------------------ row kernels
 *
 * The hot elementwise loops (softmax rows of attention and of the LM head,
 * bf16 rounding, SwiGLU) as explicit AVX-512 where the compiler has it:
 * without -ffast-math GCC does not vectorize exp_poly's bit tricks. The
 * vector exp is exp_poly lane by lane, bit for bit (same operations, same
 * order, no FMA; 2^n applied with scalef, exact like the scalar multiply), so
 * scalar and vector paths agree exactly; only sums are reassociated (16
 * partial sums). The bf16 rounding is core/bf16.h's f32_to_bf16. */
#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define OPS_AVX512 1

static inline __m512 exp_poly16(__m512 x) {
    x = _mm512_max_ps(_mm512_set1_ps(-87.0f), x); /* a NaN x is kept (second operand) */
    x = _mm512_min_ps(_mm512_set1_ps(88.0f), x);
    __m512 n = _mm512_add_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _mm512_set1_ps(0.5f));
    n = _mm512_roundscale_ps(n, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_sub_ps(x, _mm512_mul_ps(n, _mm512_set1_ps(0.693359375f)));
    r = _mm512_add_ps(r, _mm512_mul_ps(n, _mm512_set1_ps(2.12194440e-4f)));
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(5.0000001201e-1f));
    __m512 y = _mm512_add_ps(_mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(p, r), r), r), _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(y, n);
}

/* 16 fp32 -> 16 bf16, exactly f32_to_bf16 (round to nearest even, quiet NaN). */
static inline __m256i bf16_rne16(__m512 v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                                  _mm512_set1_epi32(0x7f800000));
    r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
    return _mm512_cvtepi32_epi16(r);
}

static inline __mmask16 tail_mask(int64_t left) { return left >= 16 ? 0xffff : (__mmask16)((1u << left) - 1u); }
#endif

/* dst[j] = bf16(src[j]), j < n */
static void row_to_bf16(const float *src, bf16 *dst, int64_t n) {
#ifdef OPS_AVX512
    for (int64_t j = 0; j < n; j += 16) {
        __mmask16 k = tail_mask(n - j);
        __m256i b = bf16_rne16(_mm512_maskz_loadu_ps(k, src + j));
        _mm256_mask_storeu_epi16(dst + j, k, b);
    }
#else
    for (int64_t j = 0; j < n; j++) dst[j] = f32_to_bf16(src[j]);
#endif
}

static float row_max(const float *x, int64_t n) {
    float mx = -INFINITY;
#ifdef OPS_AVX512
    __m512 m = _mm512_set1_ps(-INFINITY);
    for (int64_t j = 0; j < n; j += 16) m = _mm512_mask_max_ps(m, tail_mask(n - j), m, _mm512_maskz_loadu_ps(tail_mask(n - j), x + j));
    mx = _mm512_reduce_max_ps(m);
#else
    for (int64_t j = 0; j < n; j++) mx = x[j] > mx ? x[j] : mx;
#endif
    return mx;
}

/* Σ_j exp_poly(x[j] − sub); with store, x[j] = exp_poly(x[j] − sub) too. */
static float row_sum_exp(float *x, int64_t n, float sub, int store) {
#ifdef OPS_AVX512
    __m512 acc = _mm512_setzero_ps(), s = _mm512_set1_ps(sub);
    for (int64_t j = 0; j < n; j += 16) {
        __mmask16 k = tail_mask(n - j);
        __m512 e = exp_poly16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + j), s));
        acc = _mm512_mask_add_ps(acc, k, acc, e);
        if (store) _mm512_mask_storeu_ps(x + j, k, e);
    }
    return _mm512_reduce_add_ps(acc);
#else
    float sum = 0.0f;
    for (int64_t j = 0; j < n; j++) {
        float e = exp_poly(x[j] - sub);
        if (store) x[j] = e;
        sum += e;
    }
    return sum;
#endif
}

/* y[j] = exp_poly(x[j] − sub) · mul (fp32, y may be x), or bf16 into yb. */
static void row_exp_scale(const float *x, float *y, bf16 *yb, int64_t n, float sub, float mul) {
#ifdef OPS_AVX512
    __m512 s = _mm512_set1_ps(sub), mm = _mm512_set1_ps(mul);
    for (int64_t j = 0; j < n; j += 16) {
        __mmask16 k = tail_mask(n - j);
        __m512 e = _mm512_mul_ps(exp_poly16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + j), s)), mm);
        if (yb) _mm256_mask_storeu_epi16(yb + j, k, bf16_rne16(e));
        else _mm512_mask_storeu_ps(y + j, k, e);
    }
#else
    for (int64_t j = 0; j < n; j++) {
        float e = exp_poly(x[j] - sub) * mul;
        if (yb) yb[j] = f32_to_bf16(e);
        else y[j] = e;
    }
#endif
}

static void row_scale(float *x, int64_t n, float mul) {
#ifdef OPS_AVX512
    __m512 mm = _mm512_set1_ps(mul);
    for (int64_t j = 0; j < n; j += 16) {
        __mmask16 k = tail_mask(n - j);
        _mm512_mask_storeu_ps(x + j, k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, x + j), mm));
    }
#else
    for (int64_t j = 0; j < n; j++) x[j] *= mul;
#endif
}

/* Σ_j p[j]·d[j] in double (the softmax-backward row sum), 8 partial sums. */
static double row_dot_f64(const float *p, const float *d, int64_t n) {
#ifdef OPS_AVX512
    __m512d a0 = _mm512_setzero_pd(), a1 = _mm512_setzero_pd();
    for (int64_t j = 0; j < n; j += 16) {
        __mmask16 k = tail_mask(n - j);
        __m512 pp = _mm512_maskz_loadu_ps(k, p + j), dd = _mm512_maskz_loadu_ps(k, d + j);
        __m512d plo = _mm512_cvtps_pd(_mm512_castps512_ps256(pp)), dlo = _mm512_cvtps_pd(_mm512_castps512_ps256(dd));
        __m512d phi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(pp), 1)));
        __m512d dhi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(dd), 1)));
        a0 = _mm512_add_pd(a0, _mm512_mul_pd(plo, dlo));
        a1 = _mm512_add_pd(a1, _mm512_mul_pd(phi, dhi));
    }
    return _mm512_reduce_add_pd(_mm512_add_pd(a0, a1));
#else
    double acc = 0.0;
    for (int64_t j = 0; j < n; j++) acc += (double)p[j] * d[j];
    return acc;
#endif
}

/* d[j] = p[j]·(d[j] − a)·scale */
static void row_dsoftmax(const float *p, float *d, int64_t n, float a, float scale) {
#ifdef OPS_AVX512
    __m512 va = _mm512_set1_ps(a), vs = _mm512_set1_ps(scale);
    for (int64_t j = 0; j < n; j += 16) {
        __mmask16 k = tail_mask(n - j);
        __m512 pp = _mm512_maskz_loadu_ps(k, p + j), dd = _mm512_maskz_loadu_ps(k, d + j);
        _mm512_mask_storeu_ps(d + j, k, _mm512_mul_ps(_mm512_mul_ps(pp, _mm512_sub_ps(dd, va)), vs));
    }
#else
    for (int64_t j = 0; j < n; j++) d[j] = p[j] * (d[j] - a) * scale;
#endif
}

/* ------------------------------------------------------------------ rope table */

int rope_table_init(rope_table *t, int max_pos, int head_dim, float theta, qerr *e) {
    int half = head_dim / 2;
    t->max_pos = max_pos;
    t->head_dim = head_dim;
    t->cos = qmalloc((size_t)max_pos * half * sizeof(float), e);
    t->sin = qmalloc((size_t)max_pos * half * sizeof(float), e);
    if (!t->cos || !t->sin) return -1;
    for (int i = 0; i < half; i++) {
        /* HF: inv_freq = 1.0 / (base ** (arange(0, dim, 2).float() / dim)), all fp32 */
        float expo = (float)(2 * i) / (float)head_dim;
        float inv_freq = 1.0f / powf(theta, expo);
        for (int p = 0; p < max_pos; p++) {
            float ang = (float)p * inv_freq;
            t->cos[(size_t)p * half + i] = cosf(ang);
            t->sin[(size_t)p * half + i] = sinf(ang);
        }
    }
    return 0;
}

void rope_table_free(rope_table *t) {
    free(t->cos);
    free(t->sin);
    t->cos = t->sin = NULL;
}

/* ------------------------------------------------------------------ embedding */

tensor *op_embedding(ag_ctx *ctx, const frozen_weight *table, const int32_t *ids, int64_t n) {
    int pc = ag_prof_push(AG_PROF_EMBED);
    int64_t D = table->in;
    tensor *x = ag_tensor2(ctx, AG_F32, n, D);
    float *xd = x->data;
    if (table->kind == FROZEN_BF16) {
        const bf16 *w = table->w_bf16;
#pragma omp parallel for schedule(static) if (n * D > 16384)
        for (int64_t i = 0; i < n; i++)
            for (int64_t j = 0; j < D; j++) xd[i * D + j] = bf16_to_f32(w[(int64_t)ids[i] * D + j]);
    } else {
        for (int64_t i = 0; i < n; i++) frozen_rows_f32(table, ids[i], 1, xd + i * D);
    }
    ag_prof_pop(pc);
    return x;
}

/* ------------------------------------------------------------------ rmsnorm */

typedef struct rms_saved {
    const float *x;    /* (N, D) input, kept */
    const float *rstd; /* (N) */
    float eps;
} rms_saved;

static void rmsnorm_backward(ag_ctx *ctx, const ag_node *n) {
    int pc = ag_prof_push(AG_PROF_NORM);
    tensor *x = n->in[0], *w = n->in[1], *y = n->out;
    const rms_saved *s = n->saved;
    int64_t N = x->shape[0], D = x->shape[1];
    const float *xd = s->x, *wd = w->data, *dy = y->grad;
    float *dx = x->requires_grad ? ag_grad(ctx, x) : NULL;
    float *dw = w->requires_grad ? ag_grad(ctx, w) : NULL;
    if (dx) {
#pragma omp parallel for schedule(static)
        for (int64_t i = 0; i < N; i++) {
            const float *xi = xd + i * D, *gi = dy + i * D;
            float r = s->rstd[i];
            double dot = 0.0;
            for (int64_t j = 0; j < D; j++) dot += (double)gi[j] * wd[j] * xi[j];
            float c = (float)(dot / (double)D) * r * r * r;
            float *dxi = dx + i * D;
            for (int64_t j = 0; j < D; j++) dxi[j] += r * wd[j] * gi[j] - c * xi[j];
        }
    }
    if (dw) {
        for (int64_t i = 0; i < N; i++) {
            const float *xi = xd + i * D, *gi = dy + i * D;
            float r = s->rstd[i];
            for (int64_t j = 0; j < D; j++) dw[j] += gi[j] * xi[j] * r;
        }
    }
    ag_prof_pop(pc);
}

tensor *op_rmsnorm(ag_ctx *ctx, tensor *x, tensor *w, float eps) {
    int pc = ag_prof_push(AG_PROF_NORM);
    int64_t N = x->shape[0], D = x->shape[1];
    tensor *y = ag_tensor2(ctx, AG_F32, N, D);
    int grad = ag_needs_grad(ctx, x, w, NULL);
    float *rstd = grad ? alloc_saved(ctx, (size_t)N * sizeof(float)) : ag_alloc(ctx, (size_t)N * sizeof(float));
    const float *xd = x->data, *wd = w->data;
    float *yd = y->data;
    bf16 *yb = memo_bf16_alloc(ctx, y); /* the linears that read y take it as bf16 */
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < N; i++) {
        const float *xi = xd + i * D;
        double ss = 0.0;
        for (int64_t j = 0; j < D; j++) ss += (double)xi[j] * xi[j];
        float r = 1.0f / sqrtf((float)(ss / (double)D) + eps);
        rstd[i] = r;
        for (int64_t j = 0; j < D; j++) yd[i * D + j] = wd[j] * (xi[j] * r);
        if (yb) row_to_bf16(yd + i * D, yb + i * D, D);
    }
    if (grad) {
        ag_node *nd = ag_record(ctx, rmsnorm_backward, y, x, w, NULL, NULL);
        rms_saved *s = alloc_saved(ctx, sizeof *s);
        s->x = ag_keep(ctx, x);
        s->rstd = rstd;
        s->eps = eps;
        nd->saved = s;
    }
    ag_prof_pop(pc);
    return y;
}

/* ------------------------------------------------------------------ linear (+ LoRA) */

typedef struct linear_saved {
    const frozen_weight *w;
    const lora_adapter *lora;
    const void *xdb; /* dropout(x) (N, in) as GEMM operand (bf16, or fp32 in fp32 mode) */
    const void *ub;  /* u = dropout(x) Aᵀ (N, r) as GEMM operand */
    uint64_t seed;
    int drop;        /* dropout was active in forward (mask regenerated from seed) */
} linear_saved;

static inline int dropout_keep(uint64_t seed, uint64_t stream, int64_t i, float p) {
    return rng_uniform(seed, stream, (uint64_t)i) >= p;
}

static void linear_backward(ag_ctx *ctx, const ag_node *n) {
    tensor *x = n->in[0], *y = n->out;
    const linear_saved *s = n->saved;
    const frozen_weight *w = s->w;
    const lora_adapter *lo = s->lora;
    int64_t N = x->shape[0], in = w->in, out = w->out;
    float *dx = x->requires_grad ? ag_grad(ctx, x) : NULL;
    float *dA = lo && lo->A->requires_grad ? ag_grad(ctx, lo->A) : NULL;
    float *dB = lo && lo->B->requires_grad ? ag_grad(ctx, lo->B) : NULL;
    ag_mark m = ag_arena_mark(ctx);
    const void *dyb = operand(ctx, y->grad, N * out);
    gemm_dtype dt = gdt(ctx);
    if (dx) {
        const void *wb = frozen_operand(ctx, w);
        gemm(0, 0, N, in, out, 1.0f, dyb, out, wb, in, 1.0f, dx, in, dt); /* dx += dy W */
    }
    if (lo) {
        int64_t r = lo->r;
        /* dB += s · dyᵀ u   (out, r) */
        if (dB) gemm(1, 0, out, r, N, lo->scaling, dyb, out, s->ub, r, 1.0f, dB, r, dt);
        /* du = s · dy B   (N, r) */
        float *du = ag_alloc(ctx, (size_t)(N * r) * sizeof(float));
        const void *Bb = operand(ctx, lo->B->data, out * r);
        gemm(0, 0, N, r, out, lo->scaling, dyb, out, Bb, r, 0.0f, du, r, dt);
        const void *dub = operand(ctx, du, N * r);
        /* dA += duᵀ dropout(x)   (r, in) */
        if (dA) gemm(1, 0, r, in, N, 1.0f, dub, r, s->xdb, in, 1.0f, dA, in, dt);
        if (dx) {
            /* d dropout(x) = du A ; dx += mask/(1-p) · that */
            const void *Ab = operand(ctx, lo->A->data, r * in);
            if (s->drop) {
                float *dxd = ag_alloc(ctx, (size_t)(N * in) * sizeof(float));
                gemm(0, 0, N, in, r, 1.0f, dub, r, Ab, in, 0.0f, dxd, in, dt);
                float inv = 1.0f / (1.0f - lo->dropout);
                int pc = ag_prof_push(AG_PROF_ELTWISE);
#pragma omp parallel for schedule(static)
                for (int64_t i = 0; i < N * in; i++)
                    if (dropout_keep(s->seed, lo->stream, i, lo->dropout)) dx[i] += dxd[i] * inv;
                ag_prof_pop(pc);
            } else {
                gemm(0, 0, N, in, r, 1.0f, dub, r, Ab, in, 1.0f, dx, in, dt);
            }
        }
    }
    ag_arena_reset(ctx, m);
}

tensor *op_linear(ag_ctx *ctx, tensor *x, const frozen_weight *w, const lora_adapter *lora) {
    int64_t N = x->shape[0], in = w->in, out = w->out;
    tensor *y = ag_tensor2(ctx, AG_F32, N, out);
    int grad = ag_needs_grad(ctx, x, lora ? lora->A : NULL, lora ? lora->B : NULL);
    int drop = lora && lora->dropout > 0.0f && ctx->training;
    const void *xb = operand_of(ctx, x);
    const void *xdb = xb, *ub = NULL;
    tensor *ut = NULL;
    if (lora) {
        if (drop) {
            int pc = ag_prof_push(AG_PROF_ELTWISE);
            tensor *xdt = ag_tensor2(ctx, AG_F32, N, in);
            float *xd = xdt->data;
            float inv = 1.0f / (1.0f - lora->dropout);
            const float *xs = x->data;
#pragma omp parallel for schedule(static)
            for (int64_t i = 0; i < N * in; i++)
                xd[i] = dropout_keep(ctx->seed, lora->stream, i, lora->dropout) ? xs[i] * inv : 0.0f;
            ag_prof_pop(pc);
            xdb = operand_of(ctx, xdt);
        }
        ut = ag_tensor2(ctx, AG_F32, N, lora->r);
    }
    ag_mark m = ag_arena_mark(ctx);
    gemm_dtype dt = gdt(ctx);
    const void *wb = frozen_operand(ctx, w);
    gemm(0, 1, N, out, in, 1.0f, xb, in, wb, in, 0.0f, y->data, out, dt); /* y = x Wᵀ */
    if (lora) {
        int64_t r = lora->r;
        const void *Ab = operand(ctx, lora->A->data, r * in);
        gemm(0, 1, N, r, in, 1.0f, xdb, in, Ab, in, 0.0f, ut->data, r, dt); /* u = x Aᵀ */
        ag_arena_reset(ctx, m);
        ub = operand_of(ctx, ut);
        m = ag_arena_mark(ctx);
        const void *Bb = operand(ctx, lora->B->data, out * r);
        gemm(0, 1, N, out, r, lora->scaling, ub, r, Bb, r, 1.0f, y->data, out, dt); /* y += s u Bᵀ */
    }
    ag_arena_reset(ctx, m);
    if (grad) {
        ag_node *nd = ag_record(ctx, linear_backward, y, x, lora ? lora->A : NULL, lora ? lora->B : NULL,
                                NULL);
        linear_saved *s = alloc_saved(ctx, sizeof *s);
        s->w = w;
        s->lora = lora;
        s->xdb = xdb;
        s->ub = ub;
        s->seed = ctx->seed;
        s->drop = drop;
        nd->saved = s;
    }
    return y;
}

/* ------------------------------------------------------------------ rope */

typedef struct rope_saved {
    const rope_table *rt;
    const int32_t *pos;
    int n_heads;
} rope_saved;

/* y (+)= rotate(x) with angle sign·θ; accumulate into y when acc. */
static void rope_apply(const float *x, float *y, bf16 *yb, int64_t N, int n_heads, const rope_table *rt,
                       const int32_t *pos, float sign, int acc) {
    int hd = rt->head_dim, half = hd / 2;
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < N; t++) {
        const float *c = rt->cos + (size_t)pos[t] * half, *s = rt->sin + (size_t)pos[t] * half;
        for (int h = 0; h < n_heads; h++) {
            const float *xi = x + (t * n_heads + h) * hd;
            float *yi = y + (t * n_heads + h) * hd;
            for (int i = 0; i < half; i++) {
                float x1 = xi[i], x2 = xi[i + half], sn = sign * s[i];
                float a = x1 * c[i] - x2 * sn, b = x2 * c[i] + x1 * sn;
                if (acc) {
                    yi[i] += a;
                    yi[i + half] += b;
                } else {
                    yi[i] = a;
                    yi[i + half] = b;
                }
            }
        }
        if (yb) row_to_bf16(y + t * n_heads * hd, yb + t * n_heads * hd, (int64_t)n_heads * hd);
    }
}

static void rope_backward(ag_ctx *ctx, const ag_node *n) {
    int pc = ag_prof_push(AG_PROF_ROPE);
    tensor *x = n->in[0], *y = n->out;
    const rope_saved *s = n->saved;
    float *dx = ag_grad(ctx, x);
    rope_apply(y->grad, dx, NULL, x->shape[0], s->n_heads, s->rt, s->pos, -1.0f, 1); /* inverse rotation */
    ag_prof_pop(pc);
}

tensor *op_rope(ag_ctx *ctx, tensor *x, int n_heads, const rope_table *rt, const int32_t *pos) {
    int pc = ag_prof_push(AG_PROF_ROPE);
    int64_t N = x->shape[0];
    tensor *y = ag_tensor2(ctx, AG_F32, N, x->shape[1]);
    rope_apply(x->data, y->data, memo_bf16_alloc(ctx, y), N, n_heads, rt, pos, 1.0f, 0); /* attention reads bf16 */
    if (ag_needs_grad(ctx, x, NULL, NULL)) {
        ag_node *nd = ag_record(ctx, rope_backward, y, x, NULL, NULL, NULL);
        rope_saved *s = alloc_saved(ctx, sizeof *s);
        s->rt = rt;
        s->pos = pos;
        s->n_heads = n_heads;
        nd->saved = s;
    }
    ag_prof_pop(pc);
    return y;
}

/* ------------------------------------------------------------------ attention
 *
 * One OpenMP region per call: each thread takes whole (batch, head) tasks and
 * runs single-threaded GEMMs on them (gemm() is re-entrant), so there is one
 * fork/join per attention instead of several per head. Queries are processed
 * in blocks of ATT_BQ rows; block [i0, i0+m) only multiplies keys [0, i0+m),
 * so the causal upper triangle is mostly skipped. The probabilities are not
 * stored: forward saves each row's max and 1/sum, and backward recomputes the
 * scores with the same GEMM and P = exp(s − max) · (1/sum), bit-identical to
 * the forward values (the flash-attention recomputation, Dao et al. 2022). */

enum { ATT_BQ = 128 };

typedef struct attn_saved {
    const void *qb, *kb, *vb; /* q, k, v as GEMM operands (bf16, or fp32 in fp32 mode) */
    const float *rmax, *rinv; /* (B, H, T) row max and 1/sum of the softmax */
    const int32_t *seq_ids;
    const int32_t *seglo;     /* (B, T) start of each token's example (attn_seg_lo) */
    const unsigned char *seg_ok; /* (B) 1: row b's examples are contiguous runs */
    int B, T, H, KVH;
} attn_saved;

/* Packed rows: lo[i] = first position of the run of equal seq ids that ends at
 * i. Returns 1 when every id forms a single run, so token i attends exactly to
 * [lo[i], i] (what packing produces); 0 means the general masked path. */
static int attn_seg_lo(const int32_t *sid, int T, int32_t *lo) {
    int ok = 1;
    for (int i = 0; i < T; i++) {
        if (i > 0 && sid[i] == sid[i - 1]) {
            lo[i] = lo[i - 1];
            continue;
        }
        lo[i] = i;
        for (int j = 0; j < i && ok; j++) /* an earlier run with the same id? */
            if (sid[j] == sid[i]) ok = 0;
    }
    return ok;
}

/* Scores for query rows [i0, i0+m) of (b, h) against keys [0, kend): S = scale · Q Kᵀ (m, kend). */
static void attn_scores(const attn_saved *a, int64_t hd, int b, int h, int i0, int m, int kend, float scale,
                        size_t es, float *S, gemm_dtype dt) {
    int64_t qs = (int64_t)a->H * hd, ks = (int64_t)a->KVH * hd;
    int g = h / (a->H / a->KVH);
    const char *Q = (const char *)a->qb + (((size_t)b * a->T + i0) * qs + (size_t)h * hd) * es;
    const char *K = (const char *)a->kb + ((size_t)b * a->T * ks + (size_t)g * hd) * es;
    gemm(0, 1, m, kend, hd, scale, Q, qs, K, ks, 0.0f, S, kend, dt);
}

static inline int attn_allowed(const int32_t *sid, int i, int j) { return j <= i && (!sid || sid[j] == sid[i]); }

static void attn_backward(ag_ctx *ctx, const ag_node *n) {
    tensor *q = n->in[0], *k = n->in[1], *v = n->in[2], *o = n->out;
    const attn_saved *s = n->saved;
    int B = s->B, T = s->T, H = s->H, KVH = s->KVH;
    int64_t hd = q->shape[1] / H, qs = (int64_t)H * hd, ks = (int64_t)KVH * hd;
    int grp = H / KVH;
    float scale = 1.0f / sqrtf((float)hd);
    float *dq = q->requires_grad ? ag_grad(ctx, q) : NULL;
    float *dk = k->requires_grad ? ag_grad(ctx, k) : NULL;
    float *dv = v->requires_grad ? ag_grad(ctx, v) : NULL;
    ag_mark m = ag_arena_mark(ctx);
    gemm_dtype dt = gdt(ctx);
    size_t es = ctx->bf16 ? 2 : 4;
    const void *dob = operand(ctx, o->grad, o->numel);
    int pc = ag_prof_push(AG_PROF_ATTN);
    int nth = omp_get_max_threads();
    size_t blk = (size_t)ATT_BQ * T;
    float *Pall = ag_alloc(ctx, (size_t)nth * blk * sizeof(float));
    float *dPall = ag_alloc(ctx, (size_t)nth * blk * sizeof(float));
    char *Pball = ctx->bf16 ? ag_alloc(ctx, (size_t)nth * blk * es) : NULL;
    char *dSball = ctx->bf16 ? ag_alloc(ctx, (size_t)nth * blk * es) : NULL;
    /* tasks own (batch, kv group): dK and dV rows of a group are written by one thread */
    int ntask = B * KVH;
#pragma omp parallel for schedule(dynamic, 1)
    for (int task = 0; task < ntask; task++) {
        int tid = omp_get_thread_num();
        int b = task / KVH, g = task % KVH;
        float *P = Pall + (size_t)tid * blk, *dP = dPall + (size_t)tid * blk;
        void *Pop = Pball ? (void *)(Pball + (size_t)tid * blk * es) : (void *)P;
        void *dSop = dSball ? (void *)(dSball + (size_t)tid * blk * es) : (void *)dP;
        const int32_t *sid = s->seq_ids ? s->seq_ids + (size_t)b * T : NULL;
        const char *Kbg = (const char *)s->kb + ((size_t)b * T * ks + (size_t)g * hd) * es;
        const char *Vbg = (const char *)s->vb + ((size_t)b * T * ks + (size_t)g * hd) * es;
        for (int h = g * grp; h < (g + 1) * grp; h++) {
            for (int i0 = 0; i0 < T; i0 += ATT_BQ) {
                int mr = T - i0 < ATT_BQ ? T - i0 : ATT_BQ, kend = i0 + mr;
                size_t qoff = ((size_t)b * T + i0) * qs + (size_t)h * hd;
                const char *Qbh = (const char *)s->qb + qoff * es, *dObh = (const char *)dob + qoff * es;
                attn_scores(s, hd, b, h, i0, mr, kend, scale, es, P, dt);
                const float *rmax = s->rmax + ((size_t)b * H + h) * T + i0;
                const float *rinv = s->rinv + ((size_t)b * H + h) * T + i0;
                int ok = s->seg_ok[b];
                const int32_t *lo_b = s->seglo + (size_t)b * T;
                for (int i = 0; i < mr; i++) { /* P again, bit-identical to forward */
                    float *pi = P + (size_t)i * kend;
                    int gi = i0 + i;
                    if (ok) {
                        int lo = lo_b[gi];
                        memset(pi, 0, (size_t)lo * sizeof(float));
                        row_exp_scale(pi + lo, pi + lo, NULL, gi - lo + 1, rmax[i], rinv[i]);
                        memset(pi + gi + 1, 0, (size_t)(kend - gi - 1) * sizeof(float));
                    } else {
                        for (int j = 0; j < kend; j++)
                            pi[j] = attn_allowed(sid, gi, j) ? exp_poly(pi[j] - rmax[i]) * rinv[i] : 0.0f;
                    }
                }
                /* dP = dO Vᵀ (m, kend) */
                gemm(0, 1, mr, kend, hd, 1.0f, dObh, qs, Vbg, ks, 0.0f, dP, kend, dt);
                if (Pball) row_to_bf16(P, Pop, (int64_t)mr * kend);
                /* dV += Pᵀ dO */
                if (dv)
                    gemm(1, 0, kend, hd, mr, 1.0f, Pop, kend, dObh, qs, 1.0f,
                         dv + (size_t)b * T * ks + (size_t)g * hd, ks, dt);
                /* dS = P ⊙ (dP − rowsum(P ⊙ dP)) · scale */
                for (int i = 0; i < mr; i++) {
                    const float *pi = P + (size_t)i * kend;
                    float *di = dP + (size_t)i * kend;
                    int gi = i0 + i;
                    int lo = ok ? lo_b[gi] : 0;
                    float a = (float)row_dot_f64(pi + lo, di + lo, gi - lo + 1);
                    memset(di, 0, (size_t)lo * sizeof(float));
                    row_dsoftmax(pi + lo, di + lo, gi - lo + 1, a, scale);
                    memset(di + gi + 1, 0, (size_t)(kend - gi - 1) * sizeof(float));
                }
                if (dSball) row_to_bf16(dP, dSop, (int64_t)mr * kend);
                /* dQ += dS K ; dK += dSᵀ Q */
                if (dq) gemm(0, 0, mr, hd, kend, 1.0f, dSop, kend, Kbg, ks, 1.0f, dq + qoff, qs, dt);
                if (dk)
                    gemm(1, 0, kend, hd, mr, 1.0f, dSop, kend, Qbh, qs, 1.0f,
                         dk + (size_t)b * T * ks + (size_t)g * hd, ks, dt);
            }
        }
    }
    ag_prof_pop(pc);
    ag_arena_reset(ctx, m);
}

tensor *op_attention(ag_ctx *ctx, tensor *q, tensor *k, tensor *v, int B, int T, int H, int KVH,
                     const int32_t *seq_ids) {
    int64_t hd = q->shape[1] / H, qs = (int64_t)H * hd;
    float scale = 1.0f / sqrtf((float)hd);
    tensor *o = ag_tensor2(ctx, AG_F32, (int64_t)B * T, qs);
    bf16 *ob = memo_bf16_alloc(ctx, o); /* the output projection reads o as bf16 */
    int grad = ag_needs_grad(ctx, q, k, v);
    attn_saved a0 = {.qb = operand_of(ctx, q), .kb = operand_of(ctx, k), .vb = operand_of(ctx, v),
                     .seq_ids = seq_ids, .B = B, .T = T, .H = H, .KVH = KVH};
    size_t nstat = (size_t)B * H * T * sizeof(float);
    float *rmax = grad ? alloc_saved(ctx, nstat) : NULL, *rinv = grad ? alloc_saved(ctx, nstat) : NULL;
    int32_t *seglo = alloc_saved(ctx, (size_t)B * T * sizeof(int32_t));
    unsigned char *seg_ok = alloc_saved(ctx, (size_t)B);
    ag_mark m = ag_arena_mark(ctx);
    if (!grad) {
        rmax = ag_alloc(ctx, nstat);
        rinv = ag_alloc(ctx, nstat);
    }
    a0.rmax = rmax;
    a0.rinv = rinv;
    int pc = ag_prof_push(AG_PROF_ATTN);
    for (int b = 0; b < B; b++) {
        if (seq_ids) {
            seg_ok[b] = (unsigned char)attn_seg_lo(seq_ids + (size_t)b * T, T, seglo + (size_t)b * T);
        } else {
            memset(seglo + (size_t)b * T, 0, (size_t)T * sizeof(int32_t));
            seg_ok[b] = 1;
        }
    }
    a0.seglo = seglo;
    a0.seg_ok = seg_ok;
    gemm_dtype dt = gdt(ctx);
    size_t es = ctx->bf16 ? 2 : 4;
    int64_t ks = (int64_t)KVH * hd;
    int grp = H / KVH;
    int nth = omp_get_max_threads();
    size_t blk = (size_t)ATT_BQ * T;
    float *Sall = ag_alloc(ctx, (size_t)nth * blk * sizeof(float));
    char *Pball = ctx->bf16 ? ag_alloc(ctx, (size_t)nth * blk * es) : NULL;
    float *od = o->data;

    int ntask = B * H;
#pragma omp parallel for schedule(dynamic, 1)
    for (int task = 0; task < ntask; task++) {
        int tid = omp_get_thread_num();
        int b = task / H, h = task % H, g = h / grp;
        float *S = Sall + (size_t)tid * blk;
        void *Pop = Pball ? (void *)(Pball + (size_t)tid * blk * es) : (void *)S;
        const int32_t *sid = seq_ids ? seq_ids + (size_t)b * T : NULL;
        const char *Vbg = (const char *)a0.vb + ((size_t)b * T * ks + (size_t)g * hd) * es;
        for (int i0 = 0; i0 < T; i0 += ATT_BQ) {
            int mr = T - i0 < ATT_BQ ? T - i0 : ATT_BQ, kend = i0 + mr;
            attn_scores(&a0, hd, b, h, i0, mr, kend, scale, es, S, dt);
            float *rm = rmax + ((size_t)b * H + h) * T + i0, *ri = rinv + ((size_t)b * H + h) * T + i0;
            for (int i = 0; i < mr; i++) {
                float *pi = S + (size_t)i * kend;
                int gi = i0 + i;
                float mx, inv;
                if (seg_ok[b]) { /* attends to [lo, gi]: vector rows */
                    int lo = seglo[(size_t)b * T + gi], len = gi - lo + 1;
                    mx = row_max(pi + lo, len);
                    inv = 1.0f / row_sum_exp(pi + lo, len, mx, 1);
                    if (Pball) {
                        bf16 *pb = (bf16 *)Pop + (size_t)i * kend;
                        memset(pb, 0, (size_t)lo * sizeof(bf16));
                        row_scale(pi + lo, len, inv);
                        row_to_bf16(pi + lo, pb + lo, len);
                        memset(pb + gi + 1, 0, (size_t)(kend - gi - 1) * sizeof(bf16));
                    } else {
                        memset(pi, 0, (size_t)lo * sizeof(float));
                        row_scale(pi + lo, len, inv);
                        memset(pi + gi + 1, 0, (size_t)(kend - gi - 1) * sizeof(float));
                    }
                } else { /* general mask */
                    mx = -INFINITY;
                    for (int j = 0; j <= gi; j++)
                        if (sid[j] == sid[gi] && pi[j] > mx) mx = pi[j];
                    float sum = 0.0f;
                    for (int j = 0; j <= gi; j++) {
                        float ev = sid[j] == sid[gi] ? exp_poly(pi[j] - mx) : 0.0f;
                        pi[j] = ev;
                        sum += ev;
                    }
                    for (int j = gi + 1; j < kend; j++) pi[j] = 0.0f;
                    inv = 1.0f / sum;
                    for (int j = 0; j <= gi; j++) pi[j] *= inv;
                    if (Pball) row_to_bf16(pi, (bf16 *)Pop + (size_t)i * kend, kend);
                }
                rm[i] = mx;
                ri[i] = inv;
            }
            size_t ooff = ((size_t)b * T + i0) * qs + (size_t)h * hd;
            gemm(0, 0, mr, hd, kend, 1.0f, Pop, kend, Vbg, ks, 0.0f, od + ooff, qs, dt);
            if (ob)
                for (int i = 0; i < mr; i++) row_to_bf16(od + ooff + (size_t)i * qs, ob + ooff + (size_t)i * qs, hd);
        }
    }
    ag_prof_pop(pc);
    ag_arena_reset(ctx, m);
    if (grad) {
        ag_node *nd = ag_record(ctx, attn_backward, o, q, k, v, NULL);
        attn_saved *s = alloc_saved(ctx, sizeof *s);
        *s = a0;
        nd->saved = s;
    }
    return o;
}

/* ------------------------------------------------------------------ swiglu, add */

typedef struct swiglu_saved {
    const void *g, *u; /* (N, F) inputs: bf16 in bf16 mode (DESIGN: activations bf16), else fp32 */
    int bf16;
} swiglu_saved;

static void swiglu_backward(ag_ctx *ctx, const ag_node *n) {
    int pc = ag_prof_push(AG_PROF_ELTWISE);
    tensor *g = n->in[0], *u = n->in[1], *y = n->out;
    const swiglu_saved *s = n->saved;
    const float *dy = y->grad;
    float *dg = g->requires_grad ? ag_grad(ctx, g) : NULL;
    float *du = u->requires_grad ? ag_grad(ctx, u) : NULL;
    const bf16 *gb = s->g, *ubb = s->u;
    const float *gf = s->g, *uf = s->u;
    int isb = s->bf16;
    int64_t ne = g->numel, nchunk = (ne + 4095) / 4096;
#pragma omp parallel for schedule(static)
    for (int64_t c = 0; c < nchunk; c++) {
        int64_t i0 = c * 4096, i1 = ne - i0 < 4096 ? ne : i0 + 4096, i = i0;
#ifdef OPS_AVX512
        const __m512 one = _mm512_set1_ps(1.0f);
        for (; i < i1; i += 16) {
            __mmask16 k = tail_mask(i1 - i);
            __m512 gv = isb ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, gb + i)), 16))
                            : _mm512_maskz_loadu_ps(k, gf + i);
            __m512 uv = isb ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, ubb + i)), 16))
                            : _mm512_maskz_loadu_ps(k, uf + i);
            __m512 dyv = _mm512_maskz_loadu_ps(k, dy + i);
            __m512 sg = _mm512_div_ps(one, _mm512_add_ps(one, exp_poly16(_mm512_sub_ps(_mm512_setzero_ps(), gv))));
            if (du) {
                __m512 silu = _mm512_mul_ps(gv, sg);
                _mm512_mask_storeu_ps(du + i, k, _mm512_add_ps(_mm512_maskz_loadu_ps(k, du + i), _mm512_mul_ps(dyv, silu)));
            }
            if (dg) {
                __m512 t = _mm512_add_ps(sg, _mm512_mul_ps(_mm512_mul_ps(gv, sg), _mm512_sub_ps(one, sg)));
                __m512 v = _mm512_mul_ps(_mm512_mul_ps(dyv, uv), t);
                _mm512_mask_storeu_ps(dg + i, k, _mm512_add_ps(_mm512_maskz_loadu_ps(k, dg + i), v));
            }
        }
#endif
        for (; i < i1; i++) {
            float gv = isb ? bf16_to_f32(gb[i]) : gf[i], uv = isb ? bf16_to_f32(ubb[i]) : uf[i];
            float sg = 1.0f / (1.0f + exp_poly(-gv));
            float silu = gv * sg;
            if (du) du[i] += dy[i] * silu;
            if (dg) dg[i] += dy[i] * uv * (sg + gv * sg * (1.0f - sg));
        }
    }
    ag_prof_pop(pc);
}

tensor *op_swiglu(ag_ctx *ctx, tensor *g, tensor *u) {
    int pc = ag_prof_push(AG_PROF_ELTWISE);
    tensor *y = ag_tensor(ctx, AG_F32, g->ndim, g->shape);
    const float *gd = g->data, *ud = u->data;
    float *yd = y->data;
    int grad = ag_needs_grad(ctx, g, u, NULL);
    /* one pass: y, its bf16 copy for the down projection, and (for backward)
     * g and u in bf16 unless they already have one */
    bf16 *yb = memo_bf16_alloc(ctx, y);
    bf16 *gb = grad && ctx->bf16 && !g->kept_bf16 ? memo_bf16_alloc(ctx, g) : NULL;
    bf16 *ubf = grad && ctx->bf16 && !u->kept_bf16 ? memo_bf16_alloc(ctx, u) : NULL;
    int64_t n = g->numel, nchunk = (n + 4095) / 4096;
#pragma omp parallel for schedule(static)
    for (int64_t c = 0; c < nchunk; c++) {
        int64_t i0 = c * 4096, i1 = n - i0 < 4096 ? n : i0 + 4096, i = i0;
#ifdef OPS_AVX512
        for (; i < i1; i += 16) {
            __mmask16 k = tail_mask(i1 - i);
            __m512 gv = _mm512_maskz_loadu_ps(k, gd + i), uv = _mm512_maskz_loadu_ps(k, ud + i);
            __m512 den = _mm512_add_ps(_mm512_set1_ps(1.0f), exp_poly16(_mm512_sub_ps(_mm512_setzero_ps(), gv)));
            _mm512_mask_storeu_ps(yd + i, k, _mm512_mul_ps(_mm512_div_ps(gv, den), uv));
        }
#endif
        for (; i < i1; i++) yd[i] = gd[i] / (1.0f + exp_poly(-gd[i])) * ud[i];
        if (yb) row_to_bf16(yd + i0, yb + i0, i1 - i0);
        if (gb) row_to_bf16(gd + i0, gb + i0, i1 - i0);
        if (ubf) row_to_bf16(ud + i0, ubf + i0, i1 - i0);
    }
    if (grad) {
        ag_node *nd = ag_record(ctx, swiglu_backward, y, g, u, NULL, NULL);
        swiglu_saved *s = alloc_saved(ctx, sizeof *s);
        s->bf16 = ctx->bf16;
        s->g = ctx->bf16 ? ag_bf16_of(ctx, g, 1) : ag_keep(ctx, g);
        s->u = ctx->bf16 ? ag_bf16_of(ctx, u, 1) : ag_keep(ctx, u);
        nd->saved = s;
    }
    ag_prof_pop(pc);
    return y;
}

static void add_backward(ag_ctx *ctx, const ag_node *n) {
    int pc = ag_prof_push(AG_PROF_ELTWISE);
    tensor *a = n->in[0], *b = n->in[1], *y = n->out;
    const float *dy = y->grad;
    float *da = a->requires_grad ? ag_grad(ctx, a) : NULL;
    float *db = b->requires_grad ? ag_grad(ctx, b) : NULL;
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < y->numel; i++) {
        if (da) da[i] += dy[i];
        if (db) db[i] += dy[i];
    }
    ag_prof_pop(pc);
}

tensor *op_add(ag_ctx *ctx, tensor *a, tensor *b) {
    int pc = ag_prof_push(AG_PROF_ELTWISE);
    tensor *y = ag_tensor(ctx, AG_F32, a->ndim, a->shape);
    const float *ad = a->data, *bd = b->data;
    float *yd = y->data;
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < a->numel; i++) yd[i] = ad[i] + bd[i];
    if (ag_needs_grad(ctx, a, b, NULL)) ag_record(ctx, add_backward, y, a, b, NULL, NULL);
    ag_prof_pop(pc);
    return y;
}

/* ------------------------------------------------------------------ LM head + CE */

typedef struct ce_saved {
    float *dh; /* (N, D) d loss / d h */
} ce_saved;

static void ce_backward(ag_ctx *ctx, const ag_node *n) {
    int pc = ag_prof_push(AG_PROF_CE);
    tensor *h = n->in[0], *y = n->out;
    const ce_saved *s = n->saved;
    float g = y->grad[0];
    float *dh = ag_grad(ctx, h);
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < h->numel; i++) dh[i] += g * s->dh[i];
    ag_prof_pop(pc);
}

/* Rows of logits per chunk: 128 × vocab fp32 (+ its bf16 gradient) is the
 * largest transient of a training step (memplan.c counts it). */
enum { CE_CHUNK = 128 };

tensor *op_lm_head_ce_pick(ag_ctx *ctx, tensor *h, const frozen_weight *w, const int32_t *targets,
                           ce_target_fn pick, const void *pick_arg, float scale, int32_t *labels,
                           double *loss_sum, int64_t *n_tokens) {
    int64_t N = h->shape[0], D = h->shape[1], V = w->out;
    int64_t one = 1;
    tensor *loss = ag_tensor(ctx, AG_F32, 1, &one);
    int grad = ag_needs_grad(ctx, h, NULL, NULL);
    float *dh = grad ? alloc_saved(ctx, (size_t)(N * D) * sizeof(float)) : NULL;
    if (dh) memset(dh, 0, (size_t)(N * D) * sizeof(float));
    ag_mark m = ag_arena_mark(ctx);
    gemm_dtype dt = gdt(ctx);
    const void *wb = frozen_operand(ctx, w);
    float *logits = ag_alloc(ctx, (size_t)CE_CHUNK * V * sizeof(float));
    /* bf16 mode: the gradient of the logits is written straight as the bf16 GEMM operand */
    bf16 *glb = grad && ctx->bf16 ? ag_alloc(ctx, (size_t)CE_CHUNK * V * sizeof(bf16)) : NULL;
    double total = 0.0;
    int64_t count = 0;
    const float *hd = h->data;
    for (int64_t r0 = 0; r0 < N; r0 += CE_CHUNK) {
        int64_t c = N - r0 < CE_CHUNK ? N - r0 : CE_CHUNK;
        int any = 0;
        for (int64_t i = 0; i < c; i++) any |= !targets || targets[r0 + i] != -100;
        if (!any) {
            if (labels)
                for (int64_t i = 0; i < c; i++) labels[r0 + i] = -100;
            continue;
        }
        ag_mark m2 = ag_arena_mark(ctx);
        const void *hb = operand(ctx, hd + r0 * D, c * D);
        gemm(0, 1, c, V, D, 1.0f, hb, D, wb, D, 0.0f, logits, V, dt);
        double chunk_loss = 0.0;
        int64_t chunk_count = 0;
        int pc = ag_prof_push(AG_PROF_CE);
#pragma omp parallel for schedule(static) reduction(+ : chunk_loss, chunk_count)
        for (int64_t i = 0; i < c; i++) {
            /* locals: shared variables of the region would be reloaded after
             * every store and block vectorization */
            const int64_t Vl = V;
            const float sc = scale;
            int32_t tgt = targets ? targets[r0 + i] : 0;
            float *li = logits + i * Vl;
            if (tgt == -100) {
                if (labels) labels[r0 + i] = -100;
                if (glb) memset(glb + i * V, 0, (size_t)V * sizeof(bf16));
                else if (grad) memset(li, 0, (size_t)V * sizeof(float));
                continue;
            }
            float mx = row_max(li, Vl);
            float sum = row_sum_exp(li, Vl, mx, 0);
            float lse = mx + logf(sum);
            if (pick) tgt = pick(li, Vl, lse, r0 + i, pick_arg);
            if (labels) labels[r0 + i] = tgt;
            chunk_loss += (double)lse - (double)li[tgt];
            chunk_count += 1;
            if (glb) {
                bf16 *gi = glb + i * Vl;
                float lt = li[tgt];
                row_exp_scale(li, NULL, gi, Vl, lse, sc);
                gi[tgt] = f32_to_bf16(exp_poly(lt - lse) * sc - sc);
            } else if (grad) {
                row_exp_scale(li, li, NULL, Vl, lse, sc);
                li[tgt] -= sc;
            }
        }
        ag_prof_pop(pc);
        total += chunk_loss;
        count += chunk_count;
        if (grad) {
            const void *lb = glb ? (const void *)glb : (const void *)logits;
            gemm(0, 0, c, D, V, 1.0f, lb, V, wb, D, 0.0f, dh + r0 * D, D, dt);
        }
        ag_arena_reset(ctx, m2);
    }
    ag_arena_reset(ctx, m);
    ((float *)loss->data)[0] = (float)(total * scale);
    if (loss_sum) *loss_sum = total;
    if (n_tokens) *n_tokens = count;
    if (grad) {
        ag_node *nd = ag_record(ctx, ce_backward, loss, h, NULL, NULL, NULL);
        ce_saved *s = alloc_saved(ctx, sizeof *s);
        s->dh = dh;
        nd->saved = s;
    }
    return loss;
}

tensor *op_lm_head_ce(ag_ctx *ctx, tensor *h, const frozen_weight *w, const int32_t *targets,
                      float scale, double *loss_sum, int64_t *n_tokens) {
    return op_lm_head_ce_pick(ctx, h, w, targets, NULL, NULL, scale, NULL, loss_sum, n_tokens);
}
