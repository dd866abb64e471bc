/* bench/gpu_ops.c — `build/gpu_ops`: the CUDA backend's op rates on the card at hand, for
 * `make test-gpu` (scripts/test_gpu.sh prints its summary table from the lines here).
 *
 * Measures through the backend table (autograd/backend.h), on Llama-3-8B shapes at seq 2048:
 *   - the device memory of the CUDA runtime (context, kernels, cuBLASLt workspace) with
 *     cudaMemGetInfo, against the planner's estimate for it (trainer/memplan.c);
 *   - the bf16 GEMMs of one block's seven frozen linears in a checkpointed QLoRA step (forward
 *     X·Wᵀ, its recomputation, the input gradient dY·W), TFLOP/s and the fraction of the card's
 *     dense bf16 peak (fp32 accumulate);
 *   - NF4 -> bf16 dequantization of the largest linear (GB/s of bf16 written);
 *   - causal GQA attention forward + backward (32 heads, 8 KV heads, head_dim 128);
 *   - an estimate (labelled so) of a training step of Llama-3-8B QLoRA r 16 from those
 *     measured pieces: tokens/s and MFU by 6·N FLOPs per token.
 * Exit 1 without a CUDA device (nothing is measured then).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "autograd/backend.h"
#include "autograd/tensor.h"
#include "core/clock.h"
#include "core/rng.h"
#include "quant/nf4.h"

/* Dense bf16 peaks with fp32 accumulation, TFLOP/s (vendor data sheets; issue 13). */
static double card_peak(const char *name) {
    static const struct {
        const char *match;
        double tflops;
    } t[] = {{"H200", 989}, {"H100 PCIe", 756}, {"H100", 989}, {"A100", 312}, {"RTX 4090", 165},
             {"RTX 3090", 71}, {"L40S", 362}, {"L40", 181}, {"A10G", 70}, {"L4", 121}};
    for (size_t i = 0; i < sizeof t / sizeof t[0]; i++)
        if (strstr(name, t[i].match)) return t[i].tflops * 1e12;
    return 0;
}

static void *dev_rand_bf16(const ag_backend *be, int64_t n, uint64_t seed) {
    bf16 *h = malloc((size_t)n * 2);
    if (!h) abort();
    for (int64_t i = 0; i < n; i++) h[i] = f32_to_bf16(0.05f * (rng_uniform(seed, 1, (uint64_t)i) - 0.5f));
    void *d = be->alloc((size_t)n * 2);
    if (!d) abort();
    be->copy_h2d(d, h, (size_t)n * 2);
    free(h);
    return d;
}

int main(void) {
    const ag_backend *be = ag_backend_find("cuda");
    char name[256];
    if (!be || ag_backend_cuda_device_name(name, sizeof name, NULL)) {
        printf("device none\n");
        fprintf(stderr, "gpu_ops: no CUDA device (or no CUDA backend in this binary)\n");
        return 1;
    }
    double fr0, tot;
    ag_backend_cuda_mem_info(&fr0, &tot);
    printf("device %s\n", name);
    printf("device_memory_total_mib %.0f\n", tot / 1048576.0);
    printf("runtime_used_mib %.0f\n", (tot - fr0) / 1048576.0);
    double peak = card_peak(name);
    printf("peak_bf16_tflops %.0f\n", peak / 1e12);

    /* Llama-3-8B block linears at 2048 tokens */
    const int64_t N = 2048, D = 4096, F = 14336, KV = 1024;
    const int64_t outs[7] = {D, KV, KV, D, F, F, D}, ins[7] = {D, D, D, D, D, D, F};
    int64_t maxw = F * D;
    void *X = dev_rand_bf16(be, N * F, 1), *W = dev_rand_bf16(be, maxw, 2), *G = dev_rand_bf16(be, N * F, 3);
    float *C = be->alloc((size_t)(N * F) * 4);
    if (!C) abort();
    double flops = 0;
    for (int rep = 0; rep < 2; rep++) { /* the first pass builds the plans */
        be->sync();
        double t0 = clock_now_sec();
        for (int k = 0; k < 7; k++) {
            int64_t o = outs[k], in = ins[k];
            be->gemm(0, 1, N, o, in, 1.0f, X, in, W, in, 0.0f, C, o, GEMM_BF16);  /* Y = X Wᵀ */
            be->gemm(0, 0, N, in, o, 1.0f, G, o, W, in, 0.0f, C, in, GEMM_BF16);  /* dX = dY W */
            be->gemm(0, 1, N, o, in, 1.0f, X, in, W, in, 0.0f, C, o, GEMM_BF16);  /* the recomputed forward */
            if (rep) flops += 3 * 2.0 * (double)N * o * in;
        }
        be->sync();
        if (rep) {
            double dt = clock_now_sec() - t0;
            printf("gemm_block_ms %.3f\n", dt * 1e3);
            printf("gemm_tflops %.1f\n", flops / dt / 1e12);
            if (peak > 0) printf("gemm_frac_peak %.3f\n", flops / dt / peak);
        }
    }
    /* NF4 dequantization of the largest linear (random codes; the rate does not depend on them) */
    nf4_tensor t;
    qerr e = {{0}};
    if (nf4_alloc(&t, F, D, 64, 1, &e)) {
        fprintf(stderr, "gpu_ops: %s\n", e.msg);
        return 1;
    }
    for (int64_t i = 0; i < (t.n + 1) / 2; i++) t.packed[i] = (uint8_t)rng_u64(4, 4, (uint64_t)i);
    for (int64_t i = 0; i < t.nblocks; i++) t.absmax_q[i] = (uint8_t)(rng_u64(5, 5, (uint64_t)i) & 0xff);
    for (int64_t i = 0; i < (t.nblocks + 255) / 256; i++) t.nested_absmax[i] = 0.01f;
    frozen_weight fw = {.out = F, .in = D, .kind = FROZEN_NF4, .nf4 = &t};
    be->frozen_rows_bf16(&fw, 0, F, W); /* uploads the mirror */
    be->sync();
    double t0 = clock_now_sec();
    for (int rep = 0; rep < 5; rep++) be->frozen_rows_bf16(&fw, 0, F, W);
    be->sync();
    double dq = (clock_now_sec() - t0) / 5;
    printf("nf4_dequant_ms %.3f\n", dq * 1e3);
    printf("nf4_dequant_gbs %.1f\n", (double)maxw * 2 / dq / 1e9);

    /* attention fwd + bwd, B 1, T 2048, H 32, KVH 8, hd 128 */
    ag_ctx ctx;
    if (ag_ctx_init_backend(&ctx, be, 256u << 20, &e)) {
        fprintf(stderr, "gpu_ops: %s\n", e.msg);
        return 1;
    }
    const int T = 2048, H = 32, KVH = 8, hd = 128;
    ag_attn a = {.qb = dev_rand_bf16(be, (int64_t)T * H * hd, 6), .kb = dev_rand_bf16(be, (int64_t)T * KVH * hd, 7),
                 .vb = dev_rand_bf16(be, (int64_t)T * KVH * hd, 8), .B = 1, .T = T, .H = H, .KVH = KVH, .hd = hd,
                 .bf16 = 1};
    a.rmax = be->alloc((size_t)H * T * 4);
    a.rinv = be->alloc((size_t)H * T * 4);
    a.seglo = be->alloc((size_t)T * 4);
    a.seg_ok = be->alloc(1);
    float *o = be->alloc((size_t)T * H * hd * 4), *dq_ = be->alloc((size_t)T * H * hd * 4);
    float *dk = be->alloc((size_t)T * KVH * hd * 4), *dv = be->alloc((size_t)T * KVH * hd * 4);
    void *dob = dev_rand_bf16(be, (int64_t)T * H * hd, 9);
    be->attention_fwd(&ctx, &a, o, NULL);
    be->sync();
    t0 = clock_now_sec();
    be->attention_fwd(&ctx, &a, o, NULL);
    be->sync();
    double tf = clock_now_sec() - t0;
    t0 = clock_now_sec();
    be->attention_bwd(&ctx, &a, dob, dq_, dk, dv, 0);
    be->sync();
    double tb = clock_now_sec() - t0;
    double af = 2.0 * 2.0 * T * (double)T / 2 * H * hd; /* causal: half the score matrix, QKᵀ and PV */
    printf("attention_fwd_ms %.3f\n", tf * 1e3);
    printf("attention_bwd_ms %.3f\n", tb * 1e3);
    printf("attention_tflops %.2f\n", 3.5 * af / (tf + tb) / 1e12);

    /* Estimate (not a measured step): 32 blocks of the measured pieces — the block's 21 GEMMs,
     * three dequantizations per linear (forward, recomputation, backward) scaled from the largest
     * one's time by size, attention forward twice (checkpointing) and backward — plus the LM head
     * (forward and input gradient at the GEMM rate measured). LoRA GEMMs (r 16) and elementwise
     * ops are left out: the estimate is an upper bound on tokens/s. */
    double lin_params = 0;
    for (int k = 0; k < 7; k++) lin_params += (double)outs[k] * ins[k];
    be->sync();
    t0 = clock_now_sec();
    for (int k = 0; k < 7; k++) {
        int64_t oo = outs[k], in = ins[k];
        be->gemm(0, 1, N, oo, in, 1.0f, X, in, W, in, 0.0f, C, oo, GEMM_BF16);
        be->gemm(0, 0, N, in, oo, 1.0f, G, oo, W, in, 0.0f, C, in, GEMM_BF16);
        be->gemm(0, 1, N, oo, in, 1.0f, X, in, W, in, 0.0f, C, oo, GEMM_BF16);
    }
    be->sync();
    double block_s = clock_now_sec() - t0;
    double rate = flops / block_s; /* FLOP/s of this card's GEMMs at these shapes */
    double head_s = 2.0 * 2.0 * (double)N * 128256.0 * D / rate;
    double step_s = 32 * (block_s + 3.0 * dq * lin_params / (double)maxw + 2 * tf + tb) + head_s;
    double tok_s = (double)N / step_s;
    double n_params = 8.03e9;
    printf("estimate_step_s %.3f\n", step_s);
    printf("estimate_tok_s %.0f\n", tok_s);
    if (peak > 0) printf("estimate_mfu %.3f\n", 6.0 * n_params * tok_s / peak);
    nf4_free(&t);
    ag_ctx_free(&ctx);
    return 0;
}
