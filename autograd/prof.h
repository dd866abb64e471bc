/* autograd/prof.h — cheap always-on timers per op class (for qlora-bench).
 *
 * Exclusive accounting: at any moment the main thread is "in" exactly one
 * class; entering a nested class (a GEMM inside attention) charges the time so
 * far to the outer class and switches. Two clock reads per push/pop (vDSO,
 * ~20 ns); a training step makes a few thousand of them. Only the thread that
 * drives the tape calls these (never from inside an OpenMP region).
 */
#ifndef QLORA_AUTOGRAD_PROF_H
#define QLORA_AUTOGRAD_PROF_H

#include <stdint.h>

typedef enum ag_prof_class {
    AG_PROF_OTHER = 0, /* everything not inside a timed op (tape walk, data, glue) */
    AG_PROF_GEMM,      /* oneDNN matmul calls (any caller), incl. LoRA and attention GEMMs */
    AG_PROF_DEQUANT,   /* NF4 -> bf16/fp32 of frozen weights */
    AG_PROF_CONVERT,   /* fp32 -> bf16 operand copies */
    AG_PROF_ATTN,      /* attention without its GEMMs: softmax, masks, dS */
    AG_PROF_NORM,      /* RMSNorm forward/backward */
    AG_PROF_ROPE,      /* rotary embedding */
    AG_PROF_ELTWISE,   /* SwiGLU, residual adds, dropout, grad accumulation */
    AG_PROF_CE,        /* LM head softmax / cross-entropy without its GEMMs */
    AG_PROF_EMBED,     /* token embedding gather */
    AG_PROF_CKPT,      /* checkpointing copies (block outputs, recompute setup) */
    AG_PROF_OPTIM,     /* clipping + AdamW */
    AG_PROF_LM_HEAD_GEMM, /* the GEMMs of the fused LM head + cross-entropy (logits, dh): GEMM time
                             charged here instead of AG_PROF_GEMM inside ag_prof_lm_head(1) */
    AG_PROF_GRAD_ZERO,    /* zero-filling a gradient buffer when it is first asked for (ag_grad), whichever op asks */
    AG_PROF_LORA_GEMM,    /* the adapters' r-sized products (x Aᵀ, s u Bᵀ and their gradients): GEMM time charged
                             here instead of AG_PROF_GEMM inside ag_prof_lora(1) (autograd/ops.c) */
    AG_PROF_N
} ag_prof_class;

extern const char *const ag_prof_names[AG_PROF_N];

/* Switch to class c; returns the class to restore with ag_prof_pop. */
int ag_prof_push(int c);
void ag_prof_pop(int prev);
/* on = 1 while the LM head + cross-entropy runs (op_lm_head_ce_pick): GEMM time then goes to
 * AG_PROF_LM_HEAD_GEMM, so the profile shows the head apart from the blocks' GEMMs. */
void ag_prof_lm_head(int on);
/* on = 1 around a LoRA product (autograd/ops.c): its GEMM time goes to AG_PROF_LORA_GEMM, so the profile
 * shows the r-sized, memory-bound products apart from the frozen ones. */
void ag_prof_lora(int on);
/* Count 2·M·N·K FLOPs executed by the GEMM entry point. */
void ag_prof_add_gemm_flops(double flops);

/* Zero the accumulators (e.g. after warm-up). */
void ag_prof_reset(void);
/* Seconds per class since the last reset, and GEMM FLOPs executed. */
void ag_prof_read(double secs[AG_PROF_N], double *gemm_flops);
/* GEMM FLOPs since the last reset by the class their time went to (AG_PROF_GEMM, AG_PROF_LM_HEAD_GEMM,
 * AG_PROF_LORA_GEMM; a GEMM nested in another op's parallel region is not counted, as in ag_prof_read). */
void ag_prof_read_gemm_flops(double flops[AG_PROF_N]);

#endif
