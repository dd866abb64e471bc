/* optim/adamw8bit.h — bitsandbytes' 8-bit AdamW (bnb.optim.AdamW8bit): what HF Trainer runs for
 * optim "adamw_bnb_8bit" and "adamw_8bit", and with paged (CUDA unified) memory for
 * "paged_adamw_8bit" — on the CPU the same maths.
 *
 * Per parameter tensor, as bitsandbytes decides per torch parameter: a tensor of at least
 * min_8bit_size (4096) elements keeps its two moments as 8-bit codes, blockwise (blocks of 256 of
 * the tensor's elements, one fp32 absmax per block) into the dynamic quantization maps of
 * Dettmers et al. 2022 ("8-bit Optimizers via Block-wise Quantization", arXiv:2110.02861;
 * bitsandbytes functional.create_dynamic_map, signed for m, unsigned for v); a smaller tensor keeps
 * fp32 moments and bitsandbytes' 32-bit Adam update. The maps are computed here as
 * create_dynamic_map computes them (tests/test_adamw8bit.c checks them against bitsandbytes'); the
 * quantizer is the library's CPU one (quant/blockwise8.h). The update
 * sequences are the ones bitsandbytes' CPU backend runs (autograd/backend_cpu_optim.inc), and
 * differ from torch.optim.AdamW's (optim/adamw.h): bias corrections fold into the step size and
 * denominator as bitsandbytes folds them.
 *
 * Memory: 2 bytes per element of the 8-bit tensors plus 8 bytes per 256 of them, 8 bytes per
 * element of the small ones — about a quarter of fp32 AdamW's 8.
 */
#ifndef QLORA_OPTIM_ADAMW8BIT_H
#define QLORA_OPTIM_ADAMW8BIT_H

#include <stdint.h>

#include "autograd/backend.h"
#include "core/status.h"
#include "optim/adamw.h"

#define ADAMW8BIT_BLOCKSIZE 256
#define ADAMW8BIT_MIN_8BIT_SIZE 4096

/* One parameter tensor of the flat arena. */
typedef struct adamw8bit_tensor {
    int64_t offset, numel; /* elements of the flat parameter arena */
    int eight_bit;         /* numel >= min_8bit_size */
    int64_t block0;        /* 8-bit: its first block in absmax1/absmax2 */
    int64_t off32;         /* 32-bit: its first element in m32/v32 */
} adamw8bit_tensor;

typedef struct adamw8bit_state {
    const ag_backend *be; /* where every array below lives and the update runs */
    int64_t n, step;      /* parameters; completed updates (bnb's state["step"]) */
    int n_tensors;
    adamw8bit_tensor *tensors; /* host */
    uint8_t *state1, *state2;  /* (n) codes of m and v (bnb's state1/state2); 0 over 32-bit tensors */
    int64_t n_blocks;
    float *absmax1, *absmax2;  /* (n_blocks) */
    int64_t n32;
    float *m32, *v32;          /* (n32) fp32 moments of the tensors below min_8bit_size */
    float qmap1[256], qmap2[256]; /* host: signed (m) and unsigned (v) dynamic maps */
    float *dev_qmap1, *dev_qmap2; /* the same in be's memory (the kernel reads them there) */
    uint8_t *lut1, *lut2;         /* be's memory: the maps' quantizer tables (quant/blockwise8.h) */
} adamw8bit_state;

/* The dynamic quantization maps of bitsandbytes' create_dynamic_map(signed, max_exponent_bits 7,
 * total_bits 8), 256 sorted fp32 values each, as bitsandbytes returns them (bw8_dynamic_map). */
void adamw8bit_dynamic_map(int is_signed, float code[256]);

/* Bytes of the state for tensors of these sizes (numel[i], i < n_tensors): the memory planner's
 * figure (codes, absmax, fp32 moments of the small tensors, the maps and their tables). The codes
 * are kept for every element (those of small tensors unused), so: 2 bytes per element plus the
 * rest. */
int64_t adamw8bit_state_bytes(const int64_t *numel, int n_tensors);

/* Allocate a zeroed state in backend be's memory for a flat arena of n parameters made of n_tensors
 * tensors (offset[i], numel[i]: disjoint, inside [0, n)). Errors (-1, *e, *s zeroed): a tensor
 * outside the arena, a backend without the 8-bit update (names the backend), out of memory. */
int adamw8bit_state_init(adamw8bit_state *s, const ag_backend *be, int64_t n, const int64_t *offset,
                         const int64_t *numel, int n_tensors, qerr *e);

void adamw8bit_state_free(adamw8bit_state *s);

/* One update of param (n) fp32 from grad (n) fp32 (both be's memory) at learning rate lr, with
 * c's betas, eps and weight_decay (decay applied to every element, as bitsandbytes does in one
 * parameter group). Increments s->step first (t = step after), bias corrections in double:
 *   8-bit tensors:  per block dequantize, m = fma(g, 1-b1, m*b1), v = v*b2 + ((1-b2)*g)*g,
 *                   p = p*(1-lr*wd), p = p + ((-lr/(1-b1^t))*m) / (sqrt(v)/sqrt(1-b2^t) + eps),
 *                   quantize m and v again;
 *   small tensors:  m, v as above in fp32, p = p*(1-lr*wd),
 *                   p = fma(m / (sqrt(v) + eps*sqrt(1-b2^t)), -lr*sqrt(1-b2^t)/(1-b1^t), p). */
void adamw8bit_step(adamw8bit_state *s, const adamw_config *c, double lr, float *param, const float *grad);

#endif
