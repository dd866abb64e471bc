/* model/llama.h — a Llama-family causal LM held for QLoRA training.
 *
 * Architecture as HF transformers' modeling_llama.py: embed → N × [RMSNorm →
 * attention (RoPE rotate_half, GQA) → residual → RMSNorm → SwiGLU MLP →
 * residual] → RMSNorm → LM head. The seven linears of each block are frozen and
 * stored NF4 (bitsandbytes layout, blocksize 64, optional double quant) or bf16
 * (`load_in_4bit: false`); embeddings and the LM head stay bf16 and norms fp32,
 * as QLoRA does. Weights are kept in HF orientation and HF row order: the
 * GGUF converter's Q/K row permutation is undone at load
 * (convert_hf_to_gguf.py LlamaModel.permute; docs/formats.md §3).
 */
#ifndef QLORA_MODEL_LLAMA_H
#define QLORA_MODEL_LLAMA_H

#include <stdint.h>

#include "autograd/ops.h"
#include "core/status.h"
#include "format/gguf.h"
#include "model/llama_linear.h" /* LLAMA_Q .. LLAMA_DOWN, their names and the order contract */

struct comm;        /* comm/comm.h */
struct llama_fsdp;  /* model/llama_fsdp.h */


/* RoPE frequency scaling (HF modeling_rope_utils.py ROPE_INIT_FUNCTIONS; llama.cpp's
 * rope_freqs / freq_scale). Each maps the default inverse frequencies
 * inv_freq[i] = 1/theta^(2i/head_dim) of the head_dim/2 rotated pairs to new ones
 * (llama_rope_inv_freq); attention itself is unchanged (attention_factor 1). */
#define LLAMA_ROPE_MAX_PAIRS 256 /* head_dim <= 512 */
typedef enum llama_rope_type {
    LLAMA_ROPE_DEFAULT = 0,  /* no scaling */
    LLAMA_ROPE_LINEAR,       /* inv_freq / factor (HF "linear"; GGUF rope.scaling.type "linear") */
    LLAMA_ROPE_LLAMA3,       /* HF "llama3" (_compute_llama3_parameters): Llama 3.1 / 3.2 */
    LLAMA_ROPE_FREQ_FACTORS, /* GGUF rope_freqs.weight: inv_freq / freq_factors[i] / factor (llama.cpp
                              * ggml_rope_ext's freq_factors and freq_scale = 1/factor); the converter's
                              * form of llama3 scaling */
} llama_rope_type;

typedef struct llama_rope_scaling {
    llama_rope_type type;
    float factor;                              /* LINEAR, LLAMA3, FREQ_FACTORS (1 = none) */
    float low_freq_factor, high_freq_factor;   /* LLAMA3 */
    int original_context;                      /* LLAMA3: original_max_position_embeddings */
    float freq_factors[LLAMA_ROPE_MAX_PAIRS];  /* FREQ_FACTORS: (head_dim/2), finite, > 0 */
} llama_rope_scaling;

/* Architectures: the Llama block, and what differs from it. */
typedef enum llama_arch {
    LLAMA_ARCH_LLAMA = 0, /* Llama 1-3, Mistral, SmolLM (GGUF "llama"; HF "llama", "mistral") */
    LLAMA_ARCH_QWEN2,     /* Qwen2 / Qwen2.5 (GGUF "qwen2", HF "qwen2"): q/k/v biases; GGUF Q/K rows in HF order
                           * (llama.cpp's NEOX RoPE is HF's rotate_half: the converter does not permute) */
    LLAMA_ARCH_PHI3,      /* Phi-3 mini (GGUF "phi3", HF "phi3", modeling_phi3.py): the Llama block with fused
                           * qkv_proj and gate_up_proj (llama_linears_phi3); NEOX RoPE, so no Q/K permutation */
    LLAMA_ARCH_GEMMA3,    /* Gemma 3 text (GGUF "gemma3"; transformers modeling_gemma3.py Gemma3DecoderLayer, llama.cpp
                           * src/models/gemma3.cpp): embeddings × √d, QK-norm (RMSNorm over each head), sandwich norms
                           * (post-attention, pre- and post-feed-forward), GeGLU with the tanh GELU, sliding-window
                           * layers with their own RoPE base, tied head; NEOX RoPE, no Q/K permutation. The GGUF
                           * converter adds Gemma's +1 to every norm weight (conversion/gemma.py norm_shift), so the
                           * norms are plain RMSNorms of the stored weights */
} llama_arch;

/* The GGUF general.architecture of arch ("llama", "qwen2", "phi3"), also its key prefix. */
const char *llama_arch_name(llama_arch arch);

typedef struct llama_hparams {
    llama_arch arch;
    int qkv_bias;            /* 1: q_proj, k_proj, v_proj carry a frozen bias (Qwen2) */
    int n_layer, d_model, n_head, n_kv_head, head_dim, d_ff, vocab, context_length;
    float rope_theta, rms_eps;
    int tied_embeddings;
    llama_rope_scaling rope_scaling;
    /* Sliding-window attention (Mistral v0.1's 4096; HF sliding_window, GGUF <arch>.attention.sliding_window),
     * 0 = none. Not implemented as a mask: for rows of at most sliding_window tokens it is the plain causal
     * mask (HF masks key j for query i when i - j >= sliding_window), so longer sequences are refused
     * (trainer/run.c sequence_len, qlora-generate's context). */
    int sliding_window;
    /* Gemma 3 (LLAMA_ARCH_GEMMA3; all 0 for the other architectures): */
    int qk_norm;             /* q and k RMS-normalised per head (weights (head_dim)) before RoPE */
    int post_norms;          /* RMSNorm on the attention output and on the MLP output before each residual add */
    int act_geglu;           /* MLP activation gelu_pytorch_tanh(gate) · up instead of silu(gate) · up */
    float embed_scale;       /* 0: none; else the embedding rows are multiplied by it (Gemma: √d_model in fp32,
                              * as llama.cpp's ggml_scale; transformers rounds it to the weights' dtype) */
    int swa_pattern;         /* sliding_window > 0: layer l is a sliding (local) layer when l % swa_pattern <
                              * swa_pattern - 1 (llama.cpp set_swa_pattern; HF layer_types); 0: every layer */
    float rope_theta_local;  /* RoPE base of the sliding layers (Gemma 3: 10000; HF rope_local_base_freq, GGUF
                              * <arch>.rope.freq_base_swa); 0: rope_theta */
    int window_mask;         /* 1: sliding_window is applied as a mask in attention (Gemma 3); 0: it is not, and
                              * rows longer than it are refused (Mistral, Phi-3) */
} llama_hparams;

/* The sliding window of layer l (0: full causal attention). */
int llama_layer_window(const llama_hparams *hp, int l);

/* The linear-module name table of hp's architecture: llama_linears_phi3 for
 * Phi-3, llama_linears otherwise (model/llama_linear.h). */
const llama_linear_name *llama_hparams_linears(const llama_hparams *hp);

/* 1 when slot k (LLAMA_Q .. LLAMA_DOWN) holds a linear in hp's architecture
 * (0: a slot a fused linear took over: Phi-3's k, v and up). */
int llama_linear_present(const llama_hparams *hp, int k);

/* llama_rope_inv_freq: the RoPE inverse frequencies (head_dim/2, fp32, radians
 * per position) of hp: the default 1/theta^(2i/d) (autograd/ops.h
 * rope_default_inv_freq) scaled as hp->rope_scaling says. LLAMA3 follows
 * transformers' _compute_llama3_parameters operation for operation in fp32:
 * wavelen = 2π/inv_freq; wavelen > original/low_freq_factor: inv_freq/factor;
 * wavelen < original/high_freq_factor: unchanged; between: (1-s)·inv/factor +
 * s·inv with s = (original/wavelen - low)/(high - low). */
void llama_rope_inv_freq(const llama_hparams *hp, float *inv_freq);

/* llama_rope_init: the model's RoPE cos/sin table for max_pos positions from
 * llama_rope_inv_freq (every loader and test builds its table here).
 * Errors (-1): out of memory. */
int llama_rope_init(rope_table *t, const llama_hparams *hp, int max_pos, qerr *e);
/* llama_rope_local_init: the sliding layers' table (default frequencies at hp->rope_theta_local) when that
 * base is set and differs from rope_theta; else t is left empty (cos NULL: the layers use the global table).
 * Errors (-1): out of memory. */
int llama_rope_local_init(rope_table *t, const llama_hparams *hp, int max_pos, qerr *e);

/* llama_rope_llama3_of_factors: the llama3 parameters (HF rope_scaling) that
 * reproduce hp's FREQ_FACTORS (a GGUF's rope_freqs, as convert_hf_to_gguf.py
 * computes them from llama3 parameters), for a merged model's config.json.
 * low_freq_factor is taken as 1 (Llama 3.1/3.2) and the rest solved from the
 * smoothed pairs; the result is accepted only when it reproduces every
 * factor to 1e-5 relative. Errors (-1): the factors are not llama3's (or too
 * few pairs lie in the smoothed band to determine them). */
int llama_rope_llama3_of_factors(const llama_hparams *hp, llama_rope_scaling *out, qerr *e);

/* The roles of the base model's tensors (model/base.h base_model_tensor_f32,
 * model/hf.c), with their shapes from the hyper-parameters. */
typedef enum llama_role {
    LLAMA_T_EMBED = 0, /* (V, D) model.embed_tokens / token_embd */
    LLAMA_T_LM_HEAD,   /* (V, D) lm_head / output (== embed when tied) */
    LLAMA_T_OUT_NORM,  /* (D) model.norm / output_norm */
    LLAMA_T_ATTN_NORM, /* (D) layers.N.input_layernorm / blk.N.attn_norm */
    LLAMA_T_FFN_NORM,  /* (D) layers.N.post_attention_layernorm / blk.N.ffn_norm */
    LLAMA_T_LINEAR,    /* layers.N.{self_attn,mlp}.<module> (out, in) */
    LLAMA_T_BIAS,      /* (out) layers.N.self_attn.{q,k,v}_proj.bias / blk.N.attn_{q,k,v}.bias (hp->qkv_bias) */
} llama_role;

/* Shape (rows, cols) of a role's tensor (cols = 1 for norms and biases: rows =
 * D or out); module indexes the LLAMA_Q..LLAMA_DOWN enum for LLAMA_T_LINEAR
 * and LLAMA_T_BIAS. Phi-3: LLAMA_Q is qkv_proj (H*hd + 2*KVH*hd, D), LLAMA_GATE
 * gate_up_proj (2F, D), and the absent slots K, V, UP are (0, 0). */
void llama_tensor_shape(const llama_hparams *hp, llama_role role, int module, int64_t *rows, int64_t *cols);

/* ---- The frozen linears of one layer in one allocation (the layer blob) ----
 *
 * The seven linears of a layer live in ONE allocation owned by the layer
 * (llama_layer.blob), so that a layer can be sent, gathered or cut into shards
 * as a unit (FSDP FULL_SHARD, docs/design.md). Each linear's nf4_tensor (or
 * bf16 pointer) is a view into it (nf4_view: no ownership).
 *
 * Layer element space. The linears' weights, each flattened row-major as
 * nn.Linear.weight, are laid end to end in module order q, k, v, o, gate, up,
 * down: linear k holds elements [elem[k], elem[k] + rows_k*cols_k), and
 * elem[k+1] = elem[k] + nblocks_k * blocksize with nblocks_k =
 * ceil(rows_k*cols_k / blocksize), so every linear starts on a block boundary
 * (the pad of a partial last block is zero bytes nobody reads; no Llama shape
 * has one). elem[7] is the layer's (padded) element count.
 *
 * NF4 blob, four sections in this order. DATA, SCALES and NESTED start at a
 * multiple of LLAMA_BLOB_ALIGN (64) bytes; OFFSETS follows NESTED directly.
 *   DATA     packed nibbles, 1/2 byte per element: element x in byte
 *            off[DATA] + x/2, the high nibble when x is even (quant/nf4.h).
 *   SCALES   one per block, in block order, for block x / blocksize: the u8
 *            absmax code (double_quant) or the f32 absmax; byte
 *            off[SCALES] + s * (x / blocksize), s = 1 or 4.
 *   NESTED   double_quant only: the f32 nested absmax of each group of 256
 *            blocks OF ONE LINEAR (groups restart at every linear; a linear's
 *            last group may hold fewer blocks): linear k's group j is float
 *            group[k] + j of the section.
 *   OFFSETS  double_quant only: linear k's f32 offset (its mean absmax) at
 *            off[OFFSETS] + 4k. The views hold copies (nf4_tensor.offset);
 *            llama_layer_seal writes them here, llama_layer_bind reads them back.
 * Not in the blob: each linear's geometry and its 1 KiB nested_code map
 * (nf4_dynamic_map() when qlora quantized it, the checkpoint's
 * nested_quant_map for an adopted bnb-4bit one); they are part of the views,
 * the same on every rank.
 * bf16 blob (load_in_4bit: false): DATA only, element x at off[DATA] + 2x.
 * int8 blob (load_in_8bit: true; bitsandbytes Int8Params, quant/int8.h): DATA
 *            the int8 codes CB, element x at off[DATA] + x; SCALES each
 *            linear's fp32 SCB (one per row), linear k's row r at
 *            off[SCALES] + 4 * (row[k] + r). No NESTED, no OFFSETS. Not split
 *            (llama_layer_range_bytes refuses it: FULL_SHARD of an int8 base is
 *            not implemented).
 * The blob's size is the payload nf4_nbytes counts (or 2 bytes per element)
 * plus the zero gaps that align SCALES and NESTED and pad partial blocks:
 * none for SmolLM2-135M or Llama-2-7B (their sections are multiples of 64 B).
 *
 * Splitting (llama_layer_range_bytes). An element range [x0, x1) of the layer,
 * x0 and x1 multiples of blocksize (64), a cut inside a linear or at its edge,
 * needs one contiguous byte range per section:
 *   DATA     [x0/2, x1/2) (bf16: [2*x0, 2*x1)) from off[DATA]
 *   SCALES   [s*x0/bs, s*x1/bs) from off[SCALES]
 *   NESTED   the groups holding blocks x0/bs .. x1/bs - 1, 4 bytes each
 *   OFFSETS  the linears holding elements x0 .. x1 - 1, 4 bytes each (and, when x1
 *            ends a linear, the empty slots right after it: Phi-3's k, v, up)
 * For cuts 0 = c_0 < c_1 < ... < c_W = elem[7] at multiples of blocksize, the
 * DATA and SCALES ranges of the W shards are disjoint and tile their
 * sections: split anywhere on a 64-element boundary. NESTED ranges are
 * disjoint only where each cut lies on a group boundary of its linear (c =
 * elem[k] + j * 256 * blocksize, i.e. a multiple of 16384 elements into a
 * linear, or a linear's edge); any other cut puts the group it splits (4
 * bytes) in both neighbours' ranges. A cut inside a linear puts its offset (4
 * bytes) in both. Overlapping bytes are copies of the same values, so writing
 * every shard's ranges into one zeroed blob rebuilds the original byte for
 * byte (tests/test_layer.c).
 */
#define LLAMA_BLOB_ALIGN 64

typedef enum llama_blob_section {
    LLAMA_BLOB_DATA = 0, LLAMA_BLOB_SCALES, LLAMA_BLOB_NESTED, LLAMA_BLOB_OFFSETS, LLAMA_BLOB_N_SECTIONS
} llama_blob_section;

typedef struct llama_layer_layout {
    frozen_kind kind;                   /* FROZEN_NF4, FROZEN_BF16 or FROZEN_INT8 */
    int blocksize;                      /* elements per NF4 block (64); for bf16 only the element-space padding */
    int double_quant;                   /* NF4: absmax as u8 codes + nested absmax + offset */
    int64_t rows[LLAMA_N_LINEAR], cols[LLAMA_N_LINEAR]; /* each linear's [out, in] */
    int64_t elem[LLAMA_N_LINEAR + 1];   /* layer element space (above); elem[7] = padded total */
    int64_t group[LLAMA_N_LINEAR + 1];  /* nested-absmax groups of the linears before k (double_quant) */
    int64_t row[LLAMA_N_LINEAR + 1];    /* rows of the linears before k (FROZEN_INT8: SCB index) */
    size_t off[LLAMA_BLOB_N_SECTIONS];  /* byte offset of each section in the blob */
    size_t len[LLAMA_BLOB_N_SECTIONS];  /* byte length of each section (0: absent) */
    size_t nbytes;                      /* blob size: the end of its last section */
} llama_layer_layout;

/* A byte range [off, off + len) of a layer blob. */
typedef struct llama_byte_range {
    size_t off, len;
} llama_byte_range;

typedef struct llama_layer {
    float *attn_norm, *ffn_norm;        /* (D) fp32 */
    float *q_norm, *k_norm;             /* (head_dim) fp32 (hp.qk_norm), else NULL */
    float *post_attn_norm, *post_ffn_norm; /* (D) fp32 (hp.post_norms), else NULL */
    float *bias[LLAMA_N_LINEAR];        /* (out) fp32 frozen bias of q/k/v (hp.qkv_bias), else NULL; lin[k].bias
                                         * points here (not part of the blob, as the norms) */
    frozen_weight lin[LLAMA_N_LINEAR];  /* q (H*hd, D), k/v (KVH*hd, D), o (D, H*hd), gate/up (F, D), down (D, F) */
    nf4_tensor nf4[LLAMA_N_LINEAR];     /* when quantized: views into blob (or, in a layer built by hand
                                         * without a blob, tensors owning their buffers) */
    bf16 *w_bf16[LLAMA_N_LINEAR];       /* when bf16: views into blob (rows, cols) */
    uint8_t *blob;                      /* owned: the seven linears' storage, laid out as `layout`;
                                         * LLAMA_BLOB_ALIGN-aligned, layout.nbytes bytes */
    llama_layer_layout layout;
} llama_layer;

/* llama_layer_layout_init: the blob layout (above) of one layer of a model
 * with hyper-parameters hp, its linears stored as kind (FROZEN_NF4 with
 * blocksize, a power of two in [32, 4096], and double_quant; or FROZEN_BF16
 * or FROZEN_INT8, whose element space is padded to blocksize too).
 * Errors (-1): a kind other than those three, a bad blocksize or shape. */
int llama_layer_layout_init(llama_layer_layout *lo, const llama_hparams *hp, frozen_kind kind, int blocksize,
                            int double_quant, qerr *e);

/* llama_layer_alloc: give L a zeroed blob laid out as *lo and point its
 * views at it: L->nf4[k] (nf4_view: nested_code = nf4_dynamic_map(), offset
 * 0) or L->w_bf16[k], and L->lin[k] (out, in, kind, storage). The loader then
 * fills the linears in place (nf4_quantize_into, bf16 conversion, or a
 * checkpoint's bytes) and calls llama_layer_seal. Norms are untouched.
 * Errors (-1; L->blob NULL, L->nf4 and L->lin zeroed): out of memory, a
 * geometry nf4_view refuses. */
int llama_layer_alloc(llama_layer *L, const llama_layer_layout *lo, qerr *e);

/* llama_layer_views: as llama_layer_alloc, with the caller's blob (laid out
 * as *lo, not owned by L: L->blob is set to it; a sharded layer's views are
 * bound to a gather scratch this way, model/llama_fsdp.c). Errors (-1): a
 * geometry nf4_view refuses. */
int llama_layer_views(llama_layer *L, const llama_layer_layout *lo, uint8_t *blob, qerr *e);

/* llama_layer_seal: copy the double-quant offset of every NF4 view into the
 * blob's OFFSETS section (the blob's own copy, which shards carry). Call once
 * the linears are filled. No-op without double quantization. */
void llama_layer_seal(llama_layer *L);

/* llama_layer_bind: point L's views (nf4[k] buffers, w_bf16[k], lin[k]) at
 * blob, a buffer laid out as L->layout (e.g. a layer gathered from shards),
 * reading each double-quant offset from blob's OFFSETS section; geometry and
 * nested_code maps stay as they are. Sets L->blob = blob: the caller keeps
 * ownership of what it binds (llama_free frees the blob of a loaded model's
 * layers). */
void llama_layer_bind(llama_layer *L, uint8_t *blob);

/* llama_layer_range_bytes: the byte ranges of a layer blob laid out as *lo
 * that element range [x0, x1) of the layer element space needs, one per
 * section (out[LLAMA_BLOB_DATA] ... out[LLAMA_BLOB_OFFSETS]; len 0 for an
 * absent section or an empty range). Linear k's own elements [i, j) are
 * [lo->elem[k] + i, lo->elem[k] + j), with j = rows*cols rounded up to
 * lo->elem[k+1]. What can be split where: see the layout comment above.
 * Errors (-1): x0 or x1 not a multiple of blocksize, x0 > x1, x1 > elem[7]. */
int llama_layer_range_bytes(const llama_layer_layout *lo, int64_t x0, int64_t x1,
                            llama_byte_range out[LLAMA_BLOB_N_SECTIONS], qerr *e);

typedef struct llama_model {
    llama_hparams hp;
    bf16 *tok_embd;          /* (V, D) bf16 */
    bf16 *lm_head_w;         /* (V, D) bf16, == tok_embd when tied */
    frozen_weight embed, lm_head;
    float *out_norm;         /* (D) fp32 */
    llama_layer *layers;     /* n_layer */
    int load_in_4bit, double_quant;
    int load_in_8bit;            /* 1: the frozen linears are bitsandbytes int8 (FROZEN_INT8) */
    int64_t n_quantized_params;  /* elements of the frozen linears */
    int64_t quantized_bytes;     /* bytes holding them: the layers' blobs (layout.nbytes) */
    int64_t n_params;            /* all base parameters */
    rope_table rope;
    rope_table rope_local;       /* the sliding layers' table when hp.rope_theta_local is set (Gemma 3); else empty */
    struct llama_fsdp *fsdp;     /* FULL_SHARD: the layers' linears are sharded over the ranks and gathered
                                  * per layer (model/llama_fsdp.h); NULL: every layer owns its blob */
    struct llama_grad_buckets *grad_buckets; /* several ranks: per-layer gradient buckets, each reduced as soon as
                                  * its layer's backward is done (model/llama_fsdp.h); NULL: none */
} llama_model;

/* Read hyper-parameters from GGUF metadata (`llama.*` keys), checked with
 * llama_hparams_check. RoPE scaling: the tensor rope_freqs.weight (F32,
 * head_dim/2 factors: llama3 scaling as convert_hf_to_gguf.py writes it) and
 * llama.rope.scaling.factor (or the older llama.rope.scale_linear; linear
 * interpolation, applied whatever the type, as llama.cpp does) go into
 * hp->rope_scaling. Also
 * llama_hparams_check. Keys and tensors that change the maths and are not
 * implemented are refused by name: llama.rope.scaling.type other than
 * none/linear (yarn, longrope, ...), an attention factor other than 1, logit soft-capping, a sliding
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

/* How the frozen linears are held: the `load_in_4bit` argument of the loaders
 * (llama_load_gguf, hf_model_load, base_model_load) takes one of these; 0 and
 * 1 keep their old meaning (bf16, NF4). */
enum { LLAMA_BASE_BF16 = 0, LLAMA_BASE_NF4 = 1, LLAMA_BASE_INT8 = 2 };

/* The frozen_kind of a LLAMA_BASE_* value. */
static inline frozen_kind llama_base_kind(int base) {
    return base == LLAMA_BASE_INT8 ? FROZEN_INT8 : base ? FROZEN_NF4 : FROZEN_BF16;
}

/* Load the base model from an open GGUF: dequantize each tensor from its GGUF
 * type, un-permute Q/K rows, and store the linears as NF4 (load_in_4bit ==
 * LLAMA_BASE_NF4, blocksize 64), int8 (LLAMA_BASE_INT8: bitsandbytes
 * Int8Params, quant/int8.h) or bf16, each layer's in one blob (llama_layer_layout). One
 * layer is dequantized at a time; the fp32 copy never exists whole.
 * max_pos bounds the RoPE table (≥ sequence_len). */
int llama_load_gguf(const gguf_file *f, int load_in_4bit, int double_quant, int max_pos,
                    llama_model *m, qerr *e);
/* llama_load_gguf_sharded: llama_load_gguf, and with c (FULL_SHARD) the frozen
 * linears sharded over c's ranks (model/llama_fsdp.h): this rank reads,
 * dequantizes and quantizes only its ranges of each layer; embeddings, the LM
 * head, norms and biases are replicated. m->fsdp owns the shards. c NULL:
 * llama_load_gguf. Collective only in that every rank must call it. */
int llama_load_gguf_sharded(const gguf_file *f, int load_in_4bit, int double_quant, int max_pos, struct comm *c,
                            llama_model *m, qerr *e);
/* llama_free: release everything the model holds (each layer's blob, or the
 * nf4 tensors that own their buffers in a layer built without one) and zero *m. */
void llama_free(llama_model *m);

/* Invert the GGUF Q/K permutation for one (n_head*hd, in) matrix, in place.
 * GGUF row h·hd + 2i + j holds HF row h·hd + j·hd/2 + i. */
void llama_unpermute_rows(float *w, int n_head, int head_dim, int64_t in);

/* ---- LoRA adapters over the model, in one flat fp32 arena ----
 * params, grads and the optimizer's moments (optim/) are flat fp32 arrays of
 * n_params elements, all with one layout: per layer, per targeted module in
 * the LLAMA_Q..LLAMA_DOWN order, lora_A (r, in) then lora_B (out, r), each
 * row-major as PEFT stores them (checkpoints and adapters rely on this
 * order). Layer l's parameters are the contiguous bucket
 * [layer_offset[l], layer_offset[l+1]) of every one of these arrays: the unit
 * a gradient reduction or an optimizer shard works on per layer. */
/* PEFT's modules_to_save for a Llama: trainable full copies of the input embedding and/or the LM
 * head (peft/utils/other.py ModulesToSaveWrapper), in the flat arrays after the layers. */
enum { LORA_SAVE_EMBED = 0, LORA_SAVE_LM_HEAD = 1, LORA_N_SAVE = 2 };

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
    int64_t *layer_offset;       /* (n_layer + 1) layer l = [layer_offset[l], layer_offset[l+1]);
                                  * layer_offset[0] = 0, layer_offset[n_layer] = n_params when no module is
                                  * saved, else the start of the saved copies */
    int save[LORA_N_SAVE];       /* modules_to_save: 1 = embed_tokens / lm_head is a trainable copy */
    int64_t save_offset[LORA_N_SAVE]; /* start of the copy (V, D) row-major in params/grads, or -1;
                                  * embed_tokens first, then lm_head, after every layer */
    tensor save_t[LORA_N_SAVE];  /* (V, D) fp32 leaves into params/grads */
    frozen_weight save_w[LORA_N_SAVE]; /* FROZEN_F32 views of the copies (the GEMM/lookup operand) */
    tensor *A, *B;               /* (n_layer * LLAMA_N_LINEAR) leaf tensors into params/grads */
    lora_adapter *ad;            /* (n_layer * LLAMA_N_LINEAR) */
    const struct ag_backend *be; /* params/grads are this backend's data memory; NULL: host memory */
} lora_set;

/* Create adapters with PEFT's default init: A ~ kaiming_uniform(a=√5) =
 * U(−1/√in, 1/√in), B = 0 (peft tuners/lora/layer.py reset_lora_parameters),
 * drawn from the counter-based RNG with `seed` (same values for any thread count). */
int lora_set_init(lora_set *ls, const llama_model *m, int r, float alpha, float dropout, int use_rslora,
                  const int target[LLAMA_N_LINEAR], uint64_t seed, qerr *e);
/* The same with params and grads in backend be's data memory (be->alloc; the initial values
 * computed on the host and uploaded with copy_h2d): what a training context on be reads. Host
 * code then reaches the values only through lora_set_params_host. be NULL = lora_set_init. */
int lora_set_init_backend(lora_set *ls, const struct ag_backend *be, const llama_model *m, int r, float alpha,
                          float dropout, int use_rslora, const int target[LLAMA_N_LINEAR], uint64_t seed, qerr *e);
/* lora_set_init_backend, and for each save[k] set (NULL = none) a trainable full copy of the
 * model's embedding (LORA_SAVE_EMBED) / LM head (LORA_SAVE_LM_HEAD), fp32, initialised to the
 * base's bf16 values exactly (PEFT deep-copies the module; prepare_model_for_kbit_training has
 * cast it to fp32). A tied model gets two independent copies when both are saved (PEFT 0.21's
 * default ensure_weight_tying=False: modules_to_tie is not set, each wrapper copies its module).
 * A model whose table is FROZEN_F32 with w_f32 NULL (a dims-only skeleton, model/adapter.c) leaves
 * that copy zero. Errors: out of memory. */
int lora_set_init_saved(lora_set *ls, const struct ag_backend *be, const llama_model *m, int r, float alpha,
                        float dropout, int use_rslora, const int target[LLAMA_N_LINEAR],
                        const int save[LORA_N_SAVE], uint64_t seed, qerr *e);
/* The embedding / LM head the forward pass reads: ls's trainable copy when it has one, else the model's. */
const frozen_weight *lora_set_embed(const lora_set *ls, const llama_model *m);
const frozen_weight *lora_set_lm_head(const lora_set *ls, const llama_model *m);
/* A host-readable view of an array of ls->n_params floats in ls's memory (params, grads, or an
 * optimizer moment of the same backend): `arr` itself when that memory is host memory, else a
 * malloc'd copy (copy_d2h) the caller frees with lora_set_host_release. NULL (e set) when out of
 * memory. */
const float *lora_set_params_host(const lora_set *ls, const float *arr, qerr *e);
void lora_set_host_release(const lora_set *ls, const float *arr, const float *host);
void lora_set_free(lora_set *ls);
/* The adapter of (layer, module), or NULL if that module is not targeted. */
const lora_adapter *lora_set_get(const lora_set *ls, int layer, int module);

/* One batch of B rows × T tokens (all arrays (B*T), row-major). */
typedef struct llama_batch {
    int B, T;
    const int32_t *input_ids, *targets, *position_ids, *seq_ids;
} llama_batch;

/* What a recorded forward pass keeps for backward (the `checkpointing` argument):
 *  LLAMA_CKPT_OFF        every block is an ag_segment: what its ops saved stays (bf16 GEMM
 *                        operands, SwiGLU's g and u, the residual, row statistics);
 *  LLAMA_CKPT_FULL       every block is an ag_checkpoint: only its fp32 input stays, the whole
 *                        block is recomputed in backward;
 *  LLAMA_CKPT_SELECTIVE  the attention half (norm, q/k/v, RoPE, attention, o, residual) is a
 *                        segment and the MLP half (norm, gate, up, SwiGLU, down, residual) is
 *                        checkpointed from the kept residual: backward recomputes the norm and
 *                        the gate and up GEMMs, never the attention.
 *  LLAMA_CKPT_OFFLOAD    LLAMA_CKPT_FULL with each block's input in host memory on a device
 *                        backend (ag_checkpoint_offload, autograd/tensor.h; axolotl's
 *                        gradient_checkpointing: offload); on a CPU backend LLAMA_CKPT_FULL.
 * The four give the same gradients (recomputation is deterministic: same kernels, same
 * dropout counters; offloading copies bits); tests/test_autograd.c and tests/test_offload.c
 * check it bit for bit. */
enum { LLAMA_CKPT_OFF = 0, LLAMA_CKPT_FULL = 1, LLAMA_CKPT_SELECTIVE = 2, LLAMA_CKPT_OFFLOAD = 3 };

/* Forward pass to the summed cross-entropy, recorded on ctx's tape when
 * ctx->recording. loss = scale · Σ CE over target tokens. checkpointing: one of
 * LLAMA_CKPT_* (above). ls may be NULL (base model only). */
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

/* The RoPE table of layer l: the local one for a sliding layer when the model has one, else m->rope. */
const rope_table *llama_layer_rope(const llama_model *m, int l);

/* The input embeddings of ids (n): rows of the frozen table (op_embedding), times hp.embed_scale when set
 * (Gemma: √d_model, fp32). (n, D) fp32, no gradient. */
tensor *llama_embed(ag_ctx *ctx, const llama_model *m, const int32_t *ids, int64_t n);

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
/* The same with the LM head of ls (its modules_to_save copy when it has one; ls may be NULL). */
void llama_logits_rows_ls(ag_ctx *ctx, const llama_model *m, const lora_set *ls, const tensor *h, int64_t row0,
                          int64_t n, float *out);

#endif
