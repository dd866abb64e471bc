/* trainer/memplan.h — the memory planner: predicted peak resident memory of a
 * training run, printed before training and compared with the measured peak
 * after it (docs/design.md "Known traps": users cannot predict memory).
 *
 * The prediction mirrors what the engine allocates: the frozen base (NF4
 * linears at ≈0.52 bytes/param, bf16 embeddings / LM head, fp32 norms), the
 * adapters and their gradients (fp32), the optimizer moments (fp32 m and v),
 * the activation arena's high-water mark (what the ops of autograd/ops.c keep
 * for backward, with or without per-block checkpointing, plus the largest
 * transient of one op), fixed scratch (dequantized weight buffer, operand
 * copies) and the runtime (code, oneDNN JIT kernels, thread stacks).
 */
#ifndef QLORA_TRAINER_MEMPLAN_H
#define QLORA_TRAINER_MEMPLAN_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "model/llama.h"

typedef struct memplan_input {
    llama_hparams hp;
    int B, T;              /* micro-batch rows × tokens per row */
    int checkpointing;     /* 0 none, 1 every block recomputed, 2 selective, 3 recomputed with the inputs offloaded
                              to host memory (device only; on the CPU as 1) (model/llama.h LLAMA_CKPT_*) */
    int bf16;              /* bf16 GEMM operands (ctx->bf16) */
    int lora_r;
    float lora_dropout;    /* > 0: dropout(x) kept for backward */
    int64_t lora_params;   /* fp32 adapter elements (A and B of every adapted linear) */
    int64_t optimizer_bytes; /* the optimizer state when it is not fp32 AdamW's 8 bytes per adapter element
                                (optimizer: adamw_8bit, adamw8bit_state_bytes; with shard_optimizer this
                                rank's part, adamw8bit_state_bytes_range), or 0 (Sophia's m, h: 8 bytes too) */
    int64_t frozen_bytes;  /* bytes of the frozen linears as stored (NF4, int8 or bf16) */
    int64_t extra_bytes;   /* anything else the caller holds for the run (the mapped model file), or 0 */
    int64_t data_bytes;    /* the tokenized rows held for the whole run: packed train and held-out sets and
                              the epoch permutation (bytes), or 0 */
    int n_threads;
    int grad_accumulation; /* gradient_accumulation_steps: > 1 adds the fp32 buffer the micro-batches' adapter
                              gradients are summed in (trainer/step.c grad_acc), one element per lora_params */
    int device_cuda;       /* 1: predict the device memory of the CUDA backend (memplan.c "GPU") */
    /* several processes (README "Several processes"): the prediction is per rank */
    int world;             /* ranks (0 or 1: one process) */
    int shard_optimizer;   /* SHARD_GRAD_OP or FULL_SHARD: the optimizer state covers 1/world of the adapters
                              (⌈n/world⌉ elements); the gradients are reduce-scattered in place per layer */
    int shard_grads;       /* FULL_SHARD (host memory): the gradient pages outside this rank's shard are given back
                              once reduced, so it holds ⌈n/world⌉ fp32 gradients and two layers' buckets */
    int64_t max_layer_params; /* the largest layer's adapter elements (a gradient bucket), for shard_grads */
    int64_t table_shard_bytes; /* FULL_SHARD with the tables sharded: this rank's rows of the embedding and LM head
                                  (replaces the whole tables in base), or 0 */
    int64_t frozen_shard_bytes;  /* FULL_SHARD: this rank's shards of the frozen linears (replaces
                                    frozen_bytes in base), or 0 */
    int64_t gather_bytes;  /* FULL_SHARD: the gather scratch (one layer blob and the receive buffer, which holds the
                              next layer, or the whole LM head when the tables are sharded; + the embedding's
                              chunk), or 0 */
} memplan_input;

/* Bytes per component; total = sum. */
typedef struct memplan {
    double base;        /* frozen linears + embeddings/LM head + norms + RoPE table */
    double adapters;    /* LoRA A/B and their gradients */
    double optimizer;   /* AdamW m, v */
    double activations; /* activation arena high-water mark */
    double scratch;     /* weight dequant buffer, operand scratch */
    double runtime;     /* process baseline: code, libraries, oneDNN JIT, thread stacks, caller extras */
    double data;        /* the dataset's packed rows (data_bytes) */
    double gather;      /* FULL_SHARD: layer gather scratch (gather_bytes) */
    double total;
    double host_offload; /* checkpointing 3 on a device: pinned host memory of the offloaded block inputs
                            (not in total, which is device memory) */
    double arena_chunk; /* suggested arena chunk size (bytes) */
    int checkpointing;
} memplan;

void memplan_predict(const memplan_input *in, memplan *out);

/* The host side of a run on a device (device: cuda), from the same input (device_cuda ignored): the frozen
 * base as loaded (the device mirrors it from these host copies; an untied embedding table is gathered
 * there), the process baseline with the mapped model file (runtime, as memplan_predict without a
 * device, plus the backend's two 8 MiB pinned staging buffers), the dataset's rows (data) and, with
 * gradient_checkpointing: offload, the pinned block inputs (host_offload, here in total). Adapters,
 * gradients, optimizer state, activations and scratch are device memory: 0 here. */
void memplan_predict_host_of_device(const memplan_input *in, memplan *out);

/* Bytes of an NF4 (double-quantized, bnb layout) weight of rows x cols with blocksize
 * (quant/nf4.h nf4_nbytes without building it): packed nibbles, u8 block codes, fp32 nested
 * absmax per 256 blocks, the offset. */
int64_t memplan_nf4_bytes(int64_t rows, int64_t cols, int blocksize);
/* Bytes of a bitsandbytes int8 (rows, cols) weight (load_in_8bit, quant/int8.h): rows*cols int8 codes
 * + rows fp32 SCB. */
int64_t memplan_int8_bytes(int64_t rows, int64_t cols);

/* The planner's table: one line per component (MiB and GiB), then the total. */
void memplan_print_table(FILE *f, const memplan *p);

/* One "[memory] predicted peak ..." line. */
void memplan_print(FILE *f, const memplan *p);

/* The arena chunk size to initialise the activation context with. */
size_t memplan_arena_chunk(const memplan *p);

/* The memory a run can have on this machine, in bytes: physical memory
 * (MemTotal), or the limit of this process's cgroup (cgroup v2 memory.max)
 * when that is lower. *what (may be NULL) receives which one, in words
 * ("physical memory (MemTotal)", "the cgroup's memory.max"). 0 when unknown. */
double memplan_machine_bytes(const char **what);

/* MemAvailable of /proc/meminfo (what can be given to a new process without
 * swapping), in bytes; -1 when unknown. */
double memplan_available_bytes(void);

#endif
