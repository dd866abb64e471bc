/* autograd/ops.c — forward and backward of the Llama ops (see ops.h).
 *
 * The ops keep the shapes, the tape and the arena bookkeeping; every loop over
 * tensor data is a call into the context's backend table (ctx->be,
 * autograd/backend.h; the CPU kernels are in autograd/backend_cpu_kernels.inc).
 * Temporaries (bf16 operand copies, dropout masks) are allocated after an
 * arena mark and released before the op returns; only outputs and what the
 * backward pass needs survive.
 */
#include "autograd/ops.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "autograd/backend.h"
#include "autograd/prof.h"
#include "core/parse.h"

/* ------------------------------------------------------------------ helpers */

/* An fp32 buffer as a GEMM operand: a bf16 copy in the arena when ctx->bf16, an fp16-rounded fp32 copy
 * when ctx->fp16. */
static const void *operand(ag_ctx *ctx, const float *src, int64_t n) {
    if (!ctx->bf16 && ctx->fp16) {
        float *r = ag_alloc(ctx, (size_t)n * sizeof(float));
        ctx->be->round_f16(src, r, n);
        return r;
    }
    if (!ctx->bf16) return src;
    bf16 *b = ag_alloc(ctx, (size_t)n * sizeof(bf16));
    ctx->be->to_bf16(src, b, n);
    return b;
}

/* A tensor as a GEMM operand that backward may read again: its memoised bf16
 * copy (one conversion however many ops read it; kept for backward inside a
 * segment), or its fp32 data (kept) in fp32 mode. Call before any local mark. */
static const void *operand_of(ag_ctx *ctx, tensor *t) {
    if (ctx->bf16) return ag_bf16_of(ctx, t, 1);
    if (ctx->fp16) return ag_f16_of(ctx, t, 1);
    return ag_keep(ctx, t);
}

/* The bf16 copy of t that operand_of() would make, to be filled by the op that
 * produces t in the same pass (saves a conversion pass and its fork/join). */
static bf16 *memo_bf16_alloc(ag_ctx *ctx, tensor *t) {
    if (!ctx->bf16 || t->dtype != AG_F32) return NULL;
    t->kept_bf16 = ag_alloc_keep(ctx, (size_t)t->numel * sizeof(bf16));
    return t->kept_bf16;
}

/* The (d0, d1) fp32 output of an op that also writes its bf16 copy: without fp32 data (NULL) when the caller
 * said nothing reads it (ctx->f32_unread, cleared here) and GEMM operands are bf16. Whatever reads the data
 * of such a tensor crashes at once on NULL instead of reading stale values. */
static tensor *memo_output(ag_ctx *ctx, int64_t d0, int64_t d1) {
    const int unread = ctx->f32_unread && ctx->bf16 && !ctx->fp16;
    ctx->f32_unread = 0;
    return unread ? ag_wrap(ctx, AG_F32, d0, d1, NULL, NULL) : ag_tensor2(ctx, AG_F32, d0, d1);
}

/* Per-row statistics and other small saved data buffers: keep arena inside a segment. */
static void *alloc_saved(ag_ctx *ctx, size_t bytes) {
    return ctx->saving ? ag_alloc_keep(ctx, bytes) : ag_alloc(ctx, bytes);
}

/* The saved struct of a node (host memory), with alloc_saved's lifetime. */
static void *alloc_saved_host(ag_ctx *ctx, size_t bytes) {
    return ctx->saving ? ag_alloc_host_keep(ctx, bytes) : ag_alloc_host(ctx, bytes);
}

static gemm_dtype gdt(const ag_ctx *ctx) { return ctx->bf16 ? GEMM_BF16 : GEMM_F32; }

static void *scratch_grow(const ag_backend *be, void **buf, size_t *size, size_t need) {
    if (*size < need) {
        be->free(*buf);
        *buf = be->alloc(need);
        if (!*buf) {
            fprintf(stderr, "[autograd] out of memory for a %zu-byte weight scratch\n", need);
            abort();
        }
        *size = need;
    }
    return *buf;
}

/* The whole frozen weight as a GEMM operand, in the context's weight scratch
 * (bf16 weights are used in place when the GEMM is bf16). */
static const void *frozen_operand(ag_ctx *ctx, const frozen_weight *w) {
    int64_t n = w->out * w->in;
    if (ctx->bf16) { /* a stored bf16 weight is read in place (the backend's copy of it on a device) */
        if (w->kind == FROZEN_BF16) return ctx->be->frozen_data(w);
        bf16 *dst = scratch_grow(ctx->be, &ctx->wscratch, &ctx->wscratch_size, (size_t)n * sizeof(bf16));
        ctx->be->frozen_rows_bf16(w, 0, w->out, dst);
        return dst;
    }
    if (w->kind == FROZEN_F32 && !ctx->fp16) return ctx->be->frozen_data(w);
    float *dst = scratch_grow(ctx->be, &ctx->wscratch, &ctx->wscratch_size, (size_t)n * sizeof(float));
    ctx->be->frozen_rows_f32(w, 0, w->out, dst);
    /* fp16 mode: the weight as transformers / bitsandbytes hold it in float16 (a bf16 or fp32 value cast with
     * round to nearest even; NF4 / int8 dequantized in fp32, then cast to the fp16 compute dtype) */
    if (ctx->fp16) ctx->be->round_f16(dst, dst, n);
    return dst;
}

/* QLORA_FROZEN_T=0: the frozen input-gradient products multiply by W as stored (an A/B of frozen_dx in one
 * binary, as QLORA_CPU_AMX=0). */
static int frozen_t_on(void) {
    static int on = -1;
    if (on < 0) on = !env_switch_off("QLORA_FROZEN_T");
    return on;
}

/* dx (N, in) fp32 (β = 0: written, 1: added to) += dy (N, out) · W, the frozen input gradient. With bf16
 * operands and a backend that gives Wᵀ (frozen_t_bf16: the dequantization written transposed, into the
 * same weight scratch) it runs as dy·(Wᵀ)ᵀ, which oneDNN's brgemm takes faster with the same sums
 * (backend.h); a stored bf16 weight is read in place as W instead (a transposed copy would be a pass of its
 * own), and so are fp32/fp16 GEMMs. */
static void frozen_dx(ag_ctx *ctx, const frozen_weight *w, int64_t N, const void *dyb, float beta, float *dx) {
    const ag_backend *be = ctx->be;
    const int64_t in = w->in, out = w->out;
    if (ctx->bf16 && be->frozen_t_bf16 && w->kind != FROZEN_BF16 && frozen_t_on()) {
        bf16 *wt = scratch_grow(be, &ctx->wscratch, &ctx->wscratch_size, (size_t)(in * out) * sizeof(bf16));
        be->frozen_t_bf16(w, wt);
        be->gemm(0, 1, N, in, out, 1.0f, dyb, out, wt, out, beta, dx, in, GEMM_BF16);
        return;
    }
    be->gemm(0, 0, N, in, out, 1.0f, dyb, out, frozen_operand(ctx, w), in, beta, dx, in, gdt(ctx));
}

void frozen_rows_f32(const frozen_weight *w, int64_t row0, int64_t n, float *dst) {
    ag_backend_default()->frozen_rows_f32(w, row0, n, dst);
}

void frozen_rows_bf16(const frozen_weight *w, int64_t row0, int64_t n, bf16 *dst) {
    ag_backend_default()->frozen_rows_bf16(w, row0, n, dst);
}

/* ------------------------------------------------------------------ rope table */

int rope_table_init_freqs(rope_table *t, int max_pos, int head_dim, const float *inv_freq, qerr *e) {
    int half = head_dim / 2;
    t->max_pos = max_pos;
    t->head_dim = head_dim;
    t->cos = qmalloc((size_t)max_pos * half * sizeof(float), e);
    t->sin = qmalloc((size_t)max_pos * half * sizeof(float), e);
    if (!t->cos || !t->sin) {
        rope_table_free(t);
        return -1;
    }
    for (int i = 0; i < half; i++)
        for (int p = 0; p < max_pos; p++) {
            /* HF: freqs = inv_freq @ position_ids in fp32, then cos/sin */
            float ang = (float)p * inv_freq[i];
            t->cos[(size_t)p * half + i] = cosf(ang);
            t->sin[(size_t)p * half + i] = sinf(ang);
        }
    return 0;
}

void rope_default_inv_freq(int head_dim, float theta, float *inv_freq) {
    for (int i = 0; i < head_dim / 2; i++) {
        /* HF: inv_freq = 1.0 / (base ** (arange(0, dim, 2).float() / dim)), all fp32 */
        float expo = (float)(2 * i) / (float)head_dim;
        inv_freq[i] = 1.0f / powf(theta, expo);
    }
}

int rope_table_init(rope_table *t, int max_pos, int head_dim, float theta, qerr *e) {
    float *inv_freq = qmalloc((size_t)(head_dim / 2 + 1) * sizeof(float), e);
    if (!inv_freq) return -1;
    rope_default_inv_freq(head_dim, theta, inv_freq);
    int rc = rope_table_init_freqs(t, max_pos, head_dim, inv_freq, e);
    free(inv_freq);
    return rc;
}

void rope_table_free(rope_table *t) {
    if (!t) return;
    free(t->cos);
    free(t->sin);
    t->cos = t->sin = NULL;
}

/* ------------------------------------------------------------------ embedding */

tensor *op_embedding(ag_ctx *ctx, const frozen_weight *table, const int32_t *ids, int64_t n) {
    int pc = ag_prof_push(AG_PROF_EMBED);
    tensor *x = ag_tensor2(ctx, AG_F32, n, table->in);
    if (table->shards) { /* FULL_SHARD: the table's rows gathered chunk by chunk, each token's row picked */
        const frozen_shards *sh = table->shards;
        const int64_t D = table->in, C = sh->chunk_rows;
        ag_mark m = ag_arena_mark(ctx);
        bf16 *rows = ag_alloc(ctx, (size_t)(C * D) * sizeof(bf16));
        float *xd = x->data;
        for (int64_t r0 = 0; r0 < table->out; r0 += C) {
            const int64_t nr = table->out - r0 < C ? table->out - r0 : C;
            sh->rows(sh->arg, r0, nr, rows);
            for (int64_t i = 0; i < n; i++)
                if (ids[i] >= r0 && ids[i] < r0 + nr)
                    for (int64_t j = 0; j < D; j++) xd[i * D + j] = bf16_to_f32(rows[(ids[i] - r0) * D + j]);
        }
        ag_arena_reset(ctx, m);
    } else {
        ctx->be->embedding(table, ids, n, x->data);
    }
    ag_prof_pop(pc);
    return x;
}

typedef struct emb_saved {
    int32_t *ids; /* (n) host copy */
    int64_t n;
} emb_saved;

static void embedding_train_backward(ag_ctx *ctx, const ag_node *n) {
    int pc = ag_prof_push(AG_PROF_EMBED);
    tensor *table = n->in[0], *x = n->out;
    const emb_saved *s = n->saved;
    ctx->be->embedding_bwd(x->grad, s->ids, s->n, table->shape[1], ag_grad(ctx, table));
    ag_prof_pop(pc);
}

tensor *op_embedding_train(ag_ctx *ctx, tensor *table, const int32_t *ids, int64_t n) {
    int pc = ag_prof_push(AG_PROF_EMBED);
    const frozen_weight view = {.out = table->shape[0], .in = table->shape[1], .kind = FROZEN_F32,
                                .w_f32 = table->data};
    tensor *x = ag_tensor2(ctx, AG_F32, n, view.in);
    ctx->be->embedding(&view, ids, n, x->data);
    if (ag_needs_grad(ctx, table, NULL, NULL)) {
        ag_node *nd = ag_record(ctx, embedding_train_backward, x, table, NULL, NULL, NULL);
        emb_saved *s = alloc_saved_host(ctx, sizeof *s);
        s->ids = alloc_saved_host(ctx, (size_t)(n > 0 ? n : 1) * sizeof(int32_t));
        memcpy(s->ids, ids, (size_t)n * sizeof(int32_t));
        s->n = n;
        nd->saved = s;
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
    float *dx = x->requires_grad ? ag_grad(ctx, x) : NULL;
    float *dw = w->requires_grad ? ag_grad(ctx, w) : NULL;
    ctx->be->rmsnorm_bwd(s->x, w->data, s->rstd, y->grad, dx, dw, x->shape[0], x->shape[1]);
    ag_prof_pop(pc);
}

tensor *op_rmsnorm(ag_ctx *ctx, tensor *x, tensor *w, float eps) {
    int pc = ag_prof_push(AG_PROF_NORM);
    int64_t N = x->shape[0], D = x->shape[1];
    tensor *y = memo_output(ctx, N, D);
    int grad = ag_needs_grad(ctx, x, w, NULL);
    float *rstd = grad ? alloc_saved(ctx, (size_t)N * sizeof(float)) : ag_alloc(ctx, (size_t)N * sizeof(float));
    bf16 *yb = memo_bf16_alloc(ctx, y); /* the linears that read y take it as bf16 */
    ctx->be->rmsnorm_fwd(x->data, w->data, y->data, yb, rstd, N, D, eps);
    if (grad) {
        ag_node *nd = ag_record(ctx, rmsnorm_backward, y, x, w, NULL, NULL);
        rms_saved *s = alloc_saved_host(ctx, sizeof *s);
        s->x = ag_keep(ctx, x);
        s->rstd = rstd;
        s->eps = eps;
        nd->saved = s;
    }
    ag_prof_pop(pc);
    return y;
}

/* ------------------------------------------------------------------ linear (+ LoRA) */

/* A LoRA product (x Aᵀ, s u Bᵀ, and their gradients) through the table's lora_gemm (gemm's contract; on
 * the cpu backend with AMX, kernels that read the wide operand once: autograd/lora_gemm.h), its time
 * charged to the "lora_gemm" op class (autograd/prof.h) instead of "gemm". */
#define LORA_GEMM(...)                                                                                       \
    do {                                                                                                     \
        ag_prof_lora(1);                                                                                     \
        be->lora_gemm(__VA_ARGS__);                                                                          \
        ag_prof_lora(0);                                                                                     \
    } while (0)

typedef struct linear_saved {
    const frozen_weight *w;
    const lora_adapter *lora;
    const void *xdb; /* dropout(x) (N, in) as GEMM operand (bf16, or fp32 in fp32 mode) */
    const void *ub;  /* u = dropout(x) Aᵀ (N, r) as GEMM operand */
    uint64_t seed;
    int drop;        /* dropout was active in forward (mask regenerated from seed) */
} linear_saved;

static void linear_backward(ag_ctx *ctx, const ag_node *n) {
    tensor *x = n->in[0], *y = n->out;
    const linear_saved *s = n->saved;
    const frozen_weight *w = s->w;
    const lora_adapter *lo = s->lora;
    const ag_backend *be = ctx->be;
    int64_t N = x->shape[0], in = w->in, out = w->out;
    /* a fresh dx (x's first gradient) is written by the first GEMM (β = 0) instead of zero-filled and added to */
    int dx_fresh = 0;
    float *dx = x->requires_grad ? ag_grad_fresh(ctx, x, &dx_fresh) : NULL;
    float *dA = lo && lo->A->requires_grad ? ag_grad(ctx, lo->A) : NULL;
    float *dB = lo && lo->B->requires_grad ? ag_grad(ctx, lo->B) : NULL;
    ag_mark m = ag_arena_mark(ctx);
    /* dy as bf16 operand: given as such (op_glu's backward), or converted */
    const void *dyb = y->grad_bf16 ? (const void *)y->grad_bf16 : operand(ctx, y->grad, N * out);
    gemm_dtype dt = gdt(ctx);
    /* fp16 mode: every GEMM output of backward is an fp16 tensor under torch's autocast (each linear's grad
     * input, each adapter's gradient), so it is rounded to fp16 before it is added: a loss scale too large
     * for fp16 gives inf here, as there (GradScaler then skips the step) */
    float *tmp = ctx->fp16 && dx ? ag_alloc(ctx, (size_t)(N * in) * sizeof(float)) : NULL;
    /* A fresh dx with an adapter and no dropout: the LoRA product du A writes dx (β = 0) and the
     * frozen product adds into it (β = 1), as in forward (linear_impl): the same two roundings,
     * and the K = r product only writes dx. Otherwise the frozen product comes first. */
    const int lora_first = dx && lo && dx_fresh && !s->drop && !tmp;
    if (dx && !lora_first) {
        if (tmp) { /* dx += fp16(dy W) */
            be->gemm(0, 0, N, in, out, 1.0f, dyb, out, frozen_operand(ctx, w), in, 0.0f, tmp, in, dt);
            be->round_f16(tmp, tmp, N * in);
            if (dx_fresh)
                be->copy_d2d(dx, tmp, (size_t)(N * in) * sizeof(float));
            else
                be->add(dx, tmp, dx, N * in);
        } else {
            frozen_dx(ctx, w, N, dyb, dx_fresh ? 0.0f : 1.0f, dx); /* dx (+)= dy W */
        }
    }
    if (lo) {
        int64_t r = lo->r;
        /* dB += s · dyᵀ u   (out, r) */
        if (dB) LORA_GEMM(1, 0, out, r, N, lo->scaling, dyb, out, s->ub, r, 1.0f, dB, r, dt);
        if (dB && ctx->fp16) be->round_f16(dB, dB, out * r); /* one use per micro-batch: dB was 0 */
        /* du = s · dy B   (N, r) */
        float *du = ag_alloc(ctx, (size_t)(N * r) * sizeof(float));
        const void *Bb = operand(ctx, lo->B->data, out * r);
        LORA_GEMM(0, 0, N, r, out, lo->scaling, dyb, out, Bb, r, 0.0f, du, r, dt);
        const void *dub = operand(ctx, du, N * r);
        /* dA += duᵀ dropout(x)   (r, in) */
        if (dA) LORA_GEMM(1, 0, r, in, N, 1.0f, dub, r, s->xdb, in, 1.0f, dA, in, dt);
        if (dA && ctx->fp16) be->round_f16(dA, dA, r * in);
        if (dx) {
            /* d dropout(x) = du A ; dx += mask/(1-p) · that */
            const void *Ab = operand(ctx, lo->A->data, r * in);
            if (s->drop) {
                float *dxd = ag_alloc(ctx, (size_t)(N * in) * sizeof(float));
                LORA_GEMM(0, 0, N, in, r, 1.0f, dub, r, Ab, in, 0.0f, dxd, in, dt);
                if (ctx->fp16) be->round_f16(dxd, dxd, N * in);
                int pc = ag_prof_push(AG_PROF_ELTWISE);
                be->dropout_bwd(dxd, dx, N * in, lo->dropout, s->seed, lo->stream);
                ag_prof_pop(pc);
            } else if (tmp) { /* dx += fp16(du A) */
                LORA_GEMM(0, 0, N, in, r, 1.0f, dub, r, Ab, in, 0.0f, tmp, in, dt);
                be->round_f16(tmp, tmp, N * in);
                be->add(dx, tmp, dx, N * in);
            } else {
                LORA_GEMM(0, 0, N, in, r, 1.0f, dub, r, Ab, in, lora_first ? 0.0f : 1.0f, dx, in, dt);
            }
        }
    }
    if (lora_first) /* dx += dy W */
        frozen_dx(ctx, w, N, dyb, 1.0f, dx);
    ag_arena_reset(ctx, m);
}

/* op_linear, or with out == 0 its recorded node and saved operands without the output's value
 * (op_linear_unread_output). */
static tensor *linear_impl(ag_ctx *ctx, tensor *x, const frozen_weight *w, const lora_adapter *lora, int out_value) {
    const ag_backend *be = ctx->be;
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
            be->dropout_fwd(x->data, xdt->data, N * in, lora->dropout, ctx->seed, lora->stream);
            ag_prof_pop(pc);
            xdb = operand_of(ctx, xdt);
        }
        ut = ag_tensor2(ctx, AG_F32, N, lora->r);
    }
    ag_mark m = ag_arena_mark(ctx);
    gemm_dtype dt = gdt(ctx);
    /* With an adapter the LoRA B product runs first and writes y (β = 0); the frozen product then
     * adds into it (β = 1). Both orders give fp32 y = fl(x Wᵀ + fl(s u Bᵀ)) with the same two
     * roundings (a + b = b + a), but the memory-bound K = r product only writes y instead of
     * reading and writing it, and the compute-bound frozen product reads y in its epilogue at
     * no measurable cost (docs/design.md "GEMM layouts"). */
    float beta_w = 0.0f;
    if (lora) {
        int64_t r = lora->r;
        const void *Ab = operand(ctx, lora->A->data, r * in);
        LORA_GEMM(0, 1, N, r, in, 1.0f, xdb, in, Ab, in, 0.0f, ut->data, r, dt); /* u = x Aᵀ */
        ag_arena_reset(ctx, m);
        ub = operand_of(ctx, ut);
        m = ag_arena_mark(ctx);
        if (out_value) {
            const void *Bb = operand(ctx, lora->B->data, out * r);
            LORA_GEMM(0, 1, N, out, r, lora->scaling, ub, r, Bb, r, 0.0f, y->data, out, dt); /* y = s u Bᵀ */
            beta_w = 1.0f;
        }
    }
    if (!out_value) {
        be->zero(y->data, (size_t)(N * out) * sizeof(float));
    } else {
        const void *wb = frozen_operand(ctx, w);
        be->gemm(0, 1, N, out, in, 1.0f, xb, in, wb, in, beta_w, y->data, out, dt); /* y (+)= x Wᵀ */
    }
    if (w->bias && out_value) { /* y += ones(N, 1) · b(1, out): the bias through the table's GEMM, no per-row loop */
        float *ones = ag_alloc(ctx, (size_t)N * sizeof(float));
        be->fill_f32(ones, N, 1.0f);
        be->gemm(0, 0, N, out, 1, 1.0f, ones, 1, w->bias, out, 1.0f, y->data, out, GEMM_F32);
    }
    ag_arena_reset(ctx, m);
    if (grad) {
        ag_node *nd = ag_record(ctx, linear_backward, y, x, lora ? lora->A : NULL, lora ? lora->B : NULL,
                                NULL);
        linear_saved *s = alloc_saved_host(ctx, sizeof *s);
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

tensor *op_linear(ag_ctx *ctx, tensor *x, const frozen_weight *w, const lora_adapter *lora) {
    return linear_impl(ctx, x, w, lora, 1);
}

tensor *op_linear_unread_output(ag_ctx *ctx, tensor *x, const frozen_weight *w, const lora_adapter *lora) {
    return linear_impl(ctx, x, w, lora, 0);
}

/* ------------------------------------------------------------------ grouped linears */

enum { LINEAR_GROUP_MAX = 4 };

typedef struct linear_group_saved {
    int n;
    tensor *x;
    const void *xb; /* x as GEMM operand (kept) */
    const void *ub; /* u = x [A_0; …]ᵀ (N, n r) as GEMM operand (kept) */
    tensor *y[LINEAR_GROUP_MAX];
    const frozen_weight *w[LINEAR_GROUP_MAX];
    const lora_adapter *lora[LINEAR_GROUP_MAX];
} linear_group_saved;

/* [A_0; …; A_{n-1}] (n r, in) as one GEMM operand in the arena (each A_i is (r, in) row-major). */
static const void *lora_a_stack(ag_ctx *ctx, int n, const lora_adapter *const lora[]) {
    const int64_t r = lora[0]->r, in = lora[0]->A->shape[1];
    if (ctx->bf16) {
        bf16 *dst = ag_alloc(ctx, (size_t)(n * r * in) * sizeof(bf16));
        for (int i = 0; i < n; i++) ctx->be->to_bf16(lora[i]->A->data, dst + i * r * in, r * in);
        return dst;
    }
    float *dst = ag_alloc(ctx, (size_t)(n * r * in) * sizeof(float));
    for (int i = 0; i < n; i++)
        ctx->be->copy_d2d(dst + i * r * in, lora[i]->A->data, (size_t)(r * in) * sizeof(float));
    return dst;
}

static void linear_group_backward(ag_ctx *ctx, const ag_node *nd) {
    const linear_group_saved *s = nd->saved;
    const ag_backend *be = ctx->be;
    const int n = s->n;
    tensor *x = s->x;
    const int64_t N = x->shape[0], in = s->w[0]->in, r = s->lora[0]->r, nr = n * r;
    const size_t es = ctx->bf16 ? sizeof(bf16) : sizeof(float);
    const gemm_dtype dt = gdt(ctx);
    int dx_fresh = 0; /* a fresh dx is written by the first GEMM into it (β = 0), as in linear_backward */
    float *dx = x->requires_grad ? ag_grad_fresh(ctx, x, &dx_fresh) : NULL;
    float *dA[LINEAR_GROUP_MAX], *dB[LINEAR_GROUP_MAX];
    int any_dA = 0;
    for (int i = 0; i < n; i++) {
        dA[i] = s->lora[i]->A->requires_grad ? ag_grad(ctx, s->lora[i]->A) : NULL;
        dB[i] = s->lora[i]->B->requires_grad ? ag_grad(ctx, s->lora[i]->B) : NULL;
        any_dA |= dA[i] != NULL;
    }
    ag_mark m = ag_arena_mark(ctx);
    float *du = ag_alloc(ctx, (size_t)(N * nr) * sizeof(float)); /* [du_0 … du_{n-1}] */
    be->zero(du, (size_t)(N * nr) * sizeof(float));                /* a y[i] without gradient: du_i = 0 */
    int any = 0;
    for (int i = n - 1; i >= 0; i--) { /* the order the separate nodes ran in (the tape backwards) */
        tensor *y = s->y[i];
        if (!y->grad && !y->grad_bf16) continue;
        any = 1;
        const frozen_weight *w = s->w[i];
        const lora_adapter *lo = s->lora[i];
        const int64_t out = w->out;
        ag_mark mi = ag_arena_mark(ctx);
        const void *dyb = y->grad_bf16 ? (const void *)y->grad_bf16 : operand(ctx, y->grad, N * out);
        if (dx) {
            frozen_dx(ctx, w, N, dyb, dx_fresh ? 0.0f : 1.0f, dx);
            dx_fresh = 0;
        }
        const void *ui = (const char *)s->ub + (size_t)(i * r) * es;
        if (dB[i]) LORA_GEMM(1, 0, out, r, N, lo->scaling, dyb, out, ui, nr, 1.0f, dB[i], r, dt); /* dB += s dyᵀ u */
        const void *Bb = operand(ctx, lo->B->data, out * r);
        LORA_GEMM(0, 0, N, r, out, lo->scaling, dyb, out, Bb, r, 0.0f, du + i * r, nr, dt); /* du_i = s dy B */
        ag_arena_reset(ctx, mi);
    }
    if (any) {
        const void *dub = operand(ctx, du, N * nr);
        if (any_dA) { /* [dA_0; …] = duᵀ x, then each dA_i += its rows */
            float *dAs = ag_alloc(ctx, (size_t)(nr * in) * sizeof(float));
            LORA_GEMM(1, 0, nr, in, N, 1.0f, dub, nr, s->xb, in, 0.0f, dAs, in, dt);
            for (int i = 0; i < n; i++)
                if (dA[i]) be->axpy(dA[i], 1.0f, dAs + i * r * in, r * in);
        }
        if (dx) {
            LORA_GEMM(0, 0, N, in, nr, 1.0f, dub, nr, lora_a_stack(ctx, n, s->lora), in, dx_fresh ? 0.0f : 1.0f, dx, in, dt);
            dx_fresh = 0;
        }
    }
    if (dx && dx_fresh) be->zero(dx, (size_t)(N * in) * sizeof(float)); /* no output had a gradient */
    ag_arena_reset(ctx, m);
}

void op_linear_group(ag_ctx *ctx, tensor *x, int n, const frozen_weight *const w[],
                     const lora_adapter *const lora[], tensor *y[]) {
    int grouped = n >= 2 && n <= LINEAR_GROUP_MAX;
    /* fp16 mode: op_linear's backward rounds each GEMM output to fp16 as autocast does (the overflow GradScaler
     * must see); the grouped products do not, so fp16 runs the projections one by one */
    if (ctx->fp16 && !ctx->bf16) grouped = 0;
    /* QLORA_LINEAR_GROUP=0: one op_linear per projection, for an end-to-end A/B in one binary (as QLORA_CPU_AMX=0) */
    static int group_env = -1;
    if (group_env < 0) group_env = !env_switch_off("QLORA_LINEAR_GROUP");
    if (!group_env) grouped = 0;
    for (int i = 0; grouped && i < n; i++)
        grouped = lora[i] && lora[i]->r == lora[0]->r && !(lora[i]->dropout > 0.0f && ctx->training) &&
                  w[i]->in == w[0]->in;
    if (!grouped) {
        for (int i = 0; i < n; i++) y[i] = op_linear(ctx, x, w[i], lora[i]);
        return;
    }
    const ag_backend *be = ctx->be;
    const int64_t N = x->shape[0], in = w[0]->in, r = lora[0]->r, nr = n * r;
    const size_t es = ctx->bf16 ? sizeof(bf16) : sizeof(float);
    const gemm_dtype dt = gdt(ctx);
    int grad = ag_needs_grad(ctx, x, NULL, NULL);
    for (int i = 0; i < n; i++) grad |= ag_needs_grad(ctx, lora[i]->A, lora[i]->B, NULL);
    const void *xb = operand_of(ctx, x);
    for (int i = 0; i < n; i++) y[i] = ag_tensor2(ctx, AG_F32, N, w[i]->out);
    tensor *ut = ag_tensor2(ctx, AG_F32, N, nr);
    ag_mark m = ag_arena_mark(ctx);
    LORA_GEMM(0, 1, N, nr, in, 1.0f, xb, in, lora_a_stack(ctx, n, lora), in, 0.0f, ut->data, nr, dt); /* u = x Aᵀ */
    ag_arena_reset(ctx, m);
    const void *ub = operand_of(ctx, ut);
    for (int i = 0; i < n; i++) {
        const int64_t out = w[i]->out;
        m = ag_arena_mark(ctx);
        /* y = s u_i Bᵀ first, then y += x Wᵀ: as op_linear (the K = r product only writes y) */
        const void *Bb = operand(ctx, lora[i]->B->data, out * r);
        LORA_GEMM(0, 1, N, out, r, lora[i]->scaling, (const char *)ub + (size_t)(i * r) * es, nr, Bb, r, 0.0f,
                 y[i]->data, out, dt);
        be->gemm(0, 1, N, out, in, 1.0f, xb, in, frozen_operand(ctx, w[i]), in, 1.0f, y[i]->data, out, dt);
        if (w[i]->bias) { /* as op_linear: y += ones(N, 1) · b(1, out) */
            float *ones = ag_alloc(ctx, (size_t)N * sizeof(float));
            be->fill_f32(ones, N, 1.0f);
            be->gemm(0, 0, N, out, 1, 1.0f, ones, 1, w[i]->bias, out, 1.0f, y[i]->data, out, GEMM_F32);
        }
        ag_arena_reset(ctx, m);
    }
    if (!grad) return;
    /* one node for the group, on a marker tensor with a gradient so backward always visits it */
    tensor *mark = ag_alloc_host_keep(ctx, sizeof *mark);
    memset(mark, 0, sizeof *mark);
    mark->ndim = 1;
    mark->shape[0] = 1;
    mark->numel = 1;
    mark->grad = ag_alloc_keep(ctx, sizeof(float));
    ag_node *nd = ag_record(ctx, linear_group_backward, mark, x, NULL, NULL, NULL);
    linear_group_saved *s = alloc_saved_host(ctx, sizeof *s);
    memset(s, 0, sizeof *s);
    s->n = n;
    s->x = x;
    s->xb = xb;
    s->ub = ub;
    for (int i = 0; i < n; i++) {
        s->y[i] = y[i];
        s->w[i] = w[i];
        s->lora[i] = lora[i];
        y[i]->requires_grad = 1;
    }
    nd->saved = s;
}

/* ------------------------------------------------------------------ rope */

typedef struct rope_saved {
    const rope_table *rt;
    const int32_t *pos;
    int n_heads;
} rope_saved;

static void rope_backward(ag_ctx *ctx, const ag_node *n) {
    int pc = ag_prof_push(AG_PROF_ROPE);
    tensor *x = n->in[0], *y = n->out;
    const rope_saved *s = n->saved;
    int fresh = 0; /* x's gradient not yet started (q's or k's projection output): written, not zero-filled and added to */
    float *dx = ag_grad_fresh(ctx, x, &fresh);
    ctx->be->rope_bwd(y->grad, dx, x->shape[0], s->n_heads, s->rt, s->pos, fresh);
    ag_prof_pop(pc);
}

tensor *op_rope(ag_ctx *ctx, tensor *x, int n_heads, const rope_table *rt, const int32_t *pos) {
    int pc = ag_prof_push(AG_PROF_ROPE);
    int64_t N = x->shape[0];
    tensor *y = memo_output(ctx, N, x->shape[1]);
    ctx->be->rope_fwd(x->data, y->data, memo_bf16_alloc(ctx, y), N, n_heads, rt, pos); /* attention reads bf16 */
    if (ag_needs_grad(ctx, x, NULL, NULL)) {
        ag_node *nd = ag_record(ctx, rope_backward, y, x, NULL, NULL, NULL);
        rope_saved *s = alloc_saved_host(ctx, sizeof *s);
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
 * The kernel (backend attention_fwd/_bwd) saves each row's softmax max and
 * 1/sum, not the probabilities: backward recomputes them bit-identically
 * (flash-attention recomputation, Dao et al. 2022). */

static void attn_backward(ag_ctx *ctx, const ag_node *n) {
    tensor *q = n->in[0], *k = n->in[1], *v = n->in[2], *o = n->out;
    const ag_attn *s = n->saved;
    /* q, k and v usually have no gradient yet (RoPE's outputs and v's projection output): the kernel then writes
     * them instead of adding to zero-filled buffers; if any of them has one, the new ones are zeroed and all
     * three added to */
    int fq = 0, fk = 0, fv = 0;
    float *dq = q->requires_grad ? ag_grad_fresh(ctx, q, &fq) : NULL;
    float *dk = k->requires_grad ? ag_grad_fresh(ctx, k, &fk) : NULL; /* after q's: q == k is not fresh twice */
    float *dv = v->requires_grad ? ag_grad_fresh(ctx, v, &fv) : NULL;
    /* written only when every gradient asked for is new and none is another's buffer (q == k: one gradient) */
    const int write = (!dq || fq) && (!dk || fk) && (!dv || fv) && (!dq || (dq != dk && dq != dv)) && (!dk || dk != dv);
    if (!write) {
        int pz = ag_prof_push(AG_PROF_GRAD_ZERO);
        if (fq) ctx->be->zero(dq, (size_t)q->numel * sizeof(float));
        if (fk) ctx->be->zero(dk, (size_t)k->numel * sizeof(float));
        if (fv) ctx->be->zero(dv, (size_t)v->numel * sizeof(float));
        ag_prof_pop(pz);
    }
    ag_mark m = ag_arena_mark(ctx);
    const void *dob = operand(ctx, o->grad, o->numel);
    int pc = ag_prof_push(AG_PROF_ATTN);
    ctx->be->attention_bwd(ctx, s, dob, dq, dk, dv, write);
    ag_prof_pop(pc);
    ag_arena_reset(ctx, m);
}

tensor *op_attention(ag_ctx *ctx, tensor *q, tensor *k, tensor *v, int B, int T, int H, int KVH,
                     const int32_t *seq_ids) {
    return op_attention_window(ctx, q, k, v, B, T, H, KVH, seq_ids, 0);
}

tensor *op_attention_window(ag_ctx *ctx, tensor *q, tensor *k, tensor *v, int B, int T, int H, int KVH,
                            const int32_t *seq_ids, int window) {
    int64_t hd = q->shape[1] / H, qs = (int64_t)H * hd;
    tensor *o = ag_tensor2(ctx, AG_F32, (int64_t)B * T, qs);
    bf16 *ob = memo_bf16_alloc(ctx, o); /* the output projection reads o as bf16 */
    int grad = ag_needs_grad(ctx, q, k, v);
    ag_attn a0 = {.qb = operand_of(ctx, q), .kb = operand_of(ctx, k), .vb = operand_of(ctx, v),
                  .seq_ids = seq_ids, .B = B, .T = T, .H = H, .KVH = KVH, .hd = (int)hd, .bf16 = ctx->bf16,
                  .window = window > 0 ? window : 0, .fp16 = !ctx->bf16 && ctx->fp16};
    size_t nstat = (size_t)B * H * T * sizeof(float);
    float *rmax = grad ? alloc_saved(ctx, nstat) : NULL, *rinv = grad ? alloc_saved(ctx, nstat) : NULL;
    a0.seglo = alloc_saved(ctx, (size_t)B * T * sizeof(int32_t));
    a0.seg_ok = alloc_saved(ctx, (size_t)B);
    ag_mark m = ag_arena_mark(ctx);
    if (!grad) {
        rmax = ag_alloc(ctx, nstat);
        rinv = ag_alloc(ctx, nstat);
    }
    a0.rmax = rmax;
    a0.rinv = rinv;
    int pc = ag_prof_push(AG_PROF_ATTN);
    ctx->be->attention_fwd(ctx, &a0, o->data, ob);
    ag_prof_pop(pc);
    ag_arena_reset(ctx, m);
    if (grad) {
        ag_node *nd = ag_record(ctx, attn_backward, o, q, k, v, NULL);
        ag_attn *s = alloc_saved_host(ctx, sizeof *s);
        *s = a0;
        nd->saved = s;
    }
    return o;
}

/* ------------------------------------------------------------------ glu (swiglu, geglu), add */

typedef struct glu_saved {
    const void *g, *u; /* (N, F) inputs: bf16 in bf16 mode (activations saved as bf16), else fp32 */
    int bf16;
    int grad_op;       /* g and u come straight from their linears (op_glu): gradients as bf16 operands */
    ag_glu_act act;
} glu_saved;

static void glu_backward(ag_ctx *ctx, const ag_node *n) {
    int pc = ag_prof_push(AG_PROF_ELTWISE);
    tensor *g = n->in[0], *u = n->in[1], *y = n->out;
    const glu_saved *s = n->saved;
    /* g and u are usually read by this op only (the gate and up projections' outputs): their gradients are
     * then written, not zero-filled and added to; otherwise a fresh one is zeroed and both are added to */
    if (s->grad_op && g != u && g->requires_grad && u->requires_grad && !g->grad && !u->grad && !g->grad_bf16 &&
        !u->grad_bf16) {
        /* the gate and up projections read these gradients only as bf16 GEMM operands, and nothing else adds
         * to them (op_glu checked that their linears ran just before): written as bf16 once, the values
         * operand() would have made, without the fp32 buffers and the conversion pass */
        g->grad_bf16 = ag_alloc(ctx, (size_t)g->numel * sizeof(bf16));
        u->grad_bf16 = ag_alloc(ctx, (size_t)u->numel * sizeof(bf16));
        (s->act == AG_GLU_GELU_TANH ? ctx->be->geglu_bwd : ctx->be->swiglu_bwd)(
            s->g, s->u, s->bf16, y->grad, (float *)g->grad_bf16, (float *)u->grad_bf16, g->numel, 2);
        ag_prof_pop(pc);
        return;
    }
    int fg = 0, fu = 0;
    float *dg = g->requires_grad ? ag_grad_fresh(ctx, g, &fg) : NULL;
    float *du = u->requires_grad ? ag_grad_fresh(ctx, u, &fu) : NULL; /* after g's: g == u is not fresh twice */
    int write = (!dg || fg) && (!du || fu);
    if (!write) {
        if (fg) ctx->be->zero(dg, (size_t)g->numel * sizeof(float));
        if (fu) ctx->be->zero(du, (size_t)u->numel * sizeof(float));
    }
    (s->act == AG_GLU_GELU_TANH ? ctx->be->geglu_bwd : ctx->be->swiglu_bwd)(s->g, s->u, s->bf16, y->grad, dg, du,
                                                                          g->numel, write);
    ag_prof_pop(pc);
}

tensor *op_glu(ag_ctx *ctx, tensor *g, tensor *u, ag_glu_act act) {
    int pc = ag_prof_push(AG_PROF_ELTWISE);
    tensor *y = g->ndim == 2 ? memo_output(ctx, g->shape[0], g->shape[1]) : ag_tensor(ctx, AG_F32, g->ndim, g->shape);
    ctx->f32_unread = 0;
    int grad = ag_needs_grad(ctx, g, u, NULL);
    /* one pass: y, its bf16 copy for the down projection, and (for backward)
     * g and u in bf16 unless they already have one */
    bf16 *yb = memo_bf16_alloc(ctx, y);
    bf16 *gb = grad && ctx->bf16 && !g->kept_bf16 ? memo_bf16_alloc(ctx, g) : NULL;
    bf16 *ubf = grad && ctx->bf16 && !u->kept_bf16 ? memo_bf16_alloc(ctx, u) : NULL;
    (act == AG_GLU_GELU_TANH ? ctx->be->geglu_fwd : ctx->be->swiglu_fwd)(g->data, u->data, y->data, yb, gb, ubf,
                                                                       g->numel);
    if (grad) {
        /* g and u straight from their projections, with no other op between: the gate and up linears' node
         * (grouped) or their two nodes (gate, then up) are the last ones on the tape. Their backward then runs
         * right after this one's and is the only reader of the gradients. */
        int grad_op = 0;
        if (ctx->bf16 && !ctx->fp16 && ctx->n_nodes >= 1) {
            const ag_node *l1 = &ctx->nodes[ctx->n_nodes - 1];
            if (l1->backward == linear_group_backward) {
                const linear_group_saved *gs = l1->saved;
                int hg = 0, hu = 0;
                for (int i = 0; i < gs->n; i++) hg |= gs->y[i] == g, hu |= gs->y[i] == u;
                grad_op = hg && hu;
            } else if (ctx->n_nodes >= 2) {
                const ag_node *l2 = &ctx->nodes[ctx->n_nodes - 2];
                grad_op = l1->backward == linear_backward && l1->out == u && l2->backward == linear_backward &&
                          l2->out == g;
            }
        }
        ag_node *nd = ag_record(ctx, glu_backward, y, g, u, NULL, NULL);
        glu_saved *s = alloc_saved_host(ctx, sizeof *s);
        s->bf16 = ctx->bf16;
        s->grad_op = grad_op;
        s->act = act;
        s->g = ctx->bf16 ? ag_bf16_of(ctx, g, 1) : ag_keep(ctx, g);
        s->u = ctx->bf16 ? ag_bf16_of(ctx, u, 1) : ag_keep(ctx, u);
        nd->saved = s;
    }
    ag_prof_pop(pc);
    return y;
}

/* reshape: a copy of x's elements under another 2-D shape; backward adds dy back (copy_cols as one row). */
static void reshape_backward(ag_ctx *ctx, const ag_node *n) {
    int pc = ag_prof_push(AG_PROF_ELTWISE);
    tensor *x = n->in[0], *y = n->out;
    ctx->be->copy_cols(ag_grad(ctx, x), x->numel, y->grad, y->numel, 1, y->numel, 1);
    ag_prof_pop(pc);
}

tensor *op_reshape(ag_ctx *ctx, tensor *x, int64_t rows, int64_t cols) {
    int pc = ag_prof_push(AG_PROF_ELTWISE);
    if (rows <= 0 || cols <= 0 || rows * cols != x->numel) {
        fprintf(stderr, "[autograd] op_reshape: (%lld, %lld) for a tensor of %lld elements\n", (long long)rows,
                (long long)cols, (long long)x->numel);
        abort();
    }
    tensor *y = ag_tensor2(ctx, AG_F32, rows, cols);
    ctx->be->copy_cols(y->data, y->numel, x->data, x->numel, 1, x->numel, 0);
    if (ag_needs_grad(ctx, x, NULL, NULL)) ag_record(ctx, reshape_backward, y, x, NULL, NULL, NULL);
    ag_prof_pop(pc);
    return y;
}

typedef struct cols_saved {
    int64_t c0;
} cols_saved;

static void cols_backward(ag_ctx *ctx, const ag_node *n) {
    int pc = ag_prof_push(AG_PROF_ELTWISE);
    tensor *x = n->in[0], *y = n->out;
    const cols_saved *s = n->saved;
    float *dx = ag_grad(ctx, x);
    ctx->be->copy_cols(dx + s->c0, x->shape[1], y->grad, y->shape[1], y->shape[0], y->shape[1], 1);
    ag_prof_pop(pc);
}

tensor *op_cols(ag_ctx *ctx, tensor *x, int64_t c0, int64_t c) {
    int pc = ag_prof_push(AG_PROF_ELTWISE);
    const int64_t N = x->shape[0], C = x->shape[1];
    if (x->ndim != 2 || c0 < 0 || c <= 0 || c0 + c > C) {
        fprintf(stderr, "[autograd] op_cols: columns [%lld, %lld) of a (%lld, %lld) tensor\n", (long long)c0,
                (long long)(c0 + c), (long long)N, (long long)C);
        abort();
    }
    int64_t shape[2] = {N, c};
    tensor *y = ag_tensor(ctx, AG_F32, 2, shape);
    ctx->be->copy_cols(y->data, c, (const float *)x->data + c0, C, N, c, 0);
    if (ag_needs_grad(ctx, x, NULL, NULL)) {
        ag_node *nd = ag_record(ctx, cols_backward, y, x, NULL, NULL, NULL);
        cols_saved *s = alloc_saved_host(ctx, sizeof *s);
        s->c0 = c0;
        nd->saved = s;
    }
    ag_prof_pop(pc);
    return y;
}

/* The saved pointer of an add whose second operand's producer was the last node recorded before it. */
static const int add_b_last = 1;

static void add_backward(ag_ctx *ctx, const ag_node *n) {
    int pc = ag_prof_push(AG_PROF_ELTWISE);
    tensor *a = n->in[0], *b = n->in[1], *y = n->out;
    const size_t bytes = (size_t)y->numel * sizeof(float);
    /* a gradient not yet started is dy itself: copied, not zero-filled and added to (the residual stream's
     * two branches usually both are) */
    int fa = 0, fb = 0;
    float *da = NULL;
    if (a->requires_grad && !a->grad && a->numel == y->numel) {
        /* a's gradient not yet started: it is dy's buffer itself. y's gradient is complete and only this node
         * reads it (the tape runs backwards); a block's handover (tensor.c) may later overwrite that buffer as
         * y's, when a is dead too. Saves a copy of (N, D) fp32 per residual add. */
        a->grad = y->grad;
    } else {
        da = a->requires_grad ? ag_grad_fresh(ctx, a, &fa) : NULL;
        if (fa) ctx->be->copy_d2d(da, y->grad, bytes);
    }
    float *db = NULL;
    if (n->saved == &add_b_last && b != a && b->requires_grad && !b->grad && b->numel == y->numel) {
        /* b's producer is the node just before this one on the tape, so it runs next and reads b's gradient
         * before any other node can add to a's (possibly the same buffer): b takes dy's buffer too */
        b->grad = y->grad;
    } else {
        db = b->requires_grad ? ag_grad_fresh(ctx, b, &fb) : NULL; /* after a's: a == b adds the second dy */
        if (fb) ctx->be->copy_d2d(db, y->grad, bytes);
    }
    if ((da && !fa) || (db && !fb)) ctx->be->add_bwd(y->grad, fa ? NULL : da, fb ? NULL : db, y->numel);
    ag_prof_pop(pc);
}

static tensor *add_impl(ag_ctx *ctx, tensor *a, tensor *b, int residual) {
    int pc = ag_prof_push(AG_PROF_ELTWISE);
    tensor *y = residual && ctx->saving && a->ndim == 2
                    ? ag_wrap(ctx, AG_F32, a->shape[0], a->shape[1],
                              ag_alloc_keep(ctx, (size_t)a->numel * sizeof(float)), NULL) /* kept = data */
                    : ag_tensor(ctx, AG_F32, a->ndim, a->shape);
    ctx->be->add(a->data, b->data, y->data, a->numel);
    if (ag_needs_grad(ctx, a, b, NULL)) {
        /* b just produced (a residual branch's last op): its gradient may share dy's buffer (add_backward) */
        const int b_last = ctx->n_nodes > 0 && ctx->nodes[ctx->n_nodes - 1].out == b;
        ag_record(ctx, add_backward, y, a, b, NULL, NULL)->saved = b_last ? (void *)&add_b_last : NULL;
    }
    ag_prof_pop(pc);
    return y;
}

tensor *op_add(ag_ctx *ctx, tensor *a, tensor *b) { return add_impl(ctx, a, b, 0); }

tensor *op_add_residual(ag_ctx *ctx, tensor *a, tensor *b) { return add_impl(ctx, a, b, 1); }

/* ------------------------------------------------------------------ LM head + CE */

typedef struct ce_saved {
    float *dh;  /* (N, D) d loss / d h */
    int head_w; /* the trainable head's gradient was added in the forward pass (seed 1 assumed) */
} ce_saved;

static void ce_backward(ag_ctx *ctx, const ag_node *n) {
    int pc = ag_prof_push(AG_PROF_CE);
    tensor *h = n->in[0], *y = n->out;
    const ce_saved *s = n->saved;
    float g;
    ctx->be->copy_d2h(&g, y->grad, sizeof g);
    if (s->head_w && g != 1.0f) { /* the head's gradient is already in, for a seed of 1 */
        fprintf(stderr, "[autograd] lm_head_ce: a trainable LM head needs the loss to be the root of backward "
                        "(seed 1, ag_backward); got %g\n", (double)g);
        abort();
    }
    if (h->requires_grad) ctx->be->axpy(ag_grad(ctx, h), g, s->dh, h->numel);
    ag_prof_pop(pc);
}

tensor *op_lm_head_ce_train(ag_ctx *ctx, tensor *h, const frozen_weight *w, tensor *w_train, const int32_t *targets,
                            ag_ce_mode mode, uint64_t seed, float scale, int32_t *labels, double *loss_sum,
                            int64_t *n_tokens) {
    int64_t N = h->shape[0], D = h->shape[1];
    int64_t one = 1;
    tensor *loss = ag_tensor(ctx, AG_F32, 1, &one);
    int grad = ag_needs_grad(ctx, h, w_train, NULL);
    int head_grad = grad && w_train && w_train->requires_grad;
    float *dh = grad ? alloc_saved(ctx, (size_t)(N * D) * sizeof(float)) : NULL;
    if (dh) ctx->be->zero(dh, (size_t)(N * D) * sizeof(float));
    ag_mark m = ag_arena_mark(ctx);
    ag_ce_args a = {.h = h->data, .w = w->shards ? NULL : frozen_operand(ctx, w), .N = N, .D = D, .V = w->out,
                    .targets = targets, .mode = mode, .seed = seed, .scale = scale, .dh = dh,
                    .dw = head_grad ? ag_grad(ctx, w_train) : NULL, .labels = labels, .bf16 = ctx->bf16,
                    .w_shards = w->shards, .fp16 = !ctx->bf16 && ctx->fp16};
    int64_t count = 0;
    ag_prof_lm_head(1);
    double total = ctx->be->lm_head_ce(ctx, &a, &count);
    ag_prof_lm_head(0);
    ag_arena_reset(ctx, m);
    float lossv = (float)(total * scale);
    ctx->be->copy_h2d(loss->data, &lossv, sizeof lossv);
    if (loss_sum) *loss_sum = total;
    if (n_tokens) *n_tokens = count;
    if (grad) {
        ag_node *nd = ag_record(ctx, ce_backward, loss, h, w_train, NULL, NULL);
        ce_saved *s = alloc_saved_host(ctx, sizeof *s);
        s->dh = dh;
        s->head_w = head_grad;
        nd->saved = s;
    }
    return loss;
}

tensor *op_lm_head_ce_pick(ag_ctx *ctx, tensor *h, const frozen_weight *w, const int32_t *targets,
                           ag_ce_mode mode, uint64_t seed, float scale, int32_t *labels,
                           double *loss_sum, int64_t *n_tokens) {
    return op_lm_head_ce_train(ctx, h, w, NULL, targets, mode, seed, scale, labels, loss_sum, n_tokens);
}

tensor *op_lm_head_ce(ag_ctx *ctx, tensor *h, const frozen_weight *w, const int32_t *targets,
                      float scale, double *loss_sum, int64_t *n_tokens) {
    return op_lm_head_ce_pick(ctx, h, w, targets, AG_CE_TARGETS, 0, scale, NULL, loss_sum, n_tokens);
}
