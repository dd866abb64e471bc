/* autograd/ops.h — the differentiable ops of a Llama block.
 *
 * Every op computes its forward result into a new arena tensor and, when the
 * context is recording and an input requires grad, records a backward node.
 * Activations are (N, C) row-major fp32 with N = B*T tokens; norms, softmax and
 * the loss are computed in fp32; GEMM operands are rounded to bf16 when
 * ctx->bf16 (fp32 accumulation), fp32 otherwise. Frozen base weights are never
 * materialised whole: each linear dequantizes its own weight into a reusable
 * scratch buffer right before its GEMM, in forward and again in backward.
 * Every loop over tensor data runs in the context's backend (ctx->be,
 * autograd/backend.h); the ops keep the shapes, the tape and the arenas.
 *
 * Maths references: RMSNorm (Zhang & Sennrich 2019; HF LlamaRMSNorm), RoPE
 * (Su et al. 2021; HF `rotate_half` convention, modeling_llama.py), grouped-query
 * attention (Ainslie et al. 2023), SwiGLU (Shazeer 2020), LoRA (Hu et al. 2021;
 * PEFT tuners/lora/layer.py), rsLoRA (Kalajdzievski 2023).
 */
#ifndef QLORA_AUTOGRAD_OPS_H
#define QLORA_AUTOGRAD_OPS_H

#include <stdint.h>

#include "autograd/backend.h" /* frozen_weight, rope_table */
#include "autograd/tensor.h"
#include "core/bf16.h"
#include "quant/nf4.h"

/* LoRA adapter on one linear: ΔW = scaling · B·A (PEFT). A (r, in) and B (out, r)
 * are fp32 leaf tensors whose grads live in the trainer's gradient arena. */
typedef struct lora_adapter {
    tensor *A;
    tensor *B;
    int r;
    float scaling;   /* lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA */
    float dropout;   /* probability p in [0, 1) */
    uint64_t stream; /* RNG stream id of this module (layer, module) for dropout masks */
} lora_adapter;

/* Fill t (host memory) for max_pos positions of head_dim with the default
 * frequencies 1/theta^(2i/head_dim); errors: out of memory. */
int rope_table_init(rope_table *t, int max_pos, int head_dim, float theta, qerr *e);
/* The same from given per-pair inverse frequencies inv_freq (head_dim/2, fp32,
 * radians per position): what RoPE scaling (linear, llama3, GGUF rope_freqs)
 * produces (model/llama.h llama_rope_inv_freq). angle = pos * inv_freq[i] in
 * fp32, as HF's rotary embedding. Errors: out of memory (t left empty). */
int rope_table_init_freqs(rope_table *t, int max_pos, int head_dim, const float *inv_freq, qerr *e);
/* HF's default inverse frequencies: inv_freq[i] = 1 / theta^(2i/head_dim), fp32
 * (modeling_rope_utils.py _compute_default_rope_parameters); (head_dim/2). */
void rope_default_inv_freq(int head_dim, float theta, float *inv_freq);
void rope_table_free(rope_table *t);

/* Rows [row0, row0+n) of w into dst (n × in) fp32 or bf16: the default
 * backend's frozen_rows entries (ag_backend_default), for callers outside a
 * context (trainer/export.c, tests). */
void frozen_rows_f32(const frozen_weight *w, int64_t row0, int64_t n, float *dst);
void frozen_rows_bf16(const frozen_weight *w, int64_t row0, int64_t n, bf16 *dst);

/* x[N, D] = table[ids[n], :] (table is the frozen embedding (V, D)); no grad. */
tensor *op_embedding(ag_ctx *ctx, const frozen_weight *table, const int32_t *ids, int64_t n);

/* x[N, D] = table[ids[n], :] for a trainable fp32 table (V, D) (PEFT's modules_to_save copy of
 * embed_tokens: looked up in fp32, as torch's nn.Embedding on an fp32 weight). Backward:
 * dtable[ids[n], :] += dx[n, :], by the backend's embedding_bwd (deterministic scatter-add). */
tensor *op_embedding_train(ag_ctx *ctx, tensor *table, const int32_t *ids, int64_t n);

/* y = x / sqrt(mean(x²) + eps) * w ; x (N, D) fp32, w (D) fp32 tensor (frozen or trainable). */
tensor *op_rmsnorm(ag_ctx *ctx, tensor *x, tensor *w, float eps);

/* y (N, out) = x W^T (+ w->bias) + scaling · dropout(x) A^T B^T ; x (N, in) fp32.
 * The bias is frozen (no gradient); it is added with the backend's GEMM as the
 * rank-1 product ones(N, 1) · bias(1, out) in fp32 (one rounding: y + b).
 * lora may be NULL (frozen linear: only dx flows back). */
tensor *op_linear(ag_ctx *ctx, tensor *x, const frozen_weight *w, const lora_adapter *lora);

/* The n linears of a block that read the same input x (N, in) fp32 (q/k/v, gate/up): y[i] (N,
 * w[i]->out) = op_linear(ctx, x, w[i], lora[i]), with the LoRA A products grouped: u = x·[A_0; …;
 * A_{n-1}]ᵀ (N, n·r) is one GEMM, and in backward dA (n·r, in) = duᵀ·x and dx += du·[A_0; …] are one
 * GEMM each over du = [du_0 … du_{n-1}] (N, n·r), instead of n skinny ones (oneDNN is least efficient
 * at N or K = r; bench/gemm_group_ab.c). The base products x·W_iᵀ stay one per linear (grouping them
 * measured no faster). One node for the group, run after every consumer of the y[i] in backward.
 * Grouped only when every lora is present with the same r, no dropout is active in this context and
 * the context is not fp16 (op_linear rounds its backward GEMM outputs to fp16; the group does not);
 * otherwise it is n op_linear calls. The maths is op_linear's; the summation order of dx and dA
 * changes (the LoRA part of dx is one K = n·r product added after the n base products). 1 <= n <= 4. */
void op_linear_group(ag_ctx *ctx, tensor *x, int n, const frozen_weight *const w[],
                     const lora_adapter *const lora[], tensor *y[]);

/* op_linear for a recomputation in backward whose output values nothing reads (the last linear
 * of a checkpointed piece: only its gradient flows): the same node, the same saved operands (the
 * input's bf16 copy, dropout(x), LoRA's u = xAᵀ), hence the same gradients, but y = x Wᵀ and the
 * LoRA term are not computed: y is zero-filled. Used by the selective mode (model/llama.c). */
tensor *op_linear_unread_output(ag_ctx *ctx, tensor *x, const frozen_weight *w, const lora_adapter *lora);

/* Rotary embedding on x (N, n_heads*head_dim), rotate_half convention, with
 * per-token positions pos (N). */
tensor *op_rope(ag_ctx *ctx, tensor *x, int n_heads, const rope_table *rt, const int32_t *pos);

/* Causal grouped-query attention. q (B*T, H*hd), k and v (B*T, KVH*hd); head h
 * uses kv head h / (H/KVH). seq_ids (B*T) or NULL: token i attends to token j ≤ i
 * of the same row only if seq_ids[i] == seq_ids[j] (packed examples never see
 * each other). Scale 1/sqrt(hd). Returns (B*T, H*hd). Saves each softmax
 * row's max and 1/sum (B, H, T) fp32, from which backward recomputes the
 * probabilities (backend attention_bwd). */
tensor *op_attention(ag_ctx *ctx, tensor *q, tensor *k, tensor *v, int B, int T, int H, int KVH,
                     const int32_t *seq_ids);
/* op_attention with a sliding window (Gemma's local layers; HF's sliding mask, llama.cpp's
 * LLAMA_SWA_TYPE_STANDARD): token i also needs i - j < window; window 0 = none (op_attention). */
tensor *op_attention_window(ag_ctx *ctx, tensor *q, tensor *k, tensor *v, int B, int T, int H, int KVH,
                            const int32_t *seq_ids, int window);

/* The gated MLP's activation (op_glu). */
typedef enum ag_glu_act {
    AG_GLU_SILU = 0,      /* SwiGLU (Shazeer 2020, Llama): silu(g) = g·σ(g); backend swiglu_fwd / swiglu_bwd */
    AG_GLU_GELU_TANH = 1  /* GeGLU with the tanh GELU (Gemma's gelu_pytorch_tanh, torch's gelu(approximate="tanh"));
                           * backend geglu_fwd / geglu_bwd */
} ag_glu_act;

/* Gated linear unit y = act(g) * u, elementwise; g, u (N, F) fp32, y (N, F) fp32 with its bf16 copy memoised
 * for the down projection in bf16 mode. Backward saves g and u (bf16 in bf16 mode). Formulas:
 * autograd/backend.h swiglu_* / geglu_*. */
tensor *op_glu(ag_ctx *ctx, tensor *g, tensor *u, ag_glu_act act);

/* y (rows, cols) = x's elements in the same (row-major) order under another shape, fp32, rows·cols =
 * x->numel (a copy; backward adds dy into dx). Gemma's QK-norm normalises q (N, H·hd) as (N·H, hd). */
tensor *op_reshape(ag_ctx *ctx, tensor *x, int64_t rows, int64_t cols);

/* y (N, c) = x[:, c0 : c0 + c] for x (N, C) fp32, 0 <= c0, c0 + c <= C: one part
 * of a fused linear's output (Phi-3's qkv_proj into q, k, v and gate_up_proj
 * into gate, up; modeling_phi3.py slices and chunk). Backward adds dy into
 * those columns of dx (backend copy_cols). */
tensor *op_cols(ag_ctx *ctx, tensor *x, int64_t c0, int64_t c);

/* y = a + b, same shapes. */
tensor *op_add(ag_ctx *ctx, tensor *a, tensor *b);

/* op_add for the residual stream (2-D): inside a segment (ctx->saving, checkpointing off or selective) the sum is
 * written straight into the keep arena, where it would otherwise be copied — the next RMSNorm keeps its input for
 * backward (ag_keep), a segment keeps its output (ag_segment) — so neither copy is made. Same values as op_add. */
tensor *op_add_residual(ag_ctx *ctx, tensor *a, tensor *b);

/* Fused LM head + cross-entropy with ignore index -100:
 *   loss = scale · Σ_{n: targets[n] != -100} −log softmax(h[n] Wᵀ)[targets[n]]
 * h (N, D) fp32, W the frozen (V, D) head. The logits are computed `chunk` rows
 * at a time and never exist for all N × V at once; the gradient w.r.t. h is
 * computed in the same pass (the loss is a leaf of the graph) and stored.
 * scale is e.g. 1 / (number of target tokens in the optimizer step), so
 * micro-batches sum to a per-token mean (transformers' num_items_in_batch).
 * Returns a 1-element tensor; *loss_sum and *n_tokens (if non-NULL) receive the
 * unscaled summed loss (fp64) and the number of target tokens. */
tensor *op_lm_head_ce(ag_ctx *ctx, tensor *h, const frozen_weight *w, const int32_t *targets,
                      float scale, double *loss_sum, int64_t *n_tokens);

/* The chunked LM head + cross-entropy pass op_lm_head_ce is, with the target
 * of each row chosen by mode once its logits and log-sum-exp are known:
 * AG_CE_TARGETS takes targets[n]; AG_CE_SAMPLED draws it from the row's
 * softmax with seed (Sophia's sampled labels, autograd/ce_sampled.h; the
 * backend's lm_head_ce entry has the rule). targets (N) or NULL (= every row,
 * AG_CE_SAMPLED only): −100 skips a row. labels (N) or NULL receives the
 * targets used (−100 at skipped rows). Loss, gradient, *loss_sum and
 * *n_tokens as op_lm_head_ce. */
tensor *op_lm_head_ce_pick(ag_ctx *ctx, tensor *h, const frozen_weight *w, const int32_t *targets,
                           ag_ce_mode mode, uint64_t seed, float scale, int32_t *labels,
                           double *loss_sum, int64_t *n_tokens);

/* op_lm_head_ce_pick with a trainable head (PEFT's modules_to_save lm_head): w is the GEMM view
 * of w_train's fp32 data (FROZEN_F32, rounded to bf16 operands when ctx->bf16, as the LoRA
 * path), and w_train (V, D) fp32 receives dW = Σ_chunks dlogitsᵀ h in the same chunked pass, in
 * forward (the logits are never kept): the loss must be the root of backward (ag_backward, seed
 * 1), which ce_backward checks (abort otherwise). w_train NULL = op_lm_head_ce_pick. */
tensor *op_lm_head_ce_train(ag_ctx *ctx, tensor *h, const frozen_weight *w, tensor *w_train, const int32_t *targets,
                            ag_ce_mode mode, uint64_t seed, float scale, int32_t *labels, double *loss_sum,
                            int64_t *n_tokens);

#endif
