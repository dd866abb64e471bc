/* model/llama_infer.h — incremental (KV-cached) inference for generation.
 *
 * The same ops as training and evaluation (op_embedding, op_rmsnorm,
 * op_linear with the LoRA adapter, op_rope, op_glu; model/llama.c's block)
 * except attention, which attends from the new tokens to every cached
 * position instead of within one batch: new token at position p sees
 * positions 0..p. K (after RoPE) and V of every layer are kept in fp32; with
 * ctx->bf16 the attention operands are rounded to bf16 as op_attention does.
 * tests/test_hf.c checks that prefill + one-token steps reproduce
 * llama_forward_hidden's last-position hidden state.
 */
#ifndef QLORA_MODEL_LLAMA_INFER_H
#define QLORA_MODEL_LLAMA_INFER_H

#include <stdint.h>

#include "model/llama.h"

typedef struct llama_kv_cache {
    int max_pos;   /* capacity in positions */
    int n;         /* positions filled */
    int n_layer;
    int64_t kv_dim; /* n_kv_head * head_dim */
    float *k, *v;  /* (n_layer, max_pos, kv_dim) fp32 */
} llama_kv_cache;

/* max_pos must not exceed the model's RoPE table (the max_pos it was loaded with). */
int llama_kv_init(llama_kv_cache *c, const llama_model *m, int max_pos, qerr *e);
void llama_kv_free(llama_kv_cache *c);

/* Run n tokens at positions c->n .. c->n + n - 1 (appending their K/V) and
 * return their final hidden states (n, D) fp32 (after the output RMSNorm) in
 * ctx's arena; logits with llama_logits_rows. ls may be NULL. Returns NULL if
 * the cache or the RoPE table is full. */
tensor *llama_forward_cached(ag_ctx *ctx, const llama_model *m, const lora_set *ls, llama_kv_cache *c,
                             const int32_t *ids, int n);

#endif
