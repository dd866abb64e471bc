/* quant/int8.h — bitsandbytes-compatible row-wise int8 weights (LLM.int8's
 * storage: Dettmers et al. 2022, "LLM.int8(): 8-bit Matrix Multiplication for
 * Transformers at Scale", vector-wise quantization).
 *
 * A frozen base weight W (rows = out_features, cols = in_features, row-major
 * as nn.Linear.weight) is held as bitsandbytes 0.50.2 holds an Int8Params
 * (bitsandbytes/nn/modules.py Int8Params._quantize):
 *   CB   int8 (rows, cols) row-major, the codes;
 *   SCB  fp32 (rows), each row's absmax.
 * Quantization (Int8Params._quantize -> functional.int8_vectorwise_quant ->
 * backends/default/ops.py "int8_vectorwise_quant", threshold 0.0):
 *   A      = W.to(float16)                    (round to nearest even)
 *   SCB[r] = max_j |A[r, j]|                  (an fp16 value, widened to fp32)
 *   CB[r,j]= round(A[r,j] * fl(fl(1/SCB[r]) * 127)) in fp32, half to even
 *            (`127.0 / t` is torch's Tensor.__rtruediv__: reciprocal, then
 *            multiply; not the correctly rounded quotient)
 *            (torch.round), cast to int8. A zero row (SCB 0: 0 * inf = NaN)
 *            gets codes 0, as torch's NaN -> int8 cast gives on x86.
 * Dequantization, two formulas bitsandbytes uses for two purposes:
 *   int8_dequantize_*      functional.int8_vectorwise_dequant (_ops.py,
 *                          "default"): W' = (CB * SCB) * c, fp32, c =
 *                          7.874015718698502e-3 = (float)(1/127). PEFT's merge
 *                          (peft/utils/integrations.py dequantize_bnb_weight)
 *                          and qlora-export's merged weights use it.
 *   int8_dequantize_rows_* autograd/_functions.py MatMul8bitFp.forward, what a
 *                          CPU training step computes with: W' = CB * (SCB *
 *                          (float)(1/127)), rounded once to the compute dtype
 *                          (bf16 scratch, or fp32). The trainer's hot path.
 * The two differ in the last bit of fp32 for some elements (the product is
 * associated differently); tests/test_reference_int8.c checks both bit for
 * bit against the library. LLM.int8's activation quantization and outlier
 * decomposition (llm_int8_threshold) are not part of the storage and are not
 * applied here: the trainer multiplies in bf16 with fp32 accumulation
 * (README "load_in_8bit").
 */
#ifndef QLORA_QUANT_INT8_H
#define QLORA_QUANT_INT8_H

#include <stddef.h>
#include <stdint.h>

#include "core/status.h"

/* (float)(1/127): bnb's 7.874015718698502e-3 and MatMul8bitFp's 1.0 / 127.0 (the same fp32). */
#define INT8_INV127 7.874015718698502e-3f

/* int8_quantize_rows: quantize rows [0, rows) of w (rows, cols) f32 into
 * cb (rows * cols int8) and scb (rows f32), as Int8Params._quantize does.
 * Parallel over rows (OpenMP); the result does not depend on the thread count.
 * Errors (-1, *e filled; cb/scb partly written): rows or cols < 1, a weight
 * that is not finite after the fp16 conversion bnb applies (|w| >= 65520
 * overflows fp16), named by its row and column. */
int int8_quantize_rows(const float *w, int64_t rows, int64_t cols, int8_t *cb, float *scb, qerr *e);

/* int8_dequantize_f32: all of (rows, cols) as functional.int8_vectorwise_dequant:
 * dst[r, j] = ((float)cb[r, j] * scb[r]) * INT8_INV127, fp32. For exports. */
void int8_dequantize_f32(const int8_t *cb, const float *scb, int64_t rows, int64_t cols, float *dst);

/* int8_dequantize_rows_f32 / _bf16: rows [row0, row0 + nrows) of the (., cols)
 * weight as MatMul8bitFp.forward computes it: dst[i, j] = (float)cb[r, j] *
 * (scb[r] * INT8_INV127), r = row0 + i, in fp32; _bf16 rounds that to
 * nearest-even bf16 (uint16 bits) once. cb and scb point at the weight's row 0.
 * AVX-512 where built with it, OpenMP-parallel over rows; the same bits for
 * any thread count and with or without SIMD (the _ref versions are the scalar
 * reference tests/test_backend_ops.c compares with). */
void int8_dequantize_rows_f32(const int8_t *cb, const float *scb, int64_t cols, int64_t row0, int64_t nrows,
                              float *dst);
void int8_dequantize_rows_bf16(const int8_t *cb, const float *scb, int64_t cols, int64_t row0, int64_t nrows,
                               uint16_t *dst);
void int8_dequantize_rows_f32_ref(const int8_t *cb, const float *scb, int64_t cols, int64_t row0, int64_t nrows,
                                  float *dst);
void int8_dequantize_rows_bf16_ref(const int8_t *cb, const float *scb, int64_t cols, int64_t row0,
                                   int64_t nrows, uint16_t *dst);

/* Bytes an int8 weight (rows, cols) occupies: rows * cols + 4 * rows. */
static inline int64_t int8_nbytes(int64_t rows, int64_t cols) { return rows * cols + 4 * rows; }

#endif
