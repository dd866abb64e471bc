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

#include "autograd/gemm.h"
#include "autograd/prof.h"
#include "core/rng.h"

/* ------------------------------------------------------------------ helpers */

static void f32_to_bf16_n(const float *src, bf16 *dst, int64_t n) {
    int pc = ag_prof_push(AG_PROF_CONVERT);
#pragma omp parallel for schedule(static) if (n > 16384)
    for (int64_t i = 0; i < n; i++) dst[i] = f32_to_bf16(src[i]);
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

/* expf for softmax-like loops: Cephes' single-precision polynomial (Moshier,
 * cephes/single/expf.c) after range reduction x = n·ln2 + r; max relative error
 * ≈ 2e-7 on [-87, 88]. Written branch-free so `omp simd` loops vectorize it
 * (glibc's expf only vectorizes under -ffast-math, which we do not use). */
static inline float exp_poly(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    float n = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    float y = p * r * r + r + 1.0f;
    union { uint32_t u; float f; } sc;
    sc.u = (uint32_t)((int32_t)n + 127) << 23;
    return y * sc.f;
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
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < N; i++) {
        const float *xi = xd + i * D;
        double ss = 0.0;
        for (int64_t j = 0; j < D; j++) ss += (double)xi[j] * xi[j];
        float r = 1.0f / sqrtf((float)(ss / (double)D) + eps);
        rstd[i] = r;
        for (int64_t j = 0; j < D; j++) yd[i * D + j] = wd[j] * (xi[j] * r);
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
static void rope_apply(const float *x, float *y, int64_t N, int n_heads, const rope_table *rt,
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
    }
}

static void rope_backward(ag_ctx *ctx, const ag_node *n) {
    int pc = ag_prof_push(AG_PROF_ROPE);
    tensor *x = n->in[0], *y = n->out;
    const rope_saved *s = n->saved;
    float *dx = ag_grad(ctx, x);
    rope_apply(y->grad, dx, x->shape[0], s->n_heads, s->rt, s->pos, -1.0f, 1); /* inverse rotation */
    ag_prof_pop(pc);
}

tensor *op_rope(ag_ctx *ctx, tensor *x, int n_heads, const rope_table *rt, const int32_t *pos) {
    int pc = ag_prof_push(AG_PROF_ROPE);
    int64_t N = x->shape[0];
    tensor *y = ag_tensor2(ctx, AG_F32, N, x->shape[1]);
    rope_apply(x->data, y->data, N, n_heads, rt, pos, 1.0f, 0);
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
    int B, T, H, KVH;
} attn_saved;

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
                for (int i = 0; i < mr; i++) {
                    float *pi = P + (size_t)i * kend;
                    int gi = i0 + i;
                    for (int j = 0; j < kend; j++)
                        pi[j] = attn_allowed(sid, gi, j) ? exp_poly(pi[j] - rmax[i]) * rinv[i] : 0.0f;
                }
                /* dP = dO Vᵀ (m, kend) */
                gemm(0, 1, mr, kend, hd, 1.0f, dObh, qs, Vbg, ks, 0.0f, dP, kend, dt);
                if (Pball) {
                    bf16 *pb = Pop;
                    for (size_t i = 0; i < (size_t)mr * kend; i++) pb[i] = f32_to_bf16(P[i]);
                }
                /* dV += Pᵀ dO */
                if (dv)
                    gemm(1, 0, kend, hd, mr, 1.0f, Pop, kend, dObh, qs, 1.0f,
                         dv + (size_t)b * T * ks + (size_t)g * hd, ks, dt);
                /* dS = P ⊙ (dP − rowsum(P ⊙ dP)) · scale */
                for (int i = 0; i < mr; i++) {
                    const float *pi = P + (size_t)i * kend;
                    float *di = dP + (size_t)i * kend;
                    int gi = i0 + i;
                    double acc = 0.0;
                    for (int j = 0; j <= gi; j++) acc += (double)pi[j] * di[j];
                    float a = (float)acc;
                    for (int j = 0; j < kend; j++) di[j] = j <= gi ? pi[j] * (di[j] - a) * scale : 0.0f;
                }
                if (dSball) {
                    bf16 *db = dSop;
                    for (size_t i = 0; i < (size_t)mr * kend; i++) db[i] = f32_to_bf16(dP[i]);
                }
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
    int grad = ag_needs_grad(ctx, q, k, v);
    attn_saved a0 = {.qb = operand_of(ctx, q), .kb = operand_of(ctx, k), .vb = operand_of(ctx, v),
                     .seq_ids = seq_ids, .B = B, .T = T, .H = H, .KVH = KVH};
    size_t nstat = (size_t)B * H * T * sizeof(float);
    float *rmax = grad ? alloc_saved(ctx, nstat) : NULL, *rinv = grad ? alloc_saved(ctx, nstat) : NULL;
    ag_mark m = ag_arena_mark(ctx);
    if (!grad) {
        rmax = ag_alloc(ctx, nstat);
        rinv = ag_alloc(ctx, nstat);
    }
    a0.rmax = rmax;
    a0.rinv = rinv;
    int pc = ag_prof_push(AG_PROF_ATTN);
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
                float mx = -INFINITY;
                for (int j = 0; j <= gi; j++)
                    if ((!sid || sid[j] == sid[gi]) && pi[j] > mx) mx = pi[j];
                if (sid)
                    for (int j = 0; j <= gi; j++) pi[j] = sid[j] == sid[gi] ? pi[j] : -INFINITY;
                float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
                for (int j = 0; j <= gi; j++) {
                    float ev = pi[j] == -INFINITY ? 0.0f : exp_poly(pi[j] - mx);
                    pi[j] = ev;
                    sum += ev;
                }
                for (int j = gi + 1; j < kend; j++) pi[j] = 0.0f;
                float inv = 1.0f / sum;
                for (int j = 0; j <= gi; j++) pi[j] *= inv;
                rm[i] = mx;
                ri[i] = inv;
            }
            if (Pball) {
                bf16 *pb = Pop;
                for (size_t i = 0; i < (size_t)mr * kend; i++) pb[i] = f32_to_bf16(S[i]);
            }
            gemm(0, 0, mr, hd, kend, 1.0f, Pop, kend, Vbg, ks, 0.0f, od + ((size_t)b * T + i0) * qs + (size_t)h * hd,
                 qs, dt);
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
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < g->numel; i++) {
        float gv = isb ? bf16_to_f32(gb[i]) : gf[i], uv = isb ? bf16_to_f32(ubb[i]) : uf[i];
        float sg = 1.0f / (1.0f + expf(-gv));
        float silu = gv * sg;
        if (du) du[i] += dy[i] * silu;
        if (dg) dg[i] += dy[i] * uv * (sg + gv * sg * (1.0f - sg));
    }
    ag_prof_pop(pc);
}

tensor *op_swiglu(ag_ctx *ctx, tensor *g, tensor *u) {
    int pc = ag_prof_push(AG_PROF_ELTWISE);
    tensor *y = ag_tensor(ctx, AG_F32, g->ndim, g->shape);
    const float *gd = g->data, *ud = u->data;
    float *yd = y->data;
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < g->numel; i++) yd[i] = gd[i] / (1.0f + expf(-gd[i])) * ud[i];
    if (ag_needs_grad(ctx, g, u, NULL)) {
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

tensor *op_lm_head_ce(ag_ctx *ctx, tensor *h, const frozen_weight *w, const int32_t *targets,
                      float scale, double *loss_sum, int64_t *n_tokens) {
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
        for (int64_t i = 0; i < c; i++) any |= targets[r0 + i] != -100;
        if (!any) continue;
        ag_mark m2 = ag_arena_mark(ctx);
        const void *hb = operand(ctx, hd + r0 * D, c * D);
        gemm(0, 1, c, V, D, 1.0f, hb, D, wb, D, 0.0f, logits, V, dt);
        double chunk_loss = 0.0;
        int64_t chunk_count = 0;
        int pc = ag_prof_push(AG_PROF_CE);
#pragma omp parallel for schedule(static) reduction(+ : chunk_loss, chunk_count)
        for (int64_t i = 0; i < c; i++) {
            int32_t tgt = targets[r0 + i];
            float *li = logits + i * V;
            if (tgt == -100) {
                if (glb) memset(glb + i * V, 0, (size_t)V * sizeof(bf16));
                else if (grad) memset(li, 0, (size_t)V * sizeof(float));
                continue;
            }
            float mx = -INFINITY;
#pragma omp simd reduction(max : mx)
            for (int64_t j = 0; j < V; j++) mx = li[j] > mx ? li[j] : mx;
            float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
            for (int64_t j = 0; j < V; j++) sum += exp_poly(li[j] - mx);
            float lse = mx + logf(sum);
            chunk_loss += (double)lse - (double)li[tgt];
            chunk_count += 1;
            if (glb) {
                bf16 *gi = glb + i * V;
                float lt = li[tgt];
#pragma omp simd
                for (int64_t j = 0; j < V; j++) gi[j] = f32_to_bf16(exp_poly(li[j] - lse) * scale);
                gi[tgt] = f32_to_bf16(exp_poly(lt - lse) * scale - scale);
            } else if (grad) {
#pragma omp simd
                for (int64_t j = 0; j < V; j++) li[j] = exp_poly(li[j] - lse) * scale;
                li[tgt] -= scale;
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
