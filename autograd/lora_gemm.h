/* autograd/lora_gemm.h — the CPU backend's entry for the LoRA products (ag_backend.lora_gemm).
 *
 * The adapters' products have one side of size r (or n·r for a group): u = x·Aᵀ and du = s·dy·B give an
 * (N tokens, r) output from an (N, in|out) bf16 operand; dA = duᵀ·x and dB = s·dyᵀ·u reduce an (N, in|out)
 * operand over the tokens into an (r, in) or (out, r) gradient. oneDNN runs them at 100–300 GFLOP/s on
 * an AMX machine where it runs the frozen products at ≈ 1500 (it packs the wide operand for every call):
 * they are a fifth of a no-checkpointing step there, for 5 % of its GEMM FLOPs (README, Benchmark).
 *
 * lora_gemm has gemm()'s contract (autograd/gemm.h) and computes exactly gemm()'s maths. Where the processor
 * has AMX-BF16 and the kernel grants the tile state (and QLORA_CPU_AMX is not 0), two shapes run on qlora's
 * own AMX kernels, each reading the wide operand once, in place:
 *   - "skinny output" (!trans_a, N <= 64, K % 32 == 0): C (M, N) (+)= alpha · A (M, K) · op(B) (K, N); the
 *     rows of A are the tiles' A operand as they lie in memory, op(B) is repacked once per call into
 *     AMX's pair layout (K/2 × N × 2, at most 64·K bf16).
 *   - "skinny reduction" (trans_a, !trans_b, and M <= 64 with N % 16 == 0, or N <= 64 with M % 16 == 0):
 *     C (M, N) (+)= alpha · Aᵀ · B with K the tokens: the skinny side transposed once (r × K), the wide side
 *     read 32 tokens at a time and its token pairs interleaved in a 4 KiB buffer (the tiles' B layout).
 *   - "short K" (!trans_a, K = r even and <= 32, N % 16 == 0, beta 0): y = s·u·Bᵀ and a fresh dx = du·A, one
 *     tdpbf16ps per 16 × 16 output tile, scaled by alpha and stored once (oneDNN copies B and runs a kernel
 *     made for long K on them).
 * Every other call (fp32 operands, an accumulated K = r product, other shapes) is gemm().
 *
 * Numbers: each output element is the fp32 sum of its bf16 products in pair order of K (tdpbf16ps), a
 * different order from oneDNN's, so results differ from gemm()'s by fp32 rounding; they do not depend on
 * the number of threads (the work is split by output rows or columns, each summed whole by one thread).
 * Source of the layout and the instruction: Intel SDM vol. 2, TDPBF16PS, and the AMX programming
 * reference (tile configuration palette 1). */
#ifndef QLORA_AUTOGRAD_LORA_GEMM_H
#define QLORA_AUTOGRAD_LORA_GEMM_H

#include <stdint.h>

#include "autograd/gemm.h"

/* gemm()'s contract (autograd/gemm.h): C[M,N] = alpha op(A)[M,K] op(B)[K,N] + beta C, row-major, A and B
 * both bf16 or both fp32, C fp32, beta 0 or 1. Counts its FLOPs and time in the profile as gemm() does.
 * Aborts only where gemm() would (a oneDNN failure) or on out of memory for its packing buffers. */
void lora_gemm(int trans_a, int trans_b, int64_t M, int64_t N, int64_t K, float alpha, const void *A,
               int64_t lda, const void *B, int64_t ldb, float beta, float *C, int64_t ldc, gemm_dtype dt);

/* 1 when lora_gemm's AMX kernels are compiled in, the processor has AMX-BF16, the kernel granted the tile
 * state and neither QLORA_CPU_AMX (all AMX kernels) nor QLORA_LORA_AMX (these alone, for an A/B in one
 * binary) is 0 (asked once, outside parallel regions). QLORA_LORA_SHORTK=0 leaves the short-K products
 * alone on oneDNN. */
int lora_gemm_amx_active(void);

/* Calls and seconds the AMX kernels ran since the last reset (qlora-bench and the tests). */
void lora_gemm_amx_stats(int64_t *calls, double *seconds, double *flops);
void lora_gemm_amx_stats_reset(void);

#endif
