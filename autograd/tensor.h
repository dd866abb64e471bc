/* autograd/tensor.h — tensors, the activation arena and the tape.
 *
 * A tensor is a shape, a dtype and a pointer; activations live in bump arenas
 * that are reset after every micro-batch and keep their chunks, so a training
 * step allocates nothing from malloc in steady state.
 *
 * Two arenas. The main (transient) arena holds op outputs and temporaries;
 * the keep arena holds tensor headers and what backward needs (each op saves
 * its own inputs there, in bf16 where they are only GEMM operands). A
 * segment (ag_segment: one transformer block recorded without checkpointing)
 * resets the main arena when it ends, so a block's intermediates do not stay
 * alive until backward: only what its ops saved does. In backward a segment
 * releases the gradients of its intermediates once it is done. The tape is a flat list of nodes, each with a
 * backward function; `ag_backward` walks it in reverse (reverse-mode AD as in
 * micrograd / PyTorch autograd, without a dynamic graph). Gradients are always
 * fp32. Parameters (LoRA A/B) are leaf tensors whose `grad` points into the
 * trainer's flat gradient arena, so the optimizer is one loop over it.
 *
 * Two kinds of memory. Tensor *data* (op outputs, saved activations,
 * gradients, kernel scratch) comes from the context's backend (ctx->be,
 * autograd/backend.h) through ag_alloc / ag_alloc_keep; what only the host
 * reads — tensor headers, the structs ops save for backward, the tape — is
 * host memory (ag_alloc_host / ag_alloc_host_keep, and the tape's array).
 * Each kind has a transient and a keep arena with the same lifetimes, and a
 * mark covers all four. On the CPU backends both kinds are host memory.
 */
#ifndef QLORA_AUTOGRAD_TENSOR_H
#define QLORA_AUTOGRAD_TENSOR_H

#include <stddef.h>
#include <stdint.h>

#include "core/bf16.h"
#include "core/status.h"

struct ag_backend;

typedef enum ag_dtype { AG_F32 = 0, AG_BF16 = 1, AG_I32 = 2 } ag_dtype;

typedef struct tensor {
    int ndim;
    int64_t shape[4];
    int64_t numel;
    ag_dtype dtype;
    void *data;
    float *grad;       /* fp32, numel; NULL until first accumulated (activations) */
    int requires_grad; /* gradient wanted for this tensor (param, or depends on one) */
    void *kept;        /* copy of data (same dtype) that survives the segment, or NULL */
    void *kept_bf16;   /* bf16 copy of data (GEMM operand, saved for backward), or NULL */
    float *kept_f16;   /* fp16 mode: data rounded to fp16, held as fp32 (the GEMM operand), or NULL */
    bf16 *grad_bf16;   /* the gradient held only as a bf16 GEMM operand (numel), instead of grad: written by
                        * op_glu's backward for a linear's output that only its linear reads back (ops.c) */
} tensor;

/* ---- arena: chunked bump allocator with mark/reset ---- */
typedef struct ag_arena_chunk {
    struct ag_arena_chunk *prev, *next; /* next: a chunk kept after a reset, reused before malloc */
    size_t size, used;
    unsigned char *mem;
} ag_arena_chunk;

typedef struct ag_arena {
    ag_arena_chunk *head;
    size_t chunk_size;
    size_t in_use, peak; /* bytes; ctx->arena.peak is the high-water mark of all four arenas together, and
                          * ctx->keep.peak that of the two data arenas (arena + keep) together */
    size_t reserved;     /* bytes of chunks held (touched or not) */
    const struct ag_backend *be; /* chunks from be->alloc (data); NULL: host memory */
} ag_arena;

typedef struct ag_arena_pos {
    ag_arena_chunk *chunk;
    size_t used;
    size_t in_use;
} ag_arena_pos;

typedef struct ag_mark {
    ag_arena_pos main, keep;           /* data */
    ag_arena_pos host, host_keep;      /* host */
} ag_mark;

/* ---- tape ---- */
struct ag_ctx;
struct ag_node;
typedef void (*ag_backward_fn)(struct ag_ctx *ctx, const struct ag_node *node);

typedef struct ag_node {
    ag_backward_fn backward;
    tensor *out;
    tensor *in[4];
    void *saved; /* op-specific, allocated in the arena */
} ag_node;

typedef struct ag_ctx {
    const struct ag_backend *be; /* kernels and data memory (autograd/backend.h) */
    ag_arena arena;     /* main (transient) data arena */
    ag_arena keep;      /* saved-for-backward data */
    ag_arena host;      /* transient host structs */
    ag_arena host_keep; /* tensor headers and saved-for-backward structs */
    ag_node *nodes;
    int64_t n_nodes, cap_nodes;
    int recording; /* 1: ops record backward nodes; 0: inference / checkpoint forward */
    int bf16;      /* 1: GEMM operands rounded to bf16 (fp32 accumulate); 0: fp32 GEMMs */
    int fp16;      /* with bf16 0: fp32 GEMMs whose operands are rounded to fp16 values first (axolotl's
                    * fp16: true; a product of two fp16 values is exact in fp32, so this is an fp16 GEMM with
                    * fp32 accumulation; overflow becomes inf, which the trainer's GradScaler sees) */
    int training;  /* 1: dropout active */
    int saving;    /* 1 inside a segment: ops copy what backward needs into the keep arena */
    int recomputing; /* 1 while a checkpoint's block runs again in backward (its output value is not read) */
    int f32_unread; /* set by the caller just before op_rmsnorm / op_rope / op_glu, which clear it: their
                     * output is read only as its bf16 copy (bf16 GEMM operands, attention), so in bf16 mode
                     * its fp32 data is not written (tensor data NULL; see autograd/ops.c) */
    uint64_t seed;  /* dropout stream seed for the current micro-batch */
    /* reusable scratch (backend memory) for dequantized frozen weights and block outputs */
    void *wscratch;
    size_t wscratch_size;
    void *ascratch;
    size_t ascratch_size;
    struct ag_offload *off; /* ag_checkpoint_offload's state (slots, host copies), created on first use */
} ag_ctx;

/* Initialise a context on the process's default backend (ag_backend_default)
 * with data arena chunks of at least chunk_bytes. Errors: out of memory. */
int ag_ctx_init(ag_ctx *ctx, size_t chunk_bytes, qerr *e);
/* The same on backend be. */
int ag_ctx_init_backend(ag_ctx *ctx, const struct ag_backend *be, size_t chunk_bytes, qerr *e);
void ag_ctx_free(ag_ctx *ctx);

/* Data arena allocation (64-byte aligned, backend memory). Aborts with a
 * message on out-of-memory: activations are sized from the config, and the
 * predicted peak is printed before training, so an OOM here is not
 * recoverable input. */
void *ag_alloc(ag_ctx *ctx, size_t bytes);
/* Data allocation that outlives the current segment (saved for backward). */
void *ag_alloc_keep(ag_ctx *ctx, size_t bytes);
/* Host memory (`bytes` at `host`) as the backend's data memory: `host` itself when the backend's
 * data memory is host memory (be->host_data), else a copy in the keep arena made with copy_h2d
 * (valid until the micro-batch's reset). For small constant arrays the model keeps on the host
 * (RMSNorm weights) that a kernel reads as data. */
const void *ag_stage(ag_ctx *ctx, const void *host, size_t bytes);
/* Host arena allocation (headers, saved structs, host-side index arrays):
 * transient like ag_alloc, or kept like ag_alloc_keep. */
void *ag_alloc_host(ag_ctx *ctx, size_t bytes);
void *ag_alloc_host_keep(ag_ctx *ctx, size_t bytes);
/* Marks and resets cover all four arenas. */
ag_mark ag_arena_mark(const ag_ctx *ctx);
void ag_arena_reset(ag_ctx *ctx, ag_mark m);

/* What backward needs of t, valid until the micro-batch's reset: t->data itself
 * outside a segment, a copy in the keep arena inside one (made once, memoised
 * in t->kept). */
void *ag_keep(ag_ctx *ctx, tensor *t);
/* bf16 copy of an fp32 tensor t (memoised in t->kept_bf16): the GEMM operand
 * several ops share (q/k/v read the same normed input) and backward reuses.
 * Kept like ag_keep when `keep`, else in the main arena. */
const void *ag_bf16_of(ag_ctx *ctx, tensor *t, int keep);

/* fp16 mode's copy of an fp32 tensor t: its values rounded to fp16, held as fp32 (memoised in
 * t->kept_f16), kept like ag_bf16_of. The GEMM operand of ctx->fp16, as ag_bf16_of is of ctx->bf16. */
const float *ag_f16_of(ag_ctx *ctx, tensor *t, int keep);

/* New tensor in the arena (data uninitialised, grad NULL). */
tensor *ag_tensor(ag_ctx *ctx, ag_dtype dt, int ndim, const int64_t *shape);
tensor *ag_tensor2(ag_ctx *ctx, ag_dtype dt, int64_t d0, int64_t d1);
/* Wrap caller-owned memory (parameters) as a leaf tensor allocated in the arena. */
tensor *ag_wrap(ag_ctx *ctx, ag_dtype dt, int64_t d0, int64_t d1, void *data, float *grad);

/* Zeroed fp32 grad buffer for t (allocated in the arena on first use). */
float *ag_grad(ag_ctx *ctx, tensor *t);
/* ag_grad for an op whose backward can write the whole gradient at once: when t has no gradient buffer yet,
 * one is allocated WITHOUT zeroing and *fresh is 1, and the caller must write every element of it (a copy, a
 * GEMM with beta 0) instead of adding; otherwise *fresh is 0 and the buffer holds the gradient so far. Saves
 * the zero fill and a read of the zeros: 0 + g = g, so the gradient is the same (a −0 term stays −0). */
float *ag_grad_fresh(ag_ctx *ctx, tensor *t, int *fresh);

/* Record a node (only when ctx->recording and some input requires grad). */
ag_node *ag_record(ag_ctx *ctx, ag_backward_fn fn, tensor *out, tensor *a, tensor *b, tensor *c,
                   tensor *d);
/* Does any of the (non-NULL) inputs require grad while recording? */
int ag_needs_grad(const ag_ctx *ctx, const tensor *a, const tensor *b, const tensor *c);

/* Reverse-mode pass over the tape from node index `from_node` to the end,
 * seeded with out->grad (which the caller sets, e.g. 1.0 for a scalar loss).
 * The nodes are removed from the tape afterwards. */
void ag_backward_from(ag_ctx *ctx, int64_t from_node);
void ag_backward(ag_ctx *ctx, tensor *loss);

/* Gradient checkpointing (Chen et al. 2016, "Training deep nets with sublinear
 * memory cost"): run fn(arg, x) without recording and keep only its output;
 * during backward, recompute fn on a copy of x with recording on and
 * backpropagate through the recomputed graph. fn must be deterministic given
 * its inputs (dropout uses counter-based RNG, so it is). */
typedef tensor *(*ag_block_fn)(ag_ctx *ctx, void *arg, tensor *x);
tensor *ag_checkpoint(ag_ctx *ctx, ag_block_fn fn, void *arg, tensor *x);
/* ag_checkpoint whose output lives in the keep arena and is marked kept, as a
 * segment's output is: for a checkpointed piece followed by a segment (the
 * selective mode of model/llama.c), whose first op saves its input for
 * backward and then finds it kept instead of copying it again. Same values and
 * gradients as ag_checkpoint. */
tensor *ag_checkpoint_kept(ag_ctx *ctx, ag_block_fn fn, void *arg, tensor *x);

/* Offloaded checkpointing (gradient_checkpointing: offload; Unsloth's "offloaded gradient
 * checkpointing", Han & Han 2024; PyTorch's save_on_cpu): ag_checkpoint whose block input goes to host
 * memory instead of staying in the activation arena. On a backend whose data memory is the host's
 * (be->host_data) there is nothing to offload: it is ag_checkpoint. Otherwise:
 *  - a chain of blocks, x_{l+1} = ag_checkpoint_offload(ctx, fn, arg_l, x_l), keeps its block outputs in
 *    two device slots (not in the arena) used in turn: when block l starts, its input x_l (in a slot)
 *    starts copying to a host_alloc buffer on the backend's copy stream (be->offload_start), overlapping
 *    block l's forward; block l's output goes into the other slot once that slot's previous copy is done
 *    (be->offload_wait). The first block's input (not in a slot) stays where it is.
 *  - in backward, block l's input is taken from its slot when it is still there (the last block's), else
 *    copied back from host memory; block l's backward starts the copy of block l−1's input into the
 *    other slot (prefetch), so it overlaps block l's recompute and backward.
 * The values are copied bit for bit, so gradients are those of ag_checkpoint. Device memory: the L
 * block inputs of ag_checkpoint become two slots (and no block-output copy buffer, ascratch); host
 * memory: one buffer per offloaded input, kept for the next micro-batch. The chain's last output must
 * be passed to ag_offload_settle before anything else reads it (it moves it into the arena). */
tensor *ag_checkpoint_offload(ag_ctx *ctx, ag_block_fn fn, void *arg, tensor *x);
/* x itself; when x is a chain's output still in a slot, its data moves to the main arena first (one
 * copy), so later chains and prefetches cannot overwrite it. Any other x is returned as it is. */
tensor *ag_offload_settle(ag_ctx *ctx, tensor *x);

/* What offloaded checkpointing holds and did (all 0 when it was never used on ctx). */
typedef struct ag_offload_info {
    size_t slot_bytes;       /* device memory of the two slots together */
    size_t host_bytes;       /* host_alloc memory held for offloaded inputs */
    int64_t n_d2h, n_h2d;    /* copies to host and back started so far */
    int64_t offloaded_bytes; /* bytes copied to host so far */
} ag_offload_info;
void ag_offload_get_info(const ag_ctx *ctx, ag_offload_info *info);

/* Run fn(arg, x) without recording and keep only its output (a new arena
 * tensor); the block's intermediates are released. Inference uses this per
 * block so evaluation memory does not grow with depth. */
tensor *ag_run_discard(ag_ctx *ctx, ag_block_fn fn, void *arg, tensor *x);

/* Run fn(arg, x) recording (no recompute): the ops save what backward needs
 * in the keep arena, the output is copied there, and the main arena is reset
 * to where it was, releasing the block's other intermediates. In backward the
 * gradients of the block's intermediates are released when it is done. Same
 * gradients as calling fn directly. Not recording: as ag_run_discard. */
tensor *ag_segment(ag_ctx *ctx, ag_block_fn fn, void *arg, tensor *x);

#endif
