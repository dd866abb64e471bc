/* autograd/backend.h — the backend table: memory calls and kernels behind the ops.
 *
 * A backend is a struct of function pointers, as ggml's backends are
 * (ggml-backend-impl.h): the ops (autograd/ops.c) keep the shapes, the tape
 * and the arena bookkeeping and call the table of their context (ctx->be)
 * for every loop over tensor data; the optimizers (optim/) and the model's
 * inference paths (model/llama.c logits, model/llama_infer.c cached
 * attention) call it too. Pointers marked "data" below are memory of the
 * backend (from its alloc, or arena memory of a context using it); pointers
 * marked "host" are ordinary host memory.
 *
 * Backends today:
 *   cpu      the CPU engine: oneDNN GEMMs, OpenMP over rows, the AVX-512 row
 *            kernels where the compiler targets AVX-512 (-march=native) and
 *            the processor has them (checked at run time);
 *   cpu-ref  the same kernels built from their scalar branches (the
 *            `#else` paths of the row kernels, bitsandbytes-order NF4
 *            dequantization nf4_dequantize_rows_*_ref) and a plain scalar
 *            GEMM: the reference tests/test_backend_ops.c checks `cpu`
 *            against;
 *   cpu-fenced  `cpu` with data memory the host cannot read between table calls
 *            (autograd/backend_fenced.c): checks code paths for device-memory rules;
 *   cuda     one NVIDIA GPU (autograd/backend_cuda.cu): cuBLASLt GEMMs, own
 *            kernels, device memory; built with `make CUDA=1` (or when nvcc
 *            is found), available when a device is present.
 * QLORA_BACKEND=<name> in the environment selects the default backend
 * (ag_backend_default); unset, it is `cpu`.
 *
 * All kernels are deterministic for a fixed OpenMP thread count; the
 * elementwise ones (and the optimizer updates, and sum_squares) do not
 * depend on the thread count at all.
 */
#ifndef QLORA_AUTOGRAD_BACKEND_H
#define QLORA_AUTOGRAD_BACKEND_H

#include <stddef.h>
#include <stdint.h>

#include "autograd/gemm.h"
#include "core/bf16.h"
#include "quant/int8.h"
#include "quant/nf4.h"

struct ag_ctx;

typedef enum frozen_kind { FROZEN_NF4 = 0, FROZEN_BF16 = 1, FROZEN_F32 = 2, FROZEN_INT8 = 3 } frozen_kind;

/* A frozen bf16 table (out, in) whose rows are sharded over the ranks of a
 * job (FULL_SHARD's embedding and LM head, model/llama_fsdp.h): no rank holds
 * it whole; it is gathered when used. Every call is collective: every rank
 * makes the same calls in the same order (op_embedding: one rows() per chunk
 * of chunk_rows rows, whatever the ids; the LM head + CE: one gather_all()
 * per call, whatever the rows). Both only copy bytes, so the GEMMs and the
 * embedding see the same operands as with the whole table: the results are
 * the same to the bit. */
typedef struct frozen_shards {
    void *arg;
    int64_t chunk_rows;
    /* rows [r0, r0 + n) of the table into dst (n, in) bf16 row-major, on every rank */
    void (*rows)(void *arg, int64_t r0, int64_t n, bf16 *dst);
    /* the whole table (out, in) in a scratch of the owner, valid until the owner's next gather of any kind */
    const bf16 *(*gather_all)(void *arg);
} frozen_shards;

/* A frozen [out, in] weight (nn.Linear layout), stored NF4, bf16, fp32 or
 * int8 (bitsandbytes Int8Params: CB codes + SCB row absmax, quant/int8.h). */
typedef struct frozen_weight {
    int64_t out, in;
    frozen_kind kind;
    const float *bias;     /* (out) fp32 added to every row of x Wᵀ (frozen: Qwen2's q/k/v), or NULL */
    const nf4_tensor *nf4; /* FROZEN_NF4 */
    const bf16 *w_bf16;    /* FROZEN_BF16: (out, in) */
    const float *w_f32;    /* FROZEN_F32: (out, in) */
    const int8_t *cb;      /* FROZEN_INT8: (out, in) codes */
    const float *scb;      /* FROZEN_INT8: (out) row absmax; row r = cb[r, :] * (scb[r] / 127) */
    const frozen_shards *shards; /* FROZEN_BF16 sharded over the ranks (w_bf16 NULL): the embedding and LM head
                                  * ops gather it (op_embedding, op_lm_head_ce; CPU backend), nothing else reads it */
} frozen_weight;

/* RoPE cos/sin table: (max_pos, head_dim/2) fp32 each, computed as HF does
 * (inv_freq = 1/theta^(2i/d) in fp32; angle = pos * inv_freq in fp32). */
typedef struct rope_table {
    int max_pos, head_dim;
    float *cos, *sin;
} rope_table;

/* Causal grouped-query attention over a batch (op_attention, autograd/ops.h).
 * q (B*T, H*hd), k and v (B*T, KVH*hd) as GEMM operands: bf16 when `bf16`,
 * else fp32. Forward writes rmax/rinv (each row's softmax max and 1/sum),
 * seglo and seg_ok; backward reads them. */
typedef struct ag_attn {
    const void *qb, *kb, *vb;
    float *rmax, *rinv;      /* (B, H, T) fp32 */
    const int32_t *seq_ids;  /* (B*T) or NULL: token i sees j <= i with seq_ids[j] == seq_ids[i] */
    int32_t *seglo;          /* (B, T): first position of each token's example */
    unsigned char *seg_ok;   /* (B): 1 when row b's examples are contiguous runs */
    int B, T, H, KVH, hd;
    int bf16;
    int window;              /* sliding window (Gemma's local layers), 0 = none: token i also needs i - j < window
                              * (HF's sliding mask; llama.cpp is_masked_swa: masked when p1 - p0 >= n_swa) */
    int fp16;                /* with bf16 0: qb/kb/vb hold fp16 values (fp32), and P (and in backward dO's
                              * operand, dS) are rounded to fp16 before their GEMMs, as bf16 mode rounds them;
                              * backward's GEMM outputs dP, dq, dk, dv rounded to fp16 too (fp16 tensors under
                              * torch's autocast: where a too-large loss scale overflows to inf) */
} ag_attn;

/* Attention of n new tokens against a KV cache (model/llama_infer.c): query
 * token i at absolute position pos[i] sees cached positions 0 .. pos[i]. */
typedef struct ag_attn_cached {
    const float *q;       /* (n, H*hd) fp32 */
    const float *k, *v;   /* (max_pos, kv_dim) fp32: this layer's cache, positions 0 .. pos[n-1] filled */
    const int32_t *pos;   /* (n) host */
    int64_t kv_dim;       /* KVH*hd */
    int n, H, KVH, hd;
    int bf16;             /* round q, k, v, p to bf16 as op_attention's GEMM operands */
    int window;           /* sliding window, 0 = none: query at pos p sees pos[i] - window < j <= p */
} ag_attn_cached;

/* How the LM-head cross-entropy chooses each row's target. */
typedef enum ag_ce_mode {
    AG_CE_TARGETS = 0, /* targets[n] (must not be NULL) */
    AG_CE_SAMPLED = 1  /* drawn from the row's softmax with `seed` (autograd/ce_sampled.h) */
} ag_ce_mode;

/* RNG stream of the sampled labels' draws (core/rng.h). */
#define CE_SAMPLE_STREAM 0x5a3b1e5ull

/* Chunked LM head + cross-entropy (op_lm_head_ce / op_lm_head_ce_pick). */
typedef struct ag_ce_args {
    const float *h;         /* (N, D) fp32 data */
    const void *w;          /* (V, D) head as GEMM operand: bf16 when bf16, else fp32 */
    int64_t N, D, V;
    const int32_t *targets; /* (N) host or NULL (= every row): -100 skips a row */
    ag_ce_mode mode;
    uint64_t seed;          /* AG_CE_SAMPLED */
    float scale;            /* gradient scale (the loss itself is returned unscaled) */
    float *dh;              /* (N, D) fp32 data, zeroed by the caller, or NULL: no gradient */
    float *dw;              /* (V, D) fp32 data or NULL: dw += dlogitsᵀ h (a trainable head, PEFT's
                             * modules_to_save lm_head), one GEMM per chunk in chunk order, with the
                             * same operands (bf16 when bf16) as dh = dlogits W; needs dh */
    int32_t *labels;        /* (N) host or NULL: the targets used, -100 at skipped rows */
    int bf16;
    const frozen_shards *w_shards; /* w NULL: the head sharded over the ranks, gathered whole when used (CPU) */
    int fp16;               /* with bf16 0: w holds fp16 values (fp32); h's rows and the logits' gradient are rounded
                             * to fp16 before their GEMMs, and dh after its GEMM (fp16 mode; the gradient scaled by
                             * `scale`, which carries the loss scale, so an overflow becomes inf as in torch's fp16
                             * autocast) */
} ag_ce_args;

/* AdamW per-element constants, computed by optim/adamw.c from the doubles
 * (torch's order of roundings: see there). */
typedef struct ag_adamw_coef {
    int decay, lerp_small;
    float decay_f, lerp_coeff, beta2_f, one_minus_beta2_f, bc2_sqrt_f, eps_f, neg_step_f;
} ag_adamw_coef;

/* SophiaG per-element constants (optim/sophia.c). */
typedef struct ag_sophia_coef {
    float decay_f, beta1_f, one_minus_beta1_f, rho_bs_f, eps_f, neg_lr_f;
} ag_sophia_coef;

/* bitsandbytes' 8-bit AdamW per-element constants (optim/adamw8bit.c): fp32 casts of the Python
 * scalars bitsandbytes' CPU update passes to torch. */
typedef struct ag_adamw8bit_coef {
    int decay;                 /* weight_decay > 0 */
    float decay_f;             /* 1 - lr*wd */
    float beta1_f, one_minus_beta1_f, beta2_f, one_minus_beta2_f;
    float correction2_f;       /* 8-bit: sqrt(1 - beta2^t) */
    float eps_f;               /* 8-bit: eps */
    float step8_f;             /* 8-bit: -lr / (1 - beta1^t) */
    float eps_c2_f;            /* 32-bit: eps * sqrt(1 - beta2^t) */
    float step32_f;            /* 32-bit: -lr * sqrt(1 - beta2^t) / (1 - beta1^t) */
} ag_adamw8bit_coef;

typedef struct ag_backend {
    const char *name;
    /* 1: data memory is ordinary host memory the host may read and write directly (the CPU
     * tables); 0: it is not (cuda, cpu-fenced), and host data goes through copy_h2d/copy_d2h. */
    int host_data;

    /* ---- memory ---- */
    /* bytes of data memory, 64-byte aligned; NULL when out of memory. */
    void *(*alloc)(size_t bytes);
    void (*free)(void *p); /* NULL is a no-op */
    void (*copy_h2d)(void *dst, const void *src, size_t bytes); /* dst data, src host */
    void (*copy_d2h)(void *dst, const void *src, size_t bytes); /* dst host, src data */
    void (*copy_d2d)(void *dst, const void *src, size_t bytes); /* both data, may not overlap */
    void (*zero)(void *dst, size_t bytes);                      /* data: all bytes 0 */
    void (*fill_f32)(float *dst, int64_t n, float value);       /* data (n) fp32 = value */
    void (*sync)(void); /* wait until every call before it has finished (CPU: returns) */

    /* ---- kernels ---- */
    /* C[M,N] = alpha op(A)[M,K] op(B)[K,N] + beta C, row-major, A and B both fp32 or
     * both bf16 (dt), C fp32; beta 0 or 1. Contract of autograd/gemm.h. */
    void (*gemm)(int trans_a, int trans_b, int64_t M, int64_t N, int64_t K, float alpha, const void *A,
                 int64_t lda, const void *B, int64_t ldb, float beta, float *C, int64_t ldc, gemm_dtype dt);
    /* gemm's contract, for the LoRA products (u = x Aᵀ, s u Bᵀ and their gradients; autograd/ops.c): a
     * backend may run them on kernels of its own (the cpu backend on AMX: autograd/lora_gemm.h), with
     * gemm's maths; cpu-ref and cuda run them as gemm. */
    void (*lora_gemm)(int trans_a, int trans_b, int64_t M, int64_t N, int64_t K, float alpha, const void *A,
                      int64_t lda, const void *B, int64_t ldb, float beta, float *C, int64_t ldc, gemm_dtype dt);
    /* Rows [row0, row0+n) of a frozen weight into dst (n, w->in), fp32 or bf16. NF4: bitsandbytes'
     * dequantization (quant/nf4.h), bit for bit; bf16 -> fp32 exact; fp32 -> bf16 round to nearest even. */
    void (*frozen_rows_f32)(const frozen_weight *w, int64_t row0, int64_t n, float *dst);
    void (*frozen_rows_bf16)(const frozen_weight *w, int64_t row0, int64_t n, bf16 *dst);
    /* Wᵀ of a frozen weight: dst (w->in, w->out) bf16 row-major, dst[i·out + o] = the value frozen_rows_bf16
     * gives for W[o][i] (the same dequantization, written transposed). For the frozen input-gradient product
     * dx = dy·W run as dy·(Wᵀ)ᵀ: oneDNN's AMX/AVX-512 brgemm takes op(B) stored (N, K) faster than (K, N) on
     * every block shape measured (Llama-3-8B's 2048×4096×14336 1.6×, SmolLM2-135M's 1.05–1.15×; README
     * *Benchmark*, session 12), with bit-identical sums. NULL where the backend's GEMM transposes op(B) in
     * its kernel at no cost (cuda: cuBLASLt); autograd/ops.c then multiplies by W as stored. */
    void (*frozen_t_bf16)(const frozen_weight *w, bf16 *dst);
    /* The stored array of a FROZEN_BF16 or FROZEN_F32 weight as this backend's data memory, for GEMMs to
     * read in place (the CPU: the host array itself; a device: its copy, uploaded once); NULL for
     * FROZEN_NF4 (dequantize with frozen_rows_*). Valid while the weight's host array lives. */
    const void *(*frozen_data)(const frozen_weight *w);
    /* dst (n) bf16 = f32_to_bf16(src (n) fp32): round to nearest even, quiet NaN (core/bf16.h). */
    void (*to_bf16)(const float *src, bf16 *dst, int64_t n);
    /* Inverted dropout (LoRA's lora_dropout): element i is kept when
     * rng_uniform(seed, stream, i) >= p (core/rng.h, counter-based, so the mask is
     * regenerated in backward). fwd: y = keep ? x / (1 - p) : 0. bwd: dx += keep ? g / (1 - p) : 0
     * (the product g · (1/(1-p)) rounded once). x, y, g, dx (n) fp32. */
    void (*dropout_fwd)(const float *x, float *y, int64_t n, float p, uint64_t seed, uint64_t stream);
    void (*dropout_bwd)(const float *g, float *dx, int64_t n, float p, uint64_t seed, uint64_t stream);
    /* x (n, table->in) fp32 = rows ids[0..n) (host) of the frozen embedding table. */
    void (*embedding)(const frozen_weight *table, const int32_t *ids, int64_t n, float *x);
    /* RMSNorm (Zhang & Sennrich 2019; HF LlamaRMSNorm): per row of x (N, D),
     * rstd = 1/sqrt(mean(x²) + eps) (sum of squares in double), y = w ⊙ (x · rstd);
     * yb (N, D) bf16 copy of y or NULL; y may be NULL when yb is given (only the bf16 copy is read:
     * autograd/ops.c f32_unread). rstd (N). */
    void (*rmsnorm_fwd)(const float *x, const float *w, float *y, bf16 *yb, float *rstd, int64_t N, int64_t D,
                        float eps);
    /* dx += rstd·w⊙dy − (Σ dy⊙w⊙x / D)·rstd³·x (row dot in double), dw += Σ_rows dy⊙x·rstd;
     * dx or dw may be NULL. All fp32. */
    void (*rmsnorm_bwd)(const float *x, const float *w, const float *rstd, const float *dy, float *dx, float *dw,
                        int64_t N, int64_t D);
    /* RoPE (Su et al. 2021), HF rotate_half convention, on x (N, n_heads·hd) with token
     * positions pos (N, host): fwd y = rot(θ) x (yb: bf16 copy or NULL; y may be NULL when yb is given);
     * bwd dx += rot(−θ) dy, or dx = rot(−θ) dy with write 1 (a gradient not yet started: no zero fill). */
    void (*rope_fwd)(const float *x, float *y, bf16 *yb, int64_t N, int n_heads, const rope_table *rt,
                     const int32_t *pos);
    void (*rope_bwd)(const float *dy, float *dx, int64_t N, int n_heads, const rope_table *rt, const int32_t *pos,
                     int write);
    /* Causal GQA attention (Ainslie et al. 2023), scale 1/sqrt(hd): o (B*T, H*hd) fp32
     * (ob: bf16 copy or NULL) = softmax(q kᵀ · scale, masked) v. Scratch from ctx's arena. */
    void (*attention_fwd)(struct ag_ctx *ctx, ag_attn *a, float *o, bf16 *ob);
    /* Its backward from dob = dL/do as GEMM operand (same dtype as q): dq, dk, dv (fp32,
     * accumulated into, or with write 1 written: gradients not yet started, no zero fill; each may be NULL),
     * probabilities recomputed bit-identically from rmax/rinv (Dao et al. 2022). */
    void (*attention_bwd)(struct ag_ctx *ctx, const ag_attn *a, const void *dob, float *dq, float *dk, float *dv,
                          int write);
    /* KV-cached attention of model/llama_infer.c: out (n, H*hd) fp32. Scratch from ctx's arena. */
    void (*attention_cached)(struct ag_ctx *ctx, const ag_attn_cached *a, float *out);
    /* SwiGLU (Shazeer 2020): y = silu(g)·u = g/(1+exp(−g))·u, g u y (n) fp32; yb, gb, ub bf16
     * copies of y, g, u or NULL; y may be NULL when yb is given. exp is autograd/exp_poly.h's. */
    void (*swiglu_fwd)(const float *g, const float *u, float *y, bf16 *yb, bf16 *gb, bf16 *ub, int64_t n);
    /* dg += dy·u·(σ + g σ (1−σ)), du += dy·g σ with σ = 1/(1+exp(−g)); g and u (n) bf16 when
     * is_bf16 else fp32; dg or du may be NULL. write 1: dg and du are written (=) instead, their old
     * contents never read (a gradient not started yet: no zero fill, no read of zeros). write 2: as 1,
     * but dg and du point to bf16 arrays (n) and the values are stored rounded to bf16 (nearest even):
     * gradients only read as bf16 GEMM operands (autograd/ops.c glu_backward). */
    void (*swiglu_bwd)(const void *g, const void *u, int is_bf16, const float *dy, float *dg, float *du, int64_t n,
                       int write);
    /* GeGLU with the tanh GELU (Shazeer 2020; Gemma's gelu_pytorch_tanh, torch's gelu(approximate="tanh")):
     * y = gelu(g)·u, gelu(g) = 0.5·g·(1 + tanh(√(2/π)·(g + 0.044715·g³))) (libm tanhf); arguments as swiglu_fwd.
     * bwd: dg += dy·u·gelu'(g) with torch's formula (0.5·(1+t) + 0.5·g·(1−t²)·√(2/π)·(1 + 3·0.044715·g²)),
     * du += dy·gelu(g); arguments (write included) as swiglu_bwd. */
    void (*geglu_fwd)(const float *g, const float *u, float *y, bf16 *yb, bf16 *gb, bf16 *ub, int64_t n);
    void (*geglu_bwd)(const void *g, const void *u, int is_bf16, const float *dy, float *dg, float *du, int64_t n,
                      int write);
    /* y = a + b; and its backward da += dy, db += dy (either NULL). fp32 (n). */
    void (*add)(const float *a, const float *b, float *y, int64_t n);
    void (*add_bwd)(const float *dy, float *da, float *db, int64_t n);
    /* y += alpha · x, fp32 (n). */
    void (*axpy)(float *y, float alpha, const float *x, int64_t n);
    /* column block of a row-major matrix: dst[i*ldd + j] = src[i*lds + j] (accumulate 0) or += it (1), for
     * i < rows, j < cols (data fp32; ldd, lds >= cols; dst and src do not overlap). A fused linear's output
     * split into q/k/v or gate/up (ops.h op_cols) and its gradient gathered back. */
    void (*copy_cols)(float *dst, int64_t ldd, const float *src, int64_t lds, int64_t rows, int64_t cols,
                      int accumulate);
    /* Chunked LM head + cross-entropy (128 rows of logits at a time), logits h Wᵀ, softmax
     * with exp_poly in fp32, lse = max + log Σ. For each row not skipped: loss += lse −
     * logit[target] (double); with dh, dlogits = scale·(softmax − onehot) and dh = dlogits W.
     * AG_CE_SAMPLED draws the target by inverting the softmax CDF at one 53-bit uniform
     * rng_u64(seed, CE_SAMPLE_STREAM, row) (autograd/ce_sampled.h). Returns the unscaled
     * summed loss; *count (non-NULL) the number of rows counted. Scratch from ctx's arena. */
    double (*lm_head_ce)(struct ag_ctx *ctx, const ag_ce_args *a, int64_t *count);
    /* AdamW element update of torch.optim.AdamW (optim/adamw.c has the sequence):
     * p, m, v updated in place from g, all (n) fp32; mask (n) u8 host or NULL. */
    void (*adamw_update)(float *p, const float *g, float *m, float *v, int64_t n, const uint8_t *mask,
                         const ag_adamw_coef *c);
    /* SophiaG element update (optim/sophia.c): p, m in place from g and h (n) fp32.
     * Returns the number of elements with |m| < ρ·bs·h (win-rate numerator). */
    int64_t (*sophia_update)(float *p, const float *g, float *m, const float *h, int64_t n, const uint8_t *mask,
                             const ag_sophia_coef *c);
    /* bitsandbytes' blockwise 8-bit AdamW on one parameter tensor (optim/adamw8bit.c has the sequence):
     * p (n) fp32 in place from g (n) fp32; the moments are codes q1, q2 (n) u8 into qmap1 (signed) and
     * qmap2 (unsigned) (256 fp32 each) scaled by absmax1, absmax2 (ceil(n / blocksize) fp32) per block:
     * dequantized, updated and quantized again through the maps' lookup tables lut1, lut2
     * (BW8_LUT_SIZE bytes each, quant/blockwise8.h). blocksize <= 4096. */
    void (*adamw8bit_update)(float *p, const float *g, uint8_t *q1, uint8_t *q2, float *absmax1, float *absmax2,
                             const float *qmap1, const float *qmap2, const uint8_t *lut1, const uint8_t *lut2,
                             int64_t n, int blocksize, const ag_adamw8bit_coef *c);
    /* bitsandbytes' 32-bit AdamW (the update it uses for tensors below min_8bit_size): p, m, v (n) fp32. */
    void (*adamw_bnb32_update)(float *p, const float *g, float *m, float *v, int64_t n, const ag_adamw8bit_coef *c);
    /* h = fma((1−β2)·ĝ, ĝ, h·β2), (n) fp32 (Sophia's Hessian EMA). */
    void (*sophia_hessian)(float *h, const float *ghat, int64_t n, float beta2_f, float one_minus_beta2_f);
    /* Σ x² of x (n) fp32 in double, over a chunking that depends on n only (optim/clip.c):
     * the same bits for any thread count. */
    double (*sum_squares)(const float *x, int64_t n);
    /* x = x · s, fp32 (n). */
    void (*scale)(float *x, int64_t n, float s);
    /* Number of NaN or ±Inf elements of x (n) fp32. */
    int64_t (*count_nonfinite)(const float *x, int64_t n);
    /* Backward of a trainable embedding (PEFT modules_to_save embed_tokens): dtable (V, D) fp32 +=
     * dx (n, D) fp32 scattered to rows ids[0..n) (host). Deterministic: the rows of each column are
     * added in token order (columns split over threads / one CUDA thread per column, no atomics).
     * Last in the table so positional tables (backend_cuda.cu) stay valid. */
    void (*embedding_bwd)(const float *dx, const int32_t *ids, int64_t n, int64_t D, float *dtable);

    /* ---- host offload (gradient_checkpointing: offload, autograd/tensor.h ag_checkpoint_offload) ---- */
    /* bytes of page-locked host memory (cuda: cudaHostAlloc, so a copy stream's DMA can run while the compute
     * stream works; the CPU tables: ordinary aligned host memory), 64-byte aligned; NULL when out of memory.
     * Host memory, but the host reads or writes it only after offload_wait of every copy touching it. */
    void *(*host_alloc)(size_t bytes);
    void (*host_free)(void *p); /* NULL is a no-op; waits for the copies touching p first */
    /* Start copying `bytes` from src to dst asynchronously: to_host 1: src data, dst host_alloc memory; 0: src
     * host_alloc memory, dst data. The copy begins after every call made before it (cuda: the compute stream's
     * work, then the copy on a second stream in issue order, so two copies of the same host buffer happen in
     * the order they were started) and may be under way until offload_wait(ticket); until then src must not
     * be written and dst not read. Returns the copy's ticket (> 0). cpu/cpu-ref copy at once; cpu-fenced
     * copies at the wait (the latest moment a device may) and fills an h2d destination with NaN meanwhile, so
     * a caller that breaks the rule gets other numbers. */
    uint64_t (*offload_start)(void *dst, const void *src, size_t bytes, int to_host);
    /* Every call after this one runs after the copy of `ticket` (and of every ticket before it) completed
     * (cuda: the compute stream waits for the copy stream's event; the host does not block). */
    void (*offload_wait)(uint64_t ticket);

    /* ---- fp16 mode (axolotl fp16: true; autograd/tensor.h ctx->fp16) ---- */
    /* dst[i] = src[i] rounded to the nearest IEEE binary16 value (ties to even) and widened back to fp32
     * (core/bf16.h f32_round_f16, bit for bit): overflow to ±inf, NaN kept, subnormals as binary16 has
     * them. src == dst allowed. fp32 (n) data. Last in the table so positional tables stay valid. */
    void (*round_f16)(const float *src, float *dst, int64_t n);
} ag_backend;

/* The backend named `name` ("cpu", "cpu-ref", ...), or NULL when it is not
 * built into this binary or cannot run on this machine. */
const ag_backend *ag_backend_find(const char *name);

/* Every backend name the code knows, built or not (NULL-terminated): the
 * list tests/test_backend_ops.c walks, printing SKIPPED for the missing. */
extern const char *const ag_backend_names[];

/* The process's backend: QLORA_BACKEND when set and available, else `cpu`
 * (a set but unavailable name is reported once on stderr). Every ag_ctx and
 * optimizer state starts with it. */
const ag_backend *ag_backend_default(void);

/* Make be the process's backend (the trainer's `device:` key, trainer/run.c setup_device), before
 * any context, adapter set or optimizer state is created on the old one. */
void ag_backend_set_default(const ag_backend *be);

/* The two CPU tables (autograd/backend_cpu.c, autograd/backend_cpu_ref.c). */
extern const ag_backend ag_backend_cpu;
extern const ag_backend ag_backend_cpu_ref;
/* `cpu-fenced` (autograd/backend_fenced.c): the `cpu` kernels with data memory the host cannot
 * touch outside the table (PROT_NONE between calls) and every "data" argument checked to be its
 * memory: a CPU run that keeps a device backend's memory rules, or stops naming the code that
 * does not. */
extern const ag_backend ag_backend_cpu_fenced;
/* cpu-fenced's data memory: bytes allocated now (*live) and the high-water mark since the last reset
 * (*peak); reset 1 sets the mark to the live bytes. Either pointer may be NULL. The device memory a run on a
 * device backend would hold (its arenas, scratch, adapters), measured without a device. */
void ag_backend_fenced_mem(size_t *live, size_t *peak, int reset);
/* 1 when the `cpu` table's vector path is compiled in and this processor runs it. */
int ag_backend_cpu_vector_ok(void);
/* Scratch bytes (activation arena) one attention call of the `cpu` table takes, forward or backward,
 * whichever is larger, at micro-batch B, sequence length T, H query and KVH key/value heads, head_dim hd,
 * bf16 operands or fp32, on n_threads threads: per-thread packs and score tiles, plus (B·KVH < 8, where
 * each head of the backward is a task of its own) per-head fp32 dKᵀ, dVᵀ partials of B·H·2·hd·T' values
 * (T' = T rounded up to 64). For the memory planner. */
size_t ag_cpu_attention_scratch_bytes(int B, int T, int H, int KVH, int hd, int use_bf16, int n_threads);

/* The CUDA table (autograd/backend_cuda.cu), defined only in a build with the
 * backend (`make CUDA=1`, or nvcc found: QLORA_CUDA is defined then). Its
 * data memory is device memory; ag_backend_find("cuda") returns it only when
 * ag_backend_cuda_available() says a device is present and the backend
 * initialised (stream, cuBLASLt, pinned staging). */
#ifdef QLORA_CUDA
extern const ag_backend ag_backend_cuda;
int ag_backend_cuda_available(void);
#endif

/* The CUDA device's name ("NVIDIA H100 80GB HBM3 (sm_90, 132 SMs)") into buf and its memory in
 * bytes (mem_bytes may be NULL); -1 without a device or without the backend in this binary. */
int ag_backend_cuda_device_name(char *buf, size_t n, double *mem_bytes);

/* Free and total device memory in bytes (cudaMemGetInfo); -1 without a device or backend. */
int ag_backend_cuda_mem_info(double *free_bytes, double *total_bytes);

/* 1 when this binary has the CUDA backend compiled in (whether or not a device is present). */
int ag_backend_cuda_built(void);

#endif
