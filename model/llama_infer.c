/* model/llama_infer.c — KV-cached forward pass (see llama_infer.h). The block
 * mirrors llama_block in model/llama.c (HF modeling_llama.py LlamaDecoderLayer);
 * attention is the cached form of op_attention (softmax(q kᵀ / √hd) v over
 * positions ≤ p, GQA head h reading kv head h / (H / KVH)). */
#include "model/llama_infer.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/bf16.h"

int llama_kv_init(llama_kv_cache *c, const llama_model *m, int max_pos, qerr *e) {
    memset(c, 0, sizeof *c);
    if (max_pos < 1) return qerr_set(e, "KV cache: max_pos %d", max_pos);
    if (max_pos > m->rope.max_pos)
        return qerr_set(e, "KV cache: %d positions, but the model's RoPE table holds %d", max_pos, m->rope.max_pos);
    c->max_pos = max_pos;
    c->n_layer = m->hp.n_layer;
    c->kv_dim = (int64_t)m->hp.n_kv_head * m->hp.head_dim;
    size_t n = (size_t)c->n_layer * (size_t)max_pos * (size_t)c->kv_dim;
    c->k = qmalloc(n * sizeof(float), e);
    c->v = qmalloc(n * sizeof(float), e);
    if (!c->k || !c->v) {
        llama_kv_free(c);
        return -1;
    }
    return 0;
}

void llama_kv_free(llama_kv_cache *c) {
    free(c->k);
    free(c->v);
    memset(c, 0, sizeof *c);
}

typedef struct infer_arg {
    const llama_model *m;
    const lora_set *ls;
    llama_kv_cache *c;
    const int32_t *pos; /* (n) absolute positions */
    int layer, n;
} infer_arg;

static float round_op(float x, int bf) { return bf ? bf16_to_f32(f32_to_bf16(x)) : x; }

/* q (n, H*hd) of the new tokens; K/V of this layer in the cache hold positions
 * 0 .. p0 + n - 1. out (n, H*hd). */
static void cached_attention(ag_ctx *ctx, const infer_arg *a, const float *q, float *out) {
    const llama_hparams *hp = &a->m->hp;
    int H = hp->n_head, KVH = hp->n_kv_head, hd = hp->head_dim, grp = H / KVH, bf = ctx->bf16;
    int64_t kvd = a->c->kv_dim, qs = (int64_t)H * hd;
    const float *K = a->c->k + (size_t)a->layer * a->c->max_pos * kvd;
    const float *V = a->c->v + (size_t)a->layer * a->c->max_pos * kvd;
    int total = a->pos[a->n - 1] + 1;
    float scale = 1.0f / sqrtf((float)hd);
    /* bf16 operands as op_attention's GEMMs see them */
    float *Kr = ag_alloc(ctx, (size_t)total * kvd * sizeof(float));
    float *Vr = ag_alloc(ctx, (size_t)total * kvd * sizeof(float));
    for (int64_t i = 0; i < (int64_t)total * kvd; i++) {
        Kr[i] = round_op(K[i], bf);
        Vr[i] = round_op(V[i], bf);
    }
#pragma omp parallel
    {
        float *s = malloc((size_t)total * sizeof(float));
        float *qh = malloc((size_t)hd * sizeof(float));
        float *acc = malloc((size_t)hd * sizeof(float));
        if (s && qh && acc) {
#pragma omp for collapse(2) schedule(static)
            for (int i = 0; i < a->n; i++)
                for (int h = 0; h < H; h++) {
                    int p = a->pos[i], g = h / grp;
                    for (int d = 0; d < hd; d++) qh[d] = round_op(q[(size_t)i * qs + (size_t)h * hd + d], bf);
                    float mx = -INFINITY;
                    for (int j = 0; j <= p; j++) {
                        const float *kj = Kr + (size_t)j * kvd + (size_t)g * hd;
                        float dot = 0.0f;
                        for (int d = 0; d < hd; d++) dot += qh[d] * kj[d];
                        s[j] = dot * scale;
                        if (s[j] > mx) mx = s[j];
                    }
                    float sum = 0.0f;
                    for (int j = 0; j <= p; j++) {
                        s[j] = expf(s[j] - mx);
                        sum += s[j];
                    }
                    float inv = 1.0f / sum;
                    memset(acc, 0, (size_t)hd * sizeof(float));
                    for (int j = 0; j <= p; j++) {
                        float pj = round_op(s[j] * inv, bf);
                        const float *vj = Vr + (size_t)j * kvd + (size_t)g * hd;
                        for (int d = 0; d < hd; d++) acc[d] += pj * vj[d];
                    }
                    memcpy(out + (size_t)i * qs + (size_t)h * hd, acc, (size_t)hd * sizeof(float));
                }
        }
        free(s);
        free(qh);
        free(acc);
    }
}

/* Appends this layer's k and v (n, KVH·hd) to the cache, then attends from
 * the new tokens to every cached position up to their own. */
static tensor *cached_attention_op(ag_ctx *ctx, const void *argp, tensor *q, tensor *k, tensor *v) {
    const infer_arg *a = argp;
    const llama_hparams *hp = &a->m->hp;
    int64_t kvd = a->c->kv_dim;
    size_t base = ((size_t)a->layer * a->c->max_pos + (size_t)a->pos[0]) * kvd;
    memcpy(a->c->k + base, k->data, (size_t)a->n * kvd * sizeof(float));
    memcpy(a->c->v + base, v->data, (size_t)a->n * kvd * sizeof(float));
    tensor *att = ag_tensor2(ctx, AG_F32, a->n, (int64_t)hp->n_head * hp->head_dim);
    cached_attention(ctx, a, q->data, att->data);
    return att;
}

static tensor *infer_block(ag_ctx *ctx, void *argp, tensor *x) {
    const infer_arg *a = argp;
    return llama_layer_forward(ctx, a->m, a->ls, a->layer, x, a->pos, cached_attention_op, a);
}

tensor *llama_forward_cached(ag_ctx *ctx, const llama_model *m, const lora_set *ls, llama_kv_cache *c,
                             const int32_t *ids, int n) {
    const llama_hparams *hp = &m->hp;
    if (n < 1 || c->n + n > c->max_pos || c->n + n > m->rope.max_pos) return NULL;
    int rec = ctx->recording, tr = ctx->training;
    ctx->recording = 0;
    ctx->training = 0;
    int32_t *pos = ag_alloc(ctx, (size_t)n * sizeof(int32_t));
    for (int i = 0; i < n; i++) pos[i] = c->n + i;
    tensor *x = op_embedding(ctx, &m->embed, ids, n);
    for (int l = 0; l < hp->n_layer; l++) {
        infer_arg a = {.m = m, .ls = ls, .c = c, .pos = pos, .layer = l, .n = n};
        x = ag_run_discard(ctx, infer_block, &a, x);
    }
    c->n += n;
    tensor *h = llama_output_norm(ctx, m, x);
    ctx->recording = rec;
    ctx->training = tr;
    return h;
}
