/* optim/adamw8bit.h — AdamW with bitsandbytes' blockwise 8-bit states
 * (bnb.optim.AdamW8bit, Dettmers et al., "8-bit Optimizers via Block-wise
 * Quantization", arXiv 2110.02861).
 *
 * The parameter arena is split into its tensors (segments). A segment of at
 * least min_8bit_size elements (bnb's default 4096) keeps m and v as one byte
 * each: an index into a 256-entry dynamic quantization map (signed for m,
 * unsigned for v; adamw8_dynamic_map) times the absmax of its block of 256
 * elements (blocks start at the segment's first element). Smaller segments
 * keep fp32 m and v, as bnb does. State memory: 2 bytes + 8/256 bytes per
 * element instead of AdamW's 8.
 *
 * One step, exactly as bitsandbytes 0.50's CPU kernels order it
 * (backends/cpu/ops.py _optimizer_update_8bit_blockwise_cpu, "adam", and
 * _optimizer_update_32bit_cpu for the small segments), in fp32 with t = step:
 *   8-bit:  m = deq(q1)·b1 + (1−b1)·g;  v = deq(q2)·b2 + (1−b2)·g·g
 *           p = p·(1 − lr·wd)   (wd > 0)
 *           p = p + (−lr/(1−b1^t)) · m / (sqrt(v)/sqrt(1−b2^t) + eps)
 *           q = the map entry nearest x / absmax(block) (bnb's quantize_blockwise: its
 *           default and CUDA kernels), absmax = max |x| of the block
 *   32-bit: m, v as above (fp32 kept); p = p·(1 − lr·wd);
 *           p = p + (−lr·sqrt(1−b2^t)/(1−b1^t)) · m / (sqrt(v) + eps·sqrt(1−b2^t))
 * The update is not AdamW's bit for bit (the states are rounded each step);
 * tests/test_optim.c checks it against bnb's own run within a written
 * tolerance (tests/fixtures/adamw8bit_ref.qref.gz). CPU memory only.
 */
#ifndef QLORA_OPTIM_ADAMW8BIT_H
#define QLORA_OPTIM_ADAMW8BIT_H

#include <stdint.h>

#include "core/status.h"
#include "optim/adamw.h"

#define ADAMW8_BLOCK 256            /* elements per absmax block (bnb's optimizer blocksize) */
#define ADAMW8_MIN_8BIT_SIZE 4096   /* bnb's min_8bit_size: smaller tensors keep fp32 states */

/* bitsandbytes.functional.create_dynamic_map(signed, max_exponent_bits=7, total_bits=8) as bnb
 * 0.50.2 computes it: 256 ascending values in [-1, 1] (signed) or [0, 1], copied into map[256]. */
void adamw8_dynamic_map(int is_signed, float map[256]);

/* The midpoints of a map's consecutive entries (fp32, as torch computes (map[:-1] + map[1:]) / 2). */
void adamw8_bounds(const float map[256], float bounds[255]);
/* The map index bitsandbytes stores for a normalized value z in [-1, 1]: the number of bounds below z
 * (the nearest entry; a tie goes to the lower). */
uint8_t adamw8_quantize_one(const float bounds[255], float z);

typedef struct adamw8_segment {
    int64_t off, n;   /* elements [off, off + n) of the arena */
    int q8;           /* 1: 8-bit states; 0: fp32 states */
    int64_t block0;   /* q8: index of its first block in absmax1/2 */
    int64_t small0;   /* !q8: offset of its states in m32/v32 */
} adamw8_segment;

typedef struct adamw8_state {
    int64_t n, step;
    int n_seg;
    adamw8_segment *seg;
    uint8_t *q1, *q2;          /* (n) map indices of m and v (used in 8-bit segments) */
    float *absmax1, *absmax2;  /* (n_blocks) */
    int64_t n_blocks;
    float *m32, *v32;          /* (n_small) fp32 states of the small segments */
    int64_t n_small;
    float map1[256], map2[256]; /* signed (m) and unsigned (v) dynamic maps */
    float bounds1[255], bounds2[255]; /* their midpoints (adamw8_bounds) */
} adamw8_state;

/* adamw8_state_init: segments of the arena given by seg_n[i] elements each, consecutive from 0
 * (their sum is the arena's size); min_8bit_size: ADAMW8_MIN_8BIT_SIZE as bnb. States start at
 * zero (codes 0 with absmax 0, as bnb's zeroed buffers). Errors: a negative size, out of memory. */
int adamw8_state_init(adamw8_state *s, const int64_t *seg_n, int n_seg, int64_t min_8bit_size, qerr *e);
void adamw8_state_free(adamw8_state *s);

/* Bytes of state for segments of these sizes (the memory planner's figure). */
int64_t adamw8_state_bytes(const int64_t *seg_n, int n_seg, int64_t min_8bit_size);

/* One step over param/grad (n,) fp32, host memory; c: betas, eps, weight_decay; lr the scheduled
 * value. OpenMP-parallel over blocks; the result does not depend on the thread count. */
void adamw8_step(adamw8_state *s, const adamw_config *c, double lr, float *param, const float *grad);

/* m and v of element range as fp32 (dequantized where 8-bit): m, v (n,) each. */
void adamw8_dequantize(const adamw8_state *s, float *m, float *v);

#endif
