/* model/llama_infer.c — KV-cached forward pass (see llama_infer.h). The block
 * mirrors llama_block in model/llama.c (HF modeling_llama.py LlamaDecoderLayer);
 * attention is the cached form of op_attention (softmax(q kᵀ / √hd) v over
 * positions ≤ p, GQA head h reading kv head h / (H / KVH)), the backend's
 * attention_cached entry (autograd/backend.h). */
#include "model/llama_infer.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "autograd/backend.h"

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

/* Appends this layer's k and v (n, KVH·hd) to the cache, then attends from
 * the new tokens to every cached position up to their own. */
static tensor *cached_attention_op(ag_ctx *ctx, const void *argp, tensor *q, tensor *k, tensor *v) {
    const infer_arg *a = argp;
    const llama_hparams *hp = &a->m->hp;
    int64_t kvd = a->c->kv_dim;
    size_t base = ((size_t)a->layer * a->c->max_pos + (size_t)a->pos[0]) * kvd;
    ctx->be->copy_d2d(a->c->k + base, k->data, (size_t)a->n * kvd * sizeof(float));
    ctx->be->copy_d2d(a->c->v + base, v->data, (size_t)a->n * kvd * sizeof(float));
    tensor *att = ag_tensor2(ctx, AG_F32, a->n, (int64_t)hp->n_head * hp->head_dim);
    /* q (n, H*hd) of the new tokens; K/V of this layer hold positions 0 .. pos[n-1] */
    const size_t layer0 = (size_t)a->layer * a->c->max_pos * kvd;
    ag_attn_cached ac = {.q = q->data, .k = a->c->k + layer0, .v = a->c->v + layer0, .pos = a->pos, .kv_dim = kvd,
                         .n = a->n, .H = hp->n_head, .KVH = hp->n_kv_head, .hd = hp->head_dim, .bf16 = ctx->bf16,
                         .window = llama_layer_window(hp, a->layer)};
    ctx->be->attention_cached(ctx, &ac, att->data);
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
    int32_t *pos = ag_alloc_host(ctx, (size_t)n * sizeof(int32_t));
    for (int i = 0; i < n; i++) pos[i] = c->n + i;
    tensor *x = ls && ls->save[LORA_SAVE_EMBED] ? op_embedding(ctx, lora_set_embed(ls, m), ids, n)
                                                : llama_embed(ctx, m, ids, n);
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
