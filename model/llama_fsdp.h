/* model/llama_fsdp.h — FULL_SHARD: the frozen base sharded over the ranks,
 * each layer gathered just before it is used (docs/design.md "Several
 * processes").
 *
 * Every layer has the same blob layout (model/llama.h llama_layer_layout).
 * Its element space [0, elem[7]) is cut on NF4 block boundaries into world
 * ranges of ⌈nblocks / world⌉ blocks each (the last ones shorter or empty):
 * rank r keeps the bytes llama_layer_range_bytes gives for its range — packed
 * nibbles, absmax codes (or fp32 absmax), the nested absmax of the groups it
 * touches and the offsets of the linears it touches — concatenated in section
 * order into its shard (shard_cap bytes, zero-padded to the largest rank's
 * size so that every rank sends the same count). Ranks load and quantize only
 * their own ranges (llama_fsdp_load_layer): no rank ever holds a whole layer
 * outside the two gather scratches, nor the whole base.
 *
 * Gathering: comm_all_gather_start of the shard (raw bytes, COMM_U8) into a
 * receive buffer (world × shard_cap), comm_wait, then every rank's ranges
 * copied to their places in the layer scratch (the bytes two ranks both hold
 * — a nested group or an offset cut by a range edge — are identical copies),
 * and the layer's views bound to it (llama_layer_bind). Two layers in
 * flight, no more: the one in use, whole in the scratch, and the next one,
 * whose shards arrive in the receive buffer while the current one computes
 * and are copied into the scratch when it is acquired (the current one is
 * then done). At most one gather in flight. The forward pass
 * (model/llama.c llama_forward_trunk) acquires layer l and prefetches l + 1;
 * in backward, tape markers acquire l before its recompute and backward and
 * prefetch l − 1. Every rank runs the same sequence of gathers.
 *
 * A failed or timed-out gather ends the job (comm_abort after one line on the
 * communicator's err_fd), as the trainer does for its own collectives.
 */
#ifndef QLORA_MODEL_LLAMA_FSDP_H
#define QLORA_MODEL_LLAMA_FSDP_H

#include <stddef.h>
#include <stdint.h>

#include "comm/comm.h"
#include "core/status.h"
#include "model/llama.h"

typedef struct llama_fsdp {
    comm *c;                   /* not owned */
    llama_model *m;            /* the model whose layers' views are bound to the scratches */
    llama_layer_layout lo;     /* every layer's */
    int n_layer;
    int64_t blocks_per_rank;   /* ⌈nblocks / world⌉ */
    size_t shard_cap;          /* bytes each rank sends per layer (the largest rank's ranges) */
    size_t own_bytes;          /* bytes of this rank's ranges per layer (<= shard_cap) */
    uint8_t **shard;           /* (n_layer) this rank's shard of each layer, shard_cap bytes */
    uint8_t *slot;             /* the layer scratch: lo.nbytes, zeroed once (alignment gaps stay 0) */
    int slot_layer;            /* the layer it holds, or -1 */
    uint8_t *recv;             /* world × shard_cap: the next layer's shards as they arrive */
    uint8_t *scratch;          /* with sharded tables: one buffer holding slot then recv, or the whole LM head while
                                * the head + CE runs (table_gather_all; the layer is gathered again after) */
    size_t scratch_bytes;
    int slot_dirty;            /* the head overwrote slot: zeroed before the next layer lands there */
    comm_request *req;         /* the gather in flight (into recv), or NULL */
    int req_layer;
    int64_t n_gathers;         /* gathers started (statistics) */
    /* the embedding and LM head tables (world > 1, llama_fsdp_attach): rank r keeps rows
     * [r·tab_rows, min((r+1)·tab_rows, V)) of each, gathered chunk by chunk when used (frozen_shards) */
    int64_t tab_V, tab_D, tab_rows;
    bf16 *tab_embd, *tab_head; /* this rank's rows (tab_rows × D); tab_head NULL when tied */
    struct llama_fsdp_table {
        struct llama_fsdp *f;
        const bf16 *rows;
    } ta_embd, ta_head;
    frozen_shards sh_embd, sh_head;
} llama_fsdp;

/* Rows [row0, row0 + nrows) of linear k (LLAMA_Q .. LLAMA_DOWN) of layer l as
 * fp32, HF layout and row order, into dst (nrows × cols). 0 or -1 with e. */
typedef int (*llama_rows_fn)(void *arg, int layer, int k, int64_t row0, int64_t nrows, float *dst, qerr *e);

/* llama_fsdp_init: shards for n_layer layers laid out as *lo over c's ranks,
 * the layer scratch and the receive buffer. The shards are zeroed; fill them
 * with llama_fsdp_load_layer. f->m is set by llama_fsdp_attach.
 * Errors (-1): out of memory. */
int llama_fsdp_init(llama_fsdp *f, comm *c, const llama_layer_layout *lo, int n_layer, qerr *e);

/* Rank r's element range [*x0, *x1) of every layer (block boundaries). */
void llama_fsdp_range(const llama_fsdp *f, int r, int64_t *x0, int64_t *x1);

/* llama_fsdp_load_layer: fill this rank's shard of layer l from rows(arg, ...):
 * for each linear its range touches, NF4 (nf4_quantize_range; with double
 * quantization every block's absmax of the linear is computed first from its
 * rows streamed in pieces of at most ~1 M elements, then the own rows are
 * read and quantized) or bf16. The same bytes as quantizing the whole layer
 * (tests/test_fsdp.c). Errors (-1): those of rows, a non-finite weight, out
 * of memory. */
int llama_fsdp_load_layer(llama_fsdp *f, int l, llama_rows_fn rows, void *arg, qerr *e);

/* llama_fsdp_attach: make m's layers sharded by f: each layer's views
 * (nf4 / bf16 / lin) laid out as f->lo and bound to a scratch, owning no blob;
 * m->fsdp = f (llama_free then frees f too). With several ranks the
 * embedding and LM head tables (bf16, loaded whole) are sharded too, as
 * FSDP shards every frozen flat parameter: this rank keeps its rows
 * [r·⌈V/world⌉, …) of each (one shard when tied), the whole tables are freed
 * and m->embed / m->lm_head gather them when used (frozen_shards: each piece
 * broadcast from the rank that holds it): the embedding in chunks of ~2 MiB
 * of rows, each token's row picked as it passes; the head whole into the
 * gather scratch (grown to hold it; the layer it held is gathered again), so
 * the LM head + CE runs on the same bytes as with the whole table — only
 * when this frees more than it adds (the scratch's growth), or as
 * QLORA_FSDP_SHARD_TABLES=1/0 forces. Errors (-1): a geometry the views
 * refuse, out of memory. */
int llama_fsdp_attach(llama_fsdp *f, llama_model *m, qerr *e);

/* Layer l's whole blob in the scratch and its views bound to it: at once when
 * the scratch holds it, else waiting for its prefetch, else gathering it now. */
void llama_fsdp_acquire(llama_fsdp *f, int l);

/* Start gathering layer l (0 <= l < n_layer; others are ignored) into the
 * receive buffer, unless the scratch holds it or it is in flight. */
void llama_fsdp_prefetch(llama_fsdp *f, int l);

/* The gathers of one forward pass without computing (the embedding's chunks,
 * acquire l and prefetch l + 1 for every layer, the LM head's chunks for no
 * token chunk of its own, agreed with the others): what a rank with no batch
 * of its own does while the others evaluate one without a gradient, so that
 * every rank runs the same sequence of gathers (trainer/eval.c). */
void llama_fsdp_idle_forward(llama_fsdp *f);

/* Gather layer l into dst (lo.nbytes) synchronously (exports, tests);
 * collective. 0 or -1 with e. */
int llama_fsdp_gather_into(llama_fsdp *f, int l, uint8_t *dst, qerr *e);

/* This rank's resident bytes of the frozen linears (n_layer × shard_cap) and
 * the gather scratch (the layer scratch + the receive buffer). */
size_t llama_fsdp_resident_bytes(const llama_fsdp *f);
size_t llama_fsdp_scratch_bytes(const llama_fsdp *f);

/* This rank's rows of the embedding and LM head tables (0 when they are not
 * sharded), and the largest chunk a gather of them holds at once (bytes). */
size_t llama_fsdp_table_bytes(const llama_fsdp *f);
size_t llama_fsdp_table_chunk_bytes(const llama_fsdp *f);

/* Wait for a gather in flight (so no request outlives the buffers) and free
 * everything (safe on a zeroed struct). Unbinds the model's layers. */
void llama_fsdp_free(llama_fsdp *f);

/* ---- per-layer gradient buckets (NO_SHARD, SHARD_GRAD_OP, FULL_SHARD) ----
 *
 * Layer l's adapter gradients are the contiguous bucket [layer_offset[l],
 * layer_offset[l+1]) of ls->grads (model/llama.h lora_set). When a model has
 * buckets (m->grad_buckets) and they are armed, a tape node recorded before
 * each block (model/llama.c) runs as soon as the block's backward is done and
 * starts the bucket's reduction without waiting for it: comm_all_reduce_start
 * (NO_SHARD, every rank gets the whole sum) or comm_reduce_scatter_start onto
 * the ranks' contiguous shards of the flat arena (SHARD_GRAD_OP, FULL_SHARD:
 * rank r gets the part of the bucket inside [cuts[r], cuts[r + 1]), in place
 * at its own index in ls->grads — trainer/checkpoint.c ckpt_shard_cuts). So the next layers'
 * backward computes while a bucket travels. At most two buckets are in
 * flight: starting layer l's waits for the one started two layers earlier.
 * llama_grad_buckets_finish starts any bucket no backward reached and waits
 * for all (before the optimizer). Every rank starts the same buckets in the
 * same order (collectives match by order).
 *
 * Bit-identity: with accumulation the armed micro-batch is the last one and
 * acc holds the earlier ones' sum; the bucket is first acc + grads, the same
 * addition (same operands, same order) the trainer does for the whole arena
 * without buckets. With two ranks each summed element is one a + b.
 *
 * release (FULL_SHARD, host memory): once a reduce-scattered bucket is
 * complete, the whole pages of it outside this rank's shard are given back to
 * the system (madvise MADV_DONTNEED: they read as zeros when touched again), and
 * llama_grad_buckets_zero zeroes the arena the same way, so that a rank holds
 * the gradient of its own shard and of the buckets in flight, not the whole
 * fp32 gradient.
 *
 * Failures (a collective that fails or times out) end the job: one line on
 * the communicator's err_fd, then comm_abort. */
typedef struct llama_grad_buckets {
    comm *c;                     /* not owned */
    const lora_set *ls;          /* not owned: ls->grads is reduced in place */
    const struct ag_backend *be; /* the memory of ls->grads (sync before a collective, add) */
    int reduce_scatter;          /* 0: all-reduce (NO_SHARD); 1: reduce-scatter onto the shards */
    const int64_t *cuts;         /* reduce_scatter: (world + 1) rank r owns [cuts[r], cuts[r + 1]) (not owned) */
    int release;                 /* 1: pages outside the own shard given back once reduced (host memory only) */
    int n_layer;
    int64_t shard_len;           /* ⌈n_params / world⌉ */
    int armed;                   /* the next backward reduces (llama_grad_buckets_arm) */
    float *acc;                  /* armed with accumulation: the earlier micro-batches' sum, added first */
    comm_request **req;          /* (n_layer) the bucket in flight, or NULL */
    unsigned char *state;        /* (n_layer) 0 not started, 1 in flight, 2 done */
    int *order;                  /* (n_layer) the layers in the order their buckets started */
    int n_order, n_waited;       /* order[0 .. n_waited) complete */
    size_t *counts;              /* (world) scratch of reduce_scatter_start */
    int64_t n_buckets;           /* buckets started (statistics) */
} llama_grad_buckets;

/* Buckets over ls's layers, reduced over c (world > 1): all-reduced when
 * cuts is NULL, else reduce-scattered onto the contiguous shards
 * [cuts[r], cuts[r + 1]) (world + 1 entries, cuts[0] = 0, cuts[world] =
 * n_params, kept by the caller: trainer/run.h shard_cuts). release as in the
 * struct. Errors (-1): out of memory. */
int llama_grad_buckets_init(llama_grad_buckets *g, comm *c, const lora_set *ls, const struct ag_backend *be,
                            const int64_t *cuts, int release, qerr *e);

/* The next backward pass reduces each layer's bucket as it completes. acc:
 * NULL, or (gradient accumulation, the last micro-batch) the sum of the
 * earlier micro-batches' gradients (n_params, be's memory), added first. */
void llama_grad_buckets_arm(llama_grad_buckets *g, float *acc);

/* The tape hook: layer l's backward is done (does nothing unless armed). */
void llama_grad_buckets_layer_done(llama_grad_buckets *g, int l);

/* Start every bucket not started yet (highest layer first, as backward
 * would), wait for all, disarm. ls->grads then holds the sum over the ranks
 * (all-reduce), or on [lo, hi) this rank's shard of it (reduce-scatter; the
 * rest is undefined). Collective. 0 or -1 with e. */
int llama_grad_buckets_finish(llama_grad_buckets *g, qerr *e);

/* ls->grads ← 0: be->zero, or with release the pages given back (a partial
 * page at either end zeroed). */
void llama_grad_buckets_zero(llama_grad_buckets *g);

/* Wait for buckets in flight and free (safe on a zeroed struct). */
void llama_grad_buckets_free(llama_grad_buckets *g);

/* Zero bytes [p, p + n) of host memory, giving its whole pages back to the
 * system (madvise MADV_DONTNEED on private anonymous memory: they read as
 * zeros when touched again) and memset the partial pages at either end. */
void llama_release_zero(void *p, size_t n);

#endif
