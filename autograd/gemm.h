/* autograd/gemm.h — the one GEMM entry point of the CPU engine (oneDNN matmul).
 *
 * Row-major, BLAS-like: C[M,N] = alpha * op(A)[M,K] · op(B)[K,N] + beta * C.
 * A and B are both fp32 or both bf16; C and the accumulation are fp32 (oneDNN
 * matmul with f32 dst accumulates in f32). op(X) = X or Xᵀ; a transposed operand
 * is expressed through strides, never copied. Primitives are created once per
 * distinct (shape, strides, dtype, alpha, beta) and cached for the process.
 */
#ifndef QLORA_AUTOGRAD_GEMM_H
#define QLORA_AUTOGRAD_GEMM_H

#include <stdint.h>

#include "core/status.h"

typedef enum gemm_dtype { GEMM_F32 = 0, GEMM_BF16 = 1 } gemm_dtype;

/* A is (M, K) with leading dimension lda when !trans_a, (K, M) when trans_a;
 * B is (K, N) with ldb when !trans_b, (N, K) when trans_b; C is (M, N), ldc.
 * beta must be 0 (overwrite) or 1 (accumulate). Aborts with a message on a
 * oneDNN failure (an internal error, not bad input: shapes come from the model). */
void gemm(int trans_a, int trans_b, int64_t M, int64_t N, int64_t K, float alpha,
          const void *A, int64_t lda, const void *B, int64_t ldb, float beta,
          float *C, int64_t ldc, gemm_dtype dt);

/* Time spent per distinct GEMM shape (qlora-bench's "GEMM by shape"): every call made outside an
 * OpenMP parallel region is counted with the wall time of its execution (the host clock around oneDNN's
 * execute and wait; the operand copies of short-K products are not in it). */
typedef struct gemm_shape_stat {
    int64_t M, N, K;    /* C (M, N) = op(A) (M, K) · op(B) (K, N) */
    int trans_a, trans_b;
    float beta;         /* 0: C written; 1: C accumulated into */
    int64_t calls;
    double seconds;
} gemm_shape_stat;

/* Fills out with up to max shapes, the slowest first (by total seconds since the last reset); returns how
 * many. A shape is its (M, N, K, strides, alpha, beta, dtype) primitive, so two call sites that differ
 * only in alpha count apart. Call from outside parallel regions. */
int gemm_shape_stats(gemm_shape_stat *out, int max);

/* Zero the per-shape counters (qlora-bench: after its warm-up steps). */
void gemm_shape_stats_reset(void);

/* Release the cached primitives (end of process / tests). */
void gemm_shutdown(void);

#endif
