/* model/llama.h — a Llama-family causal LM held for QLoRA training.
 *
 * Architecture as HF transformers' modeling_llama.py: embed → N × [RMSNorm →
 * attention (RoPE rotate_half, GQA) → residual → RMSNorm → SwiGLU MLP →
 * residual] → RMSNorm → LM head. The seven linears of each block are frozen and
 * stored NF4 (bitsandbytes layout, blocksize 64, optional double quant) or bf16
 * (`load_in_4bit: false`); embeddings and the LM head stay bf16 and norms fp32,
 * as QLoRA does. Weights are kept in HF orientation and HF row order: the
 * GGUF converter's Q/K row permutation is undone at load
 * (convert_hf_to_gguf.py LlamaModel.permute; formats.md §3).
 */
#ifndef QLORA_MODEL_LLAMA_H
#define QLORA_MODEL_LLAMA_H

#include <stdint.h>

#include "autograd/ops.h"
#include "core/status.h"
#include "format/gguf.h"
#include "model/llama_linear.h" /* LLAMA_Q .. LLAMA_DOWN, their names and the order contract */


typedef struct llama_hparams {
    int n_layer, d_model, n_head, n_kv_head, head_dim, d_ff, vocab, context_length;
    float rope_theta, rms_eps;
    int tied_embeddings;
} llama_hparams;

/* The roles of the base model's tensors (model/base.h base_model_tensor_f32,
 * model/hf.c), with their shapes from the hyper-parameters. */
typedef enum llama_role {
    LLAMA_T_EMBED = 0, /* (V, D) model.embed_tokens / token_embd */
    LLAMA_T_LM_HEAD,   /* (V, D) lm_head / output (== embed when tied) */
    LLAMA_T_OUT_NORM,  /* (D) model.norm / output_norm */
    LLAMA_T_ATTN_NORM, /* (D) layers.N.input_layernorm / blk.N.attn_norm */
    LLAMA_T_FFN_NORM,  /* (D) layers.N.post_attention_layernorm / blk.N.ffn_norm */
    LLAMA_T_LINEAR,    /* layers.N.{self_attn,mlp}.<module> (out, in) */
} llama_role;

/* Shape (rows, cols) of a role's tensor (cols = 1 for norms: rows = D); module
 * indexes the LLAMA_Q..LLAMA_DOWN enum for LLAMA_T_LINEAR. */
void llama_tensor_shape(const llama_hparams *hp, llama_role role, int module, int64_t *rows, int64_t *cols);

typedef struct llama_layer {
    float *attn_norm, *ffn_norm;        /* (D) fp32 */
    frozen_weight lin[LLAMA_N_LINEAR];  /* q (H*hd, D), k/v (KVH*hd, D), o (D, H*hd), gate/up (F, D), down (D, F) */
    nf4_tensor nf4[LLAMA_N_LINEAR];     /* storage when quantized */
    bf16 *w_bf16[LLAMA_N_LINEAR];       /* storage when bf16 */
} llama_layer;

typedef struct llama_model {
    llama_hparams hp;
    bf16 *tok_embd;          /* (V, D) bf16 */
    bf16 *lm_head_w;         /* (V, D) bf16, == tok_embd when tied */
    frozen_weight embed, lm_head;
    float *out_norm;         /* (D) fp32 */
    llama_layer *layers;     /* n_layer */
    int load_in_4bit, double_quant;
    int64_t n_quantized_params;  /* elements of the frozen linears */
    int64_t quantized_bytes;     /* bytes holding them (packed + scales) */
    int64_t n_params;            /* all base parameters */
    rope_table rope;
} llama_model;

/* Read hyper-parameters from GGUF metadata (`llama.*` keys), checked with
 * llama_hparams_check. Keys and tensors that change the maths and are not
 * implemented are refused by name: rope_freqs.weight (llama3 scaling),
 * llama.rope.scaling.* other than none/1, logit soft-capping, a sliding
 * window, partial rotary dimensions, linear biases, QK-norm, and blk.N
 * tensors beyond llama.block_count. Errors (-1): one line naming the key or
 * tensor. */
int llama_hparams_from_gguf(const gguf_file *f, llama_hparams *hp, qerr *e);

/* Hyper-parameters that would make a different (or NaN) model: rope_theta
 * must be finite and > 1, rms_eps finite in (0, 1), context_length > 0.
 * theta_key / eps_key name the source's keys in the message (GGUF
 * "llama.rope.freq_base", HF config.json "rope_theta"). Returns 0, or -1 with
 * "<key>: expected ..., got <value>". */
int llama_hparams_check(const llama_hparams *hp, const char *theta_key, const char *eps_key, qerr *e);

/* Load the base model from an open GGUF: dequantize each tensor from its GGUF
 * type, un-permute Q/K rows, and store the linears as NF4 (load_in_4bit) or
 * bf16. One layer is dequantized at a time; the fp32 copy never exists whole.
 * max_pos bounds the RoPE table (≥ sequence_len). */
int llama_load_gguf(const gguf_file *f, int load_in_4bit, int double_quant, int max_pos,
                    llama_model *m, qerr *e);
void llama_free(llama_model *m);

/* Invert the GGUF Q/K permutation for one (n_head*hd, in) matrix, in place.
 * GGUF row h·hd + 2i + j holds HF row h·hd + j·hd/2 + i. */
void llama_unpermute_rows(float *w, int n_head, int head_dim, int64_t in);

/* ---- LoRA adapters over the model, in one flat fp32 arena ---- */
typedef struct lora_set {
    int r;
    float alpha, dropout, scaling;
    int use_rslora;
    int target[LLAMA_N_LINEAR];  /* which module kinds carry an adapter */
    int n_layer;
    int64_t n_params;            /* total fp32 elements in `params` */
    float *params;               /* flat: per layer, per targeted module: A (r, in) then B (out, r) */
    float *grads;                /* same layout */
    int64_t *offset;             /* (n_layer * LLAMA_N_LINEAR) start of A in params, or -1 */
    tensor *A, *B;               /* (n_layer * LLAMA_N_LINEAR) leaf tensors into params/grads */
    lora_adapter *ad;            /* (n_layer * LLAMA_N_LINEAR) */
} lora_set;

/* Create adapters with PEFT's default init: A ~ kaiming_uniform(a=√5) =
 * U(−1/√in, 1/√in), B = 0 (peft tuners/lora/layer.py reset_lora_parameters),
 * drawn from the counter-based RNG with `seed` (same values for any thread count). */
int lora_set_init(lora_set *ls, const llama_model *m, int r, float alpha, float dropout, int use_rslora,
                  const int target[LLAMA_N_LINEAR], uint64_t seed, qerr *e);
void lora_set_free(lora_set *ls);
/* The adapter of (layer, module), or NULL if that module is not targeted. */
const lora_adapter *lora_set_get(const lora_set *ls, int layer, int module);

/* One batch of B rows × T tokens (all arrays (B*T), row-major). */
typedef struct llama_batch {
    int B, T;
    const int32_t *input_ids, *targets, *position_ids, *seq_ids;
} llama_batch;

/* Forward pass to the summed cross-entropy, recorded on ctx's tape when
 * ctx->recording. loss = scale · Σ CE over target tokens. Gradient
 * checkpointing recomputes each block during backward. ls may be NULL (base
 * model only). */
tensor *llama_forward_loss(ag_ctx *ctx, const llama_model *m, const lora_set *ls, const llama_batch *b,
                           float scale, int checkpointing, double *loss_sum, int64_t *n_tokens);

/* The same forward pass ending in Sophia's Gauss-Newton-Bartlett loss
 * (autograd/ce_sampled.h): at every position with a training target, a label
 * is sampled from the model's own softmax (deterministically from
 * sample_seed) and loss = scale · Σ CE with the sampled labels. labels (B*T)
 * or NULL receives them (−100 at masked positions). */
tensor *llama_forward_sampled_loss(ag_ctx *ctx, const llama_model *m, const lora_set *ls, const llama_batch *b,
                                   float scale, int checkpointing, uint64_t sample_seed, int32_t *labels,
                                   double *loss_sum, int64_t *n_tokens);

/* The attention of one decoder layer, supplied by the caller of
 * llama_layer_forward: q (N, n_head·hd) and k, v (N, n_kv_head·hd) fp32,
 * already rotated; returns (N, n_head·hd). arg is the caller's. */
typedef tensor *(*llama_attention_fn)(ag_ctx *ctx, const void *arg, tensor *q, tensor *k, tensor *v);

/* One decoder layer (HF modeling_llama.py LlamaDecoderLayer) on x (N, D) fp32:
 *   q, k, v = linears of RMSNorm(x) (+ LoRA), RoPE on q and k at positions pos (N);
 *   x += o_proj(attention(q, k, v));  x += down(SwiGLU(gate(RMSNorm(x)), up(RMSNorm(x)))).
 * Training and evaluation pass op_attention over the batch; generation the
 * KV-cached attention (model/llama_infer.c). Every linear carries its LoRA
 * adapter from ls (NULL: base model only). Returns the new x (N, D). */
tensor *llama_layer_forward(ag_ctx *ctx, const llama_model *m, const lora_set *ls, int layer, tensor *x,
                            const int32_t *pos, llama_attention_fn attention, const void *arg);

/* The output RMSNorm (model.norm) on x (N, D): the hidden states the LM head reads. */
tensor *llama_output_norm(ag_ctx *ctx, const llama_model *m, tensor *x);

/* Forward pass to the final hidden states (B*T, D) fp32, after the final
 * RMSNorm, without recording (inference). ls may be NULL. */
tensor *llama_forward_hidden(ag_ctx *ctx, const llama_model *m, const lora_set *ls, const llama_batch *b);

/* Logits for rows [row0, row0+n) of the hidden states h (B*T, D):
 * out (n, V) fp32 = h W_headᵀ, with the same GEMM precision as training
 * (bf16 operands when ctx->bf16). For inference, tests and generation; the
 * training loss never materialises all logits. */
void llama_logits_rows(ag_ctx *ctx, const llama_model *m, const tensor *h, int64_t row0, int64_t n, float *out);

#endif
