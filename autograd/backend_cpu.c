/* autograd/backend_cpu.c — the `cpu` backend: the CPU engine's kernels
 * (autograd/backend_cpu_kernels.inc) with their vector paths — the AVX-512 row
 * kernels where the compiler targets AVX-512F/BW (the Makefile's
 * -march=native), the oneDNN GEMM (autograd/gemm.c), the AVX-512 NF4
 * dequantization of quant/nf4.c. */
#define CPU_VECTOR 1
#define CPU_GEMM gemm
#define CPU_LORA_GEMM lora_gemm /* AMX kernels for the LoRA products where the processor has AMX */
#define CPU_NF4_ROWS_F32 nf4_dequantize_rows_f32
#define CPU_NF4_ROWS_BF16 nf4_dequantize_rows_bf16
#define CPU_NF4_T_BF16 nf4_dequantize_t_bf16
#define CPU_INT8_ROWS_F32 int8_dequantize_rows_f32
#define CPU_INT8_ROWS_BF16 int8_dequantize_rows_bf16
#define CPU_TABLE ag_backend_cpu
#define CPU_NAME "cpu"
#define CPU_SHARED_DEFS 1 /* the one definition of the table's shared functions (backend_cpu_nn.inc) */
#include "autograd/lora_gemm.h"
#include "autograd/backend_cpu_kernels.inc"

int ag_backend_cpu_vector_ok(void) {
#ifdef OPS_AVX512
    /* compiled for AVX-512: the processor must have it (a binary copied to an older machine) */
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
#ifdef __AVX512BF16__
           /* attention's vdpbf16ps kernel (autograd/backend_cpu_nn.inc); AMX is asked for at run time */
           && __builtin_cpu_supports("avx512bf16")
#endif
        ;
#else
    return 1; /* no vector path compiled in: the table is the scalar code, which runs anywhere */
#endif
}
