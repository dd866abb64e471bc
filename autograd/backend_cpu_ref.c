/* autograd/backend_cpu_ref.c — the `cpu-ref` backend: the same kernels
 * (autograd/backend_cpu_kernels.inc) built from their scalar branches, the
 * reference the vector paths are tested against (tests/test_backend_ops.c):
 * the `#else` branches of the row kernels (CPU_VECTOR 0 leaves OPS_AVX512
 * undefined), quant/nf4.c's scalar nf4_dequantize_rows_*_ref, and the plain
 * GEMM below instead of oneDNN. Selectable for a whole run with
 * QLORA_BACKEND=cpu-ref (slow: the GEMM is three loops). */
#include <stdint.h>

#include "autograd/gemm.h"
#include "core/bf16.h"

/* C = alpha · op(A) op(B) + beta · C with each dot product summed in double
 * in k order and rounded once to fp32 (a reference: more accurate than any
 * fp32-accumulating GEMM, so the NMSE bounds of the test are the fast
 * GEMM's own rounding). Operands bf16 or fp32 as gemm_dtype says. */
static inline float gemm_ref_load(const void *X, int64_t i, gemm_dtype dt) {
    return dt == GEMM_BF16 ? bf16_to_f32(((const bf16 *)X)[i]) : ((const float *)X)[i];
}

static void gemm_ref(int trans_a, int trans_b, int64_t M, int64_t N, int64_t K, float alpha, const void *A,
                     int64_t lda, const void *B, int64_t ldb, float beta, float *C, int64_t ldc, gemm_dtype dt) {
    for (int64_t i = 0; i < M; i++)
        for (int64_t j = 0; j < N; j++) {
            double acc = 0.0;
            for (int64_t k = 0; k < K; k++) {
                float a = gemm_ref_load(A, trans_a ? k * lda + i : i * lda + k, dt);
                float b = gemm_ref_load(B, trans_b ? j * ldb + k : k * ldb + j, dt);
                acc += (double)a * (double)b;
            }
            float r = (float)((double)alpha * acc);
            C[i * ldc + j] = beta != 0.0f ? C[i * ldc + j] + r : r;
        }
}

#define CPU_VECTOR 0
#define CPU_GEMM gemm_ref
#define CPU_NF4_ROWS_F32 nf4_dequantize_rows_f32_ref
#define CPU_NF4_ROWS_BF16 nf4_dequantize_rows_bf16_ref
#define CPU_NF4_T_BF16 nf4_dequantize_t_bf16_ref
#define CPU_INT8_ROWS_F32 int8_dequantize_rows_f32_ref
#define CPU_INT8_ROWS_BF16 int8_dequantize_rows_bf16_ref
#define CPU_TABLE ag_backend_cpu_ref
#define CPU_NAME "cpu-ref"
#include "autograd/backend_cpu_kernels.inc"
