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
    /* The state covers elements [lo, lo + n) of the flat arena (0 unless adamw8bit_state_init_range: one
     * rank's shard under SHARD_GRAD_OP / FULL_SHARD); its blocks are [block_lo, block_lo + n_blocks) of the
     * whole arena's block list and its fp32 moments [n32_lo, n32_lo + n32) of the whole arena's. */
    int64_t lo, block_lo, n32_lo;
    int64_t n_blocks_all, n32_all; /* the whole arena's blocks and fp32-moment elements (= n_blocks, n32 unranged) */
    int n_tensors;
    adamw8bit_tensor *tensors; /* host; offsets relative to lo (the pieces of the arena's tensors in [lo, lo + n)) */
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

/* Sharding (SHARD_GRAD_OP / FULL_SHARD, trainer/run.c): the smallest x' >= x at which a shard of the arena
 * may begin or end so that every rank's quantization blocks are exactly blocks of one process's state —
 * x itself unless x lies inside an 8-bit tensor (numel >= min_8bit_size) off its 256-element block grid
 * (bitsandbytes quantizes each parameter tensor in blocks of 256 from its first element), then the next
 * block start or the tensor's end. Tensors as adamw8bit_state_init's (arena order). */
int64_t adamw8bit_shard_cut(const int64_t *offset, const int64_t *numel, int n_tensors, int64_t x);

/* The blocks [*block_lo, *block_hi) of the whole arena's block list and the fp32-moment elements
 * [*n32_lo, *n32_hi) that the elements [lo, hi) hold (lo, hi: shard cuts). */
void adamw8bit_range_index(const int64_t *offset, const int64_t *numel, int n_tensors, int64_t lo, int64_t hi,
                           int64_t *block_lo, int64_t *block_hi, int64_t *n32_lo, int64_t *n32_hi);

/* adamw8bit_state_bytes for the part [lo, hi) of the arena (one rank's shard): 2 bytes per element,
 * 8 per block of its 8-bit pieces, 8 per element of its fp32 pieces, the maps and tables. */
int64_t adamw8bit_state_bytes_range(const int64_t *offset, const int64_t *numel, int n_tensors, int64_t lo,
                                    int64_t hi);

/* As adamw8bit_state_init for the part [lo, hi) of the arena only (one rank's shard): s->n = hi - lo,
 * s->lo = lo, the pieces of the tensors that intersect it (each keeps its whole tensor's 8-bit choice
 * and block grid), so adamw8bit_step(s, ..., param + lo, grad_shard) updates these elements exactly as
 * the whole state would. Tensors must be in arena order (increasing offsets). Errors (-1, *e): lo or
 * hi not a shard cut (adamw8bit_shard_cut), tensors out of order, and adamw8bit_state_init's. */
int adamw8bit_state_init_range(adamw8bit_state *s, const ag_backend *be, int64_t lo, int64_t hi,
                               const int64_t *offset, const int64_t *numel, int n_tensors, qerr *e);

void adamw8bit_state_free(adamw8bit_state *s);

/* One update of param (n) fp32 from grad (n) fp32 (both be's memory; with a ranged state the elements
 * [s->lo, s->lo + n) of the arena: pass param + s->lo) at learning rate lr, with
 * c's betas, eps and weight_decay (decay applied to every element, as bitsandbytes does in one
 * parameter group). Increments s->step first (t = step after), bias corrections in double:
 *   8-bit tensors:  per block dequantize, m = fma(g, 1-b1, m*b1), v = v*b2 + ((1-b2)*g)*g,
 *                   p = p*(1-lr*wd), p = p + ((-lr/(1-b1^t))*m) / (sqrt(v)/sqrt(1-b2^t) + eps),
 *                   quantize m and v again;
 *   small tensors:  m, v as above in fp32, p = p*(1-lr*wd),
 *                   p = fma(m / (sqrt(v) + eps*sqrt(1-b2^t)), -lr*sqrt(1-b2^t)/(1-b1^t), p). */
void adamw8bit_step(adamw8bit_state *s, const adamw_config *c, double lr, float *param, const float *grad);

#endif
