/* trainer/bench_main.c — `qlora-bench`: training-step throughput, MFU and memory.
 *
 *   qlora-bench --shape smollm2-135m|smollm2-1.7b|llama2-7b|llama3-8b|mistral-7b|qwen2.5-7b|phi3-mini --seq N
 *               --batch N --lora-r N --checkpointing on|off|selective [--model PATH.gguf] [--steps N]
 *               [--device cpu|cuda] [--plan-only] [--strategy no_shard|shard_grad_op|full_shard]
 *               [--base nf4|int8]
 *
 * --base int8: the frozen linears as bitsandbytes' Int8Params (load_in_8bit: true;
 * quant/int8.h), random codes and row scales of the same weight statistics.
 * Under an MPI launcher (`mpirun -np N qlora-bench ...`) every rank runs the
 * steps on its own random batch, with --strategy: no_shard (gradients
 * all-reduced), shard_grad_op (reduce-scattered, AdamW on each rank's 1/N,
 * parameters all-gathered) or full_shard (as shard_grad_op, and the random
 * NF4 base generated shard by shard — each rank only its ranges of every
 * layer, model/llama_fsdp.h — and gathered per layer in forward and
 * backward). Rank 0 prints; peak RSS is the largest over the ranks, and the
 * planner's prediction is per rank.
 * --plan-only prints the memory planner's prediction per component (trainer/memplan.c) for the
 * shape and exits without building a model: with --device cuda, the device memory of the CUDA
 * backend, on a machine with or without a GPU.
 *
 * Runs N training steps (forward, backward, clipping, AdamW; LoRA on all seven
 * linears, alpha = 2r, no dropout) of a Llama shape whose frozen linears are
 * random NF4 generated directly in the quantized layout (no multi-GB file), or
 * of a real GGUF model. Before the steps it measures the machine's oneDNN bf16
 * matmul rate on a large GEMM (the MFU denominator, taken in the same run, so
 * it sees the same machine load) and prints the memory planner's predicted
 * peak; after them: tokens/s, model GFLOP/s, MFU, peak RSS, time per op class.
 * The last line is one JSON object.
 *
 * Model FLOPs per token (PaLM appendix B convention, the one anchors.md uses):
 * 2·P_frozen forward + 2·P_frozen input gradient (LM head included), LoRA
 * 6·r·(in+out) per adapted linear (forward, input grad, A/B grads), and
 * attention 4·T·H·hd forward + 8·T·H·hd backward per layer, counted over the
 * full T×T score matrix (causal masking not subtracted). No recompute: with
 * checkpointing the same model FLOPs take longer, and MFU says so.
 */
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#include "autograd/backend.h"
#include "autograd/gemm.h"
#include "autograd/lora_gemm.h"
#include "autograd/prof.h"
#include "autograd/tensor.h"
#include "core/clock.h"
#include "core/rng.h"
#include "format/gguf.h"
#include "comm/comm.h"
#include "model/llama.h"
#include "model/llama_fsdp.h"
#include "optim/adamw.h"
#include "optim/clip.h"
#include "trainer/memplan.h"

static const char *const ckpt_name[] = {"off", "on", "selective", "offload"};

static double cpu_sec(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + 1e-6 * (double)ru.ru_utime.tv_usec + (double)ru.ru_stime.tv_sec +
           1e-6 * (double)ru.ru_stime.tv_usec;
}

/* ------------------------------------------------------------------ shapes */

/* The model shapes (their config.json hyper-parameters), one table. RoPE scaling and biases are part of the
 * shape: they run in the timed steps as in the real model. */
typedef struct bench_shape {
    const char *name;
    llama_hparams hp;
} bench_shape;

#define BENCH_SHAPE_NAMES "smollm2-135m, smollm2-1.7b, llama2-7b, llama3-8b, mistral-7b, qwen2.5-7b, phi3-mini"
static const bench_shape bench_shapes[] = {
    {"smollm2-135m", {.n_layer = 30, .d_model = 576, .n_head = 9, .n_kv_head = 3, .head_dim = 64, .d_ff = 1536,
                      .vocab = 49152, .context_length = 8192, .rope_theta = 100000.0f, .rms_eps = 1e-5f,
                      .tied_embeddings = 1}},
    /* HuggingFaceTB/SmolLM2-1.7B */
    {"smollm2-1.7b", {.n_layer = 24, .d_model = 2048, .n_head = 32, .n_kv_head = 32, .head_dim = 64, .d_ff = 8192,
                      .vocab = 49152, .context_length = 8192, .rope_theta = 130000.0f, .rms_eps = 1e-5f,
                      .tied_embeddings = 1}},
    {"llama2-7b", {.n_layer = 32, .d_model = 4096, .n_head = 32, .n_kv_head = 32, .head_dim = 128, .d_ff = 11008,
                   .vocab = 32000, .context_length = 4096, .rope_theta = 10000.0f, .rms_eps = 1e-5f}},
    /* meta-llama/Llama-3.1-8B */
    {"llama3-8b", {.n_layer = 32, .d_model = 4096, .n_head = 32, .n_kv_head = 8, .head_dim = 128, .d_ff = 14336,
                   .vocab = 128256, .context_length = 131072, .rope_theta = 500000.0f, .rms_eps = 1e-5f,
                   .rope_scaling = {.type = LLAMA_ROPE_LLAMA3, .factor = 8.0f, .low_freq_factor = 1.0f,
                                    .high_freq_factor = 4.0f, .original_context = 8192}}},
    /* mistralai/Mistral-7B-v0.3 (no sliding window) */
    {"mistral-7b", {.n_layer = 32, .d_model = 4096, .n_head = 32, .n_kv_head = 8, .head_dim = 128, .d_ff = 14336,
                    .vocab = 32768, .context_length = 32768, .rope_theta = 1000000.0f, .rms_eps = 1e-5f}},
    /* Qwen/Qwen2.5-7B */
    {"qwen2.5-7b", {.arch = LLAMA_ARCH_QWEN2, .qkv_bias = 1, .n_layer = 28, .d_model = 3584, .n_head = 28,
                    .n_kv_head = 4, .head_dim = 128, .d_ff = 18944, .vocab = 152064, .context_length = 32768,
                    .rope_theta = 1000000.0f, .rms_eps = 1e-6f}},
    /* microsoft/Phi-3-mini-4k-instruct: fused qkv_proj (9216, 3072) and gate_up_proj (16384, 3072) */
    {"phi3-mini", {.arch = LLAMA_ARCH_PHI3, .n_layer = 32, .d_model = 3072, .n_head = 32, .n_kv_head = 32,
                   .head_dim = 96, .d_ff = 8192, .vocab = 32064, .context_length = 4096, .rope_theta = 10000.0f,
                   .rms_eps = 1e-5f, .sliding_window = 2047}},
};

static void usage(FILE *f) {
    fprintf(f,
            "usage: qlora-bench --shape NAME --seq N --batch N --lora-r N --checkpointing on|off|selective|offload\n"
            "                   [--model PATH.gguf] [--steps N] [--warmup N] [--layers N] [--calib-seconds S]\n"
            "                   [--device cpu|cuda] [--plan-only] [--strategy no_shard|shard_grad_op|full_shard]\n"
            "                   [--base nf4|int8]\n"
            "  --base: the frozen linears as NF4 (load_in_4bit, default) or bitsandbytes int8 (load_in_8bit)\n"
            "  Under mpirun (mpirun -np N qlora-bench ...) the ranks train together with --strategy\n"
            "  (full_shard: the frozen base sharded over the ranks, gathered per layer).\n"
            "  NAME: " BENCH_SHAPE_NAMES "\n"
            "  --checkpointing: on (= full: every block recomputed), off, selective (the MLP half\n"
            "  recomputed, the attention half kept; model/llama.h LLAMA_CKPT_SELECTIVE), offload (on, with\n"
            "  each block's input in pinned host memory on a device; on the CPU the same as on)\n"
            "  --layers N: only the first N layers of the shape (the table says so where it is used)\n"
            "  --plan-only: print the predicted memory per component (device memory with --device cuda)\n"
            "  and exit; no model is built and no GPU is needed.\n"
            "  Times N LoRA training steps (random NF4 base of the given shape, or a real GGUF model)\n"
            "  and prints tokens/s, GFLOP/s, MFU against a bf16 GEMM measured in the same run,\n"
            "  peak RSS (predicted and measured) and time per op class; last line is JSON.\n");
}

/* ------------------------------------------------------------------ random model */

/* Random NF4 directly in the quantized layout: uniform nibbles, block scales
 * around 0.04 via double quantization, so weights have std ≈ 0.02. */
static int random_nf4(nf4_tensor *t, int64_t rows, int64_t cols, uint64_t stream, qerr *e) {
    if (nf4_alloc(t, rows, cols, 64, 1, e)) return -1;
    int64_t nbytes = (t->n + 1) / 2;
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < nbytes / 8; i++) {
        uint64_t r = rng_u64(17, stream, (uint64_t)i);
        memcpy(t->packed + 8 * i, &r, 8);
    }
    for (int64_t i = nbytes / 8 * 8; i < nbytes; i++) t->packed[i] = (uint8_t)rng_u64(18, stream, (uint64_t)i);
    for (int64_t b = 0; b < t->nblocks; b++) t->absmax_q[b] = (uint8_t)(rng_u64(19, stream, (uint64_t)b) & 0xff);
    int64_t ng = (t->nblocks + NF4_NESTED_BLOCKSIZE - 1) / NF4_NESTED_BLOCKSIZE;
    for (int64_t g = 0; g < ng; g++) t->nested_absmax[g] = 0.01f;
    t->offset = 0.04f;
    return 0;
}

/* FULL_SHARD: this rank's ranges of every layer's blob, random as random_nf4's statistics (uniform
 * nibbles and codes, nested absmax 0.01, offset 0.04) from a counter-based draw keyed by the byte's place
 * in the layer, so bytes two ranks both hold (a cut nested group or offset) are the same; then the
 * layers' views are attached to the gather scratches. No rank holds a whole layer outside them. */
static int random_sharded_linears(llama_model *m, comm *c, qerr *e) {
    llama_layer_layout lo;
    if (llama_layer_layout_init(&lo, &m->hp, FROZEN_NF4, 64, 1, e)) return -1;
    llama_fsdp *f = qcalloc(1, sizeof *f, e);
    if (!f || llama_fsdp_init(f, c, &lo, m->hp.n_layer, e)) {
        free(f);
        return -1;
    }
    int64_t x0, x1;
    llama_fsdp_range(f, c->rank, &x0, &x1);
    llama_byte_range rg[LLAMA_BLOB_N_SECTIONS];
    if (llama_layer_range_bytes(&lo, x0, x1, rg, e)) return -1;
    for (int l = 0; l < m->hp.n_layer; l++) {
        uint8_t *dst = f->shard[l];
        size_t at = 0;
        for (int sec = 0; sec < LLAMA_BLOB_N_SECTIONS; sec++) {
            at = (at + LLAMA_BLOB_ALIGN - 1) / LLAMA_BLOB_ALIGN * LLAMA_BLOB_ALIGN; /* the shard's section layout */
            if (sec == LLAMA_BLOB_NESTED || sec == LLAMA_BLOB_OFFSETS) {
                const float v = sec == LLAMA_BLOB_NESTED ? 0.01f : 0.04f;
                for (size_t i = 0; i < rg[sec].len; i += 4) memcpy(dst + at + i, &v, 4);
            } else {
#pragma omp parallel for schedule(static)
                for (int64_t i = 0; i < (int64_t)rg[sec].len; i++)
                    dst[at + (size_t)i] = (uint8_t)rng_u64(17 + (uint64_t)sec, (uint64_t)l, rg[sec].off + (size_t)i);
            }
            at += rg[sec].len;
        }
        m->quantized_bytes += (int64_t)lo.nbytes;
        for (int k = 0; k < LLAMA_N_LINEAR; k++) m->n_quantized_params += lo.rows[k] * lo.cols[k];
    }
    if (llama_fsdp_attach(f, m, e)) {
        llama_fsdp_free(f);
        free(f);
        return -1;
    }
    return 0;
}

/* --base int8: the frozen linears as bitsandbytes Int8Params (load_in_8bit). */
static int g_base_int8;

/* A layer's seven linears as random int8 in one blob laid out as the loader lays it out: uniform codes in
 * [-127, 127] (std ≈ 73.6) and row absmax 0.035, so weights have std ≈ 0.02 as random_nf4's. */
static int random_int8_layer(llama_layer *L, const llama_hparams *hp, int l, qerr *e) {
    llama_layer_layout lo;
    if (llama_layer_layout_init(&lo, hp, FROZEN_INT8, 64, 0, e) || llama_layer_alloc(L, &lo, e)) return -1;
    for (int k = 0; k < LLAMA_N_LINEAR; k++) {
        if (lo.rows[k] == 0) continue;
        int8_t *cb = (int8_t *)L->lin[k].cb;
        float *scb = (float *)L->lin[k].scb;
        const int64_t n = lo.rows[k] * lo.cols[k];
        const uint64_t stream = (uint64_t)(l * LLAMA_N_LINEAR + k);
#pragma omp parallel for schedule(static)
        for (int64_t i = 0; i < n; i++) cb[i] = (int8_t)((int)(rng_u64(20, stream, (uint64_t)i) % 255) - 127);
        for (int64_t r = 0; r < lo.rows[k]; r++) scb[r] = 0.035f;
    }
    return 0;
}

static int random_model(llama_model *m, const llama_hparams *hp, int max_pos, comm *shard_over, qerr *e) {
    memset(m, 0, sizeof *m);
    m->hp = *hp;
    int64_t D = hp->d_model, V = hp->vocab;
    m->load_in_4bit = !g_base_int8;
    m->load_in_8bit = g_base_int8;
    m->double_quant = 1;
    m->tok_embd = qmalloc((size_t)(V * D) * sizeof(bf16), e);
    if (!m->tok_embd) return -1;
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < V * D; i++)
        m->tok_embd[i] = f32_to_bf16((rng_uniform(5, 1, (uint64_t)i) - 0.5f) * 0.07f);
    m->n_params += V * D;
    if (hp->tied_embeddings) {
        m->lm_head_w = m->tok_embd;
    } else {
        m->lm_head_w = qmalloc((size_t)(V * D) * sizeof(bf16), e);
        if (!m->lm_head_w) return -1;
#pragma omp parallel for schedule(static)
        for (int64_t i = 0; i < V * D; i++)
            m->lm_head_w[i] = f32_to_bf16((rng_uniform(5, 2, (uint64_t)i) - 0.5f) * 0.07f);
        m->n_params += V * D;
    }
    m->embed = (frozen_weight){.out = V, .in = D, .kind = FROZEN_BF16, .w_bf16 = m->tok_embd};
    m->lm_head = (frozen_weight){.out = V, .in = D, .kind = FROZEN_BF16, .w_bf16 = m->lm_head_w};
    m->out_norm = qmalloc((size_t)D * sizeof(float), e);
    m->layers = qcalloc((size_t)hp->n_layer, sizeof *m->layers, e);
    if (!m->out_norm || !m->layers) return -1;
    for (int64_t i = 0; i < D; i++) m->out_norm[i] = 1.0f;
    int64_t outs[LLAMA_N_LINEAR], ins[LLAMA_N_LINEAR];
    for (int k = 0; k < LLAMA_N_LINEAR; k++) llama_tensor_shape(hp, LLAMA_T_LINEAR, k, &outs[k], &ins[k]);
    for (int l = 0; l < hp->n_layer; l++) {
        llama_layer *L = &m->layers[l];
        L->attn_norm = qmalloc((size_t)D * sizeof(float), e);
        L->ffn_norm = qmalloc((size_t)D * sizeof(float), e);
        if (!L->attn_norm || !L->ffn_norm) return -1;
        for (int64_t i = 0; i < D; i++) L->attn_norm[i] = L->ffn_norm[i] = 1.0f;
        m->n_params += 2 * D;
        if (g_base_int8 && random_int8_layer(L, hp, l, e)) return -1;
        for (int k = 0; k < LLAMA_N_LINEAR; k++) {
            if (outs[k] == 0) continue; /* a slot a fused linear took over (Phi-3) */
            if (shard_over) { /* the linears come from random_sharded_linears; the q/k/v biases here */
                if (hp->qkv_bias && k <= LLAMA_V) {
                    if (!(L->bias[k] = qcalloc((size_t)outs[k], sizeof(float), e))) return -1;
                    m->n_params += outs[k];
                }
                continue;
            }
            if (g_base_int8) {
                /* L->lin[k] points into the layer's int8 blob already */
            } else {
                if (random_nf4(&L->nf4[k], outs[k], ins[k], (uint64_t)(l * LLAMA_N_LINEAR + k), e)) return -1;
                L->lin[k] = (frozen_weight){.out = outs[k], .in = ins[k], .kind = FROZEN_NF4, .nf4 = &L->nf4[k]};
            }
            if (hp->qkv_bias && k <= LLAMA_V) { /* Qwen2: the frozen q/k/v bias */
                if (!(L->bias[k] = qcalloc((size_t)outs[k], sizeof(float), e))) return -1;
                L->lin[k].bias = L->bias[k];
                m->n_params += outs[k];
            }
            m->quantized_bytes += g_base_int8 ? int8_nbytes(outs[k], ins[k]) : (int64_t)nf4_nbytes(&L->nf4[k]);
            m->n_quantized_params += outs[k] * ins[k];
        }
    }
    if (shard_over) {
        if (random_sharded_linears(m, shard_over, e)) return -1;
        for (int l = 0; l < hp->n_layer; l++)
            for (int k = 0; k <= LLAMA_V; k++) m->layers[l].lin[k].bias = m->layers[l].bias[k];
    }
    m->n_params += D + m->n_quantized_params;
    return llama_rope_init(&m->rope, hp, max_pos, e);
}

/* ------------------------------------------------------------------ FLOPs */

static double model_flops_per_token(const llama_hparams *hp, int T, int r) {
    double D = hp->d_model, hd = hp->head_dim, H = hp->n_head;
    double qd = H * hd;
    double per_layer = 0;
    for (int k = 0; k < LLAMA_N_LINEAR; k++) {
        int64_t out, in;
        llama_tensor_shape(hp, LLAMA_T_LINEAR, k, &out, &in);
        per_layer += 4.0 * (double)in * (double)out;         /* forward + input gradient */
        per_layer += 6.0 * r * ((double)in + (double)out);   /* LoRA: fwd, input grad, dA, dB */
    }
    per_layer += 12.0 * T * qd;                        /* attention: QKᵀ, PV fwd (4) + bwd (8), full T×T */
    return per_layer * hp->n_layer + 4.0 * (double)hp->vocab * D; /* LM head fwd + dh */
}

/* ------------------------------------------------------------------ calibration */

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* The backend's bf16 matmul rate (oneDNN on the CPU) on a large square-ish GEMM
 * (fp32 accumulate and output, as the engine's GEMMs), in FLOP/s: the best of
 * repeated runs over ~`seconds` (returned: the peak), and their median in
 * *median (the rate the machine sustains: on a shared VM the two can differ by
 * 2–3×, short bursts against a throttled steady state). 0 when out of memory. */
static double calibrate_gemm(const ag_backend *be, double seconds, int64_t M, int64_t N, int64_t K, double *median) {
    *median = 0;
    bf16 *Ah = malloc((size_t)(M * K) * sizeof(bf16));
    bf16 *Bh = malloc((size_t)(K * N) * sizeof(bf16));
    bf16 *A = be->alloc((size_t)(M * K) * sizeof(bf16));
    bf16 *B = be->alloc((size_t)(K * N) * sizeof(bf16));
    float *C = be->alloc((size_t)(M * N) * sizeof(float));
    if (!Ah || !Bh || !A || !B || !C) {
        free(Ah);
        free(Bh);
        be->free(A);
        be->free(B);
        be->free(C);
        return 0;
    }
    for (int64_t i = 0; i < M * K; i++) Ah[i] = f32_to_bf16(rng_uniform(1, 1, (uint64_t)i) - 0.5f);
    for (int64_t i = 0; i < K * N; i++) Bh[i] = f32_to_bf16(rng_uniform(1, 2, (uint64_t)i) - 0.5f);
    be->copy_h2d(A, Ah, (size_t)(M * K) * sizeof(bf16));
    be->copy_h2d(B, Bh, (size_t)(K * N) * sizeof(bf16));
    free(Ah);
    free(Bh);
    be->gemm(0, 0, M, N, K, 1.0f, A, K, B, N, 0.0f, C, N, GEMM_BF16); /* JIT + first touch */
    be->sync();
    double best = 0, t_end = clock_now_sec() + seconds;
    enum { CALIB_MAX_RUNS = 4096 };
    double *rates = malloc(CALIB_MAX_RUNS * sizeof *rates);
    int it = 0;
    while ((clock_now_sec() < t_end || it < 3) && it < CALIB_MAX_RUNS) {
        double t0 = clock_now_sec();
        be->gemm(0, 0, M, N, K, 1.0f, A, K, B, N, 0.0f, C, N, GEMM_BF16);
        be->sync();
        double dt = clock_now_sec() - t0;
        double r = 2.0 * M * N * K / dt;
        if (r > best) best = r;
        if (rates) rates[it] = r;
        it++;
    }
    if (rates) {
        qsort(rates, (size_t)it, sizeof *rates, cmp_double);
        *median = it % 2 ? rates[it / 2] : 0.5 * (rates[it / 2 - 1] + rates[it / 2]);
        free(rates);
    }
    be->free(A);
    be->free(B);
    be->free(C);
    return best;
}

/* ------------------------------------------------------------------ main */

int main(int argc, char **argv) {
    const char *shape = "smollm2-135m", *model_path = NULL;
    int T = 512, B = 4, r = 16, ckpt = 1, steps = 3, warmup = 1, layers = 0, plan_only = 0, dev_cuda = 0;
    double calib_s = 2.0;
    int strategy = 0; /* 0 no_shard, 1 shard_grad_op, 2 full_shard */
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout);
            return 0;
        }
        if (!strcmp(a, "--plan-only")) {
            plan_only = 1;
            continue;
        }
        if (!v) {
            fprintf(stderr, "qlora-bench: %s needs a value\n", a);
            usage(stderr);
            return 2;
        }
        if (!strcmp(a, "--shape")) shape = v;
        else if (!strcmp(a, "--seq")) T = atoi(v);
        else if (!strcmp(a, "--batch")) B = atoi(v);
        else if (!strcmp(a, "--lora-r")) r = atoi(v);
        else if (!strcmp(a, "--checkpointing")) {
            if (!strcmp(v, "on") || !strcmp(v, "full")) ckpt = LLAMA_CKPT_FULL;
            else if (!strcmp(v, "off")) ckpt = LLAMA_CKPT_OFF;
            else if (!strcmp(v, "selective")) ckpt = LLAMA_CKPT_SELECTIVE;
            else if (!strcmp(v, "offload")) ckpt = LLAMA_CKPT_OFFLOAD;
            else {
                fprintf(stderr, "qlora-bench: --checkpointing: expected on, off, selective or offload, got \"%s\"\n", v);
                return 2;
            }
        } else if (!strcmp(a, "--device")) {
            if (!strcmp(v, "cpu")) dev_cuda = 0;
            else if (!strcmp(v, "cuda")) dev_cuda = 1;
            else {
                fprintf(stderr, "qlora-bench: --device: expected cpu or cuda, got \"%s\"\n", v);
                return 2;
            }
        } else if (!strcmp(a, "--model")) model_path = v;
        else if (!strcmp(a, "--steps")) steps = atoi(v);
        else if (!strcmp(a, "--warmup")) warmup = atoi(v);
        else if (!strcmp(a, "--layers")) layers = atoi(v);
        else if (!strcmp(a, "--calib-seconds")) calib_s = atof(v);
        else if (!strcmp(a, "--base")) {
            if (!strcmp(v, "nf4")) g_base_int8 = 0;
            else if (!strcmp(v, "int8")) g_base_int8 = 1;
            else {
                fprintf(stderr, "qlora-bench: --base: expected nf4 or int8, got \"%s\"\n", v);
                return 2;
            }
        } else if (!strcmp(a, "--strategy")) {
            if (!strcmp(v, "no_shard")) strategy = 0;
            else if (!strcmp(v, "shard_grad_op")) strategy = 1;
            else if (!strcmp(v, "full_shard")) strategy = 2;
            else {
                fprintf(stderr, "qlora-bench: --strategy: expected no_shard, shard_grad_op or full_shard, got \"%s\"\n",
                        v);
                return 2;
            }
        }
        else {
            fprintf(stderr, "qlora-bench: unknown option %s\n", a);
            usage(stderr);
            return 2;
        }
        i++;
    }
    if (T <= 0 || B <= 0 || r <= 0 || steps <= 0 || warmup < 0) {
        fprintf(stderr, "qlora-bench: --seq, --batch, --lora-r, --steps must be positive\n");
        return 2;
    }
    qerr e = {{0}};
    llama_hparams hp;
    const bench_shape *bs = NULL;
    for (size_t i = 0; i < sizeof bench_shapes / sizeof *bench_shapes; i++)
        if (!strcmp(shape, bench_shapes[i].name)) bs = &bench_shapes[i];
    if (!bs) {
        fprintf(stderr, "qlora-bench: --shape: expected one of %s, got \"%s\"\n", BENCH_SHAPE_NAMES, shape);
        return 2;
    }
    hp = bs->hp;
    if (layers > 0) hp.n_layer = layers;
    if (hp.sliding_window > 0 && !hp.window_mask && T > hp.sliding_window) { /* as trainer/run.c refuses it */
        fprintf(stderr, "qlora-bench: --seq %d exceeds the sliding window of %d tokens of %s (sliding-window attention "
                        "is not implemented)\n", T, hp.sliding_window, shape);
        return 2;
    }
    if (plan_only) {
        if (model_path) {
            fprintf(stderr, "qlora-bench: --plan-only takes a --shape, not --model\n");
            return 2;
        }
        int64_t frozen = 0, lora = 0;
        for (int k = 0; k < LLAMA_N_LINEAR; k++) {
            int64_t out, in;
            llama_tensor_shape(&hp, LLAMA_T_LINEAR, k, &out, &in);
            if (out == 0) continue; /* fused away (Phi-3) */
            frozen += g_base_int8 ? memplan_int8_bytes(out, in) : memplan_nf4_bytes(out, in, NF4_DEFAULT_BLOCKSIZE);
            lora += (int64_t)r * (in + out);
        }
        memplan_input pi = {.hp = hp, .B = B, .T = T, .checkpointing = ckpt, .bf16 = 1, .lora_r = r,
                            .lora_params = lora * hp.n_layer, .frozen_bytes = frozen * hp.n_layer,
                            .n_threads = omp_get_max_threads(), .device_cuda = dev_cuda};
        memplan pl;
        memplan_predict(&pi, &pl);
        printf("qlora-bench plan: %s, %s memory, seq %d x batch %d, LoRA r %d on all linears, AdamW, bf16, "
               "checkpointing %s\n",
               shape, dev_cuda ? "CUDA device" : "CPU (resident)", T, B, r, ckpt_name[ckpt]);
        memplan_print_table(stdout, &pl);
        printf("{\"shape\":\"%s\",\"device\":\"%s\",\"seq\":%d,\"batch\":%d,\"lora_r\":%d,\"layers\":%d,"
               "\"checkpointing\":%s,\"checkpointing_mode\":\"%s\",\"predicted_bytes\":%.0f,"
               "\"predicted_activation_bytes\":%.0f,\"predicted_host_offload_bytes\":%.0f,"
               "\"model_gflop_per_token\":%.4f}\n",
               shape, dev_cuda ? "cuda" : "cpu", T, B, r, hp.n_layer, ckpt ? "true" : "false", ckpt_name[ckpt],
               pl.total, pl.activations, pl.host_offload, model_flops_per_token(&hp, T, r) / 1e9);
        return 0;
    }
    if (dev_cuda) {
        const ag_backend *cuda = ag_backend_find("cuda");
        if (!cuda) {
            fprintf(stderr, "qlora-bench: --device cuda: %s\n",
                    ag_backend_cuda_built() ? "no CUDA device is visible to this process"
                                            : "this binary was built without the CUDA backend (make CUDA=1)");
            return 2;
        }
        ag_backend_set_default(cuda);
    }
    comm *cm = NULL;
    if (comm_init(&cm, &e)) {
        fprintf(stderr, "qlora-bench: %s\n", e.msg);
        return 1;
    }
    const int W = cm->world_size, rank = cm->rank;
    if (rank != 0) { /* rank 0 speaks; the others only when they fail */
        cm->err_fd = dup(2);
        if (!freopen("/dev/null", "w", stdout) || !freopen("/dev/null", "w", stderr)) return 1;
    }
    if (strategy == 2 && hp.arch == LLAMA_ARCH_PHI3) {
        fprintf(stderr, "qlora-bench: --strategy full_shard: Phi-3's fused linears are not sharded yet\n");
        return 2;
    }
    if (strategy == 2 && g_base_int8) {
        fprintf(stderr, "qlora-bench: --strategy full_shard: FULL_SHARD of an int8 base is not implemented\n");
        return 2;
    }
    if (strategy == 2 && (dev_cuda || model_path)) {
        fprintf(stderr, "qlora-bench: --strategy full_shard: the random CPU model only (no --model, no --device cuda)\n");
        return 2;
    }
    double dev_free0 = 0, dev_total = 0;
    if (dev_cuda) ag_backend_cuda_mem_info(&dev_free0, &dev_total);
    int n_threads = omp_get_max_threads();
    double rss_start = proc_peak_rss_mib();

    /* ---- calibration: the machine's bf16 GEMM rate right now ---- */
    double sustained = 0;
    double peak = calibrate_gemm(ag_backend_default(), calib_s, 2048, 2048, 2048, &sustained);
    fprintf(stderr,
            "[bench] calibration: oneDNN bf16 matmul 2048x2048x2048 peak %.0f GFLOP/s (best run), %.0f sustained "
            "(median run) on %d threads\n",
            peak / 1e9, sustained / 1e9, n_threads);

    /* ---- model ---- */
    llama_model m;
    gguf_file *gf = NULL;
    double t0 = clock_now_sec();
    if (model_path) {
        if (gguf_open(model_path, &gf, &e) || llama_load_gguf(gf, g_base_int8 ? LLAMA_BASE_INT8 : LLAMA_BASE_NF4, 1, T, &m, &e)) {
            fprintf(stderr, "qlora-bench: --model %s: %s\n", model_path, e.msg);
            return 1;
        }
        gguf_close(gf);
        gf = NULL;
        hp = m.hp;
        shape = model_path;
    } else if (random_model(&m, &hp, T, strategy == 2 ? cm : NULL, &e)) {
        fprintf(stderr, "qlora-bench: %s\n", e.msg);
        return 1;
    }
    fprintf(stderr, "[bench] model %s: %d layers, d %d, heads %d/%d, ff %d, vocab %d; %.1fM frozen linear params as %s "
                    "(%.1f MiB); %.1fs\n",
            shape, hp.n_layer, hp.d_model, hp.n_head, hp.n_kv_head, hp.d_ff, hp.vocab, m.n_quantized_params / 1e6,
            g_base_int8 ? "int8" : "NF4", m.quantized_bytes / 1048576.0, clock_now_sec() - t0);

    int target[LLAMA_N_LINEAR] = {1, 1, 1, 1, 1, 1, 1};
    lora_set ls;
    if (lora_set_init_backend(&ls, ag_backend_default(), &m, r, 2.0f * (float)r, 0.0f, 0, target, 42, &e)) {
        fprintf(stderr, "qlora-bench: %s\n", e.msg);
        return 1;
    }
    /* B != 0 so every gradient path carries real numbers (on a device: a host copy, uploaded) */
    float *lp = (float *)lora_set_params_host(&ls, ls.params, &e);
    if (!lp) {
        fprintf(stderr, "qlora-bench: %s\n", e.msg);
        return 1;
    }
    for (int64_t i = 0; i < ls.n_params; i++)
        if (lp[i] == 0.0f) lp[i] = 1e-3f * (rng_uniform(9, 9, (uint64_t)i) - 0.5f);
    if (lp != ls.params) ls.be->copy_h2d(ls.params, lp, (size_t)ls.n_params * sizeof(float));
    lora_set_host_release(&ls, ls.params, lp);

    int64_t max_layer = 0; /* the largest layer's adapter elements: one gradient bucket */
    for (int l = 0; l < ls.n_layer; l++)
        if (ls.layer_offset[l + 1] - ls.layer_offset[l] > max_layer) max_layer = ls.layer_offset[l + 1] - ls.layer_offset[l];
    memplan_input mi = {.hp = hp, .B = B, .T = T, .checkpointing = ckpt, .bf16 = 1, .lora_r = r,
                        .lora_params = ls.n_params, .frozen_bytes = m.quantized_bytes, .lora_dropout = 0.0f,
                        .n_threads = n_threads, .device_cuda = dev_cuda, .world = W, .shard_optimizer = strategy >= 1,
                        .shard_grads = strategy == 2 && W > 1,
                        .max_layer_params = max_layer,
                        .frozen_shard_bytes = m.fsdp ? (int64_t)llama_fsdp_resident_bytes(m.fsdp) : 0,
                        .table_shard_bytes = m.fsdp ? (int64_t)llama_fsdp_table_bytes(m.fsdp) : 0,
                        .gather_bytes = m.fsdp ? (int64_t)(llama_fsdp_scratch_bytes(m.fsdp) +
                                                           llama_fsdp_table_chunk_bytes(m.fsdp))
                                               : 0};
    memplan plan;
    memplan_predict(&mi, &plan);
    memplan_print(stderr, &plan);

    /* SHARD_GRAD_OP / FULL_SHARD: rank r owns [r·len, (r+1)·len) of the flat arrays (the trainer's layout) */
    const int64_t shard_len = (ls.n_params + W - 1) / W;
    const int64_t sh_lo = strategy >= 1 ? (rank * shard_len < ls.n_params ? rank * shard_len : ls.n_params) : 0;
    const int64_t sh_hi = strategy >= 1 ? (sh_lo + shard_len < ls.n_params ? sh_lo + shard_len : ls.n_params)
                                        : ls.n_params;
    if (strategy >= 1 && dev_cuda) {
        fprintf(stderr, "qlora-bench: --strategy %s: CPU only\n", strategy == 1 ? "shard_grad_op" : "full_shard");
        return 1;
    }
    /* several ranks: each layer's gradient reduced as its backward completes (the trainer's buckets) */
    llama_grad_buckets gbk;
    memset(&gbk, 0, sizeof gbk);
    int64_t *bench_cuts = calloc((size_t)W + 1, sizeof *bench_cuts); /* rank r's [r·len, (r+1)·len) */
    if (!bench_cuts) {
        fprintf(stderr, "qlora-bench: out of memory\n");
        return 1;
    }
    if (W > 1) {
        for (int q = 0; q <= W; q++) bench_cuts[q] = q * shard_len < ls.n_params ? q * shard_len : ls.n_params;
        if (llama_grad_buckets_init(&gbk, cm, &ls, ag_backend_default(), strategy >= 1 ? bench_cuts : NULL,
                                    strategy == 2, &e)) {
            fprintf(stderr, "qlora-bench: %s\n", e.msg);
            return 1;
        }
        m.grad_buckets = &gbk;
    }
    ag_ctx ctx;
    adamw_state opt;
    if (ag_ctx_init(&ctx, memplan_arena_chunk(&plan), &e) ||
        adamw_state_init_backend(&opt, ctx.be, sh_hi - sh_lo > 0 ? sh_hi - sh_lo : 1, &e)) {
        fprintf(stderr, "qlora-bench: %s\n", e.msg);
        return 1;
    }
    ctx.bf16 = 1;
    ctx.training = 1;
    adamw_config ac = {.lr = 1e-4, .beta1 = 0.9, .beta2 = 0.999, .eps = 1e-8, .weight_decay = 0.0};

    int64_t N = (int64_t)B * T;
    int32_t *ids = malloc((size_t)N * 4), *tgt = malloc((size_t)N * 4), *pos = malloc((size_t)N * 4);
    if (!ids || !tgt || !pos) {
        fprintf(stderr, "qlora-bench: out of memory\n");
        return 1;
    }
    for (int64_t i = 0; i < N; i++) { /* each rank its own rows */
        ids[i] = (int32_t)(rng_u64(3, 1 + 2 * (uint64_t)rank, (uint64_t)i) % (uint64_t)hp.vocab);
        tgt[i] = (int32_t)(rng_u64(3, 2 + 2 * (uint64_t)rank, (uint64_t)i) % (uint64_t)hp.vocab);
        pos[i] = (int32_t)(i % T);
    }
    llama_batch b = {.B = B, .T = T, .input_ids = ids, .targets = tgt, .position_ids = pos, .seq_ids = NULL};

    static const char *const strategy_name[] = {"NO_SHARD", "SHARD_GRAD_OP", "FULL_SHARD"};
    fprintf(stderr, "[bench] %d warm-up + %d timed steps: seq %d x batch %d, LoRA r %d on all linears, AdamW, "
                    "checkpointing %s, %d threads; %d rank%s (%s, %s)\n",
            warmup, steps, T, B, r, ckpt_name[ckpt], n_threads, W, W > 1 ? "s" : "", cm->ops->name,
            strategy_name[strategy]);
    double step_time = 0, loss = 0, step_cpu = 0;
    for (int s = 0; s < warmup + steps; s++) {
        if (s == warmup) {
            ag_prof_reset();
            gemm_shape_stats_reset();
            lora_gemm_amx_stats_reset();
        }
        double ts = clock_now_sec(), cs = cpu_sec();
        if (m.grad_buckets) {
            llama_grad_buckets_zero(&gbk);
            llama_grad_buckets_arm(&gbk, NULL);
        } else
            ctx.be->zero(ls.grads, (size_t)ls.n_params * sizeof(float));
        ctx.seed = rng_u64(42, 0xd509u, (uint64_t)s);
        ag_mark mk = ag_arena_mark(&ctx);
        double lsum = 0;
        int64_t nt = 0;
        tensor *L = llama_forward_loss(&ctx, &m, &ls, &b, 1.0f / (float)(N * W), ckpt, &lsum, &nt);
        ag_backward(&ctx, L);
        ag_arena_reset(&ctx, mk);
        if (m.grad_buckets && llama_grad_buckets_finish(&gbk, &e)) goto comm_failed;
        int pc = ag_prof_push(AG_PROF_OPTIM);
        float gn;
        if (strategy == 0) {
            gn = clip_grad_norm_backend(ctx.be, ls.grads, ls.n_params, 1.0f);
            adamw_step(&opt, &ac, 1e-4, ls.params, ls.grads, NULL);
        } else { /* the buckets reduce-scattered: the norm over the shards, AdamW on the own shard, broadcasts */
            float *g = ls.grads + sh_lo;
            double ss = 0;
            for (int64_t i = 0; i < sh_hi - sh_lo; i++) ss += (double)g[i] * g[i];
            if (comm_all_reduce_sum(cm, &ss, 1, COMM_F64, &e)) goto comm_failed;
            gn = (float)sqrt(ss);
            if (gn > 1.0f)
                for (int64_t i = 0; i < sh_hi - sh_lo; i++) g[i] *= 1.0f / gn;
            opt.n = sh_hi - sh_lo;
            adamw_step(&opt, &ac, 1e-4, ls.params + sh_lo, g, NULL);
            for (int q = 0; q < W; q++) { /* every rank's interval from its owner, in place */
                const int64_t qlo = q * shard_len < ls.n_params ? q * shard_len : ls.n_params;
                const int64_t qhi = qlo + shard_len < ls.n_params ? qlo + shard_len : ls.n_params;
                if (qhi > qlo && comm_broadcast(cm, ls.params + qlo, (size_t)(qhi - qlo), COMM_F32, q, &e))
                    goto comm_failed;
            }
        }
        ag_prof_pop(pc);
        double dt = clock_now_sec() - ts;
        loss = lsum / (double)(nt ? nt : 1);
        fprintf(stderr, "[bench] step %d%s: %.2fs, %.0f tok/s, loss %.4f, grad_norm %.3g\n", s + 1,
                s < warmup ? " (warm-up)" : "", dt, (double)N / dt, loss, gn);
        if (s >= warmup) {
            step_time += dt;
            step_cpu += cpu_sec() - cs;
        }
    }
    step_time /= steps;
    step_cpu /= steps;
    double prof[AG_PROF_N], gemm_flops;
    ag_prof_read(prof, &gemm_flops);

    double tps = (double)N / step_time;
    double fpt = model_flops_per_token(&hp, T, r);
    double achieved = fpt * tps;
    double mfu = peak > 0 ? achieved / peak : 0;
    double mfu_sustained = sustained > 0 ? achieved / sustained : 0;
    double rss = proc_peak_rss_mib();
    if (W > 1) { /* the largest over the ranks, and each */
        double *all = calloc((size_t)W, sizeof *all);
        if (!all || comm_all_gather(cm, &rss, all, 1, COMM_F64, &e)) goto comm_failed;
        for (int k = 0; k < W; k++) {
            fprintf(stderr, "[bench] rank %d peak RSS %.0f MiB\n", k, all[k]);
            if (all[k] > rss) rss = all[k];
        }
        free(all);
    }
    double prof_total = 0;
    for (int c = 0; c < AG_PROF_N; c++) prof_total += prof[c];
    /* gemm_flops counts the three GEMM classes: the blocks' frozen products, the LM head's, LoRA's */
    double gemm_s = prof[AG_PROF_GEMM] + prof[AG_PROF_LM_HEAD_GEMM] + prof[AG_PROF_LORA_GEMM];
    double gemm_rate = gemm_s > 0 ? gemm_flops / gemm_s : 0;
    double class_flops[AG_PROF_N];
    ag_prof_read_gemm_flops(class_flops);
    const int gemm_class[3] = {AG_PROF_GEMM, AG_PROF_LM_HEAD_GEMM, AG_PROF_LORA_GEMM};
    double class_rate[3];
    for (int c = 0; c < 3; c++)
        class_rate[c] = prof[gemm_class[c]] > 0 ? class_flops[gemm_class[c]] / prof[gemm_class[c]] : 0;

    printf("qlora-bench: %s, seq %d x batch %d, LoRA r %d (all linears), AdamW, checkpointing %s, %d threads%s%s\n",
           shape, T, B, r, ckpt_name[ckpt], n_threads, W > 1 || strategy ? ", " : "",
           W > 1 || strategy ? strategy_name[strategy] : "");
    if (W > 1) printf("  ranks             %10d   (tokens/s below: one rank's; peak RSS: the largest rank's)\n", W);
    printf("  tokens/s          %10.1f   (%.3f s/step, mean of %d steps)\n", tps, step_time, steps);
    printf("  CPU time          %10.3f s/step (%.2f of %d threads busy; wall/CPU shows machine contention)\n",
           step_cpu, step_cpu / step_time, n_threads);
    printf("  model FLOPs/token %10.3f G (fwd + input grad + LoRA + attention, no recompute)\n", fpt / 1e9);
    printf("  achieved          %10.1f GFLOP/s\n", achieved / 1e9);
    printf("  bf16 GEMM peak    %10.1f GFLOP/s (measured in this run: best run; median run %.1f)\n", peak / 1e9,
           sustained / 1e9);
    printf("  MFU               %10.1f %%   (of the peak; %.1f %% of the median run's rate)\n", 100 * mfu,
           100 * mfu_sustained);
    printf("  GEMM calls        %10.1f GFLOP/s inside oneDNN (%.1f%% of peak), incl. recompute\n", gemm_rate / 1e9,
           peak > 0 ? 100 * gemm_rate / peak : 0);
    printf("    by class        frozen blocks %.0f, LM head %.0f, LoRA %.0f GFLOP/s (%.0f %% of the GEMM FLOPs in "
           "%.0f %% of their time)\n",
           class_rate[0] / 1e9, class_rate[1] / 1e9, class_rate[2] / 1e9,
           gemm_flops > 0 ? 100 * class_flops[AG_PROF_LORA_GEMM] / gemm_flops : 0,
           gemm_s > 0 ? 100 * prof[AG_PROF_LORA_GEMM] / gemm_s : 0);
    printf("  peak RSS          %10.0f MiB measured, %.0f MiB predicted (%+.1f%%); arena peak %.0f MiB\n", rss,
           plan.total / 1048576.0, 100.0 * (plan.total / 1048576.0 - rss) / rss, ctx.arena.peak / 1048576.0);
    double dev_used = 0;
    if (dev_cuda) {
        double fr = 0, tt = 0;
        ag_backend_cuda_mem_info(&fr, &tt);
        dev_used = (tt - fr) / 1048576.0; /* arena chunks are kept: the run's high-water mark, roughly */
        printf("  device memory     %10.0f MiB in use after the steps (all processes), %.0f MiB predicted; %.0f MiB "
               "before the model\n",
               dev_used, plan.total / 1048576.0, (dev_total - dev_free0) / 1048576.0);
    }
    printf("  time per op class (per step; host-side timers, asynchronous on a GPU):\n");
    for (int c = 0; c < AG_PROF_N; c++)
        if (prof[c] > 0)
            printf("    %-12s %8.3f s  %5.1f%%\n", ag_prof_names[c], prof[c] / steps, 100 * prof[c] / prof_total);
    int64_t amx_calls = 0;
    double amx_s = 0, amx_f = 0;
    lora_gemm_amx_stats(&amx_calls, &amx_s, &amx_f);
    if (amx_calls > 0)
        printf("  LoRA products on qlora's AMX kernels (autograd/lora_gemm.c): %.1f calls, %.3f s, %.0f GFLOP/s per "
               "step\n",
               (double)amx_calls / steps, amx_s / steps, amx_s > 0 ? amx_f / amx_s / 1e9 : 0.0);
    gemm_shape_stat shp[8];
    const int nshp = gemm_shape_stats(shp, 8);
    if (nshp > 0) {
        printf("  slowest oneDNN GEMM shapes (per step; C (M, N) = op(A) (M, K) · op(B) (K, N), as oneDNN ran them):\n");
        for (int i = 0; i < nshp; i++)
            printf("    %6lld x %-6lld x %-6lld %s%s %s %5.1f calls %7.3f s %7.0f GFLOP/s\n", (long long)shp[i].M,
                   (long long)shp[i].N, (long long)shp[i].K, shp[i].trans_a ? "Aᵀ" : "A ", shp[i].trans_b ? "Bᵀ" : "B ",
                   shp[i].beta != 0.0f ? "C+=" : "C= ", (double)shp[i].calls / steps, shp[i].seconds / steps,
                   2.0 * (double)shp[i].M * (double)shp[i].N * (double)shp[i].K * (double)shp[i].calls /
                       shp[i].seconds / 1e9);
    }
    printf("{\"shape\":\"%s\",\"seq\":%d,\"batch\":%d,\"lora_r\":%d,\"layers\":%d,\"checkpointing\":%s,"
           "\"checkpointing_mode\":\"%s\",\"threads\":%d,"
           "\"steps\":%d,\"tokens_per_s\":%.2f,\"s_per_step\":%.4f,\"cpu_s_per_step\":%.4f,\"model_gflop_per_token\":%.4f,"
           "\"achieved_gflops\":%.1f,\"peak_gflops\":%.1f,\"mfu\":%.4f,\"sustained_gflops\":%.1f,"
           "\"mfu_sustained\":%.4f,\"gemm_gflops\":%.1f,"
           "\"peak_rss_mb\":%.1f,\"predicted_peak_mb\":%.1f,\"arena_peak_mb\":%.1f,\"device_used_mb\":%.1f,"
           "\"predicted_activations_mb\":%.1f,\"loss\":%.5f,\"world_size\":%d,\"strategy\":\"%s\",\"base\":\"%s\"",
           shape, T, B, r, hp.n_layer, ckpt ? "true" : "false", ckpt_name[ckpt], n_threads, steps, tps, step_time, step_cpu, fpt / 1e9, achieved / 1e9,
           peak / 1e9, mfu, sustained / 1e9, mfu_sustained, gemm_rate / 1e9, rss, plan.total / 1048576.0, ctx.arena.peak / 1048576.0, dev_used,
           plan.activations / 1048576.0, loss, W, strategy_name[strategy], g_base_int8 ? "int8" : "nf4");
    printf(",\"gemm_gflops_by_class\":{\"gemm\":%.1f,\"lm_head_gemm\":%.1f,\"lora_gemm\":%.1f}", class_rate[0] / 1e9,
           class_rate[1] / 1e9, class_rate[2] / 1e9);
    printf(",\"op_seconds_per_step\":{");
    for (int c = 0; c < AG_PROF_N; c++) printf("%s\"%s\":%.4f", c ? "," : "", ag_prof_names[c], prof[c] / steps);
    printf("}}\n");
    (void)rss_start;

    free(ids);
    free(tgt);
    free(pos);
    adamw_state_free(&opt);
    ag_ctx_free(&ctx);
    if (m.grad_buckets) {
        llama_grad_buckets_free(&gbk);
        m.grad_buckets = NULL;
    }
    free(bench_cuts);
    lora_set_free(&ls);
    llama_free(&m);
    gemm_shutdown();
    comm_free(cm);
    return 0;
comm_failed:
    dprintf(cm->err_fd, "qlora-bench: rank %d: %s\n", rank, e.msg);
    comm_abort(cm, 1);
}
