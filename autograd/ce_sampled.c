/* autograd/ce_sampled.c — sampled-label LM head + cross-entropy for Sophia's
 * Gauss-Newton-Bartlett estimator (see ce_sampled.h).
 *
 * Same structure and numerics as op_lm_head_ce in ops.c — chunks of 128 rows
 * of logits, max / log-sum-exp in fp32 with the Cephes expf polynomial, the
 * logit gradient scale·(p − onehot) written straight into the GEMM operand —
 * with one addition per row: after the softmax p is known, a label is drawn
 * by inverting its CDF with one counter-based uniform. Built only on public
 * helpers (gemm.h, frozen_rows_*, the arenas), so ops.c stays untouched.
 */
#include "autograd/ce_sampled.h"

#include <math.h>
#include <string.h>

#include "autograd/gemm.h"
#include "autograd/prof.h"
#include "core/rng.h"

enum { CE_SAMPLED_CHUNK = 128 };

/* expf for the softmax loops: the Cephes single-precision polynomial
 * (cephes/single/expf.c), the same one op_lm_head_ce uses, so the ordinary
 * and the sampled loss agree to the last bit on the same logits. */
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
    union {
        uint32_t u;
        float f;
    } sc;
    sc.u = (uint32_t)((int32_t)n + 127) << 23;
    return y * sc.f;
}

/* Inverse CDF of softmax(li − lse) at u: the smallest j whose prefix sum of
 * p_j = exp(li[j] − lse) (fp32 terms, summed in double) exceeds u·Σ p. */
static int32_t sample_row(const float *li, int64_t V, float lse, double u) {
    double total = 0.0;
    for (int64_t j = 0; j < V; j++) total += (double)exp_poly(li[j] - lse);
    const double target = u * total;
    double cum = 0.0;
    for (int64_t j = 0; j < V; j++) {
        const float pj = exp_poly(li[j] - lse);
        if (!(pj > 0.0f)) continue;
        cum += (double)pj;
        if (cum > target) return (int32_t)j;
    }
    for (int64_t j = V - 1; j > 0; j--) /* u·total rounded up to the total */
        if (exp_poly(li[j] - lse) > 0.0f) return (int32_t)j;
    return 0;
}

/* Uniform double in [0, 1) with 53 random bits (row n of a draw). */
static inline double uniform53(uint64_t seed, uint64_t n) {
    return (double)(rng_u64(seed, CE_SAMPLE_STREAM, n) >> 11) * (1.0 / 9007199254740992.0);
}

typedef struct ce_sampled_saved {
    float *dh; /* (N, D) d loss / d h */
} ce_sampled_saved;

static void ce_sampled_backward(ag_ctx *ctx, const ag_node *n) {
    int pc = ag_prof_push(AG_PROF_CE);
    tensor *h = n->in[0], *y = n->out;
    const ce_sampled_saved *s = n->saved;
    float g = y->grad[0];
    float *dh = ag_grad(ctx, h);
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < h->numel; i++) dh[i] += g * s->dh[i];
    ag_prof_pop(pc);
}

tensor *op_lm_head_ce_sampled(ag_ctx *ctx, tensor *h, const frozen_weight *w, const int32_t *mask,
                              uint64_t seed, float scale, int32_t *labels, double *loss_sum, int64_t *n_tokens) {
    const int64_t N = h->shape[0], D = h->shape[1], V = w->out;
    int64_t one = 1;
    tensor *loss = ag_tensor(ctx, AG_F32, 1, &one);
    const int grad = ag_needs_grad(ctx, h, NULL, NULL);
    const int bf = ctx->bf16;
    const gemm_dtype dt = bf ? GEMM_BF16 : GEMM_F32;
    float *dh = NULL;
    if (grad) {
        size_t nb = (size_t)(N * D) * sizeof(float);
        dh = ctx->saving ? ag_alloc_keep(ctx, nb) : ag_alloc(ctx, nb);
        memset(dh, 0, nb);
    }
    ag_mark mk = ag_arena_mark(ctx);
    /* the head as a GEMM operand: bf16 weights in place, anything else dequantized once */
    const void *wb;
    if (bf && w->kind == FROZEN_BF16) wb = w->w_bf16;
    else if (!bf && w->kind == FROZEN_F32) wb = w->w_f32;
    else if (bf) {
        bf16 *t = ag_alloc(ctx, (size_t)(V * D) * sizeof(bf16));
        frozen_rows_bf16(w, 0, V, t);
        wb = t;
    } else {
        float *t = ag_alloc(ctx, (size_t)(V * D) * sizeof(float));
        frozen_rows_f32(w, 0, V, t);
        wb = t;
    }
    float *logits = ag_alloc(ctx, (size_t)CE_SAMPLED_CHUNK * V * sizeof(float));
    bf16 *glb = grad && bf ? ag_alloc(ctx, (size_t)CE_SAMPLED_CHUNK * V * sizeof(bf16)) : NULL;
    bf16 *hb = bf ? ag_alloc(ctx, (size_t)CE_SAMPLED_CHUNK * D * sizeof(bf16)) : NULL;
    const float *hd = h->data;
    double total = 0.0;
    int64_t count = 0;
    for (int64_t r0 = 0; r0 < N; r0 += CE_SAMPLED_CHUNK) {
        const int64_t c = N - r0 < CE_SAMPLED_CHUNK ? N - r0 : CE_SAMPLED_CHUNK;
        int any = 0;
        for (int64_t i = 0; i < c; i++) any |= !mask || mask[r0 + i] != -100;
        if (!any) {
            if (labels)
                for (int64_t i = 0; i < c; i++) labels[r0 + i] = -100;
            continue;
        }
        const void *ha = hd + r0 * D;
        if (bf) {
            for (int64_t i = 0; i < c * D; i++) hb[i] = f32_to_bf16(hd[r0 * D + i]);
            ha = hb;
        }
        gemm(0, 1, c, V, D, 1.0f, ha, D, wb, D, 0.0f, logits, V, dt);
        double chunk_loss = 0.0;
        int64_t chunk_count = 0;
        int pc = ag_prof_push(AG_PROF_CE);
#pragma omp parallel for schedule(static) reduction(+ : chunk_loss, chunk_count)
        for (int64_t i = 0; i < c; i++) {
            const int64_t row = r0 + i;
            float *li = logits + i * V;
            if (mask && mask[row] == -100) {
                if (labels) labels[row] = -100;
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
            const float lse = mx + logf(sum);
            const int32_t y = sample_row(li, V, lse, uniform53(seed, (uint64_t)row));
            if (labels) labels[row] = y;
            chunk_loss += (double)lse - (double)li[y];
            chunk_count += 1;
            /* from here on exactly op_lm_head_ce's gradient with target y */
            if (glb) {
                bf16 *gi = glb + i * V;
                const float ly = li[y];
#pragma omp simd
                for (int64_t j = 0; j < V; j++) gi[j] = f32_to_bf16(exp_poly(li[j] - lse) * scale);
                gi[y] = f32_to_bf16(exp_poly(ly - lse) * scale - scale);
            } else if (grad) {
#pragma omp simd
                for (int64_t j = 0; j < V; j++) li[j] = exp_poly(li[j] - lse) * scale;
                li[y] -= scale;
            }
        }
        ag_prof_pop(pc);
        total += chunk_loss;
        count += chunk_count;
        if (grad) {
            const void *lb = glb ? (const void *)glb : (const void *)logits;
            gemm(0, 0, c, D, V, 1.0f, lb, V, wb, D, 0.0f, dh + r0 * D, D, dt);
        }
    }
    ag_arena_reset(ctx, mk);
    ((float *)loss->data)[0] = (float)(total * scale);
    if (loss_sum) *loss_sum = total;
    if (n_tokens) *n_tokens = count;
    if (grad) {
        ag_node *nd = ag_record(ctx, ce_sampled_backward, loss, h, NULL, NULL, NULL);
        ce_sampled_saved *s = ctx->saving ? ag_alloc_keep(ctx, sizeof *s) : ag_alloc(ctx, sizeof *s);
        s->dh = dh;
        nd->saved = s;
    }
    return loss;
}
