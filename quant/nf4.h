/* quant/nf4.h — bitsandbytes-compatible NF4 (4-bit NormalFloat) with double quantization.
 *
 * A frozen base weight W (rows = out_features, cols = in_features, row-major as
 * nn.Linear.weight) is flattened and cut into blocks of `blocksize` consecutive
 * elements (default 64; blocks may straddle rows). Each block keeps its fp32
 * absmax; each element becomes the index of the NF4 code whose bucket holds
 * w * (1/absmax) (bnb's fp32 midpoints between codes; nearest code up to one
 * ulp). Two indices share a byte, element 2i in the HIGH nibble.
 * With double quantization (bnb `compress_statistics=True`) the fp32 absmax
 * vector is replaced by: offset = mean(absmax), and 8-bit blockwise codes of
 * (absmax - offset) in groups of 256 with the bnb "dynamic" map, one fp32
 * nested absmax per group:
 *     absmax[b] = nested_code[absmax_q[b]] * nested_absmax[b / 256] + offset
 * Dequantisation: w = nf4_code[q] * absmax[block], in fp32, then (for bf16
 * output) rounded to nearest-even.
 *
 * Which bitsandbytes: its CPU backend as `pip install bitsandbytes` runs it on
 * a machine without a GPU (bitsandbytes/backends/cpu/ops.py +
 * backends/default/ops.py for quantize_4bit, the native CPU library's 65536-bin
 * lookup for the 8-bit quantize_blockwise used by double quantization), with PyTorch's
 * CPU kernels for the tensor arithmetic around them. Every rounding step is
 * documented in nf4.c next to the code that reproduces it, together with the
 * places where bnb's result depends on the machine (torch's mean over more
 * than 32768 blocks with several threads; bf16 conversion of subnormal
 * values). tests/test_reference_nf4.c compares against the library itself
 * (bitsandbytes 0.50.2, fixtures from scripts/make_reference.py).
 *
 * The trainer never dequantizes a base weight whole: it calls
 * nf4_dequantize_rows_bf16/_f32 per layer into a scratch buffer right before
 * each GEMM (forward and backward). Those two functions are the hot path; they
 * are OpenMP-parallel over blocks and their results do not depend on the
 * number of threads.
 */
#ifndef QLORA_QUANT_NF4_H
#define QLORA_QUANT_NF4_H

#include <stddef.h>
#include <stdint.h>

#include "core/status.h"

#define NF4_DEFAULT_BLOCKSIZE 64
#define NF4_MIN_BLOCKSIZE 32
#define NF4_MAX_BLOCKSIZE 4096
#define NF4_NESTED_BLOCKSIZE 256 /* bnb quantize_4bit: quantize_blockwise(absmax - offset, blocksize=256) */

/* The 16 NF4 code values, ascending, exact 0 at index 7 (bnb
 * functional.py::get_4bit_type("nf4") / backends/utils.py::_NF4_QUANT_TABLE). */
extern const float nf4_code[16];

/* One quantized weight matrix. Its buffers are either owned (nf4_alloc,
 * nf4_quantize: nf4_free releases them) or a view into memory someone else
 * owns (nf4_view: e.g. a model layer's one allocation, model/llama.h
 * llama_layer_layout; nf4_free only forgets them). */
typedef struct nf4_tensor {
    int64_t rows, cols;     /* logical [out, in], row-major as nn.Linear.weight */
    int64_t n;              /* rows * cols */
    int64_t nblocks;        /* ceil(n / blocksize) */
    int blocksize;          /* power of two in [32, 4096] */
    int double_quant;       /* 1: absmax held as 8-bit codes (bnb compress_statistics) */
    uint8_t *packed;        /* (ceil(n/2),) u8: byte i = q[2i] << 4 | q[2i+1]; odd n padded with nibble 7
                             * (bnb pads the scaled values with 0.0) */
    float *absmax;          /* (nblocks,) f32 block scales (a partial last block stores max(absmax, 1e-38),
                             * as bnb does); NULL when double_quant */
    uint8_t *absmax_q;      /* (nblocks,) u8 indices into nested_code; NULL unless double_quant */
    float *nested_absmax;   /* (ceil(nblocks/256),) f32; NULL unless double_quant */
    float offset;           /* f32 mean of the original absmax (double_quant only, else 0) */
    int is_view;            /* 1: the four buffers above belong to the caller of nf4_view */
    float nested_code[256]; /* 8-bit map absmax_q indexes (double_quant only): bnb's `state2.code`,
                             * i.e. `nested_quant_map` in a bnb-4bit safetensors checkpoint */
} nf4_tensor;

/* nf4_quantize: quantize w (rows, cols) f32 row-major into out.
 *   blocksize: power of two in [32, 4096] (bnb default and the trainer's: 64).
 *   double_quant: 0 -> fp32 absmax per block; 1 -> bnb double quantization.
 * Parallel over blocks with OpenMP; the result is identical for any number of
 * threads. On success *out owns new buffers (release with nf4_free).
 * Errors (-1, *e filled, *out zeroed): rows or cols < 1, bad blocksize, a
 * non-finite weight (the message names its flat index), out of memory. */
int nf4_quantize(const float *w, int64_t rows, int64_t cols, int blocksize, int double_quant,
                 nf4_tensor *out, qerr *e);

/* nf4_quantize_bf16: the same for a bf16 source (u16 bit patterns, e.g. an HF
 * safetensors checkpoint). Identical to converting to f32 first (bf16 -> f32 is
 * exact and bnb computes on the promoted f32 values). Same errors. */
int nf4_quantize_bf16(const uint16_t *w, int64_t rows, int64_t cols, int blocksize, int double_quant,
                      nf4_tensor *out, qerr *e);

/* nf4_check_geometry: 0 if (rows, cols, blocksize) is a shape nf4_alloc
 * accepts (rows, cols >= 1, rows*cols < 2^62, blocksize a power of two in
 * [32, 4096]); else -1 with the reason in *e. */
int nf4_check_geometry(int64_t rows, int64_t cols, int blocksize, qerr *e);

/* nf4_alloc: allocate an empty tensor of the given geometry for a loader that
 * fills the buffers itself (e.g. from a bnb-4bit checkpoint). packed is zeroed,
 * scales are zeroed, nested_code is set to nf4_dynamic_map() (a loader should
 * copy the checkpoint's nested_quant_map over it).
 * Errors: as nf4_quantize (geometry, memory). */
int nf4_alloc(nf4_tensor *t, int64_t rows, int64_t cols, int blocksize, int double_quant, qerr *e);

/* nf4_view: make *t a tensor of the given geometry whose buffers are the
 * caller's, for storage that holds several tensors in one allocation (a
 * model layer: model/llama.h llama_layer_layout). The buffers must hold
 *   packed:        ceil(rows*cols / 2) bytes,
 *   scales:        nblocks u8 absmax codes (double_quant) or nblocks f32
 *                  absmax (4-byte aligned), nblocks = ceil(rows*cols / blocksize),
 *   nested_absmax: ceil(nblocks / 256) f32, 4-byte aligned (double_quant; else NULL).
 * Nothing is written to them. nested_code is set to nf4_dynamic_map(), offset
 * to 0, is_view to 1: nf4_free on a view zeroes *t and frees nothing.
 * Errors (-1, *t zeroed): geometry as nf4_quantize, a NULL buffer. */
int nf4_view(nf4_tensor *t, int64_t rows, int64_t cols, int blocksize, int double_quant, uint8_t *packed,
             void *scales, float *nested_absmax, qerr *e);

/* nf4_quantize_into / nf4_quantize_bf16_into: quantize w (t->rows, t->cols)
 * into the buffers t already has (nf4_alloc or nf4_view), with t's blocksize
 * and double_quant: the same bytes nf4_quantize / nf4_quantize_bf16 produce,
 * which are these functions on a fresh nf4_alloc. Every byte of packed (odd n:
 * the pad nibble 7 included), of the scales and of nested_absmax is written,
 * and offset. Errors (-1, *e filled; t keeps its buffers, their contents
 * undefined): a NULL weight, a non-finite weight (the message names its row
 * and column), out of memory (double quantization's 64 KiB table). */
int nf4_quantize_into(const float *w, nf4_tensor *t, qerr *e);
int nf4_quantize_bf16_into(const uint16_t *w, nf4_tensor *t, qerr *e);

/* nf4_absmax_blocks: the fp32 absmax of each of the ceil(n / blocksize)
 * blocks of w (n elements, row-major), as nf4_quantize computes it before
 * double quantization (the last partial block clamped to bnb's minimum; NaN
 * for a block holding a non-finite value). For a range quantizer that needs
 * the whole tensor's double-quant offset (nf4_quantize_range) while holding
 * only a few rows at a time: callers stream w in pieces of whole blocks,
 * passing each piece's n. Errors: none. */
void nf4_absmax_blocks(const float *w, int64_t n, int blocksize, float *absmax);

/* nf4_quantize_range: the bytes nf4_quantize_into writes for elements
 * [x0, x1) of t's tensor (x0, x1 multiples of t->blocksize, x1 <= nblocks *
 * blocksize), from w = elements x0 .. min(x1, n) - 1 only — what a FULL_SHARD
 * rank quantizes of a linear it holds a part of (model/llama_fsdp.c):
 *   packed   (x1 - x0) / 2 bytes: the nibbles of elements x0 .. x1 - 1;
 *   scales   the blocks x0/bs .. x1/bs - 1: u8 codes (double_quant) or f32 absmax;
 *   nested   double_quant: the nested absmax of groups g0 = x0/bs/256 ..
 *            (x1/bs - 1)/256 (a group cut by x0 or x1 is written whole);
 *   offset   double_quant: the tensor's offset (mean absmax).
 * Double quantization needs every block's absmax of the tensor: absmax_all
 * (nblocks f32 from nf4_absmax_blocks over the whole tensor); NULL without
 * double_quant. t gives geometry, blocksize, double_quant and nested_code
 * (its buffers are not touched). Byte for byte what nf4_quantize_into puts
 * at those places (tests/test_nf4.c). Errors (-1): a bad range, a
 * non-finite weight (row and column named), out of memory. */
int nf4_quantize_range(const float *w, int64_t x0, int64_t x1, const nf4_tensor *t, const float *absmax_all,
                       uint8_t *packed, void *scales, float *nested, float *offset, qerr *e);

/* nf4_free: release the buffers (unless t is a view) and zero *t. Safe on a
 * zeroed or freed tensor. */
void nf4_free(nf4_tensor *t);

/* nf4_nbytes: bytes of quantized data held: packed nibbles + block scales
 * (fp32 absmax, or u8 codes + fp32 nested absmax + the fp32 offset). The
 * 1 KiB nested_code map (the same for every tensor) is not counted.
 * NF4-64 with double quant: 0.5 + 1/64 + 4/(64*256) ~= 0.5159 bytes/param. */
size_t nf4_nbytes(const nf4_tensor *t);

/* nf4_block_absmax: the fp32 scale of block b (0 <= b < nblocks), recovered
 * from the double-quantized form when t->double_quant, exactly as bnb does:
 * fl(fl(nested_code[q] * nested_absmax[b/256]) + offset). */
float nf4_block_absmax(const nf4_tensor *t, int64_t b);

/* nf4_dequantize_rows_bf16: rows [row0, row0 + nrows) of W into dst, which is
 * (nrows, cols) bf16 row-major. Each value is bf16_rne(fp32(nf4_code[q] * absmax)),
 * bit-identical to bnb's CPU dequantize_4bit(dtype=bfloat16).
 * Preconditions (not checked in this hot path): 0 <= row0, 0 <= nrows,
 * row0 + nrows <= t->rows, dst holds nrows*cols elements. OpenMP over blocks;
 * uses AVX-512 when compiled for it; result independent of thread count and
 * bit-identical to nf4_dequantize_rows_bf16_ref. */
void nf4_dequantize_rows_bf16(const nf4_tensor *t, int64_t row0, int64_t nrows, uint16_t *dst);

/* nf4_dequantize_rows_f32: as above with fp32 output (nrows, cols). */
void nf4_dequantize_rows_f32(const nf4_tensor *t, int64_t row0, int64_t nrows, float *dst);

/* nf4_dequantize_t_bf16: Wᵀ, (cols, rows) bf16 row-major: dst[i·rows + o] is the value
 * nf4_dequantize_rows_bf16 gives for W[o][i] (the input-gradient product dx = dy·W runs as dy·(Wᵀ)ᵀ,
 * which oneDNN's brgemm takes faster: autograd/backend.h frozen_t_bf16). dst holds rows*cols elements.
 * OpenMP over 32-row blocks, AVX-512 when compiled for it (64-column segments through the block kernel when
 * blocksize and cols are multiples of 64), bit-identical to nf4_dequantize_t_bf16_ref. */
void nf4_dequantize_t_bf16(const nf4_tensor *t, uint16_t *dst);
void nf4_dequantize_t_bf16_ref(const nf4_tensor *t, uint16_t *dst);

/* Reference versions: one element at a time, no SIMD, no threads. The fast
 * paths are tested against these bit for bit. Same preconditions. */
void nf4_dequantize_rows_bf16_ref(const nf4_tensor *t, int64_t row0, int64_t nrows, uint16_t *dst);
void nf4_dequantize_rows_f32_ref(const nf4_tensor *t, int64_t row0, int64_t nrows, float *dst);

/* nf4_code_index: the NF4 index for a value already scaled to [-1, 1], as
 * bnb's torch.bucketize against its fp32 bounds fl(code[k] + code[k+1]) / 2:
 * the number of bounds strictly below the value (a value exactly on a bound
 * goes to the LOWER code). This is the nearest code except for the one float
 * at each bound that fp32 rounding put above the real midpoint. NaN -> 0. */
uint8_t nf4_code_index(float scaled);

/* nf4_dynamic_map: bitsandbytes' create_dynamic_map(signed=True,
 * max_exponent_bits=7, total_bits=8) exactly as PyTorch computes it (fp32
 * linspace/means/scaling): 256 ascending values, [0] = -0.99296875,
 * [127] = 0, [255] = 1. */
void nf4_dynamic_map(float out[256]);

/* nf4_dynamic_map_cpu: the map as older bitsandbytes CPU kernels left it
 * after quantize_blockwise: identical except out[0] = -1.0f (their
 * quantize_cpu overwrote code[0] in place). bitsandbytes 0.50.2 no longer
 * does, so double quantization here uses and stores nf4_dynamic_map(); this
 * variant stays for states written by those older versions. */
void nf4_dynamic_map_cpu(float out[256]);

#endif
