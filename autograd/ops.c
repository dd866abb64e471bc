/* autograd/ops.c — forward and backward of the Llama ops on the CPU (see ops.h).
 *
 * Temporaries (bf16 operand copies, dropout masks) are allocated after an
 * arena mark and released before the op returns; only outputs and what the
 * backward pass needs survive. Loops are OpenMP-parallel over rows with static
 * scheduling, so results depend only on the thread count, not on timing.
 */
#include "autograd/ops.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "autograd/gemm.h"
#include "core/rng.h"

/* ------------------------------------------------------------------ helpers */

static void f32_to_bf16_n(const float *src, bf16 *dst, int64_t n) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i++) dst[i] = f32_to_bf16(src[i]);
}

/* An fp32 buffer as a GEMM operand: a bf16 copy in the arena when ctx->bf16. */
static const void *operand(ag_ctx *ctx, const float *src, int64_t n) {
    if (!ctx->bf16) return src;
    bf16 *b = ag_alloc(ctx, (size_t)n * sizeof(bf16));
    f32_to_bf16_n(src, b, n);
    return b;
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
    switch (w->kind) {
    case FROZEN_NF4:
        nf4_dequantize_rows_f32(w->nf4, row0, n, dst);
        break;
    case FROZEN_BF16: {
        const bf16 *src = w->w_bf16 + row0 * w->in;
#pragma omp parallel for schedule(static)
        for (int64_t i = 0; i < n * w->in; i++) dst[i] = bf16_to_f32(src[i]);
        break;
    }
    case FROZEN_F32:
        memcpy(dst, w->w_f32 + row0 * w->in, (size_t)(n * w->in) * sizeof(float));
        break;
    }
}

void frozen_rows_bf16(const frozen_weight *w, int64_t row0, int64_t n, bf16 *dst) {
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
    int64_t D = table->in;
    tensor *x = ag_tensor2(ctx, AG_F32, n, D);
    float *xd = x->data;
    for (int64_t i = 0; i < n; i++) frozen_rows_f32(table, ids[i], 1, xd + i * D);
    return x;
}

/* ------------------------------------------------------------------ rmsnorm */

typedef struct rms_saved {
    float *rstd; /* (N) */
    float eps;
} rms_saved;

static void rmsnorm_backward(ag_ctx *ctx, const ag_node *n) {
    tensor *x = n->in[0], *w = n->in[1], *y = n->out;
    const rms_saved *s = n->saved;
    int64_t N = x->shape[0], D = x->shape[1];
    const float *xd = x->data, *wd = w->data, *dy = y->grad;
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
}

tensor *op_rmsnorm(ag_ctx *ctx, tensor *x, tensor *w, float eps) {
    int64_t N = x->shape[0], D = x->shape[1];
    tensor *y = ag_tensor2(ctx, AG_F32, N, D);
    float *rstd = ag_alloc(ctx, (size_t)N * sizeof(float));
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
    if (ag_needs_grad(ctx, x, w, NULL)) {
        ag_node *nd = ag_record(ctx, rmsnorm_backward, y, x, w, NULL, NULL);
        rms_saved *s = ag_alloc(ctx, sizeof *s);
        s->rstd = rstd;
        s->eps = eps;
        nd->saved = s;
    }
    return y;
}

/* ------------------------------------------------------------------ linear (+ LoRA) */

typedef struct linear_saved {
    const frozen_weight *w;
    const lora_adapter *lora;
    float *xd; /* dropout(x) (N, in) fp32, == x->data when p == 0 */
    float *u;  /* dropout(x) Aᵀ (N, r) fp32 */
    uint64_t seed;
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
        const void *ub = operand(ctx, s->u, N * r);
        /* dB += s · dyᵀ u   (out, r) */
        if (dB) gemm(1, 0, out, r, N, lo->scaling, dyb, out, ub, r, 1.0f, dB, r, dt);
        /* du = s · dy B   (N, r) */
        float *du = ag_alloc(ctx, (size_t)(N * r) * sizeof(float));
        const void *Bb = operand(ctx, lo->B->data, out * r);
        gemm(0, 0, N, r, out, lo->scaling, dyb, out, Bb, r, 0.0f, du, r, dt);
        const void *dub = operand(ctx, du, N * r);
        /* dA += duᵀ dropout(x)   (r, in) */
        if (dA) {
            const void *xdb = operand(ctx, s->xd, N * in);
            gemm(1, 0, r, in, N, 1.0f, dub, r, xdb, in, 1.0f, dA, in, dt);
        }
        if (dx) {
            /* d dropout(x) = du A ; dx += mask/(1-p) · that */
            const void *Ab = operand(ctx, lo->A->data, r * in);
            if (lo->dropout > 0.0f) {
                float *dxd = ag_alloc(ctx, (size_t)(N * in) * sizeof(float));
                gemm(0, 0, N, in, r, 1.0f, dub, r, Ab, in, 0.0f, dxd, in, dt);
                float inv = 1.0f / (1.0f - lo->dropout);
#pragma omp parallel for schedule(static)
                for (int64_t i = 0; i < N * in; i++)
                    if (dropout_keep(s->seed, lo->stream, i, lo->dropout)) dx[i] += dxd[i] * inv;
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
    float *xd = x->data, *u = NULL;
    if (lora) {
        int64_t r = lora->r;
        if (lora->dropout > 0.0f && ctx->training) {
            xd = ag_alloc(ctx, (size_t)(N * in) * sizeof(float));
            float inv = 1.0f / (1.0f - lora->dropout);
            const float *xs = x->data;
#pragma omp parallel for schedule(static)
            for (int64_t i = 0; i < N * in; i++)
                xd[i] = dropout_keep(ctx->seed, lora->stream, i, lora->dropout) ? xs[i] * inv : 0.0f;
        }
        u = ag_alloc(ctx, (size_t)(N * r) * sizeof(float));
    }
    ag_mark m = ag_arena_mark(ctx);
    gemm_dtype dt = gdt(ctx);
    const void *xb = operand(ctx, x->data, N * in);
    const void *wb = frozen_operand(ctx, w);
    gemm(0, 1, N, out, in, 1.0f, xb, in, wb, in, 0.0f, y->data, out, dt); /* y = x Wᵀ */
    if (lora) {
        int64_t r = lora->r;
        const void *xdb = xd == x->data ? xb : operand(ctx, xd, N * in);
        const void *Ab = operand(ctx, lora->A->data, r * in);
        gemm(0, 1, N, r, in, 1.0f, xdb, in, Ab, in, 0.0f, u, r, dt); /* u = x Aᵀ */
        const void *ub = operand(ctx, u, N * r);
        const void *Bb = operand(ctx, lora->B->data, out * r);
        gemm(0, 1, N, out, r, lora->scaling, ub, r, Bb, r, 1.0f, y->data, out, dt); /* y += s u Bᵀ */
    }
    ag_arena_reset(ctx, m);
    if (grad) {
        ag_node *nd = ag_record(ctx, linear_backward, y, x, lora ? lora->A : NULL, lora ? lora->B : NULL,
                                NULL);
        linear_saved *s = ag_alloc(ctx, sizeof *s);
        s->w = w;
        s->lora = lora;
        s->xd = xd;
        s->u = u;
        s->seed = ctx->seed;
        nd->saved = s;
        /* dropout mask is regenerated from (seed, stream) in backward */
        if (lora && !(lora->dropout > 0.0f && ctx->training)) s->xd = x->data;
    }
    return y;
}

/* ------------------------------------------------------------------ rope */

typedef struct rope_saved {
    const rope_table *rt;
    const int32_t *pos;
    int n_heads;
} rope_saved;

static void rope_apply(const float *x, float *y, int64_t N, int n_heads, const rope_table *rt,
                       const int32_t *pos, float sign) {
    int hd = rt->head_dim, half = hd / 2;
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < N; t++) {
        const float *c = rt->cos + (size_t)pos[t] * half, *s = rt->sin + (size_t)pos[t] * half;
        for (int h = 0; h < n_heads; h++) {
            const float *xi = x + (t * n_heads + h) * hd;
            float *yi = y + (t * n_heads + h) * hd;
            for (int i = 0; i < half; i++) {
                float x1 = xi[i], x2 = xi[i + half], sn = sign * s[i];
                yi[i] = x1 * c[i] - x2 * sn;
                yi[i + half] = x2 * c[i] + x1 * sn;
            }
        }
    }
}

static void rope_backward(ag_ctx *ctx, const ag_node *n) {
    tensor *x = n->in[0], *y = n->out;
    const rope_saved *s = n->saved;
    int64_t N = x->shape[0];
    float *dx = ag_grad(ctx, x);
    ag_mark m = ag_arena_mark(ctx);
    float *tmp = ag_alloc(ctx, (size_t)x->numel * sizeof(float));
    rope_apply(y->grad, tmp, N, s->n_heads, s->rt, s->pos, -1.0f); /* inverse rotation */
    for (int64_t i = 0; i < x->numel; i++) dx[i] += tmp[i];
    ag_arena_reset(ctx, m);
}

tensor *op_rope(ag_ctx *ctx, tensor *x, int n_heads, const rope_table *rt, const int32_t *pos) {
    int64_t N = x->shape[0];
    tensor *y = ag_tensor2(ctx, AG_F32, N, x->shape[1]);
    rope_apply(x->data, y->data, N, n_heads, rt, pos, 1.0f);
    if (ag_needs_grad(ctx, x, NULL, NULL)) {
        ag_node *nd = ag_record(ctx, rope_backward, y, x, NULL, NULL, NULL);
        rope_saved *s = ag_alloc(ctx, sizeof *s);
        s->rt = rt;
        s->pos = pos;
        s->n_heads = n_heads;
        nd->saved = s;
    }
    return y;
}

/* ------------------------------------------------------------------ attention */

typedef struct attn_saved {
    float *P; /* (B, H, T, T) softmax probabilities, 0 where masked */
    int B, T, H, KVH;
} attn_saved;

static void attn_backward(ag_ctx *ctx, const ag_node *n) {
    tensor *q = n->in[0], *k = n->in[1], *v = n->in[2], *o = n->out;
    const attn_saved *s = n->saved;
    int B = s->B, T = s->T, H = s->H, KVH = s->KVH;
    int64_t hd = q->shape[1] / H, qs = (int64_t)H * hd, ks = (int64_t)KVH * hd;
    int grp = H / KVH;
    float scale = 1.0f / sqrtf((float)hd);
    float *dq = ag_grad(ctx, q), *dk = ag_grad(ctx, k), *dv = ag_grad(ctx, v);
    ag_mark m = ag_arena_mark(ctx);
    gemm_dtype dt = gdt(ctx);
    const void *qb = operand(ctx, q->data, q->numel);
    const void *kb = operand(ctx, k->data, k->numel);
    const void *vb = operand(ctx, v->data, v->numel);
    const void *dob = operand(ctx, o->grad, o->numel);
    size_t es = ctx->bf16 ? 2 : 4;
    float *dP = ag_alloc(ctx, (size_t)T * T * sizeof(float));
    for (int b = 0; b < B; b++) {
        for (int h = 0; h < H; h++) {
            int g = h / grp;
            ag_mark mi = ag_arena_mark(ctx);
            const float *P = s->P + ((size_t)b * H + h) * T * T;
            size_t qoff = ((size_t)b * T * qs + (size_t)h * hd) * es;
            size_t koff = ((size_t)b * T * ks + (size_t)g * hd) * es;
            const char *Qbh = (const char *)qb + qoff, *Kbg = (const char *)kb + koff;
            const char *Vbg = (const char *)vb + koff, *dObh = (const char *)dob + qoff;
            /* dP = dO Vᵀ (T, T) */
            gemm(0, 1, T, T, hd, 1.0f, dObh, qs, Vbg, ks, 0.0f, dP, T, dt);
            /* dV += Pᵀ dO */
            const void *Pb = operand(ctx, P, (int64_t)T * T);
            gemm(1, 0, T, hd, T, 1.0f, Pb, T, dObh, qs, 1.0f, dv + (size_t)b * T * ks + (size_t)g * hd, ks, dt);
            /* dS = P ⊙ (dP − rowsum(P ⊙ dP)) · scale, in place in dP */
#pragma omp parallel for schedule(static)
            for (int i = 0; i < T; i++) {
                const float *pi = P + (size_t)i * T;
                float *di = dP + (size_t)i * T;
                double acc = 0.0;
                for (int j = 0; j <= i; j++) acc += (double)pi[j] * di[j];
                float a = (float)acc;
                for (int j = 0; j < T; j++) di[j] = j <= i ? pi[j] * (di[j] - a) * scale : 0.0f;
            }
            const void *dSb = operand(ctx, dP, (int64_t)T * T);
            /* dQ = dS K ; dK += dSᵀ Q */
            gemm(0, 0, T, hd, T, 1.0f, dSb, T, Kbg, ks, 1.0f, dq + (size_t)b * T * qs + (size_t)h * hd, qs, dt);
            gemm(1, 0, T, hd, T, 1.0f, dSb, T, Qbh, qs, 1.0f, dk + (size_t)b * T * ks + (size_t)g * hd, ks, dt);
            ag_arena_reset(ctx, mi);
        }
    }
    ag_arena_reset(ctx, m);
}

tensor *op_attention(ag_ctx *ctx, tensor *q, tensor *k, tensor *v, int B, int T, int H, int KVH,
                     const int32_t *seq_ids) {
    int64_t hd = q->shape[1] / H, qs = (int64_t)H * hd, ks = (int64_t)KVH * hd;
    int grp = H / KVH;
    float scale = 1.0f / sqrtf((float)hd);
    tensor *o = ag_tensor2(ctx, AG_F32, (int64_t)B * T, qs);
    int grad = ag_needs_grad(ctx, q, k, v);
    float *Pall = grad ? ag_alloc(ctx, (size_t)B * H * T * T * sizeof(float)) : NULL;
    ag_mark m = ag_arena_mark(ctx);
    gemm_dtype dt = gdt(ctx);
    const void *qb = operand(ctx, q->data, q->numel);
    const void *kb = operand(ctx, k->data, k->numel);
    const void *vb = operand(ctx, v->data, v->numel);
    size_t es = ctx->bf16 ? 2 : 4;
    float *Ptmp = grad ? NULL : ag_alloc(ctx, (size_t)T * T * sizeof(float));
    bf16 *Pb = ctx->bf16 ? ag_alloc(ctx, (size_t)T * T * sizeof(bf16)) : NULL;
    float *od = o->data;
    for (int b = 0; b < B; b++) {
        const int32_t *sid = seq_ids ? seq_ids + (size_t)b * T : NULL;
        for (int h = 0; h < H; h++) {
            int g = h / grp;
            float *P = grad ? Pall + ((size_t)b * H + h) * T * T : Ptmp;
            size_t qoff = ((size_t)b * T * qs + (size_t)h * hd) * es;
            size_t koff = ((size_t)b * T * ks + (size_t)g * hd) * es;
            gemm(0, 1, T, T, hd, scale, (const char *)qb + qoff, qs, (const char *)kb + koff, ks, 0.0f, P, T, dt);
#pragma omp parallel for schedule(static)
            for (int i = 0; i < T; i++) {
                float *pi = P + (size_t)i * T;
                float mx = -INFINITY;
                for (int j = 0; j <= i; j++)
                    if ((!sid || sid[j] == sid[i]) && pi[j] > mx) mx = pi[j];
                float sum = 0.0f;
                if (sid) {
                    for (int j = 0; j <= i; j++) pi[j] = sid[j] == sid[i] ? pi[j] : -INFINITY;
                }
#pragma omp simd reduction(+ : sum)
                for (int j = 0; j <= i; j++) {
                    float ev = pi[j] == -INFINITY ? 0.0f : exp_poly(pi[j] - mx);
                    pi[j] = ev;
                    sum += ev;
                }
                for (int j = i + 1; j < T; j++) pi[j] = 0.0f;
                float inv = 1.0f / sum;
                for (int j = 0; j <= i; j++) pi[j] *= inv;
            }
            const void *Pop = P;
            if (Pb) {
                f32_to_bf16_n(P, Pb, (int64_t)T * T);
                Pop = Pb;
            }
            gemm(0, 0, T, hd, T, 1.0f, Pop, T, (const char *)vb + koff, ks, 0.0f,
                 od + (size_t)b * T * qs + (size_t)h * hd, qs, dt);
        }
    }
    ag_arena_reset(ctx, m);
    if (grad) {
        ag_node *nd = ag_record(ctx, attn_backward, o, q, k, v, NULL);
        attn_saved *s = ag_alloc(ctx, sizeof *s);
        s->P = Pall;
        s->B = B;
        s->T = T;
        s->H = H;
        s->KVH = KVH;
        nd->saved = s;
    }
    return o;
}

/* ------------------------------------------------------------------ swiglu, add */

static void swiglu_backward(ag_ctx *ctx, const ag_node *n) {
    tensor *g = n->in[0], *u = n->in[1], *y = n->out;
    const float *gd = g->data, *ud = u->data, *dy = y->grad;
    float *dg = g->requires_grad ? ag_grad(ctx, g) : NULL;
    float *du = u->requires_grad ? ag_grad(ctx, u) : NULL;
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < g->numel; i++) {
        float sg = 1.0f / (1.0f + expf(-gd[i]));
        float silu = gd[i] * sg;
        if (du) du[i] += dy[i] * silu;
        if (dg) dg[i] += dy[i] * ud[i] * (sg + gd[i] * sg * (1.0f - sg));
    }
}

tensor *op_swiglu(ag_ctx *ctx, tensor *g, tensor *u) {
    tensor *y = ag_tensor(ctx, AG_F32, g->ndim, g->shape);
    const float *gd = g->data, *ud = u->data;
    float *yd = y->data;
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < g->numel; i++) yd[i] = gd[i] / (1.0f + expf(-gd[i])) * ud[i];
    if (ag_needs_grad(ctx, g, u, NULL)) ag_record(ctx, swiglu_backward, y, g, u, NULL, NULL);
    return y;
}

static void add_backward(ag_ctx *ctx, const ag_node *n) {
    tensor *a = n->in[0], *b = n->in[1], *y = n->out;
    const float *dy = y->grad;
    float *da = a->requires_grad ? ag_grad(ctx, a) : NULL;
    float *db = b->requires_grad ? ag_grad(ctx, b) : NULL;
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < y->numel; i++) {
        if (da) da[i] += dy[i];
        if (db) db[i] += dy[i];
    }
}

tensor *op_add(ag_ctx *ctx, tensor *a, tensor *b) {
    tensor *y = ag_tensor(ctx, AG_F32, a->ndim, a->shape);
    const float *ad = a->data, *bd = b->data;
    float *yd = y->data;
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < a->numel; i++) yd[i] = ad[i] + bd[i];
    if (ag_needs_grad(ctx, a, b, NULL)) ag_record(ctx, add_backward, y, a, b, NULL, NULL);
    return y;
}

/* ------------------------------------------------------------------ LM head + CE */

typedef struct ce_saved {
    float *dh; /* (N, D) d loss / d h */
} ce_saved;

static void ce_backward(ag_ctx *ctx, const ag_node *n) {
    tensor *h = n->in[0], *y = n->out;
    const ce_saved *s = n->saved;
    float g = y->grad[0];
    float *dh = ag_grad(ctx, h);
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < h->numel; i++) dh[i] += g * s->dh[i];
}

enum { CE_CHUNK = 256 };

tensor *op_lm_head_ce(ag_ctx *ctx, tensor *h, const frozen_weight *w, const int32_t *targets,
                      float scale, double *loss_sum, int64_t *n_tokens) {
    int64_t N = h->shape[0], D = h->shape[1], V = w->out;
    int64_t one = 1;
    tensor *loss = ag_tensor(ctx, AG_F32, 1, &one);
    int grad = ag_needs_grad(ctx, h, NULL, NULL);
    float *dh = grad ? ag_alloc(ctx, (size_t)(N * D) * sizeof(float)) : NULL;
    if (dh) memset(dh, 0, (size_t)(N * D) * sizeof(float));
    ag_mark m = ag_arena_mark(ctx);
    gemm_dtype dt = gdt(ctx);
    const void *wb = frozen_operand(ctx, w);
    float *logits = ag_alloc(ctx, (size_t)CE_CHUNK * V * sizeof(float));
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
#pragma omp parallel for schedule(static) reduction(+ : chunk_loss, chunk_count)
        for (int64_t i = 0; i < c; i++) {
            int32_t tgt = targets[r0 + i];
            float *li = logits + i * V;
            if (tgt == -100) {
                if (grad) memset(li, 0, (size_t)V * sizeof(float));
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
            if (grad) {
#pragma omp simd
                for (int64_t j = 0; j < V; j++) li[j] = exp_poly(li[j] - lse) * scale;
                li[tgt] -= scale;
            }
        }
        total += chunk_loss;
        count += chunk_count;
        if (grad) {
            const void *lb = operand(ctx, logits, c * V);
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
        ce_saved *s = ag_alloc(ctx, sizeof *s);
        s->dh = dh;
        nd->saved = s;
    }
    return loss;
}
